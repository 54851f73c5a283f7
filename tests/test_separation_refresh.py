"""The separation term's nearest-other-class ids carried between steps and refreshed every n."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from test_knn import random_embeddings

from jaxscaleseg import losses, nearest_other

# Float32 sums of a few hundred terms of size ~1: relative rounding of a few 1e-7 per term,
# so 1e-5 leaves room for another CPU's summation order (as in test_losses).
RTOL = 1e-5


def objective(pixels, labels, table, separation_ids=None):
    return losses.ess_objective(
        pixels,
        labels,
        table,
        num_neighbors=3,
        margin=1.2,
        separation_weight=0.7,
        normalize_classes=True,
        separation_ids=separation_ids,
    )


def problem(seed, num_classes=40, dim=6, num_pixels=96):
    pixels, unit, rng = random_embeddings(seed, num_pixels, num_classes, dim)
    table = unit * rng.uniform(0.5, 2.0, (num_classes, 1)).astype(np.float32)
    labels = rng.integers(0, num_classes, num_pixels).astype(np.int32)
    return pixels.reshape(2, -1, dim), labels.reshape(2, -1), table


def test_fresh_ids_give_todays_loss_and_gradients():
    pixels, labels, table = problem(0)
    grad_fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 2), has_aux=True))
    ids = nearest_other.nearest_other_classes(table, normalize_classes=True)
    (total, parts), grads = grad_fn(pixels, labels, table, ids)
    (ref_total, ref_parts), ref_grads = grad_fn(pixels, labels, table)
    assert float(parts["separation"]) > 0  # the hinge is active
    np.testing.assert_allclose(float(total), float(ref_total), rtol=RTOL)
    np.testing.assert_allclose(float(parts["separation"]), float(ref_parts["separation"]), RTOL)
    for got, want in zip(grads, ref_grads, strict=True):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=RTOL * scale)


def test_nearest_other_classes_matches_reference():
    _, _, table = problem(1, num_classes=300)
    unit = table / np.linalg.norm(table, axis=-1, keepdims=True)
    want = reference.nearest(unit, unit, 1, exclude=np.arange(300))[1][:, 0]
    got = nearest_other.nearest_other_classes(table, normalize_classes=True, max_block_bytes=20_000)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_stale_ids_are_used_for_the_hinge_on_current_rows():
    """Given ids (here a random permutation, far from the nearest), the hinge and its gradient
    are those of the float64 reference with exactly those partners."""
    pixels, labels, table = problem(2)
    rng = np.random.default_rng(2)
    stale = (np.arange(40) + rng.integers(1, 40, 40)) % 40
    grad_fn = jax.jit(jax.value_and_grad(objective, argnums=2, has_aux=True))
    (_, parts), grad = grad_fn(pixels, labels, table, jnp.asarray(stale, jnp.int32))
    (_, ess_parts), ess_grad = jax.jit(
        jax.value_and_grad(
            lambda p, y, e: losses.ess_objective(
                p, y, e, num_neighbors=3, separation_weight=0.0, normalize_classes=True
            ),
            argnums=2,
            has_aux=True,
        )
    )(pixels, labels, table)
    norms = np.linalg.norm(table.astype(np.float64), axis=-1, keepdims=True)
    unit = table / norms
    ref_sep, ref_grad_unit = reference.separation_loss_and_grad(unit, 1.2, nearest_id=stale)
    along = (unit * ref_grad_unit).sum(-1, keepdims=True)
    ref_grad = (ref_grad_unit - unit * along) / norms
    np.testing.assert_allclose(float(parts["separation"]), ref_sep, rtol=RTOL)
    sep_grad = (np.asarray(grad, np.float64) - np.asarray(ess_grad, np.float64)) / 0.7
    scale = np.abs(ref_grad).max()
    np.testing.assert_allclose(sep_grad, ref_grad, rtol=1e-4, atol=1e-4 * scale)
    assert float(ess_parts["ess"]) == pytest.approx(float(parts["ess"]), rel=RTOL)


def plain_step(pixels, labels):
    """One jitted SGD step on the objective with the given separation ids."""

    @jax.jit
    def step(table, ids):
        grad = jax.grad(lambda e: objective(pixels, labels, e, ids)[0])(table)
        return table - 0.5 * grad

    return step


def sgd_steps(table, ids, first, last, every, pixels, labels):
    """Steps ``first .. last - 1`` of SGD, the ids refreshed by ``lax.cond`` inside the jitted
    step; returns the table, the ids and the ids each step used."""
    update = plain_step(pixels, labels)

    @jax.jit
    def step(table, ids, step):
        ids = nearest_other.refresh_separation_ids(ids, table, step, every, normalize_classes=True)
        return update(table, ids), ids

    used = []
    for index in range(first, last):
        table, ids = step(table, ids, jnp.int32(index))
        used.append(np.asarray(ids))
    return table, ids, used


def test_refresh_every_n_uses_the_ids_of_the_last_refresh_and_resumes_identically():
    pixels, labels, table = problem(3)
    ids0 = jnp.zeros((40,), jnp.int32)
    every = 3
    final, ids, used = sgd_steps(jnp.asarray(table), ids0, 0, 7, every, pixels, labels)
    # Replay: the ids used at step s are the exact ones of the table at the last multiple of
    # `every` at or before s.
    update = plain_step(pixels, labels)
    current = jnp.asarray(table)
    for index in range(7):
        if index % every == 0:
            refreshed = np.asarray(
                nearest_other.nearest_other_classes(current, normalize_classes=True)
            )
        np.testing.assert_array_equal(used[index], refreshed)
        current = update(current, jnp.asarray(used[index]))
    np.testing.assert_array_equal(np.asarray(current), np.asarray(final))
    # The table moved enough that a refresh changed the ids (so the test can fail).
    assert any((used[i] != used[i - 1]).any() for i in range(1, 7))
    # Resume mid-interval (after step 4; next refresh at 6) from the carried state, as a
    # checkpoint holds it (host arrays).
    half, half_ids, _ = sgd_steps(jnp.asarray(table), ids0, 0, 4, every, pixels, labels)
    half, half_ids = jnp.asarray(np.asarray(half)), jnp.asarray(np.asarray(half_ids))
    resumed, resumed_ids, _ = sgd_steps(half, half_ids, 4, 7, every, pixels, labels)
    np.testing.assert_array_equal(np.asarray(resumed), np.asarray(final))
    np.testing.assert_array_equal(np.asarray(resumed_ids), np.asarray(ids))


def test_bad_refresh_period_and_ids_shape_are_named():
    pixels, labels, table = problem(4)
    with pytest.raises(ValueError, match="every=0"):
        nearest_other.refresh_separation_ids(jnp.zeros(40, jnp.int32), table, 0, 0)
    with pytest.raises(ValueError, match="separation_ids"):
        objective(pixels, labels, table, jnp.zeros(39, jnp.int32))


def test_train_step_refreshes_carried_ids_every_n_steps_and_resumes_identically():
    """The step with ``loss.separation_refresh_every = 3``: ids searched on steps 0 and 3 from
    the table the step reads, carried in the state, and a mid-interval resume from host copies
    of the state (as a checkpoint) ends bit-identical."""
    from test_training import _state_and_batch, tiny_config

    from jaxscaleseg import steps, workdir

    config = tiny_config(**{"loss.separation_refresh_every": 3, "loss.margin": 1.5})
    state, batch = _state_and_batch(config)
    assert "separation_ids" in workdir.state_tree(state)
    spec = steps.LossSpec.from_config(config.loss)
    step = jax.jit(steps.train_step, static_argnames="spec")
    key = jax.random.key(1)
    tables, ids = [], []
    for _ in range(5):
        tables.append(np.asarray(state.params["class_embedding"]))
        state, _ = step(state, batch, key, spec=spec)
        ids.append(np.asarray(state.separation_ids))
    for index in range(5):
        refreshed = tables[index - index % 3]
        want = nearest_other.nearest_other_classes(refreshed, normalize_classes=True)
        np.testing.assert_array_equal(ids[index], np.asarray(want))
    # Resume after step 2 (mid-interval): replay from a host copy of the state at step 2.
    again, _ = _state_and_batch(config)
    for _ in range(2):
        again, _ = step(again, batch, key, spec=spec)
    saved = jax.tree.map(np.asarray, workdir.state_tree(again))
    fresh, _ = _state_and_batch(config)
    resumed = fresh.replace(**jax.tree.map(jnp.asarray, saved))
    for _ in range(3):
        resumed, _ = step(resumed, batch, key, spec=spec)
    for got, want in zip(
        jax.tree.leaves(workdir.state_tree(resumed)),
        jax.tree.leaves(workdir.state_tree(state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_refresh_period_is_checked_in_the_config():
    from test_training import tiny_config

    from jaxscaleseg import config_schema
    from jaxscaleseg.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.separation_refresh_every"):
        config_schema.validate(tiny_config(**{"loss.separation_refresh_every": 0}))
