"""Losses: the ESS approximate cross-entropy, the class-separation regulariser, the baseline.

Conventions (optax style): integer labels, ``ignore_index`` marks pixels that do not count, no
one-hot over classes, and every loss is a mean over the pixels that count, 0 when none do. Labels
outside ``[0, C)`` other than ``ignore_index`` make the loss NaN inside ``jit`` (so a training
loop that stops on non-finite losses stops); call ``jaxscaleseg.labels.check_labels`` eagerly to
get an error that names the offending values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import class_rows, knn, nearest_other
from jaxscaleseg import negatives as negatives_rule
from jaxscaleseg.labels import IGNORE_INDEX
from jaxscaleseg.loss_plan import DEFAULT_PIXELS_PER_CHUNK, loss_plan
from jaxscaleseg.loss_sums import LossTerms, loss_sums

# Classes per chunk of the separation loss (its gathered nearest rows, forward and backward).
_CLASSES_PER_CHUNK = 8192


def _mean_over_valid(per_pixel: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``per_pixel`` where ``valid``; 0 (not NaN) when nothing is valid."""
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


def _labels_in_range(labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
    """Scalar bool: every label is a class id or ``ignore_index``."""
    return jnp.all((labels == ignore_index) | ((labels >= 0) & (labels < num_classes)))


def _separation_partners(classes, with_separation, separation_ids, plan, normalize):
    """int32 ``[C]``: each class's separation partner (given, searched, or unused zeros)."""
    num_classes = classes.shape[0]
    if not with_separation:
        nearest = jnp.zeros((num_classes,), jnp.int32)
    elif separation_ids is not None:
        if separation_ids.shape != (num_classes,):
            raise ValueError(f"separation_ids {separation_ids.shape} must be (C={num_classes},)")
        nearest = lax.stop_gradient(jnp.asarray(separation_ids, jnp.int32))
    else:
        nearest = nearest_other.nearest_other_class_ids(
            classes, plan.max_block_bytes, normalize, plan.search_method
        )
    return nearest


def ess_objective(
    pixel_emb: jax.Array,
    labels: jax.Array,
    class_emb: jax.Array,
    *,
    num_neighbors: int = 7,
    temperature: float = 20.0,
    margin: float = 0.2,
    separation_weight: float = 1.0,
    normalize_classes: bool = False,
    ignore_index: int = IGNORE_INDEX,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
    pixels_per_chunk: int | str = DEFAULT_PIXELS_PER_CHUNK,
    table_gradient: str = "auto",
    negatives: str = "nearest_other",
    search_method: str = "auto",
    separation_ids: jax.Array | None = None,
    neighbor_ids: jax.Array | None = None,
    normalize_pixels: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective ``ess_loss + separation_weight · separation_loss`` in one pass.

    Same values and gradients as the two losses added up, but the backward pass scatters the
    gradients of both into one ``[C, D]`` table gradient; with ``normalize_classes`` it also
    takes the raw, learnable table and normalises the rows it reads (in the search blocks and
    the gathered rows), so that no normalised copy of the table and no separate gradient of
    one is ever held. At C = 100 000 that keeps the training step's table memory to the table,
    its gradient and the optimiser state.

    Args:
      pixel_emb: ``[B, H, W, D]`` float32 or bfloat16 (computed in float32).
      labels: int ``[B, H, W]`` class ids in ``[0, C)`` or ``ignore_index``.
      class_emb: float ``[C, D]``: unit rows, or any rows with ``normalize_classes``.
      num_neighbors, temperature, ignore_index, pixels_per_chunk: as in :func:`ess_loss`.
      margin: as in :func:`separation_loss`.
      separation_weight: weight of the separation term; 0 leaves it out.
      normalize_classes: ``class_emb`` holds raw rows; each is scaled to unit length where it
        is read (the gradient flows through that scaling, as through ``l2_normalize``).
      max_block_bytes: memory budget of the nearest-class searches (and of the matmul table
        gradient's weights), or ``"auto"`` (by backend, ``loss_plan.loss_plan``).
      pixels_per_chunk: as in :func:`ess_loss`, or ``"auto"`` (by backend).
      table_gradient: how row gradients reach the table: ``"scatter"`` (a scatter-add: fastest
        on CPU; atomics on GPUs), ``"sorted"`` (each chunk's rows summed per class id after a
        sort, then written once per id), ``"matmul"`` (per block of classes, a pixels-weighted
        sum as one matmul; no sort, no scatter), ``"segment"`` (one sort of all the step's
        candidate ids, then per-id sums written once) — see ``class_rows`` — or ``"auto"``
        (``loss_plan.loss_plan``: scatter on CPU, sorted on GPU/TPU).
      negatives: ``"nearest_other"`` (the paper: the k nearest classes other than the target)
        or ``"original"`` (the original code: the k nearest classes, a target among them
        replaced as in ``negatives.original_rule_negatives``).
      search_method: the nearest-class search's selection (``knn.nearest_class_ids``).
      separation_ids: optional int ``[C]``, each class's nearest other class for the separation
        term (e.g. from ``nearest_other.nearest_other_classes`` a few steps ago, see
        ``nearest_other.refresh_separation_ids``); the hinge is computed on the current rows.
        None: the exact C×C bounded search, now.
      neighbor_ids: optional int ``[B, H, W, k]``, each pixel's k negatives found elsewhere
        (e.g. by ``knn_index.approximate_nearest_class_ids``, excluding the target); None: the
        exact search (``negatives`` then applies).
      normalize_pixels: the ESS term reads each pixel scaled to unit length, chunk by chunk
        (no scaled copy held; the gradient flows through the scaling). The negatives are the
        same: a positive scale leaves a pixel's ranking of unit class rows unchanged.

    Returns:
      ``(total, {"ess": ..., "separation": ...})``, float32 scalars; ``separation`` is 0 when
      ``separation_weight`` is 0 (it is not computed).
    """
    num_classes, dim = class_rows.check_table(class_emb, "ess_objective")
    if not 1 <= num_neighbors <= num_classes - 1:
        raise ValueError(
            f"num_neighbors={num_neighbors} must be between 1 and C-1={num_classes - 1}"
        )
    if pixel_emb.shape[:-1] != labels.shape or pixel_emb.shape[-1] != dim:
        raise ValueError(f"pixel_emb {pixel_emb.shape} must be labels {labels.shape} + (D={dim},)")
    plan = loss_plan(
        None,
        num_classes,
        max_block_bytes=max_block_bytes,
        pixels_per_chunk=pixels_per_chunk,
        table_gradient=table_gradient,
        search_method=search_method,
    )
    pixels = jnp.asarray(pixel_emb, jnp.float32).reshape(-1, dim)
    flat_labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    classes = jnp.asarray(class_emb, jnp.float32)
    valid = (flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < num_classes)
    targets = jnp.where(valid, flat_labels, 0)
    neighbors = negatives_rule.pixel_negatives(
        pixels, targets, classes, labels.shape, num_neighbors, negatives, neighbor_ids, plan,
        normalize_classes,
    )  # fmt: skip
    num_pixels = pixels.shape[0]
    chunk = max(1, min(plan.pixels_per_chunk, num_pixels))
    extra = -num_pixels % chunk
    if extra:
        pixels = jnp.pad(pixels, ((0, extra), (0, 0)))
        targets = jnp.pad(targets, (0, extra))
        neighbors = jnp.pad(neighbors, ((0, extra), (0, 0)))
        valid = jnp.pad(valid, (0, extra))
    with_separation = separation_weight != 0
    nearest = _separation_partners(
        classes, with_separation, separation_ids, plan, normalize_classes
    )
    terms = LossTerms(
        temperature=float(temperature),
        margin=float(margin),
        normalize=bool(normalize_classes),
        pixels_per_chunk=chunk,
        classes_per_chunk=min(_CLASSES_PER_CHUNK, num_classes),
        with_ess=True,
        with_separation=with_separation,
        table_gradient=plan.table_gradient,
        # The matmul's [classes, pixels] float32 weights within the block budget.
        classes_per_block=max(1, plan.max_block_bytes // (4 * chunk)),
        normalize_pixels=bool(normalize_pixels),
    )
    ess_sum, separation_sum = loss_sums(pixels, targets, neighbors, valid, nearest, classes, terms)
    ess = ess_sum / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    ess = jnp.where(_labels_in_range(flat_labels, num_classes, ignore_index), ess, jnp.nan)
    separation = separation_sum / num_classes
    return ess + separation_weight * separation, {"ess": ess, "separation": separation}


def ess_loss(
    pixel_emb: jax.Array,
    labels: jax.Array,
    class_emb: jax.Array,
    *,
    num_neighbors: int = 7,
    temperature: float = 20.0,
    ignore_index: int = IGNORE_INDEX,
    max_block_bytes: int = knn.DEFAULT_MAX_BLOCK_BYTES,
    pixels_per_chunk: int = DEFAULT_PIXELS_PER_CHUNK,
    negatives: str = "nearest_other",
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
    ``class_emb`` only; nothing of size pixels×C is ever held, and the backward pass
    recomputes each chunk of ``pixels_per_chunk`` pixels instead of storing its gathered rows.

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
      negatives: ``"nearest_other"`` (K above) or ``"original"`` (the original code's rule,
        see ``negatives.original_rule_negatives``).

    Returns:
      float32 scalar; 0 when every pixel is ignored, NaN when a label is out of range.
    """
    class_rows.check_table(class_emb, "ess_loss")
    _, parts = ess_objective(
        pixel_emb,
        labels,
        class_emb,
        num_neighbors=num_neighbors,
        temperature=temperature,
        separation_weight=0.0,
        ignore_index=ignore_index,
        max_block_bytes=max_block_bytes,
        pixels_per_chunk=pixels_per_chunk,
        negatives=negatives,
    )
    return parts["ess"]


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
    flows through the distance to both rows, computed chunk by chunk (no second ``[C, D]``
    array besides the gradient).

    Args:
      class_emb: float ``[C, D]``, C >= 2.
      margin: m.
      max_block_bytes: memory budget of the nearest-class search.

    Returns:
      float32 scalar.
    """
    num_classes, dim = class_rows.check_table(class_emb, "separation_loss")
    classes = jnp.asarray(class_emb, jnp.float32)
    terms = LossTerms(
        temperature=0.0,
        margin=float(margin),
        normalize=False,
        pixels_per_chunk=1,
        classes_per_chunk=min(_CLASSES_PER_CHUNK, num_classes),
        with_ess=False,
        with_separation=True,
        table_gradient=loss_plan(None, num_classes).table_gradient,
    )
    nearest = nearest_other.nearest_other_class_ids(classes, max_block_bytes, False)
    no_pixels = jnp.zeros((0, dim), jnp.float32)
    _, separation_sum = loss_sums(
        no_pixels,
        jnp.zeros((0,), jnp.int32),
        jnp.zeros((0, 1), jnp.int32),
        jnp.zeros((0,), bool),
        nearest,
        classes,
        terms,
    )
    return separation_sum / num_classes


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
