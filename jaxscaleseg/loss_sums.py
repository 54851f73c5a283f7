"""The chunked sums of the ESS and separation terms, with their hand-written backward.

:func:`loss_sums` is what ``jaxscaleseg.losses`` builds its objectives on: the ESS term over
chunks of P pixels (each chunk gathers its pixels' target and negative rows), the separation
hinge over chunks of classes, and a ``custom_vjp`` whose backward recomputes each chunk and adds
the class-table gradient by the method :class:`LossTerms` names (``class_rows``), so that no
array of the step's N·(k + 1) gathered rows or of N×C is ever held.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import class_rows, knn


@dataclasses.dataclass(frozen=True)
class LossTerms:
    """Static settings of :func:`loss_sums` (hashable, so a ``custom_vjp`` nondiff argument)."""

    temperature: float
    margin: float
    normalize: bool
    pixels_per_chunk: int
    classes_per_chunk: int
    with_ess: bool
    with_separation: bool
    table_gradient: str = "scatter"
    classes_per_block: int = 1
    normalize_pixels: bool = False


def _ess_chunk_coefficients(pixels, rows, valid, temperature, cotangent):
    """The ESS gradient of one chunk as one scalar per candidate.

    With ``d_j = ‖p − r_j‖`` (clamped as ``knn.pairwise_distance``) and ``a_j = (∂loss/∂d_j)
    / d_j`` (0 where the clamp holds), ``∂loss/∂r_j = a_j (r_j − p)`` and ``∂loss/∂p = Σ_j a_j
    (p − r_j)``.

    Args:
      pixels: float32 ``[P, D]``.
      rows: float32 ``[P, k + 1, D]``, as :func:`_ess_chunk_sum` reads them.
      valid: bool ``[P]``.
      temperature: T.
      cotangent: float32 scalar, the cotangent of the chunk's sum.

    Returns:
      ``(a [P, k + 1], pixel_grad [P, D])``, float32.
    """
    diff = pixels[:, None, :] - rows
    squared = jnp.sum(diff * diff, axis=-1)
    distances = jnp.sqrt(jnp.maximum(squared, 1e-12))

    def chunk_sum(distances):
        logits = -temperature * distances
        per_pixel = jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]
        return jnp.sum(jnp.where(valid, per_pixel, 0.0))

    _, pullback = jax.vjp(chunk_sum, distances)
    (distance_grad,) = pullback(cotangent)
    coefficients = jnp.where(squared > 1e-12, distance_grad / distances, 0.0)
    pixel_grad = jnp.sum(coefficients[..., None] * diff, axis=1)
    return coefficients, pixel_grad


def _ess_chunk_sum(pixels, rows, valid, temperature):
    """Sum over one chunk's valid pixels of the cross-entropy of the target among its rows.

    Args:
      pixels: float32 ``[P, D]``.
      rows: float32 ``[P, k + 1, D]``, the target's row first, then the k neighbours'.
      valid: bool ``[P]``.
      temperature: logits are ``-temperature * distance``.

    Returns:
      float32 scalar: ``sum over valid p of logsumexp(logits_p) - logits_p[0]``.
    """
    logits = -temperature * knn.pairwise_distance(pixels[:, None, :], rows)
    per_pixel = jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]
    return jnp.sum(jnp.where(valid, per_pixel, 0.0))


def _hinge_chunk_sum(own, nearest, weights, margin):
    """``sum_c weights_c · relu(margin − ‖own_c − nearest_c‖)`` over one chunk of classes.

    Args:
      own, nearest: float32 ``[R, D]``.
      weights: float32 ``[R]`` (0 for rows another chunk already counted).
      margin: m.

    Returns:
      float32 scalar.
    """
    return jnp.sum(weights * jax.nn.relu(margin - knn.pairwise_distance(own, nearest)))


def _class_chunk(index, chunk, num_classes, nearest):
    """Rows of class chunk ``index``: ``(start, own_ids [R], nearest_ids [R], weights [R])``.

    The last chunk starts early so that it stays inside the table; its rows that the chunk
    before it covered weigh 0.
    """
    covered = index * chunk
    start = jnp.minimum(covered, num_classes - chunk)
    own_ids = start + jnp.arange(chunk, dtype=jnp.int32)
    weights = jnp.where(own_ids >= covered, 1.0, 0.0).astype(jnp.float32)
    return start, own_ids, lax.dynamic_slice_in_dim(nearest, start, chunk), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def loss_sums(pixels, targets, neighbors, valid, nearest, classes, terms):
    """The sums behind the ESS loss and the separation loss, with one table gradient.

    Forward: ``(Σ_valid ESS cross-entropy, Σ_c relu(m − ‖e_c − e_nearest[c]‖))`` over chunks of
    pixels and of classes (the second is 0 unless ``terms.with_separation``). Backward: each
    chunk is recomputed and differentiated on its own gathered rows, and the row gradients of
    both terms are scattered into a single ``[C, D]`` table gradient, so that the step holds one
    table-sized array for the loss where automatic differentiation would hold several (the
    normalised table, its gradient, a second gradient for the regulariser).

    Args:
      pixels: float32 ``[n·P, D]`` (padded to whole chunks of P = ``terms.pixels_per_chunk``).
      targets: int32 ``[n·P]``, each pixel's target class (any valid id where not ``valid``).
      neighbors: int32 ``[n·P, k]``, its k nearest other classes.
      valid: bool ``[n·P]``.
      nearest: int32 ``[C]``, each class's nearest other class.
      classes: float32 ``[C, D]``, unit rows, or any rows when ``terms.normalize``.
      terms: the static settings.

    Returns:
      ``(ess_sum, separation_sum)``, float32 scalars.
    """
    return _loss_sums_fwd(pixels, targets, neighbors, valid, nearest, classes, terms)[0]


def _pixel_chunks(pixels, targets, neighbors, valid, chunk):
    """The pixel arrays cut into ``[n, P, ...]`` chunks."""
    count = pixels.shape[0] // chunk
    return (
        pixels.reshape(count, chunk, pixels.shape[-1]),
        targets.reshape(count, chunk),
        neighbors.reshape(count, chunk, neighbors.shape[-1]),
        valid.reshape(count, chunk),
    )


def _candidates(targets, neighbors):
    """int32 ``[P, k + 1]``: the target first, then the neighbours."""
    return jnp.concatenate([targets[:, None], neighbors], axis=-1)


def _loss_sums_fwd(pixels, targets, neighbors, valid, nearest, classes, terms):
    ess_sum = jnp.zeros((), jnp.float32)
    if terms.with_ess:

        def ess_step(total, xs):
            chunk_pixels, chunk_targets, chunk_neighbors, chunk_valid = xs
            chunk_pixels, _ = class_rows.read_rows(chunk_pixels, terms.normalize_pixels)
            rows, _ = class_rows.read_rows(
                classes[_candidates(chunk_targets, chunk_neighbors)], terms.normalize
            )
            return total + _ess_chunk_sum(chunk_pixels, rows, chunk_valid, terms.temperature), None

        chunks = _pixel_chunks(pixels, targets, neighbors, valid, terms.pixels_per_chunk)
        ess_sum, _ = lax.scan(ess_step, ess_sum, chunks)
    separation_sum = jnp.zeros((), jnp.float32)
    if terms.with_separation:
        num_classes = classes.shape[0]
        chunk = terms.classes_per_chunk

        def separation_step(index, total):
            start, own_ids, nearest_ids, weights = _class_chunk(index, chunk, num_classes, nearest)
            own, _ = class_rows.read_rows(classes[own_ids], terms.normalize)
            other, _ = class_rows.read_rows(classes[nearest_ids], terms.normalize)
            return total + _hinge_chunk_sum(own, other, weights, terms.margin)

        separation_sum = lax.fori_loop(0, -(-num_classes // chunk), separation_step, separation_sum)
    residuals = (pixels, targets, neighbors, valid, nearest, classes)
    return (ess_sum, separation_sum), residuals


def _separation_backward(terms, classes, nearest, cotangent, table_grad):
    """Adds the separation term's gradient (scaled by ``cotangent``) to ``table_grad [C, D]``."""
    num_classes = classes.shape[0]
    chunk = terms.classes_per_chunk

    def separation_step(index, grad):
        start, own_ids, nearest_ids, weights = _class_chunk(index, chunk, num_classes, nearest)

        def hinge(own, other):
            return _hinge_chunk_sum(own, other, weights, terms.margin)

        own, own_inverse_norms = class_rows.read_rows(
            lax.dynamic_slice_in_dim(classes, start, chunk), terms.normalize
        )
        other, other_inverse_norms = class_rows.read_rows(classes[nearest_ids], terms.normalize)
        _, pullback = jax.vjp(hinge, own, other)
        own_grad, other_grad = pullback(cotangent)
        own_grad = class_rows.raw_row_gradient(own, own_inverse_norms, own_grad)
        other_grad = class_rows.raw_row_gradient(other, other_inverse_norms, other_grad)
        grad = lax.dynamic_update_slice_in_dim(
            grad, lax.dynamic_slice_in_dim(grad, start, chunk) + own_grad, start, 0
        )
        # One row per class: little contention, but no atomics where they are avoided.
        return class_rows.add_rows(grad, nearest_ids, other_grad, terms.table_gradient != "scatter")

    table_grad = lax.fori_loop(0, -(-num_classes // chunk), separation_step, table_grad)
    return table_grad


def _ess_backward(terms, pixels, targets, neighbors, valid, classes, cotangent, table_grad):
    """The ESS term's gradients (scaled by ``cotangent``): ``(pixel_grad [N, D], table_grad)``."""

    def ess_step(grad, xs):
        chunk_pixels, chunk_targets, chunk_neighbors, chunk_valid = xs
        chunk_pixels, scales = class_rows.read_rows(chunk_pixels, terms.normalize_pixels)
        chunk_candidates = _candidates(chunk_targets, chunk_neighbors)
        rows, inverse_norms = class_rows.read_rows(classes[chunk_candidates], terms.normalize)
        if terms.table_gradient == "matmul":
            coefficients, chunk_pixel_grad = _ess_chunk_coefficients(
                chunk_pixels, rows, chunk_valid, terms.temperature, cotangent
            )
            grad = class_rows.add_rows_by_matmul(
                grad,
                classes,
                terms.normalize,
                chunk_pixels,
                chunk_candidates,
                coefficients,
                terms.classes_per_block,
            )
            return grad, class_rows.raw_row_gradient(chunk_pixels, scales, chunk_pixel_grad)

        def chunk_sum(chunk_pixels, rows):
            return _ess_chunk_sum(chunk_pixels, rows, chunk_valid, terms.temperature)

        _, pullback = jax.vjp(chunk_sum, chunk_pixels, rows)
        chunk_pixel_grad, rows_grad = pullback(cotangent)
        rows_grad = class_rows.raw_row_gradient(rows, inverse_norms, rows_grad)
        grad = class_rows.add_rows(
            grad, chunk_candidates, rows_grad, terms.table_gradient == "sorted"
        )
        return grad, class_rows.raw_row_gradient(chunk_pixels, scales, chunk_pixel_grad)

    def coefficient_step(carry, xs):
        chunk_pixels, chunk_targets, chunk_neighbors, chunk_valid = xs
        chunk_pixels, scales = class_rows.read_rows(chunk_pixels, terms.normalize_pixels)
        rows, _ = class_rows.read_rows(
            classes[_candidates(chunk_targets, chunk_neighbors)], terms.normalize
        )
        coefficients, chunk_pixel_grad = _ess_chunk_coefficients(
            chunk_pixels, rows, chunk_valid, terms.temperature, cotangent
        )
        chunk_pixel_grad = class_rows.raw_row_gradient(chunk_pixels, scales, chunk_pixel_grad)
        return carry, (chunk_pixel_grad, coefficients)

    chunks = _pixel_chunks(pixels, targets, neighbors, valid, terms.pixels_per_chunk)
    if terms.table_gradient == "segment":
        # The chunks only give coefficients; one sort of the step's ids sums them.
        _, (pixel_grad, coefficients) = lax.scan(coefficient_step, None, chunks)
        candidates = _candidates(targets, neighbors)
        table_grad = class_rows.add_rows_by_segments(
            table_grad,
            classes,
            terms.normalize,
            class_rows.read_rows(pixels, terms.normalize_pixels)[0],
            candidates,
            coefficients.reshape(candidates.shape),
            terms.pixels_per_chunk * candidates.shape[1],
        )
    else:
        table_grad, pixel_grad = lax.scan(ess_step, table_grad, chunks)
    return pixel_grad.reshape(pixels.shape), table_grad


def _loss_sums_bwd(terms, residuals, cotangents):
    pixels, targets, neighbors, valid, nearest, classes = residuals
    ess_cotangent, separation_cotangent = cotangents
    table_grad = jnp.zeros_like(classes)
    if terms.with_separation:
        table_grad = _separation_backward(terms, classes, nearest, separation_cotangent, table_grad)
    pixel_grad = jnp.zeros_like(pixels)
    if terms.with_ess:
        pixel_grad, table_grad = _ess_backward(
            terms, pixels, targets, neighbors, valid, classes, ess_cotangent, table_grad
        )
    return pixel_grad, None, None, None, None, table_grad


loss_sums.defvjp(_loss_sums_fwd, _loss_sums_bwd)
