"""The length of the full-resolution pixel embeddings, which the ESS loss can exploit.

The model L2-normalises its embeddings at stride 4 and upsamples them bilinearly (as in the
paper), so a full-resolution embedding is a blend that is shorter than 1 where its stride-4
sources disagree. A short pixel is about equally far from every unit class row, which moves its
ESS loss towards ``log(k + 1)`` whatever its label: a network that cannot yet reach its targets
can lower the loss by turning neighbouring stride-4 embeddings apart (BENCHMARKS.md §7.5 saw it
at 10 000 and 100 000 classes, with the exact search too). ``loss.normalize_pixels`` makes the
loss read unit-length pixels, which removes that way out; ``pixel_norm`` is logged every step.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxscaleseg.models import l2_normalize


def loss_outputs(outputs: Mapping[str, jax.Array], normalize: bool) -> Mapping[str, jax.Array]:
    """The model outputs the loss reads: ``outputs`` itself, or with ``normalize`` a copy
    whose ``pixel_embedding`` ``[B, H, W, D]`` float32 is scaled to unit length.

    The nearest-class searches keep the raw blends: against unit class rows a positive scale
    leaves each pixel's ranking of the classes (by ``p · c``) unchanged.
    """
    if not normalize:
        return outputs
    return {**outputs, "pixel_embedding": l2_normalize(outputs["pixel_embedding"])}


def mean_length(pixels: jax.Array) -> jax.Array:
    """float32 scalar: the mean length of ``pixels`` ``[B, H, W, D]`` on every fourth row and
    column (one pixel per 4×4 cell: a sixteenth of the reads, and no full-size temporary at the
    step's peak)."""
    sample = jax.lax.stop_gradient(pixels[:, ::4, ::4]).astype(jnp.float32)
    return jnp.mean(jnp.sqrt(jnp.sum(sample * sample, axis=-1)))


__all__ = ["loss_outputs", "mean_length"]
