"""How each pixel's k negatives are chosen: the paper's rule and the original code's.

The paper (and our default, ``"nearest_other"``) takes the k nearest classes other than the
target. The original code searched the k nearest classes with the target included and replaced
a neighbour equal to the target by class ``target − 1`` (``"original"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
