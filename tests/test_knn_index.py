"""The two-level approximate class search: its index, its search, its recall."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from test_knn import random_embeddings

from jaxscaleseg import knn, knn_index, losses


def test_index_is_a_balanced_deterministic_partition():
    _, classes, _ = random_embeddings(0, 1, 300, 8)
    index = jax.jit(knn_index.build_index, static_argnames="num_cells")(classes, num_cells=16)
    assert index.members.shape == (16, 19) and index.centroids.shape == (16, 8)
    members = np.asarray(index.members)
    np.testing.assert_array_equal(np.sort(members[members >= 0]), np.arange(300))
    assert (members >= 0).sum(axis=1).min() >= 19 - 4  # the 4 padding slots at the end
    again = knn_index.build_index(classes, num_cells=16)
    np.testing.assert_array_equal(np.asarray(again.members), members)
    for cell in range(16):
        rows = classes[members[cell][members[cell] >= 0]].astype(np.float64)
        np.testing.assert_allclose(np.asarray(index.centroids[cell]), rows.mean(0), atol=1e-6)


def test_index_finds_well_separated_clusters():
    """Four tight clusters of 25 classes each, far apart: each cell is one cluster."""
    rng = np.random.default_rng(1)
    centres = 10.0 * np.eye(4, 6)
    labels = rng.permutation(np.repeat(np.arange(4), 25))
    classes = (centres[labels] + 0.01 * rng.normal(size=(100, 6))).astype(np.float32)
    members = np.asarray(knn_index.build_index(classes, num_cells=4).members)
    for cell in members:
        assert len(set(labels[cell])) == 1


def numpy_approximate(queries, classes, members, centroids, k, probes, exclude):
    """float64: exact top-k (by distance) among the members of each query's probed cells."""
    _, cells = reference.nearest(queries, centroids, probes)
    out = []
    for row, query in enumerate(queries):
        ids = members[cells[row]].reshape(-1)
        ids = ids[(ids >= 0) & (ids != exclude[row])]
        dist = np.linalg.norm(classes[ids].astype(np.float64) - query, axis=-1)
        out.append(ids[np.argsort(dist, kind="stable")[:k]])
    return np.stack(out)


@pytest.mark.parametrize("probes,budget", [(3, knn.DEFAULT_MAX_BLOCK_BYTES), (2, 20_000)])
def test_approximate_search_matches_numpy_over_the_probed_cells(probes, budget):
    queries, classes, rng = random_embeddings(2, 203, 500, 8)
    exclude = rng.integers(0, 500, 203)
    index = knn_index.build_index(classes, num_cells=16)
    fn = jax.jit(
        knn_index.approximate_nearest_class_ids,
        static_argnames=("k", "probes", "max_block_bytes", "normalize_classes"),
    )
    got = fn(queries, classes, index, k=5, probes=probes, exclude=exclude, max_block_bytes=budget)
    want = numpy_approximate(
        queries,
        classes,
        np.asarray(index.members),
        np.asarray(index.centroids),
        5,
        probes,
        exclude,
    )
    np.testing.assert_array_equal(np.asarray(got), want)


def test_probing_every_cell_is_the_exact_search_and_rows_are_read_now():
    """All cells probed: the exact ids, also for a table that moved since the index was built
    and for raw rows normalised where read."""
    queries, classes, rng = random_embeddings(3, 150, 120, 6)
    index = knn_index.build_index(classes, num_cells=8)
    moved = classes + 0.3 * rng.normal(size=classes.shape).astype(np.float32)
    moved *= rng.uniform(0.5, 2.0, (120, 1)).astype(np.float32)
    got = knn_index.approximate_nearest_class_ids(
        queries.reshape(3, 50, 6), moved, index, 4, probes=8, normalize_classes=True
    )
    want = knn.nearest_class_ids(queries, moved, 4, normalize_classes=True)
    np.testing.assert_array_equal(np.asarray(got).reshape(-1, 4), np.asarray(want))


def test_recall_at_k_counts_each_exact_id_once():
    exact = jnp.array([[1, 2, 3], [4, 5, 6]])
    approx = jnp.array([[3, 1, 1], [7, 8, 9]])
    assert float(knn_index.recall_at_k(approx, exact)) == pytest.approx(2 / 6)
    valid = jnp.array([True, False])
    assert float(knn_index.recall_at_k(approx, exact, valid)) == pytest.approx(2 / 3)


def test_search_quality_is_perfect_with_every_cell_and_worse_with_one():
    pixels, classes, rng = random_embeddings(4, 256, 200, 8)
    raw = classes * rng.uniform(0.5, 2.0, (200, 1)).astype(np.float32)
    labels = rng.integers(0, 200, 256).astype(np.int32)
    labels[:20] = -1
    index = knn_index.build_index(raw, num_cells=16, normalize_classes=True)
    quality = jax.jit(knn_index.search_quality, static_argnames=("probes", "sample"))
    full = quality(pixels, labels, raw, index, probes=16, sample=128)
    assert float(full["recall"]) == 1.0 and float(full["ess_relative_error"]) == 0.0
    one = quality(pixels, labels, raw, index, probes=1, sample=128)
    # Random vectors have no structure: one cell of 16 misses most neighbours, and the loss
    # over farther negatives is lower.
    assert 0.0 < float(one["recall"]) < 0.6
    assert float(one["ess_relative_error"]) > 0.01


def test_neighbor_ids_given_to_the_objective_give_the_searched_loss():
    pixels, classes, rng = random_embeddings(5, 64, 30, 6)
    labels = rng.integers(0, 30, 64).astype(np.int32)
    ids = knn.nearest_class_ids(pixels, classes, 3, exclude=labels)
    given = losses.ess_objective(pixels, labels, classes, num_neighbors=3, neighbor_ids=ids)
    searched = losses.ess_objective(pixels, labels, classes, num_neighbors=3)
    # Same ids, same arithmetic: equal up to float32 reassociation.
    np.testing.assert_allclose(float(given[0]), float(searched[0]), rtol=1e-6)
    with pytest.raises(ValueError, match="neighbor_ids"):
        losses.ess_objective(pixels, labels, classes, num_neighbors=3, neighbor_ids=ids[:, :2])


def test_refresh_index_rebuilds_on_multiples_of_every():
    _, classes, rng = random_embeddings(6, 1, 64, 4)
    other = rng.normal(size=(64, 4)).astype(np.float32)
    old = knn_index.build_index(classes, num_cells=8)
    fresh = knn_index.build_index(other, num_cells=8)
    refresh = jax.jit(knn_index.refresh_index, static_argnames=("every", "num_cells"))
    kept = refresh(old, other, jnp.int32(5), every=3, num_cells=8)
    rebuilt = refresh(old, other, jnp.int32(6), every=3, num_cells=8)
    np.testing.assert_array_equal(np.asarray(kept.members), np.asarray(old.members))
    np.testing.assert_array_equal(np.asarray(rebuilt.members), np.asarray(fresh.members))
    assert not np.array_equal(np.asarray(old.members), np.asarray(fresh.members))


def test_search_modes_and_bad_arguments_are_named():
    assert knn_index.resolve_search("auto", 10**6) == (
        "exact" if knn_index.AUTO_APPROXIMATE_MIN_CLASSES is None else "approximate"
    )
    assert knn_index.resolve_search("approximate", 5) == "approximate"
    # With unit-length pixels in the loss, the certified search from AUTO_CERTIFIED_MIN_CLASSES on.
    threshold = knn_index.AUTO_CERTIFIED_MIN_CLASSES
    assert knn_index.resolve_search("auto", threshold, unit_pixels=True) == "certified"
    assert knn_index.resolve_search("auto", threshold - 1, unit_pixels=True) == "exact"
    assert knn_index.resolve_search("auto", 10**6, unit_pixels=False) == "exact"
    assert knn_index.resolve_search("exact", 10**6, unit_pixels=True) == "exact"
    with pytest.raises(ValueError, match="loss.search='fast'"):
        knn_index.resolve_search("fast", 5)
    with pytest.raises(ValueError, match="num_cells=6"):
        knn_index.index_shape(100, 6)
    _, classes, _ = random_embeddings(7, 1, 40, 4)
    index = knn_index.build_index(classes, num_cells=4)
    with pytest.raises(ValueError, match="probes=5"):
        knn_index.approximate_nearest_class_ids(classes, classes, index, 2, probes=5)
    with pytest.raises(ValueError, match="k=10"):
        knn_index.approximate_nearest_class_ids(classes, classes, index, 10, probes=1)


def test_train_step_with_the_approximate_search_carries_its_index():
    """``loss.search = "approximate"``: the index is built at init, rebuilt on steps 0 and 2
    (``index_refresh_every = 2``) from the table the step reads, checkpointed with the state;
    probing every cell gives the exact step's loss."""
    from test_training import _state_and_batch, tiny_config

    from jaxscaleseg import steps, workdir

    overrides = {"loss.search": "approximate", "loss.index_refresh_every": 2}
    config = tiny_config(**overrides, **{"loss.search_probes": 4})  # 30 classes: 4 cells
    state, batch = _state_and_batch(config)
    assert set(workdir.state_tree(state)["class_index"]) == {"centroids", "members"}
    spec = steps.LossSpec.from_config(config.loss)
    step = jax.jit(steps.train_step, static_argnames="spec")
    exact_state, _ = _state_and_batch(tiny_config())
    exact_spec = steps.LossSpec.from_config(tiny_config().loss)
    key = jax.random.key(1)
    tables = []
    for _ in range(3):
        tables.append(state.params["class_embedding"])
        state, out = step(state, batch, key, spec=spec)
        exact_state, exact_out = step(exact_state, batch, key, spec=exact_spec)
        # Every cell probed: the exact negatives, so the same loss (float32 reassociation).
        np.testing.assert_allclose(float(out["loss"]), float(exact_out["loss"]), rtol=1e-5)
    want = knn_index.build_index(tables[2], num_cells=4, normalize_classes=True)
    np.testing.assert_array_equal(np.asarray(state.class_index["members"]), want.members)
    from jaxscaleseg import config_schema
    from jaxscaleseg.errors import ConfigError

    with pytest.raises(ConfigError, match="search_probes=5"):
        config_schema.validate(tiny_config(**overrides, **{"loss.search_probes": 5}))
