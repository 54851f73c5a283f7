"""The length of the full-resolution pixel embeddings, which the ESS loss can exploit.

The model L2-normalises its embeddings at stride 4 and upsamples them bilinearly (as in the
paper), so a full-resolution embedding is a blend that is shorter than 1 where its stride-4
sources disagree. A short pixel is about equally far from every unit class row, which moves its
ESS loss towards ``log(k + 1)`` whatever its label: a network that cannot yet reach its targets
can lower the loss by turning neighbouring stride-4 embeddings apart (BENCHMARKS.md §7.5 saw it
at 10 000 and 100 000 classes, with the exact search too). ``loss.normalize_pixels`` makes the
loss read unit-length pixels (``losses.ess_objective(..., normalize_pixels=True)``, chunk by
chunk), which removes that way out; ``pixel_norm`` (:func:`mean_length`) is logged every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mean_length(pixels: jax.Array) -> jax.Array:
    """float32 scalar: the mean length of ``pixels`` ``[B, H, W, D]`` on every fourth row and
    column (one pixel per 4×4 cell: a sixteenth of the reads, and no full-size temporary at the
    step's peak)."""
    sample = jax.lax.stop_gradient(pixels[:, ::4, ::4]).astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.sum(sample * sample, axis=-1)))


__all__ = ["mean_length"]
