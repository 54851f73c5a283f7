"""Losses: the ESS approximate cross-entropy, the class-separation regulariser, the baseline.

Conventions (optax style): integer labels, ``ignore_index`` marks pixels that do not count, no
one-hot over classes, and every loss is a mean over the pixels that count, 0 when none do. Labels
outside ``[0, C)`` other than ``ignore_index`` make the loss NaN inside ``jit`` (so a training
loop that stops on non-finite losses stops); call ``jaxscaleseg.labels.check_labels`` eagerly to
get an error that names the offending values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import knn
from jaxscaleseg.labels import IGNORE_INDEX

# Pixels per chunk of the ESS loss; each chunk's k+1 gathered class rows are recomputed in the
# backward pass instead of being stored for all pixels at once.
_DEFAULT_PIXELS_PER_CHUNK = 16384


def _mean_over_valid(per_pixel: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``per_pixel`` where ``valid``; 0 (not NaN) when nothing is valid."""
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


def _labels_in_range(labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
    """Scalar bool: every label is a class id or ``ignore_index``."""
    return jnp.all((labels == ignore_index) | ((labels >= 0) & (labels < num_classes)))


def _ess_per_pixel(
    pixel_emb: jax.Array,
    targets: jax.Array,
    neighbors: jax.Array,
    class_emb: jax.Array,
    temperature: float,
) -> jax.Array:
    """Cross-entropy of the target among {target} ∪ neighbours, per pixel.

    Args:
      pixel_emb: float32 ``[P, D]``.
      targets: int32 ``[P]`` valid class ids.
      neighbors: int32 ``[P, k]`` class ids (no gradient).
      class_emb: float32 ``[C, D]``.
      temperature: logits are ``-temperature * distance``.

    Returns:
      float32 ``[P]``: ``logsumexp(logits) - logits[target]``.
    """
    candidates = jnp.concatenate([targets[:, None], neighbors], axis=-1)  # [P, k+1]
    distances = knn.pairwise_distance(pixel_emb[:, None, :], class_emb[candidates])
    logits = -temperature * distances
    return jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]


def ess_loss(
    pixel_emb: jax.Array,
    labels: jax.Array,
    class_emb: jax.Array,
    *,
    num_neighbors: int = 7,
    temperature: float = 20.0,
    ignore_index: int = IGNORE_INDEX,
    max_block_bytes: int = knn.DEFAULT_MAX_BLOCK_BYTES,
    pixels_per_chunk: int = _DEFAULT_PIXELS_PER_CHUNK,
) -> jax.Array:
    r"""Embedding-based approximate cross-entropy (ESS, Jain et al. 2021, eq. 4).

    For a pixel embedding :math:`p` with target class :math:`y` and the set :math:`K` of its
    ``num_neighbors`` nearest classes other than :math:`y` (found without gradient),

    .. math::
        \ell = -\log \frac{\exp(-T\,\lVert p - e_y \rVert)}
                          {\sum_{c \in \{y\} \cup K} \exp(-T\,\lVert p - e_c \rVert)}

    averaged over the pixels whose label is not ``ignore_index``. With
    ``num_neighbors = C - 1`` this is the full softmax cross-entropy over
    ``-T * distance``. Gradients reach ``pixel_emb`` and the gathered ``k + 1`` rows of
    ``class_emb`` only; nothing of size pixels×C is ever held.

    Args:
      pixel_emb: ``[B, H, W, D]`` (any leading shape) float32 or bfloat16 pixel embeddings;
        computed in float32. Need not be unit length.
      labels: int ``[B, H, W]`` class ids in ``[0, C)`` or ``ignore_index``.
      class_emb: float ``[C, D]`` class embeddings.
      num_neighbors: k, negatives per pixel, ``1 <= k <= C - 1``.
      temperature: T.
      ignore_index: label value of pixels that do not count.
      max_block_bytes: memory budget of the nearest-class search.
      pixels_per_chunk: pixels per rematerialised chunk of the loss.

    Returns:
      float32 scalar; 0 when every pixel is ignored, NaN when a label is out of range.
    """
    num_classes, dim = class_emb.shape
    if num_classes < 2:
        raise ValueError(f"ess_loss needs at least 2 classes, got C={num_classes}")
    if not 1 <= num_neighbors <= num_classes - 1:
        raise ValueError(
            f"num_neighbors={num_neighbors} must be between 1 and C-1={num_classes - 1}"
        )
    if pixel_emb.shape[:-1] != labels.shape or pixel_emb.shape[-1] != dim:
        raise ValueError(f"pixel_emb {pixel_emb.shape} must be labels {labels.shape} + (D={dim},)")
    pixels = jnp.asarray(pixel_emb, jnp.float32).reshape(-1, dim)
    flat_labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    classes = jnp.asarray(class_emb, jnp.float32)
    valid = (flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < num_classes)
    targets = jnp.where(valid, flat_labels, 0)
    neighbors = knn.nearest_class_ids(
        pixels, classes, num_neighbors, exclude=targets, max_block_bytes=max_block_bytes
    )

    num_pixels = pixels.shape[0]
    chunk = max(1, min(pixels_per_chunk, num_pixels))
    extra = -num_pixels % chunk
    if extra:
        pixels = jnp.pad(pixels, ((0, extra), (0, 0)))
        targets = jnp.pad(targets, (0, extra))
        neighbors = jnp.pad(neighbors, ((0, extra), (0, 0)))
        valid = jnp.pad(valid, (0, extra))
    num_chunks = pixels.shape[0] // chunk

    @jax.checkpoint
    def chunk_loss(carry, xs):
        chunk_pixels, chunk_targets, chunk_neighbors, chunk_valid = xs
        per_pixel = _ess_per_pixel(
            chunk_pixels, chunk_targets, chunk_neighbors, classes, temperature
        )
        return carry + jnp.sum(jnp.where(chunk_valid, per_pixel, 0.0)), None

    xs = (
        pixels.reshape(num_chunks, chunk, dim),
        targets.reshape(num_chunks, chunk),
        neighbors.reshape(num_chunks, chunk, num_neighbors),
        valid.reshape(num_chunks, chunk),
    )
    total, _ = lax.scan(chunk_loss, jnp.zeros((), jnp.float32), xs)
    loss = total / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    in_range = _labels_in_range(flat_labels, num_classes, ignore_index)
    return jnp.where(in_range, loss, jnp.nan)


def separation_loss(
    class_emb: jax.Array,
    *,
    margin: float = 0.2,
    max_block_bytes: int = knn.DEFAULT_MAX_BLOCK_BYTES,
) -> jax.Array:
    r"""Pushes each class embedding at least ``margin`` away from its nearest other class.

    .. math::
        \frac{1}{C} \sum_c \max\bigl(0,\ m - \min_{c' \ne c} \lVert e_c - e_{c'} \rVert\bigr)

    The nearest other class is found with the bounded search (no C×C array); the gradient
    flows through the distance to both rows.

    Args:
      class_emb: float ``[C, D]``, C >= 2.
      margin: m.
      max_block_bytes: memory budget of the nearest-class search.

    Returns:
      float32 scalar.
    """
    num_classes = class_emb.shape[0]
    if num_classes < 2:
        raise ValueError(f"separation_loss needs at least 2 classes, got C={num_classes}")
    classes = jnp.asarray(class_emb, jnp.float32)
    own_ids = jnp.arange(num_classes, dtype=jnp.int32)
    nearest = knn.nearest_class_ids(
        classes, classes, 1, exclude=own_ids, max_block_bytes=max_block_bytes
    )[:, 0]
    return _hinge_to_nearest(classes, nearest, margin) / num_classes


# Classes per step of the separation gradient's scatter to the nearest rows.
_SCATTER_CHUNK = 8192


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _hinge_to_nearest(classes: jax.Array, nearest: jax.Array, margin: float) -> jax.Array:
    """``sum_c relu(margin − ‖e_c − e_nearest[c]‖)`` with a lean hand-written gradient.

    Automatic differentiation keeps the ``[C, D]`` differences (or the gathered rows) from
    the forward pass to the backward pass and builds a second ``[C, D]`` array for the scatter
    to the nearest rows. Here the backward pass keeps one scale per class, recomputes the
    differences and scatters them in chunks, so at large C it holds the gradient alone.

    Args:
      classes: float32 ``[C, D]``.
      nearest: int32 ``[C]`` (no gradient).
      margin: m.

    Returns:
      float32 scalar.
    """
    return _hinge_to_nearest_fwd(classes, nearest, margin)[0]


def _squared_norm(x: jax.Array) -> jax.Array:
    """``sum(x², -1)`` as an elementwise chain (fuses with the producer of x; see
    ``models.deeplabv3plus._dot_along``)."""
    total = x[..., 0] * x[..., 0]
    for i in range(1, x.shape[-1]):
        total = total + x[..., i] * x[..., i]
    return total


def _hinge_to_nearest_fwd(classes, nearest, margin):
    squared = _squared_norm(classes - classes[nearest])
    distances = jnp.sqrt(jnp.maximum(squared, 1e-12))  # as knn.pairwise_distance
    # d relu(m − d)/d diff = −diff/d where the margin is violated and the distance is not
    # clamped (a zero gradient there, as for knn.pairwise_distance).
    scale = jnp.where((distances < margin) & (squared > 1e-12), -1.0 / distances, 0.0)
    return jnp.sum(jax.nn.relu(margin - distances)), (classes, nearest, scale)


def _hinge_to_nearest_bwd(margin, residuals, g):
    del margin
    classes, nearest, scale = residuals
    # A barrier keeps XLA from sharing the gather below with the forward pass's (which would
    # keep a [C, D] array alive from one to the other).
    nearest = lax.optimization_barrier(nearest)
    weights = g * scale
    grad = weights[:, None] * (classes - classes[nearest])
    num_classes = classes.shape[0]
    chunk = min(_SCATTER_CHUNK, num_classes)

    def scatter_chunk(index, grad):
        # The last chunk starts early to stay inside the table; rows already done weigh 0.
        covered = index * chunk
        start = jnp.minimum(covered, num_classes - chunk)
        rows = start + jnp.arange(chunk)
        chunk_weights = jnp.where(
            rows >= covered, lax.dynamic_slice_in_dim(weights, start, chunk), 0
        )
        chunk_nearest = lax.dynamic_slice_in_dim(nearest, start, chunk)
        diff = lax.dynamic_slice_in_dim(classes, start, chunk) - classes[chunk_nearest]
        return grad.at[chunk_nearest].add(-chunk_weights[:, None] * diff)

    grad = lax.fori_loop(0, -(-num_classes // chunk), scatter_chunk, grad)
    return grad, None


_hinge_to_nearest.defvjp(_hinge_to_nearest_fwd, _hinge_to_nearest_bwd)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> jax.Array:
    r"""Per-pixel softmax cross-entropy, the baseline's loss, without one-hot targets.

    .. math:: \ell = \operatorname{logsumexp}(z) - z_y

    averaged over pixels whose label is not ``ignore_index``.

    Args:
      logits: float ``[B, H, W, C]`` (any leading shape); computed in float32.
      labels: int ``[B, H, W]`` class ids in ``[0, C)`` or ``ignore_index``.
      ignore_index: label value of pixels that do not count.

    Returns:
      float32 scalar; 0 when every pixel is ignored, NaN when a label is out of range.
    """
    num_classes = logits.shape[-1]
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} must be labels {labels.shape} + (C,)")
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    targets = jnp.where(valid, labels, 0)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    per_pixel = jax.nn.logsumexp(logits, axis=-1) - target_logits
    loss = _mean_over_valid(per_pixel, valid)
    return jnp.where(_labels_in_range(labels, num_classes, ignore_index), loss, jnp.nan)
