"""How each pixel's k negatives are chosen: the paper's rule and the original code's.

The paper (and our default, ``"nearest_other"``) takes the k nearest classes other than the
target. The original code searched the k nearest classes with the target included and replaced
a neighbour equal to the target by class ``target − 1`` (``"original"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import knn

# How each pixel's k negatives are chosen (``ess_objective``'s ``negatives``).
NEGATIVE_RULES = ("nearest_other", "original")


def original_rule_negatives(neighbors: jax.Array, targets: jax.Array) -> jax.Array:
    """The original code's negatives: a neighbour equal to the target becomes class target − 1.

    ``neighbors`` are the k nearest classes found with the target included in the search.
    Where one equals the target it is replaced by ``target − 1``, or, for class 0, by 0: the
    target itself then enters the softmax twice. Duplicates are kept (``target − 1`` may
    already be a neighbour).

    Args:
      neighbors: int32 ``[P, k]``.
      targets: int32 ``[P]``.

    Returns:
      int32 ``[P, k]``.
    """
    column = targets[:, None]
    return jnp.where(neighbors == column, jnp.maximum(column - 1, 0), neighbors)


def pixel_negatives(
    pixels, targets, classes, label_shape, num_neighbors, negatives, neighbor_ids, plan, normalize
):
    """int32 ``[N, k]``: each pixel's negatives, given or searched under the ``negatives`` rule.

    Args:
      pixels: float32 ``[N, D]``.
      targets: int32 ``[N]``.
      classes: float32 ``[C, D]``.
      label_shape: the labels' shape (N pixels in all), to check ``neighbor_ids``.
      num_neighbors: k.
      negatives: one of ``NEGATIVE_RULES``.
      neighbor_ids: int ``[*label_shape, k]`` found elsewhere, or None to search exactly.
      plan: the objective's ``loss_plan.LossPlan``.
      normalize: search against unit class rows.
    """
    if negatives not in NEGATIVE_RULES:
        raise ValueError(f"negatives={negatives!r}; expected one of {NEGATIVE_RULES}")
    original = negatives == "original"
    if neighbor_ids is not None:
        if neighbor_ids.shape != (*label_shape, num_neighbors):
            raise ValueError(
                f"neighbor_ids {neighbor_ids.shape} must be labels {label_shape}"
                f" + (num_neighbors={num_neighbors},)"
            )
        neighbors = lax.stop_gradient(jnp.asarray(neighbor_ids, jnp.int32)).reshape(
            -1, num_neighbors
        )
    else:
        neighbors = knn.nearest_class_ids(
            pixels,
            classes,
            num_neighbors,
            exclude=None if original else targets,
            max_block_bytes=plan.max_block_bytes,
            method=plan.search_method,
            normalize_classes=normalize,
        )
        if original:
            neighbors = original_rule_negatives(neighbors, targets)
    return neighbors
