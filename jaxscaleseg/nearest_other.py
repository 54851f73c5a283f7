"""Each class's nearest other class: the partners of the separation term.

Found by the bounded search (no C×C array), without gradient; ``refresh_separation_ids``
recomputes them only every n steps inside a jitted step (the table moves slowly), while the
hinge itself is computed on the current rows every step (``losses.ess_objective``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import class_rows, knn
from jaxscaleseg.loss_plan import loss_plan


def nearest_other_class_ids(
    classes: jax.Array, max_block_bytes: int, normalize: bool, method: str = "auto"
) -> jax.Array:
    """int32 ``[C]``: each class's nearest other class (bounded search, no gradient)."""
    own_ids = jnp.arange(classes.shape[0], dtype=jnp.int32)
    return knn.nearest_class_ids(
        classes,
        classes,
        1,
        exclude=own_ids,
        max_block_bytes=max_block_bytes,
        method=method,
        normalize_classes=normalize,
    )[:, 0]


def nearest_other_classes(
    class_emb: jax.Array,
    *,
    normalize_classes: bool = False,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
    search_method: str = "auto",
) -> jax.Array:
    """Each class's nearest other class, exactly (bounded search): the separation term's ids.

    The same ids ``losses.ess_objective`` finds when it is given no ``separation_ids``.

    Args:
      class_emb: float ``[C, D]``, C >= 2.
      normalize_classes: search among the rows scaled to unit length.
      max_block_bytes: memory budget of the search, or ``"auto"``.
      search_method: block selection (``knn.nearest_class_ids``), or ``"auto"``.

    Returns:
      int32 ``[C]``.
    """
    num_classes, _ = class_rows.check_table(class_emb, "nearest_other_classes")
    plan = loss_plan(
        None, num_classes, max_block_bytes=max_block_bytes, search_method=search_method
    )
    classes = jnp.asarray(class_emb, jnp.float32)
    return nearest_other_class_ids(
        classes, plan.max_block_bytes, normalize_classes, plan.search_method
    )


def refresh_separation_ids(
    separation_ids: jax.Array,
    class_emb: jax.Array,
    step: jax.Array,
    every: int,
    **search_kwargs,
) -> jax.Array:
    """``separation_ids``, recomputed exactly where ``step % every == 0`` (one ``lax.cond``).

    Jittable with a traced ``step``: the C×C search runs only on the steps that refresh (on
    the others the ids carried from the last refresh are returned), so the separation term's
    search costs ``1/every`` of its per-step cost. ``every = 1`` refreshes on every step.

    Args:
      separation_ids: int32 ``[C]``, the ids of the last refresh.
      class_emb: float ``[C, D]``, the table as the step reads it.
      step: int scalar, the step about to be taken.
      every: refresh period n >= 1 (static).
      **search_kwargs: passed to :func:`nearest_other_classes`.

    Returns:
      int32 ``[C]``.
    """
    if int(every) < 1:
        raise ValueError(f"separation refresh period every={every} must be >= 1")
    if every == 1:
        return nearest_other_classes(class_emb, **search_kwargs)
    return lax.cond(
        jnp.asarray(step) % every == 0,
        lambda: nearest_other_classes(class_emb, **search_kwargs),
        lambda: jnp.asarray(separation_ids, jnp.int32),
    )
