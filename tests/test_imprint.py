"""Class-table imprinting and centred pixel embeddings (the from-scratch options)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_training import _state_and_batch, tiny_config

from jaxscaleseg import config_schema, imprint, training


@pytest.mark.parametrize("seed", [0, 1])
def test_imprint_points_seen_rows_at_their_class_mean_and_keeps_lengths(seed):
    rng = np.random.default_rng(seed)
    num_classes, dim = 9, 5
    table = rng.normal(size=(num_classes, dim)).astype(np.float32)
    pixels = rng.normal(size=(200, dim))
    labels = rng.integers(-1, num_classes - 2, size=200)  # the last two classes never occur
    sums = np.zeros((num_classes, dim))
    counts = np.zeros(num_classes, np.int64)
    for p, y in zip(pixels, labels, strict=True):
        if y >= 0:
            sums[y] += p
            counts[y] += 1
    out = imprint.imprint_class_embeddings(
        {"class_embedding": jnp.asarray(table), "other": jnp.ones(3)},
        jnp.asarray(sums, jnp.float32),
        jnp.asarray(counts),
    )
    new = np.asarray(out["class_embedding"], np.float64)
    np.testing.assert_array_equal(np.asarray(out["other"]), np.ones(3))
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), np.linalg.norm(table, axis=1), 1e-5)
    for c in range(num_classes):
        if counts[c]:
            mean = sums[c] / counts[c]
            expected = mean / np.linalg.norm(mean) * np.linalg.norm(table[c])
            np.testing.assert_allclose(new[c], expected, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(new[c], table[c])


def test_class_embedding_sums_match_a_numpy_segment_sum():
    config = tiny_config()
    state, batch = _state_and_batch(config, key=3)
    sums, counts = jax.jit(imprint.class_embedding_sums, static_argnames="num_classes")(
        state, batch, num_classes=config.dataset.num_classes
    )
    outputs, _ = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)},
    )
    pixel = np.asarray(outputs["pixel_embedding"], np.float64).reshape(-1, 12)
    labels = np.asarray(batch["label"]).reshape(-1)
    assert (labels == -1).any()
    for c in range(config.dataset.num_classes):
        np.testing.assert_allclose(
            np.asarray(sums[c]), pixel[labels == c].sum(0), rtol=1e-4, atol=1e-4
        )
        assert int(counts[c]) == int((labels == c).sum())


def test_centred_embeddings_have_zero_batch_mean_before_normalisation():
    config = tiny_config(**{"model.center_embedding": True})
    state, batch = _state_and_batch(config, key=4)
    _, state_vars = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"] * 0.0 + 0.5,  # a constant image: without centring, one embedding
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
        rngs={"dropout": jax.random.key(0)},
    )
    centred = np.asarray(state_vars["intermediates"]["embedding_center"]["__call__"][0])
    assert centred.shape[-1] == config.model.embedding_dim
    np.testing.assert_allclose(centred.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    assert "embedding_center" in state.batch_stats


def test_imprinting_run_starts_from_imprinted_rows_and_resumes_without_reimprinting(
    tmp_path, capsys
):
    config = tiny_config(
        **{
            "model.class_embedding_init": "imprint",
            "model.imprint_batches": "epoch",
            "num_train_steps": 2,
            "checkpoint_every_steps": 1,
        }
    )
    training.train_and_evaluate(config, tmp_path)
    # "epoch": one pass over the 16 training examples in batches of 4.
    assert "from 4 batches (one epoch)" in capsys.readouterr().out
    config.num_train_steps = 3
    training.train_and_evaluate(config, tmp_path)
    out = capsys.readouterr().out
    assert "resuming from step 2" in out and "imprinted" not in out


def test_imprint_batches_by_count_or_epoch():
    assert imprint.imprint_batch_count("epoch", 4000, 16) == 250
    assert imprint.imprint_batch_count("epoch", 4001, 16) == 251
    assert imprint.imprint_batch_count("epoch", 3, 16) == 1
    assert imprint.imprint_batch_count(25, 4000, 16) == 25
    for bad in (0, "all", True, 2.5):
        with pytest.raises(config_schema.ConfigError, match="model.imprint_batches"):
            config_schema.validate(tiny_config(**{"model.imprint_batches": bad}))


def test_unknown_class_embedding_init_is_refused():
    config = tiny_config(**{"model.class_embedding_init": "zeros"})
    with pytest.raises(config_schema.ConfigError, match="model.class_embedding_init"):
        config_schema.validate(config)
