"""Nearest-class search against a float64 NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

from jaxscaleseg import knn, selection


def random_embeddings(seed, num_queries, num_classes, dim):
    """Unit class embeddings and pixel embeddings of norm in [0.3, 1]."""
    rng = np.random.default_rng(seed)
    classes = rng.normal(size=(num_classes, dim))
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    queries = rng.normal(size=(num_queries, dim))
    queries *= rng.uniform(0.3, 1.0, (num_queries, 1)) / np.linalg.norm(
        queries, axis=-1, keepdims=True
    )
    return queries.astype(np.float32), classes.astype(np.float32), rng


@pytest.mark.parametrize(
    "seed,num_queries,num_classes,dim,k,budget",
    [
        (0, 300, 5, 8, 4, knn.DEFAULT_MAX_BLOCK_BYTES),
        (1, 500, 19, 6, 7, knn.DEFAULT_MAX_BLOCK_BYTES),
        (2, 400, 150, 12, 7, knn.DEFAULT_MAX_BLOCK_BYTES),
        (3, 700, 1284, 16, 8, knn.DEFAULT_MAX_BLOCK_BYTES),
        (4, 257, 3000, 12, 7, knn.DEFAULT_MAX_BLOCK_BYTES),
        # Tiny budgets force row blocks and class column blocks with a running merge.
        (5, 333, 3000, 12, 7, 50_000),
        (6, 100, 97, 4, 3, 3_000),
    ],
)
@pytest.mark.parametrize("method", ["pyramid", "top_k"])
def test_nearest_classes_matches_reference(
    maybe_jit, seed, num_queries, num_classes, dim, k, budget, method
):
    queries, classes, rng = random_embeddings(seed, num_queries, num_classes, dim)
    exclude = rng.integers(0, num_classes, num_queries).astype(np.int32)
    search = maybe_jit(
        lambda q, e, x: knn.nearest_classes(
            q, e, k, exclude=x, max_block_bytes=budget, method=method
        )
    )
    distances, ids = search(queries, classes, exclude)
    ref_d, ref_ids = reference.nearest(queries, classes, k, exclude=exclude)
    np.testing.assert_allclose(np.asarray(distances), ref_d, rtol=1e-5, atol=1e-6)
    assert ids.dtype == jnp.int32 and ids.shape == (num_queries, k)
    assert not (np.asarray(ids) == exclude[:, None]).any()
    # Ids agree except where float32 cannot separate two distances.
    gaps = np.abs(np.diff(reference.nearest(queries, classes, k + 1, exclude=exclude)[0], axis=-1))
    clear = (gaps > 1e-5).all(-1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(ids)[clear], ref_ids[clear])
    assert (np.diff(np.asarray(distances), axis=-1) >= 0).all()


def test_nearest_classes_without_exclusion_and_leading_shape(maybe_jit):
    queries, classes, _ = random_embeddings(7, 2 * 5 * 7, 40, 8)
    search = maybe_jit(lambda q, e: knn.nearest_classes(q, e, 5))
    distances, ids = search(queries.reshape(2, 5, 7, 8), classes)
    assert distances.shape == ids.shape == (2, 5, 7, 5)
    ref_d, ref_ids = reference.nearest(queries, classes, 5)
    np.testing.assert_allclose(np.asarray(distances).reshape(-1, 5), ref_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1, 5), ref_ids)


@pytest.mark.parametrize("method", ["pyramid", "top_k"])
@pytest.mark.parametrize(
    "seed,num_classes,budget", [(8, 5, 1 << 20), (9, 3000, 1 << 26), (10, 2000, 20_000)]
)
def test_assign_matches_reference(maybe_jit, seed, num_classes, budget, method):
    queries, classes, _ = random_embeddings(seed, 600, num_classes, 12)
    assign = maybe_jit(lambda q, e: knn.assign(q, e, max_block_bytes=budget, method=method))
    ids = assign(queries, classes)
    ref = reference.distances(queries, classes).argmin(-1)
    assert ids.shape == (600,)
    np.testing.assert_array_equal(np.asarray(ids), ref)


def test_ties_give_distinct_ids():
    classes = np.tile(np.eye(4, dtype=np.float32), (5, 1))  # every class has 4 twins
    queries = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    _, ids = knn.nearest_classes(queries, classes, 7)
    for row in np.asarray(ids):
        assert len(set(row.tolist())) == 7


def test_bfloat16_queries_are_searched_in_float32():
    queries, classes, _ = random_embeddings(11, 64, 30, 8)
    distances, ids = knn.nearest_classes(jnp.asarray(queries, jnp.bfloat16), classes, 3)
    assert distances.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(queries, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(ids), reference.nearest(rounded, classes, 3)[1])


def test_no_gradient_flows_through_the_search():
    queries, classes, _ = random_embeddings(12, 16, 10, 4)
    grads = jax.grad(lambda q, e: knn.nearest_classes(q, e, 3)[0].sum(), argnums=(0, 1))(
        queries, classes
    )
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_bad_arguments_are_named():
    queries, classes, _ = random_embeddings(13, 4, 5, 4)
    with pytest.raises(ValueError, match="k=5 must be between 1 and 4"):
        knn.nearest_classes(queries, classes, 5, exclude=np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="dimension 3"):
        knn.nearest_classes(queries[:, :3], classes, 2)


def test_auto_budget_is_per_backend():
    # CPU keeps the cache-sized budget the CPU benchmarks were measured with.
    assert knn.resolve_block_bytes("auto", "cpu") == 8 * 2**20
    assert knn.resolve_block_bytes("auto", "gpu") == knn.resolve_block_bytes("auto", "tpu") == 2**30
    assert knn.resolve_block_bytes(12345, "gpu") == 12345
    assert knn.resolve_method("auto", "cpu") == "pyramid"
    assert knn.resolve_method("auto", "gpu") == "top_k"
    with pytest.raises(ValueError, match="max_block_bytes='big'"):
        knn.resolve_block_bytes("big")
    with pytest.raises(ValueError, match="method='heap'"):
        knn.resolve_method("heap")


def test_gpu_sized_blocks_never_reach_two_to_the_31_elements():
    budget = knn.resolve_block_bytes("auto", "gpu")
    # N = 8·512², C = 1 284: about 20 row blocks, not thousands.
    rows, cols = knn.block_shape(8 * 512**2, 1284, budget)
    assert cols == 1284 and -(-8 * 512**2 // rows) <= 32
    for num_classes in [19, 1284, 100_000, 10**7, 10**9]:
        for budget in [2**30, 2**36, 2**44]:  # up to budgets far above 2³¹ floats
            rows, cols = knn.block_shape(10**8, num_classes, budget)
            assert rows * cols <= knn.MAX_BLOCK_ELEMENTS < 2**31
            rows, cols = knn._selection_block_shape(10**8, num_classes, budget)
            assert rows * cols <= knn.MAX_BLOCK_ELEMENTS


def test_search_with_more_than_two_to_the_31_scores_matches_numpy():
    """70 000 queries × 40 000 classes (2.8·10⁹ scores, above int32) checked on sampled rows."""
    rng = np.random.default_rng(15)
    num_queries, num_classes, dim = 70_000, 40_000, 3
    assert num_queries * num_classes > 2**31
    queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
    classes = rng.normal(size=(num_classes, dim)).astype(np.float32)
    ids = np.asarray(jax.jit(lambda q, e: knn.nearest_class_ids(q, e, 2))(queries, classes))
    sample = np.concatenate([rng.choice(num_queries, 200, replace=False), [num_queries - 1]])
    q = queries[sample].astype(np.float64)
    squared = ((q[:, None, :] - classes[None].astype(np.float64)) ** 2).sum(-1)  # [201, C]
    want = np.sort(squared, axis=1)[:, :2]
    got = np.take_along_axis(squared, ids[sample], axis=1)
    # The search ranks by float32 scores ‖e‖² − 2q·e: equal up to their rounding (~16 float32
    # ulps of (‖q‖ + max‖e‖)²), whatever CPU; most ids agree exactly.
    scale = (np.linalg.norm(q, axis=1) + np.linalg.norm(classes, axis=1).max()) ** 2
    assert (np.abs(got - want) <= 1e-6 * scale[:, None]).all(), np.abs(got - want).max()
    assert (ids[sample, 0] != ids[sample, 1]).all()
    assert (ids[sample] == np.argsort(squared, axis=1, kind="stable")[:, :2]).mean() > 0.9


def test_block_shape_respects_budget():
    for num_classes in [19, 1284, 100_000, 10_000_000]:
        rows, cols = knn.block_shape(131072, num_classes, knn.DEFAULT_MAX_BLOCK_BYTES)
        assert rows * cols * 8 <= knn.DEFAULT_MAX_BLOCK_BYTES
        assert cols < num_classes or rows >= 32


def test_column_blocks_take_64_rows():
    """At 100 000 classes in the CPU budget the searches cut the table into column blocks of
    64 rows (the tile minima in two passes, ``knn._search_by_tile_minima``); whole-table
    blocks keep theirs."""
    budget = knn.resolve_block_bytes("auto", "cpu")
    rows, cols, _, _, tile = knn._block_plan("tile_minima", 8192, 100_000, budget, 32)
    assert (rows, tile) == (64, selection.tile_minima_size(100_000, 32))
    assert cols < 100_000 and cols % tile == 0 and rows * cols * 8 <= budget
    rows, cols, _, _, tile = knn._block_plan("pyramid", 8192, 100_000, budget, 8)
    assert rows == 64 and cols < 100_000 and tile is None and rows * cols * 8 <= budget
    rows, cols, _, _, _ = knn._block_plan("tile_minima", 8192, 1284, budget, 32)
    assert rows == knn.block_shape(8192, cols, budget)[0] > 64 and cols >= 1284


@pytest.mark.parametrize("num_classes", [1284, 100_000])
def test_compiled_search_memory_is_bounded(num_classes):
    """Temporaries of the search stay near the block budget whatever C is."""
    budget = 16 * 2**20
    queries = jax.ShapeDtypeStruct((2 * 128 * 128, 16), jnp.float32)
    classes = jax.ShapeDtypeStruct((num_classes, 16), jnp.float32)
    exclude = jax.ShapeDtypeStruct((2 * 128 * 128,), jnp.int32)
    fn = jax.jit(lambda q, e, x: knn.nearest_classes(q, e, 7, exclude=x, max_block_bytes=budget))
    memory = fn.lower(queries, classes, exclude).compile().memory_analysis()
    class_table = num_classes * 16 * 4
    # The block (within budget) plus copies of the padded class table and small per-row state.
    assert memory.temp_size_in_bytes < budget + 3 * class_table + 8 * 2**20, memory


@pytest.mark.parametrize("k,n", [(1, 5), (2, 40), (8, 8), (8, 37), (5, 3)])
def test_k_smallest_reduction_with_ties_and_infinities(maybe_jit, k, n):
    """The reduction-based selection: ascending, ties keep the earlier entry, -1 fills."""
    rng = np.random.default_rng(14)
    values = rng.integers(0, 6, (50, n)).astype(np.float32)  # many exact ties
    values[rng.random((50, n)) < 0.3] = np.inf
    values[0] = np.inf  # a row with nothing finite
    ids = rng.permutation(50 * n).reshape(50, n).astype(np.int32)
    got_values, got_ids = maybe_jit(lambda v, i: selection.k_smallest(v, i, k))(values, ids)
    order = np.argsort(values, axis=1, kind="stable")[:, :k]  # stable: earlier entry first
    want_values = np.take_along_axis(values, order, axis=1)
    want_ids = np.where(np.isinf(want_values), -1, np.take_along_axis(ids, order, axis=1))
    if k > n:
        pad = ((0, 0), (0, k - n))
        want_values = np.pad(want_values, pad, constant_values=np.inf)
        want_ids = np.pad(want_ids, pad, constant_values=-1)
    np.testing.assert_array_equal(np.asarray(got_values), want_values)
    np.testing.assert_array_equal(np.asarray(got_ids), want_ids)


def test_selection_blocks_stay_within_the_budget():
    for num_classes in [19, 1284, 10_000, 100_000]:
        for budget in [2**16, 8 * 2**20, knn.DEFAULT_MAX_BLOCK_BYTES]:
            rows, cols = knn._selection_block_shape(131072, num_classes, budget)
            assert rows * cols * 8 <= budget
            assert cols == num_classes or rows <= knn._COLUMN_BLOCK_ROWS


@pytest.mark.parametrize("method", ["pyramid", "top_k", "tile_minima"])
@pytest.mark.parametrize("budget", [knn.DEFAULT_MAX_BLOCK_BYTES, 20_000])
def test_search_on_raw_rows_normalises_them(maybe_jit, method, budget):
    # Raw rows of norms 0.2..5: the search must rank the unit rows, one table or column blocks.
    queries, unit, rng = random_embeddings(11, 300, 700, 8)
    raw = unit * rng.uniform(0.2, 5.0, (700, 1)).astype(np.float32)
    labels = rng.integers(0, 700, 300).astype(np.int32)

    def search(q, e, x):
        return knn.nearest_class_ids(
            q, e, 5, exclude=x, max_block_bytes=budget, method=method, normalize_classes=True
        )

    ids = np.asarray(maybe_jit(search)(queries, raw, labels))
    _, ref_ids = reference.nearest(queries, unit, 5, exclude=labels)
    np.testing.assert_array_equal(ids, ref_ids)
    # Unnormalised, the long rows would rank differently.
    plain = np.asarray(knn.nearest_class_ids(queries, raw, 5, exclude=labels))
    assert (plain != ref_ids).any()


@pytest.mark.parametrize("k,n", [(1, 128), (8, 256), (8, 1280), (3, 384), (16, 512), (2, 128)])
def test_small_k_selections_are_a_stable_sort(maybe_jit, k, n):
    """Rounds of minima, tile minima, tiled top-k: ascending (value, position), as lax.top_k."""
    rng = np.random.default_rng(16)
    values = rng.integers(0, 12, (40, n)).astype(np.float32)  # many exact ties
    values[1] = 3.0  # a row of one value
    values[2, : n // 2] = np.inf  # infinities in the first tiles
    order = np.argsort(values, axis=1, kind="stable")[:, :k]
    tile = selection.tile_minima_size(n, k)
    for select in (
        selection.top_k_smallest,
        selection.smallest_k_by_rounds,
        selection.smallest_k_by_tiles,
        functools.partial(selection.smallest_k_by_tile_minima, tile=tile),
    ):
        got_values, positions = maybe_jit(lambda v, select=select: select(v, k))(values)
        np.testing.assert_array_equal(np.asarray(positions), order, err_msg=str(select))
        np.testing.assert_array_equal(
            np.asarray(got_values), np.take_along_axis(values, order, axis=1)
        )


def test_rounds_skip_nan_and_fill_missing_slots_with_minus_one():
    values = np.array([[np.nan, 2.0, np.nan, 1.0, np.inf]], np.float32)
    got_values, positions = selection.smallest_k_by_rounds(values, 4)
    np.testing.assert_array_equal(np.asarray(positions), [[3, 1, 4, -1]])
    np.testing.assert_array_equal(np.asarray(got_values), [[1.0, 2.0, np.inf, np.inf]])


@pytest.mark.parametrize("method", ["min_rounds", "tile_minima", "tiled_top_k"])
@pytest.mark.parametrize("budget", [knn.DEFAULT_MAX_BLOCK_BYTES, 50_000])
def test_gpu_selections_give_top_k_ids(method, budget):
    """Same ids as the top_k path (whole table and column blocks), and the float64 reference.

    Every class has a twin (the same row), so exact ties are everywhere: the lower id first.
    """
    queries, classes, rng = random_embeddings(17, 333, 700, 8)
    classes = np.concatenate([classes, classes])  # class c + 700 is class c's twin
    exclude = rng.integers(0, 1400, 333).astype(np.int32)

    def search(q, e, x, method):
        return knn.nearest_class_ids(q, e, 7, exclude=x, max_block_bytes=budget, method=method)

    search = jax.jit(search, static_argnums=3)
    ids = np.asarray(search(queries, classes, exclude, method))
    np.testing.assert_array_equal(ids, np.asarray(search(queries, classes, exclude, "top_k")))
    ref_d, ref_ids = reference.nearest(queries, classes, 7, exclude=exclude)
    # Twins tie exactly in float64 too, so the references' stable order is the lower id first;
    # rows whose ranking float32 cannot separate from another class are left out.
    gaps = np.diff(reference.nearest(queries, classes[:700], 5)[0], axis=-1)
    clear = (gaps > 1e-5).all(-1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ids[clear], ref_ids[clear])


@pytest.mark.parametrize("method", knn.SEARCH_METHODS[1:])
def test_every_method_keeps_blocks_below_two_to_the_31_elements(method):
    """The padded block (tiles, pyramid groups) stays below 2³¹ scores with any budget."""
    for num_classes in [19, 130, 1284, 100_000, 10**7]:
        for budget in [2**30, 2**36, 2**44]:
            rows, cols, _, _, _ = knn._block_plan(method, 10**8, num_classes, budget, 8)
            assert rows * cols < 2**31, (num_classes, budget, rows, cols)
            if method == "tiled_top_k" and num_classes > selection.TILE_COLUMNS:
                assert cols % selection.TILE_COLUMNS == 0
            if method == "tile_minima":
                assert cols % selection.tile_minima_size(num_classes, 8) == 0


def test_config_selection_reaches_the_step_and_is_checked():
    from jaxscaleseg import config_schema, steps  # noqa: PLC0415

    config = config_schema.base_config()
    config.loss.selection = "min_rounds"
    config_schema.validate(config)
    assert steps.LossSpec.from_config(config.loss).selection == "min_rounds"
    config.loss.selection = "heap"
    with pytest.raises(config_schema.ConfigError, match="loss.selection must be one of"):
        config_schema.validate(config)
