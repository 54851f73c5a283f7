"""ESS loss, separation loss and the softmax baseline against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from test_knn import random_embeddings

from jaxscaleseg import class_rows, knn, loss_plan, losses, negatives
from jaxscaleseg.labels import check_labels


def ess_and_grads(num_neighbors, temperature, **kwargs):
    def loss(pixels, labels, classes):
        return losses.ess_loss(
            pixels,
            labels,
            classes,
            num_neighbors=num_neighbors,
            temperature=temperature,
            **kwargs,
        )

    return jax.value_and_grad(loss, argnums=(0, 2))


@pytest.mark.parametrize(
    "seed,num_pixels,num_classes,dim,k,temperature,chunk",
    [
        (0, 200, 5, 4, 2, 20.0, 16384),
        (1, 300, 19, 6, 7, 20.0, 64),
        (2, 256, 150, 12, 7, 10.0, 100),
        (3, 400, 1284, 16, 8, 20.0, 16384),
        (4, 150, 3000, 12, 7, 5.0, 37),
    ],
)
def test_ess_loss_and_gradients_match_reference(
    maybe_jit, seed, num_pixels, num_classes, dim, k, temperature, chunk
):
    pixels, classes, rng = random_embeddings(seed, num_pixels, num_classes, dim)
    # Targets near their pixel (inside the k nearest) and arbitrary (usually outside).
    labels = rng.integers(0, num_classes, num_pixels)
    near = rng.random(num_pixels) < 0.5
    labels[near] = reference.nearest(pixels[near], classes, 1)[1][:, 0]
    labels[rng.random(num_pixels) < 0.2] = -1
    _, ref_neighbors = reference.nearest(pixels, classes, k)
    inside = (ref_neighbors == labels[:, None]).any(-1) & (labels >= 0)
    outside = ~inside & (labels >= 0)
    assert inside.any() and outside.any()
    labels = labels.reshape(2, -1).astype(np.int32)
    pixels = pixels.reshape(2, -1, dim)

    fn = maybe_jit(ess_and_grads(k, temperature, pixels_per_chunk=chunk))
    loss, (grad_pixels, grad_classes) = fn(pixels, labels, classes)
    ref_loss, ref_gp, ref_gc = reference.ess_loss_and_grads(
        pixels.reshape(-1, dim), labels.reshape(-1), classes, k, temperature
    )
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    scale = np.abs(ref_gp).max()
    np.testing.assert_allclose(
        np.asarray(grad_pixels).reshape(-1, dim), ref_gp, rtol=1e-5, atol=1e-5 * scale
    )
    scale = np.abs(ref_gc).max()
    np.testing.assert_allclose(np.asarray(grad_classes), ref_gc, rtol=1e-5, atol=1e-5 * scale)
    # Only the gathered rows receive gradient.
    used = np.zeros(num_classes, bool)
    valid = labels.reshape(-1) >= 0
    used[labels.reshape(-1)[valid]] = True
    used[
        reference.nearest(
            pixels.reshape(-1, dim)[valid], classes, k, exclude=labels.reshape(-1)[valid]
        )[1]
    ] = True
    assert (np.abs(np.asarray(grad_classes))[~used] == 0).all()


@pytest.mark.parametrize("seed,num_classes,dim,k,chunk", [(8, 6, 4, 3, 64), (9, 40, 8, 7, 4096)])
def test_original_negative_rule_matches_reference(maybe_jit, seed, num_classes, dim, k, chunk):
    """``negatives="original"``: the target among the k nearest becomes target − 1 (0 twice)."""
    pixels, classes, rng = random_embeddings(seed, 240, num_classes, dim)
    labels = rng.integers(0, num_classes, 240)
    nearest_class = reference.nearest(pixels, classes, 1)[1][:, 0]
    near = rng.random(240) < 0.6
    labels[near] = nearest_class[near]
    # Class 0 as a target inside its pixel's k nearest: the case where it enters twice.
    zero_pixels = np.flatnonzero(nearest_class == 0)[:10]
    labels[zero_pixels] = 0
    labels[rng.random(240) < 0.1] = -1
    _, ref_neighbors = reference.nearest(pixels, classes, k)
    inside = (ref_neighbors == labels[:, None]).any(-1) & (labels >= 0)
    assert inside.any() and (inside & (labels == 0)).any() and (inside & (labels > 0)).any()

    fn = maybe_jit(ess_and_grads(k, 20.0, pixels_per_chunk=chunk, negatives="original"))
    loss, (grad_pixels, grad_classes) = fn(pixels, labels.astype(np.int32), classes)
    ref_loss, ref_gp, ref_gc = reference.ess_loss_and_grads(
        pixels, labels, classes, k, 20.0, negatives="original"
    )
    # float32 against float64: sums of a few hundred terms of size ~1 keep ~1e-6 relative.
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    scale = np.abs(ref_gp).max()
    np.testing.assert_allclose(np.asarray(grad_pixels), ref_gp, rtol=1e-5, atol=1e-5 * scale)
    scale = np.abs(ref_gc).max()
    np.testing.assert_allclose(np.asarray(grad_classes), ref_gc, rtol=1e-5, atol=1e-5 * scale)
    # The rules differ exactly where a target is among its pixel's k nearest classes.
    ours, _, _ = reference.ess_loss_and_grads(pixels, labels, classes, k, 20.0)
    assert abs(ours - ref_loss) > 1e-3


def test_original_rule_replaces_the_target_only():
    neighbors = jnp.asarray([[3, 1, 2], [0, 4, 5], [6, 7, 8]], jnp.int32)
    targets = jnp.asarray([1, 0, 9], jnp.int32)
    out = negatives.original_rule_negatives(neighbors, targets)
    np.testing.assert_array_equal(np.asarray(out), [[3, 0, 2], [0, 4, 5], [6, 7, 8]])


def test_unknown_negative_rule_is_named():
    with pytest.raises(ValueError, match="negatives='nearest'"):
        losses.ess_objective(
            jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2), jnp.int32), jnp.eye(4, 3),
            num_neighbors=2, negatives="nearest",
        )  # fmt: skip


@pytest.mark.parametrize("seed,num_classes", [(5, 5), (6, 12), (7, 40)])
def test_all_neighbors_is_the_full_softmax(maybe_jit, seed, num_classes):
    pixels, classes, rng = random_embeddings(seed, 120, num_classes, 6)
    labels = rng.integers(-1, num_classes, 120).astype(np.int32)
    ess = maybe_jit(lambda p, y, e: losses.ess_loss(p, y, e, num_neighbors=num_classes - 1))
    logits = -20.0 * jnp.linalg.norm(pixels[:, None, :] - classes[None], axis=-1)
    full = maybe_jit(losses.softmax_cross_entropy)(logits, labels)
    np.testing.assert_allclose(float(ess(pixels, labels, classes)), float(full), rtol=1e-5)


@pytest.mark.parametrize(
    "seed,num_classes,dim,margin",
    [(0, 5, 3, 1.5), (1, 300, 4, 0.3), (2, 3000, 8, 0.6), (3, 50, 16, 0.2)],
)
def test_separation_loss_and_gradient_match_reference(maybe_jit, seed, num_classes, dim, margin):
    _, classes, _ = random_embeddings(seed, 1, num_classes, dim)
    fn = maybe_jit(jax.value_and_grad(lambda e: losses.separation_loss(e, margin=margin)))
    loss, grad = fn(classes)
    ref_loss, ref_grad = reference.separation_loss_and_grad(classes, margin)
    if dim < 16:
        assert ref_loss > 0  # the margin is active for these settings
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-7)
    scale = max(np.abs(ref_grad).max(), 1e-12)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-5 * scale)


def test_separation_loss_with_class_blocks_matches_default():
    _, classes, _ = random_embeddings(4, 1, 500, 4)
    small = losses.separation_loss(classes, margin=0.4, max_block_bytes=20_000)
    default = losses.separation_loss(classes, margin=0.4)
    np.testing.assert_allclose(float(small), float(default), rtol=1e-6)


def test_softmax_cross_entropy_matches_reference(maybe_jit):
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(2, 7, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(-1, 11, (2, 7, 5)).astype(np.int32)
    loss, grad = maybe_jit(jax.value_and_grad(losses.softmax_cross_entropy))(logits, labels)
    flat = logits.reshape(-1, 11).astype(np.float64)
    y = labels.reshape(-1)
    valid = y >= 0
    lse = np.log(np.exp(flat).sum(-1))
    ref = (lse - flat[np.arange(len(y)), np.maximum(y, 0)])[valid].mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    prob = np.exp(flat - lse[:, None])
    prob[np.arange(len(y)), np.maximum(y, 0)] -= 1
    ref_grad = np.where(valid[:, None], prob, 0) / valid.sum()
    np.testing.assert_allclose(np.asarray(grad).reshape(-1, 11), ref_grad, atol=1e-7)


def test_everything_ignored_gives_zero_and_finite_gradients(maybe_jit):
    pixels, classes, _ = random_embeddings(10, 64, 20, 8)
    labels = np.full(64, -1, np.int32)
    loss, grads = maybe_jit(ess_and_grads(7, 20.0))(pixels, labels, classes)
    assert float(loss) == 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    logits = np.zeros((64, 20), np.float32)
    ce, ce_grad = maybe_jit(jax.value_and_grad(losses.softmax_cross_entropy))(logits, labels)
    assert float(ce) == 0.0 and np.isfinite(np.asarray(ce_grad)).all()


def test_gradients_finite_when_pixel_equals_a_class(maybe_jit):
    _, classes, _ = random_embeddings(11, 1, 10, 4)
    # Pixel 0 sits on its target, pixel 1 on a negative, pixel 2 on both of a duplicated pair.
    classes[3] = classes[2]
    pixels = np.stack([classes[0], classes[5], classes[2]])
    labels = np.array([0, 1, 2], np.int32)
    loss, grads = maybe_jit(ess_and_grads(4, 20.0))(pixels, labels, classes)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    sep, sep_grad = maybe_jit(jax.value_and_grad(losses.separation_loss))(classes)
    assert np.isfinite(float(sep)) and np.isfinite(np.asarray(sep_grad)).all()


def test_bfloat16_pixel_embeddings_are_accepted(maybe_jit):
    pixels, classes, rng = random_embeddings(12, 128, 30, 8)
    labels = rng.integers(0, 30, 128).astype(np.int32)
    half = jnp.asarray(pixels, jnp.bfloat16)
    fn = maybe_jit(ess_and_grads(7, 20.0))
    loss, (grad_pixels, _) = fn(half, labels, classes)
    assert grad_pixels.dtype == jnp.bfloat16
    rounded = np.asarray(half.astype(jnp.float32))
    ref_loss, _, _ = reference.ess_loss_and_grads(rounded, labels, classes, 7, 20.0)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


def test_out_of_range_labels_make_the_jitted_loss_nan():
    pixels, classes, _ = random_embeddings(13, 16, 6, 4)
    labels = np.zeros(16, np.int32)
    labels[3] = 6
    ess = jax.jit(lambda p, y, e: losses.ess_loss(p, y, e, num_neighbors=3))
    assert np.isnan(float(ess(pixels, labels, classes)))
    logits = np.zeros((16, 6), np.float32)
    assert np.isnan(float(jax.jit(losses.softmax_cross_entropy)(logits, labels)))


def test_check_labels_names_source_and_values():
    labels = np.array([[0, 1, -1], [300, 5, 300]])
    with pytest.raises(ValueError, match=r"in img_0007\.png.*0\.\.4.*5 \(1 px\), 300 \(2 px\)"):
        check_labels(labels, 5, source="img_0007.png")
    check_labels(np.array([0, 4, -1]), 5)
    with pytest.raises(ValueError, match="must be integers"):
        check_labels(np.array([0.5]), 5)


def test_value_and_grad_memory_grows_less_than_the_class_table():
    """Compiled temporaries at N = 2·256·256, D = 16, k = 7: C = 1284 vs C = 100 000."""
    dim = 16

    def temp_bytes(num_classes):
        def objective(pixels, labels, classes):
            return losses.ess_loss(pixels, labels, classes) + losses.separation_loss(classes)

        fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 2)))
        args = (
            jax.ShapeDtypeStruct((2, 256, 256, dim), jnp.float32),
            jax.ShapeDtypeStruct((2, 256, 256), jnp.int32),
            jax.ShapeDtypeStruct((num_classes, dim), jnp.float32),
        )
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1284), temp_bytes(100_000)
    allowed = 16 * 2**20 + 8 * (100_000 - 1284) * dim * 4
    assert large - small < allowed, (small, large, allowed)


def test_separation_gradient_scatter_in_chunks(monkeypatch):
    """The hand-written backward pass scatters in chunks; the last one overlaps the one before."""
    _, classes, _ = random_embeddings(14, 1, 300, 4)
    monkeypatch.setattr(
        losses, "_CLASSES_PER_CHUNK", 64
    )  # 300 = 4 chunks of 64 + an overlapping one
    loss, grad = jax.value_and_grad(lambda e: losses.separation_loss(e, margin=0.3))(classes)
    ref_loss, ref_grad = reference.separation_loss_and_grad(classes, 0.3)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    scale = np.abs(ref_grad).max()
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-5 * scale)


def objective_reference(pixels, labels, raw, k, temperature, margin, weight, normalize=True):
    """float64 ESS + weight·separation on the unit rows of ``raw``, gradients by the chain rule
    (through the normalisation when ``normalize``, else taking ``raw`` as the unit rows).

    Returns ``(total, ess, separation, d/dpixels, d/draw)``.
    """
    raw = np.asarray(raw, np.float64)
    norms = np.linalg.norm(raw, axis=-1, keepdims=True)
    unit = raw / norms
    ess, grad_pixels, grad_unit = reference.ess_loss_and_grads(pixels, labels, unit, k, temperature)
    separation, grad_separation = reference.separation_loss_and_grad(unit, margin)
    grad_unit = grad_unit + weight * grad_separation
    if not normalize:
        return ess + weight * separation, ess, separation, grad_pixels, grad_unit
    along = (unit * grad_unit).sum(-1, keepdims=True)
    grad_raw = (grad_unit - unit * along) / norms
    return ess + weight * separation, ess, separation, grad_pixels, grad_raw


@pytest.mark.parametrize(
    "seed,num_classes,dim,k,margin,chunk,class_chunk,budget",
    [
        (20, 5, 4, 3, 1.5, 16384, 8192, knn.DEFAULT_MAX_BLOCK_BYTES),
        (21, 150, 8, 7, 0.6, 64, 32, knn.DEFAULT_MAX_BLOCK_BYTES),
        (22, 3000, 12, 7, 0.6, 100, 700, 40_000),
    ],
)
@pytest.mark.parametrize("normalize", [True, False])
def test_ess_objective_matches_reference(
    maybe_jit, monkeypatch, seed, num_classes, dim, k, margin, chunk, class_chunk, budget, normalize
):
    """The one-pass objective (raw or unit table) against float64, in chunks and blocks."""
    monkeypatch.setattr(losses, "_CLASSES_PER_CHUNK", class_chunk)
    pixels, unit, rng = random_embeddings(seed, 300, num_classes, dim)
    # Raw rows of norms 0.3..3 (the learnable table), or the unit rows themselves.
    table = unit * rng.uniform(0.3, 3.0, (num_classes, 1)).astype(np.float32) if normalize else unit
    labels = rng.integers(0, num_classes, 300).astype(np.int32)
    near = rng.random(300) < 0.5
    labels[near] = reference.nearest(pixels[near], unit, 1)[1][:, 0]
    labels[rng.random(300) < 0.2] = -1
    weight = 0.7

    def objective(p, y, e):
        return losses.ess_objective(
            p,
            y,
            e,
            num_neighbors=k,
            margin=margin,
            separation_weight=weight,
            normalize_classes=normalize,
            max_block_bytes=budget,
            pixels_per_chunk=chunk,
        )

    fn = maybe_jit(jax.value_and_grad(objective, argnums=(0, 2), has_aux=True))
    (total, parts), (grad_pixels, grad_table) = fn(
        pixels.reshape(3, 100, dim), labels.reshape(3, 100), table
    )
    ref_total, ref_ess, ref_sep, ref_gp, ref_gt = objective_reference(
        pixels, labels, table, k, 20.0, margin, weight, normalize
    )
    assert ref_sep > 0  # the margin is active
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)
    np.testing.assert_allclose(float(parts["ess"]), ref_ess, rtol=1e-5)
    np.testing.assert_allclose(float(parts["separation"]), ref_sep, rtol=1e-5)
    scale = np.abs(ref_gp).max()
    np.testing.assert_allclose(
        np.asarray(grad_pixels).reshape(-1, dim), ref_gp, rtol=1e-5, atol=1e-5 * scale
    )
    scale = np.abs(ref_gt).max()
    np.testing.assert_allclose(np.asarray(grad_table), ref_gt, rtol=1e-5, atol=1e-5 * scale)


def test_ess_objective_without_separation_reports_zero():
    pixels, classes, rng = random_embeddings(23, 64, 40, 6)
    labels = rng.integers(0, 40, 64).astype(np.int32)
    total, parts = losses.ess_objective(pixels, labels, classes, separation_weight=0.0)
    assert float(parts["separation"]) == 0.0
    np.testing.assert_allclose(float(total), float(losses.ess_loss(pixels, labels, classes)))


def test_loss_plan_by_backend():
    # CPU: exactly the sizes the CPU benchmarks were measured with.
    cpu = loss_plan.loss_plan("cpu", 1284)
    assert cpu == loss_plan.LossPlan(8 * 2**20, 8192, "scatter", "pyramid")
    # GPU/TPU: GiB blocks, 2¹⁸-pixel chunks, top_k, and no contended atomics.
    for backend in ("gpu", "tpu"):
        assert loss_plan.loss_plan(backend, 1284) == loss_plan.LossPlan(
            2**30, 2**18, "sorted", "top_k"
        )
        assert loss_plan.loss_plan(backend, 100_000).table_gradient == "sorted"
    given = loss_plan.loss_plan(
        "gpu", 19, max_block_bytes=2**20, pixels_per_chunk=100, table_gradient="scatter"
    )
    assert given == loss_plan.LossPlan(2**20, 100, "scatter", "top_k")
    with pytest.raises(ValueError, match="pixels_per_chunk='many'"):
        loss_plan.loss_plan("cpu", 19, pixels_per_chunk="many")


@pytest.mark.parametrize("table_gradient", ["scatter", "sorted", "matmul", "segment"])
@pytest.mark.parametrize("search_method", ["pyramid", "top_k"])
@pytest.mark.parametrize("num_classes", [5, 150])
def test_table_gradients_and_searches_match_reference(table_gradient, search_method, num_classes):
    """Every table gradient, with either search, gives the float64 values and gradients.

    The budget gives the matmul blocks of 78 classes (40 000 bytes / (4 · 128 pixels)), so at
    C = 150 the last block overlaps the first; at C = 5 many pixels share each class.
    """
    pixels, unit, rng = random_embeddings(30 + num_classes, 500, num_classes, 6)
    raw = unit * rng.uniform(0.5, 2.0, (num_classes, 1)).astype(np.float32)
    labels = rng.integers(-1, num_classes, 500).astype(np.int32)
    k = min(4, num_classes - 1)

    def objective(p, y, e):
        return losses.ess_objective(
            p,
            y,
            e,
            num_neighbors=k,
            margin=1.5,
            normalize_classes=True,
            max_block_bytes=40_000,
            pixels_per_chunk=128,
            table_gradient=table_gradient,
            search_method=search_method,
        )[0]

    loss, (grad_pixels, grad_table) = jax.jit(jax.value_and_grad(objective, argnums=(0, 2)))(
        pixels, labels, raw
    )
    ref_total, _, _, ref_gp, ref_gt = objective_reference(pixels, labels, raw, k, 20.0, 1.5, 1.0)
    # float32 sums of a few hundred terms: 1e-5 relative covers any CPU's summation order.
    np.testing.assert_allclose(float(loss), ref_total, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grad_pixels), ref_gp, rtol=1e-5, atol=1e-5 * np.abs(ref_gp).max()
    )
    np.testing.assert_allclose(
        np.asarray(grad_table), ref_gt, rtol=1e-5, atol=1e-5 * np.abs(ref_gt).max()
    )


@pytest.mark.parametrize(
    "table_gradient,selection",
    [
        ("auto", "auto"),
        ("matmul", "auto"),
        ("segment", "auto"),
        # The small-k selections offered for GPUs (C = 300: padded to whole tiles).
        ("auto", "min_rounds"),
        ("auto", "tile_minima"),
        ("auto", "tiled_top_k"),
    ],
)
def test_gpu_sized_plan_runs_on_cpu_and_matches_reference(table_gradient, selection):
    """The plan a GPU gets (1 GiB blocks, 2¹⁸-pixel chunks, top_k; its table gradient), run here."""
    plan = loss_plan.loss_plan("gpu", 300, table_gradient=table_gradient, search_method=selection)
    assert plan.table_gradient == ("sorted" if table_gradient == "auto" else table_gradient)
    assert plan.search_method == ("top_k" if selection == "auto" else selection)
    pixels, unit, rng = random_embeddings(50, 2000, 300, 8)
    raw = unit * rng.uniform(0.5, 2.0, (300, 1)).astype(np.float32)
    labels = rng.integers(-1, 300, 2000).astype(np.int32)

    def objective(p, y, e):
        return losses.ess_objective(
            p,
            y,
            e,
            num_neighbors=7,
            normalize_classes=True,
            max_block_bytes=plan.max_block_bytes,
            pixels_per_chunk=plan.pixels_per_chunk,
            table_gradient=plan.table_gradient,
            search_method=plan.search_method,
        )[0]

    loss, (grad_pixels, grad_table) = jax.jit(jax.value_and_grad(objective, argnums=(0, 2)))(
        pixels, labels, raw
    )
    ref_total, _, _, ref_gp, ref_gt = objective_reference(pixels, labels, raw, 7, 20.0, 0.2, 1.0)
    np.testing.assert_allclose(float(loss), ref_total, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grad_pixels), ref_gp, rtol=1e-5, atol=1e-5 * np.abs(ref_gp).max()
    )
    np.testing.assert_allclose(
        np.asarray(grad_table), ref_gt, rtol=1e-5, atol=1e-5 * np.abs(ref_gt).max()
    )


def test_add_rows_sums_duplicates_like_a_scatter():
    rng = np.random.default_rng(40)
    table = rng.normal(size=(7, 3)).astype(np.float32)
    ids = rng.integers(0, 7, (50, 4)).astype(np.int32)  # every id many times, some never
    ids[ids == 3] = 2
    rows = rng.normal(size=(50, 4, 3)).astype(np.float32)
    expected = table.astype(np.float64)
    np.add.at(expected, ids, rows)
    for presorted in (False, True):
        out = jax.jit(class_rows.add_rows, static_argnums=3)(table, ids, rows, presorted)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_unknown_table_gradient_is_named():
    pixels, classes, _ = random_embeddings(41, 8, 5, 3)
    with pytest.raises(ValueError, match="table_gradient='atomic'"):
        losses.ess_objective(
            pixels, np.zeros(8, np.int32), classes, num_neighbors=2, table_gradient="atomic"
        )


@pytest.mark.parametrize("table_gradient", ["scatter", "sorted", "matmul", "segment"])
def test_unit_length_pixels_in_the_loss(table_gradient):
    """``normalize_pixels``: the ESS term reads the pixels scaled to unit length, chunk by
    chunk; value and gradients (through the scaling, and into the table) as the float64
    reference on the unit pixels, with every table-gradient method; off, the raw pixels."""
    from jaxscaleseg import steps

    pixels, unit, rng = random_embeddings(31, 240, 60, 8)
    pixels = pixels.reshape(2, 12, 10, 8)
    labels = rng.integers(-1, 60, (2, 12, 10)).astype(np.int32)
    k, temperature = 5, 20.0

    def loss_of(normalize):
        def fn(p, table):
            return losses.ess_objective(
                p,
                jnp.asarray(labels),
                table,
                num_neighbors=k,
                temperature=temperature,
                separation_weight=0.0,
                pixels_per_chunk=64,  # 240 pixels: 4 chunks, the last one padded
                table_gradient=table_gradient,
                normalize_pixels=normalize,
            )[0]

        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(jnp.asarray(pixels), unit)

    flat = np.asarray(pixels, np.float64).reshape(-1, 8)
    norms = np.linalg.norm(flat, axis=-1, keepdims=True)
    direction = flat / norms
    ref, grad_direction, ref_table_grad = reference.ess_loss_and_grads(
        direction, labels.reshape(-1), unit, k, temperature
    )
    # d/dp of p/|p| applied to g: (g - u (u·g)) / |p|.
    along = (direction * grad_direction).sum(-1, keepdims=True)
    ref_grad = ((grad_direction - direction * along) / norms).reshape(pixels.shape)
    value, (grad, table_grad) = loss_of(True)
    # float32 distances and softmax against float64: relative 1e-5 allows any CPU's rounding.
    np.testing.assert_allclose(float(value), ref, rtol=1e-5)
    for got, want in ((grad, ref_grad), (table_grad, ref_table_grad)):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * scale)
    raw, _ = loss_of(False)
    raw_ref = reference.ess_loss_and_grads(flat, labels.reshape(-1), unit, k, temperature)[0]
    np.testing.assert_allclose(float(raw), raw_ref, rtol=1e-5)
    assert abs(raw_ref - ref) > 0.01 * ref  # the two losses differ on these short pixels
    # The training step's loss passes loss.normalize_pixels on.
    spec = steps.LossSpec(
        num_neighbors=k, temperature=temperature, separation_weight=0.0, normalize_pixels=True
    )
    outputs = {"pixel_embedding": jnp.asarray(pixels), "class_embedding": unit}
    step_loss = steps.compute_loss(outputs, jnp.asarray(labels), spec)[0]
    np.testing.assert_allclose(float(step_loss), ref, rtol=1e-5)
