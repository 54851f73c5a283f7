"""The certified assignment: exact against float64 references, whatever the features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscaleseg import inference, knn, knn_certified
from tests import reference


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _table(rng, num_classes, dim):
    """Class rows of unequal norms (0.5 to 1.5): the bounds use the largest norm."""
    rows = _unit(rng.normal(size=(num_classes, dim))) * rng.uniform(0.5, 1.5, (num_classes, 1))
    return rows.astype(np.float32)


def _assert_nearest(ids, queries, classes):
    """``ids`` are the float64 nearest classes, except where two classes tie within float32
    rounding (the distances are compared at 1e-5, ~100 float32 ulps of these magnitudes)."""
    dim = queries.shape[-1]
    d = reference.distances(queries.reshape(-1, dim), classes)
    got = np.take_along_axis(d, np.asarray(ids).reshape(-1, 1), -1)[:, 0]
    np.testing.assert_allclose(got, d.min(-1), rtol=0, atol=1e-5)
    assert np.mean(np.asarray(ids).reshape(-1) == d.argmin(-1)) > 0.99


@pytest.mark.parametrize("seed", [0, 1])
def test_search_uncertified_replaces_only_the_uncertified_rows(seed):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(45, 6)).astype(np.float32)
    classes = _table(rng, 30, 6)
    stale = rng.integers(0, 30, (45, 3)).astype(np.int32)
    certified = rng.random(45) < 0.6
    ids = jax.jit(
        lambda q, i, c, e: knn_certified.search_uncertified(
            q, i, c, e, max_block_bytes=4096, chunk=7
        )
    )(queries, stale, certified, classes)
    _, want = reference.nearest(queries, classes, 3)
    np.testing.assert_array_equal(np.asarray(ids)[certified], stale[certified])
    np.testing.assert_array_equal(np.asarray(ids)[~certified], want[~certified])


@pytest.mark.parametrize("kind", ["smooth", "random", "noisy"])
def test_certified_assignment_is_the_exact_one(kind):
    """Smooth features (the model's kind: mostly certified), independent random grid points
    (mostly searched exactly) and smooth ones with per-pixel noise (not a blend of any grid:
    the bound's slack)."""
    rng = np.random.default_rng(["smooth", "random", "noisy"].index(kind) + 10)
    batch, h, w, dim, num_classes = 2, 5, 7, 6, 60
    if kind == "random":
        grid = rng.normal(size=(batch, h, w, dim))
    else:
        coarse = rng.normal(size=(batch, 2, 3, dim))
        grid = np.asarray(jax.image.resize(coarse, (batch, h, w, dim), "bilinear"))
    grid = _unit(grid).astype(np.float32)
    shape = (batch, 4 * h - 1, 4 * w - 2, dim)  # not multiples of 4: partial border cells
    features = np.asarray(jax.image.resize(grid, shape, "bilinear", antialias=False))
    if kind == "noisy":
        features = features + 0.05 * rng.normal(size=shape)
    features = _unit(features).astype(np.float32)
    classes = _table(rng, num_classes, dim)
    ids, certified = knn_certified.certified_assign(
        features, classes, candidates=8, max_block_bytes=1 << 16
    )
    assert ids.shape == shape[:3] and ids.dtype == jnp.int32
    _assert_nearest(ids, features, classes)
    # Both paths ran: the bound certifies most smooth pixels and few random ones.
    if kind == "random":
        assert float(certified) < 0.5
    else:
        assert float(certified) > 0.5
    labels = inference.features_to_labels(
        features, classes, search="certified", search_candidates=8
    )
    np.testing.assert_array_equal(np.asarray(labels), np.asarray(ids))
    np.testing.assert_array_equal(
        np.asarray(labels), np.asarray(knn.assign(jnp.asarray(features), jnp.asarray(classes)))
    )


def test_certified_assignment_rejects_bad_shapes():
    classes = np.eye(4, 3, dtype=np.float32)
    with pytest.raises(ValueError, match="takes \\[B, H, W, D\\]"):
        knn_certified.certified_assign(np.zeros((8, 3), np.float32), classes)
    settings = inference.InferenceSettings(search="certified", search_candidates=8)
    assert inference.describe(settings) == "whole certified search K'=8"


def test_auto_search_is_certified_from_many_classes_on_the_cpu(monkeypatch):
    """``search="auto"`` (inference's default): the certified search from
    ``AUTO_CERTIFIED_MIN_CLASSES`` classes on, on CPU only; the exact one below, elsewhere, for
    flat features and for logits. Its labels are the exact assignment either way."""
    threshold = inference.AUTO_CERTIFIED_MIN_CLASSES
    assert inference.InferenceSettings().search == "auto"
    assert inference.resolve_search("auto", threshold, backend="cpu") == "certified"
    assert inference.resolve_search("auto", threshold - 1, backend="cpu") == "exact"
    assert inference.resolve_search("auto", 10 * threshold, backend="gpu") == "exact"
    assert inference.resolve_search("auto", None, backend="cpu") == "exact"
    assert inference.resolve_search("approximate", 3, backend="gpu") == "approximate"
    with pytest.raises(ValueError, match="search must be one of"):
        inference.resolve_search("fast", 3)
    assert inference.describe(inference.InferenceSettings()) == "whole"

    rng = np.random.default_rng(7)
    coarse = _unit(rng.normal(size=(1, 3, 4, 5)))
    grid = np.asarray(jax.image.resize(coarse, (1, 6, 8, 5), "bilinear"))
    features = np.asarray(jax.image.resize(_unit(grid), (1, 23, 30, 5), "bilinear"))
    features = _unit(features).astype(np.float32)
    classes = _table(rng, 40, 5)
    calls = []
    certified_assign = knn_certified.certified_assign

    def spy(*args, **kwargs):
        calls.append(args[1].shape[0])
        return certified_assign(*args, **kwargs)

    monkeypatch.setattr(knn_certified, "certified_assign", spy)
    exact = np.asarray(knn.assign(jnp.asarray(features), jnp.asarray(classes)))
    for minimum, routed in ((41, []), (40, [40])):
        monkeypatch.setattr(inference, "AUTO_CERTIFIED_MIN_CLASSES", minimum)
        calls.clear()
        labels = inference.features_to_labels(features, classes, search_candidates=4)
        assert calls == (routed if jax.default_backend() == "cpu" else []), minimum
        np.testing.assert_array_equal(np.asarray(labels), exact)
    flat = inference.features_to_labels(features.reshape(-1, 5), classes)  # not [B, H, W, D]
    assert calls == [40] or jax.default_backend() != "cpu"
    np.testing.assert_array_equal(np.asarray(flat), exact.reshape(-1))


def test_search_uncertified_under_grad_holds_no_copy_of_the_table():
    """Inside a differentiated step (the training's ``loss.search = "certified"``) the fallback
    builds the exact search's class blocks one at a time: JAX's partial evaluation must not
    hoist them, all at once, out of its loop (that was a second copy of the class table)."""
    rng = np.random.default_rng(3)
    num, num_classes, dim = 256, 60_000, 12  # the table: 2.9 MB; its augmented rows 3.1 MB
    queries = jnp.asarray(rng.normal(size=(num, dim)), jnp.float32)
    classes = jnp.asarray(_table(rng, num_classes, dim))
    ids = jnp.zeros((num, 1), jnp.int32)
    certified = jnp.asarray(rng.random(num) < 0.5)

    def loss(queries, classes):
        found = knn_certified.search_uncertified(
            queries, ids, certified, classes, max_block_bytes=2**20, chunk=64
        )
        return jnp.sum(classes[found[:, 0]] * queries)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    temp = step.lower(queries, classes).compile().memory_analysis().temp_size_in_bytes
    assert temp < num_classes * dim * 4 / 2, temp


def test_fallback_chunk_follows_the_block_budget_within_bounds():
    """The fallback's chunk is what one block of the whole table holds (GPU-sized budgets make
    few, large searches), never below 512 (the CPU's chunk at many classes) nor above 16 384
    queries, nor above the query count."""
    gpu, cpu = knn.resolve_block_bytes("auto", "gpu"), knn.resolve_block_bytes("auto", "cpu")
    assert knn_certified.fallback_chunk(10**6, 10_000, gpu) == knn.block_elements(gpu) // 10_000
    assert knn_certified.fallback_chunk(10**6, 1_284, gpu) == 2**14
    assert knn_certified.fallback_chunk(10**6, 100_000, cpu) == 512
    assert knn_certified.fallback_chunk(10**6, 10_000, cpu) == 512
    assert knn_certified.fallback_chunk(300, 10_000, gpu) == 300
