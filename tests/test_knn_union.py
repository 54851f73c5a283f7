"""The stride-4 union search: its cells, its ids against float64 references, its certificate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscaleseg import inference, knn, knn_index, knn_union
from jaxscaleseg.models import l2_normalize
from tests import reference


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed, batch=2, h=4, w=5, dim=6, num_classes=40, factor=4):
    """Random unit stride-4 sources (independent per position: the union's worst case), their
    bilinear ×factor upsampling (as the model's), a random unit table and random labels."""
    rng = np.random.default_rng(seed)
    sources = _unit(rng.normal(size=(batch, h, w, dim))).astype(np.float32)
    shape = (batch, h * factor, w * factor, dim)
    queries = np.asarray(jax.image.resize(sources, shape, "bilinear", antialias=False))
    classes = _unit(rng.normal(size=(num_classes, dim))).astype(np.float32)
    labels = rng.integers(0, num_classes, shape[:3]).astype(np.int32)
    return queries, sources, classes, labels


def _numpy_union(queries, sources, classes, k, candidates, labels):
    """float64: each source's K' nearest; each pixel re-ranks the union of the sources with a
    non-zero bilinear weight (read off a resize of one-hot maps)."""
    batch, height, width, dim = queries.shape
    h, w = sources.shape[1:3]
    _, src_ids = reference.nearest(sources.reshape(-1, dim), classes, candidates)
    src_ids = src_ids.reshape(batch, h * w, candidates)
    onehot = np.eye(h * w, dtype=np.float32).reshape(h * w, h, w, 1)
    weights = np.asarray(jax.image.resize(onehot, (h * w, height, width, 1), "bilinear"))[..., 0]
    out = np.zeros((batch, height, width, k), np.int64)
    e = classes.astype(np.float64)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                used = np.flatnonzero(weights[:, y, x] > 0)
                cand = np.unique(src_ids[b, used].reshape(-1))
                cand = cand[cand != labels[b, y, x]]
                d = ((queries[b, y, x].astype(np.float64) - e[cand]) ** 2).sum(-1)
                out[b, y, x] = cand[np.argsort(d, kind="stable")[:k]]
    return out


@pytest.mark.parametrize("sizes", [(4, 16), (5, 20), (3, 7), (1, 4), (6, 6)])
def test_axis_cells_reproduce_the_bilinear_resize(sizes):
    n_in, n_out = sizes
    cells = knn_union.axis_cells(n_in, n_out)
    values = np.random.default_rng(n_in).normal(size=n_in)
    want = np.asarray(
        jax.image.resize(jnp.asarray(values, jnp.float32), (n_out,), "bilinear", antialias=False)
    )
    got = np.zeros(n_out)
    for c, g in zip(*np.nonzero(cells.members >= 0), strict=True):
        pair = values[cells.sources[c]]
        got[cells.members[c, g]] = cells.weights[c, g] @ pair
    # float32 resize against float64 weights: a few float32 ulps of values of size ~1.
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(cells.weights >= 0) and np.allclose(cells.weights.sum(-1)[cells.members >= 0], 1)
    assert np.array_equal(cells.members[cells.cell_of, cells.slot_of], np.arange(n_out))


def test_every_class_as_candidate_is_the_exact_search_and_certified():
    queries, sources, classes, labels = _inputs(0)
    ids, certified = knn_union.union_nearest_class_ids(
        queries, sources, classes, 3, candidates=40, exclude=labels
    )
    _, want = reference.nearest(queries.reshape(-1, 6), classes, 3, labels.reshape(-1))
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1, 3), want)
    assert bool(jnp.all(certified))


@pytest.mark.parametrize(
    ("budget", "candidates"),
    # K' = 12 takes the longer lists' selection (tile minima on CPU), whose last id bounds
    # the certificate: it must come out sorted by distance, as the pyramid's do.
    [(knn.DEFAULT_MAX_BLOCK_BYTES, 5), (20_000, 5), (20_000, 12)],
)
def test_few_candidates_match_numpy_and_the_certificate_is_sound(budget, candidates):
    """K' of 40 on independent random sources: the ids are the float64 union's; where
    certified they are the exact search's, and the certificate holds for some pixels."""
    queries, sources, classes, labels = _inputs(1)
    search = jax.jit(
        knn_union.union_nearest_class_ids,
        static_argnames=("k", "candidates", "max_block_bytes"),
    )
    ids, certified = search(
        queries, sources, classes, 3, candidates=candidates, exclude=labels, max_block_bytes=budget
    )
    ids, certified = np.asarray(ids), np.asarray(certified)
    want = _numpy_union(queries, sources, classes, 3, candidates, labels)
    np.testing.assert_array_equal(ids, want)
    _, exact = reference.nearest(queries.reshape(-1, 6), classes, 3, labels.reshape(-1))
    same = np.all(ids.reshape(-1, 3) == exact, axis=-1)
    assert np.all(same[certified.reshape(-1)])
    assert 0.1 < certified.mean() < 1.0 and same.mean() >= certified.mean()


def test_compiled_temporaries_stay_below_the_exact_search():
    """Blocks gather their own cells' queries and lists: no per-cell copy of the queries, no
    list held four times (those took 4.2 MB here against the exact search's 3.1 MB; the
    train step's peak, BENCHMARKS §2). Compiled only, the budget small enough for many blocks."""
    batch, h, w, dim, budget = 2, 32, 32, 12, 64 * 1024
    args = (
        jax.ShapeDtypeStruct((batch, 4 * h, 4 * w, dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, h, w, dim), jnp.float32),
        jax.ShapeDtypeStruct((500, dim), jnp.float32),
        jax.ShapeDtypeStruct((batch, 4 * h, 4 * w), jnp.int32),
    )

    def temp_bytes(search):
        return jax.jit(search).lower(*args).compile().memory_analysis().temp_size_in_bytes

    union = temp_bytes(
        lambda q, s, c, x: knn_union.union_nearest_class_ids(
            q, s, c, 7, candidates=32, exclude=x, max_block_bytes=budget
        )[0]
    )
    exact = temp_bytes(
        lambda q, s, c, x: knn.nearest_class_ids(q, c, 7, exclude=x, max_block_bytes=budget)
    )
    assert union < exact, (union, exact)


def test_sources_through_an_index_of_all_cells_give_the_same_ids_uncertified():
    queries, sources, classes, labels = _inputs(2, num_classes=64)
    index = knn_index.build_index(classes, num_cells=8)
    exact_lists, _ = knn_union.union_nearest_class_ids(
        queries, sources, classes, 2, candidates=6, exclude=labels
    )
    indexed, certified = knn_union.union_nearest_class_ids(
        queries, sources, classes, 2, candidates=6, exclude=labels, index=index, probes=8
    )
    np.testing.assert_array_equal(np.asarray(indexed), np.asarray(exact_lists))
    assert not bool(jnp.any(certified))


def test_bad_arguments_are_named():
    queries, sources, classes, _ = _inputs(3)
    with pytest.raises(ValueError, match="candidates=41"):
        knn_union.union_nearest_class_ids(queries, sources, classes, 3, candidates=41)
    with pytest.raises(ValueError, match="k=6"):
        knn_union.union_nearest_class_ids(queries, sources, classes, 6, candidates=5)
    with pytest.raises(ValueError, match="sources"):
        knn_union.union_nearest_class_ids(queries, sources[..., :3], classes, 3)


def test_approximate_assignment_in_inference():
    """All classes as candidates: the exact assignment; few: mostly it (smooth features)."""
    queries, _, classes, _ = _inputs(4, h=6, w=6, num_classes=50)
    features = np.asarray(l2_normalize(jnp.asarray(queries)))
    exact = inference.features_to_labels(features, classes)
    every = inference.features_to_labels(
        features, classes, search="approximate", search_candidates=50
    )
    np.testing.assert_array_equal(np.asarray(every), np.asarray(exact))
    few = inference.features_to_labels(features, classes, search="approximate", search_candidates=4)
    assert 0.5 < float(np.mean(np.asarray(few) == np.asarray(exact))) <= 1.0
    with pytest.raises(ValueError, match="search must be one of"):
        inference.InferenceSettings(search="fast")
    settings = inference.InferenceSettings(search="approximate", search_candidates=8)
    assert inference.describe(settings) == "whole approximate search K'=8"


def test_train_step_with_the_union_search():
    """``loss.search = "union"``: every class a candidate gives the exact step's loss; few
    candidates a close one; the config check names the keys."""
    from test_training import _state_and_batch, tiny_config

    from jaxscaleseg import config_schema, initial_state, steps
    from jaxscaleseg.errors import ConfigError

    step = jax.jit(steps.train_step, static_argnames="spec")
    measure = jax.jit(steps.search_quality, static_argnames="spec")
    key = jax.random.key(1)
    # The union search carries no state: one initial state serves every spec.
    state, batch = _state_and_batch(tiny_config())
    losses, quality, certified = {}, {}, {}
    for name, overrides in {
        "exact": {},
        "every": {"loss.search": "union", "loss.search_candidates": 30},
        "few": {"loss.search": "union", "loss.search_candidates": 8},
        "six": {"loss.search": "union", "loss.search_candidates": 6},
        "certified": {"loss.search": "certified", "loss.search_candidates": 6},
    }.items():
        config = tiny_config(**overrides)
        config_schema.validate(config)
        assert initial_state.carried_state(config, state.params)["class_index"] is None
        spec = steps.LossSpec.from_config(config.loss)
        _, out = step(state, batch, key, spec=spec)
        losses[name] = float(out["loss"])
        measured = measure(state, batch, key, spec=spec)
        quality[name] = (measured.get("search_recall"), measured.get("search_ess_rel_error"))
        # Measured apart (the loop calls it at log steps), not inside the step.
        assert "search_recall" not in out
        certified[name] = out.get("search_certified")
    # Same negatives, same arithmetic up to float32 reassociation.
    np.testing.assert_allclose(losses["every"], losses["exact"], rtol=1e-5)
    # Farther negatives weigh less in the softmax: a loss no higher, within a few per cent.
    assert 0.9 * losses["exact"] <= losses["few"] <= losses["exact"] * (1 + 1e-5)
    # Measured on a sample (loss.search_quality_sample): perfect with every class.
    assert quality["exact"] == (None, None)
    assert float(quality["every"][0]) == 1.0 and float(quality["every"][1]) < 1e-5
    assert 0.0 < float(quality["few"][0]) <= 1.0 and float(quality["few"][1]) >= 0.0
    # "certified": the union's lists completed by the exact search where the certificate
    # fails, so the exact step's negatives and loss where the union alone (K' = 6) misses
    # some; the fraction certified is reported.
    # (The union's misses change this loss by ~1e-5 relative, measured; float32 reassociation
    # of the same negatives by ~1e-7, hence the 5e-6 and 1e-6.)
    assert losses["six"] < losses["exact"] * (1 - 5e-6), losses
    np.testing.assert_allclose(losses["certified"], losses["exact"], rtol=1e-6)
    assert float(quality["certified"][0]) == 1.0
    assert 0.0 <= float(certified["certified"]) <= 1.0 and certified["few"] is None
    with pytest.raises(ConfigError, match="search='union'.*search_candidates=5"):
        config_schema.validate(tiny_config(**{"loss.search": "union", "loss.search_candidates": 5}))


def test_the_loop_measures_the_union_search_at_log_steps_only(tmp_path):
    """The training loop logs the union's quality (``steps.search_quality`` on that step's
    batch) with each log line; every class a candidate: recall 1, no loss error."""
    from test_training import tiny_config

    from jaxscaleseg import training, workdir

    config = tiny_config(
        num_train_steps=5,
        log_every_steps=2,
        eval_every_steps=0,
        checkpoint_every_steps=5,
        **{"loss.search": "union", "loss.search_candidates": 30},
    )
    training.train_and_evaluate(config, tmp_path)
    logged = [r for r in workdir.read_metrics(tmp_path) if "train_loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 5]
    for record in logged:
        assert record["train_search_recall"] == 1.0, record
        assert 0.0 <= record["train_search_ess_rel_error"] < 1e-5, record


def test_auto_search_is_certified_with_unit_pixels(monkeypatch):
    """``loss.search = "auto"`` with ``loss.normalize_pixels``: the certified search (its
    measured recall that of the exact search) from ``AUTO_CERTIFIED_MIN_CLASSES`` classes on,
    the exact search below; a setting it cannot take is named together with "auto"."""
    from test_training import _state_and_batch, tiny_config

    from jaxscaleseg import config_schema, knn_index, steps
    from jaxscaleseg.errors import ConfigError

    config = tiny_config(**{"loss.normalize_pixels": True, "loss.search_candidates": 8})
    state, batch = _state_and_batch(config)
    logged = {}
    for threshold in (30, 31):  # the tiny config has 30 classes
        monkeypatch.setattr(knn_index, "AUTO_CERTIFIED_MIN_CLASSES", threshold)
        config_schema.validate(config)
        spec = steps.LossSpec.from_config(config.loss)
        assert spec.resolved_search(30) == ("certified" if threshold == 30 else "exact")
        # A fresh function each time: jit's cache would keep the first trace for this spec.
        measure = jax.jit(lambda s, b, k, spec=spec: steps.search_quality(s, b, k, spec=spec))
        logged[threshold] = measure(state, batch, jax.random.key(1))
        assert spec.measures_search(30) == ("search_recall" in logged[threshold])
    assert float(logged[30]["search_recall"]) == 1.0
    assert float(logged[30]["search_ess_rel_error"]) < 1e-5
    assert logged[31] == {}
    monkeypatch.setattr(knn_index, "AUTO_CERTIFIED_MIN_CLASSES", 30)
    with pytest.raises(ConfigError, match="loss.search='auto'.*negatives='original'"):
        config_schema.validate(
            tiny_config(**{"loss.normalize_pixels": True, "loss.negatives": "original"})
        )
