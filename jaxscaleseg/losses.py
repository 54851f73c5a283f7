"""Losses: the ESS approximate cross-entropy, the class-separation regulariser, the baseline.

Conventions (optax style): integer labels, ``ignore_index`` marks pixels that do not count, no
one-hot over classes, and every loss is a mean over the pixels that count, 0 when none do. Labels
outside ``[0, C)`` other than ``ignore_index`` make the loss NaN inside ``jit`` (so a training
loop that stops on non-finite losses stops); call ``jaxscaleseg.labels.check_labels`` eagerly to
get an error that names the offending values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import knn
from jaxscaleseg.labels import IGNORE_INDEX

# Pixels per chunk of the ESS loss; each chunk's k+1 gathered class rows are recomputed in the
# backward pass instead of being stored for all pixels at once.
_DEFAULT_PIXELS_PER_CHUNK = 8192
# What ``pixels_per_chunk="auto"`` means: the cache-sized chunk on CPU (as measured in
# BENCHMARKS.md §2); on GPU/TPU a chunk is a loop iteration of several kernels, so 2¹⁸ pixels
# (8 chunks a step at batch 8, 512×512).
AUTO_PIXELS_PER_CHUNK = {"cpu": _DEFAULT_PIXELS_PER_CHUNK}
ACCELERATOR_PIXELS_PER_CHUNK = 2**18
# Classes per chunk of the separation loss (its gathered nearest rows, forward and backward).
_CLASSES_PER_CHUNK = 8192
# Largest C for which ``table_gradient="auto"`` takes the matmul on GPU/TPU: its work grows as
# N·C (like the exact search's), the segment path's as N·log N. A guess until benchmarks.gpu_check
# has measured both on a GPU.
MATMUL_MAX_CLASSES = 8192
TABLE_GRADIENTS = ("auto", "scatter", "sorted", "matmul", "segment")


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """How the ESS objective is cut up and how its table gradient is summed.

    Attributes:
      max_block_bytes: budget of the nearest-class searches (queries×classes scores, and the
        matmul table gradient's classes×pixels weights).
      pixels_per_chunk: pixels per chunk of the loss (rows gathered and recomputed per chunk).
      table_gradient: ``"scatter"``, ``"sorted"``, ``"matmul"`` or ``"segment"`` (see
        :func:`ess_objective`).
      search_method: ``"pyramid"`` or ``"top_k"`` (see ``knn.nearest_class_ids``).
    """

    max_block_bytes: int
    pixels_per_chunk: int
    table_gradient: str
    search_method: str


def loss_plan(
    backend: str | None,
    num_classes: int,
    *,
    max_block_bytes: int | str = "auto",
    pixels_per_chunk: int | str = "auto",
    table_gradient: str = "auto",
    search_method: str = "auto",
) -> LossPlan:
    """Resolves every ``"auto"`` setting of the ESS objective for a backend (pure).

    On ``"cpu"``: 8 MiB blocks, 8 192-pixel chunks, scatter-add, the pyramid search (the values
    the CPU benchmarks were measured with). On any other backend: 1 GiB blocks, 2¹⁸-pixel
    chunks, ``lax.top_k``, and the matmul table gradient up to ``MATMUL_MAX_CLASSES`` classes,
    the segment one above (no contended float atomics either way). Ints and named methods are
    kept as given.

    Args:
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; None: ``jax.default_backend()``.
      num_classes: C.
      max_block_bytes, pixels_per_chunk, table_gradient, search_method: the settings, each
        ``"auto"`` or a value.

    Returns:
      The resolved :class:`LossPlan`.
    """
    backend = backend or jax.default_backend()
    if table_gradient not in TABLE_GRADIENTS:
        raise ValueError(f"table_gradient={table_gradient!r}; expected one of {TABLE_GRADIENTS}")
    if isinstance(pixels_per_chunk, str):
        if pixels_per_chunk != "auto":
            raise ValueError(f"pixels_per_chunk={pixels_per_chunk!r}; expected 'auto' or an int")
        pixels_per_chunk = AUTO_PIXELS_PER_CHUNK.get(backend, ACCELERATOR_PIXELS_PER_CHUNK)
    if int(pixels_per_chunk) < 1:
        raise ValueError(f"pixels_per_chunk={pixels_per_chunk} must be positive")
    if table_gradient == "auto":
        if backend == "cpu":
            table_gradient = "scatter"
        else:
            table_gradient = "matmul" if num_classes <= MATMUL_MAX_CLASSES else "segment"
    return LossPlan(
        max_block_bytes=knn.resolve_block_bytes(max_block_bytes, backend),
        pixels_per_chunk=int(pixels_per_chunk),
        table_gradient=table_gradient,
        search_method=knn.resolve_method(search_method, backend),
    )


def _mean_over_valid(per_pixel: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``per_pixel`` where ``valid``; 0 (not NaN) when nothing is valid."""
    total = jnp.sum(jnp.where(valid, per_pixel, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1).astype(total.dtype)


def _labels_in_range(labels: jax.Array, num_classes: int, ignore_index: int) -> jax.Array:
    """Scalar bool: every label is a class id or ``ignore_index``."""
    return jnp.all((labels == ignore_index) | ((labels >= 0) & (labels < num_classes)))


@dataclasses.dataclass(frozen=True)
class _Terms:
    """Static settings of :func:`_loss_sums` (hashable, so a ``custom_vjp`` nondiff argument)."""

    temperature: float
    margin: float
    normalize: bool
    pixels_per_chunk: int
    classes_per_chunk: int
    with_ess: bool
    with_separation: bool
    table_gradient: str = "scatter"
    classes_per_block: int = 1


def _read_rows(raw: jax.Array, normalize: bool) -> tuple[jax.Array, jax.Array | None]:
    """Gathered table rows as the loss sees them, and what their gradient needs.

    Args:
      raw: float32 ``[..., D]`` rows of the table.
      normalize: scale each row to unit length (its norm clamped at 1e-12, as
        ``models.l2_normalize``).

    Returns:
      ``(rows, inverse_norms)``: ``rows`` float32 ``[..., D]``; ``inverse_norms`` float32
      ``[..., 1]`` (``1 / max(‖raw‖, 1e-12)``) when normalising, else None.
    """
    if not normalize:
        return raw, None
    scales = knn.inverse_norms(raw)
    return raw * scales, scales


def _raw_row_gradient(
    rows: jax.Array, inverse_norms: jax.Array | None, grad: jax.Array
) -> jax.Array:
    """The gradient with respect to the raw rows, from that with respect to ``rows``.

    ``d(r/‖r‖)ᵀg = (g − u ⟨u, g⟩) / ‖r‖`` with ``u = r/‖r‖``; where the norm is clamped the
    scale is constant and the gradient is ``g / eps`` (as ``models.l2_normalize``).

    Args:
      rows: float32 ``[..., D]`` from :func:`_read_rows`.
      inverse_norms: float32 ``[..., 1]`` from :func:`_read_rows`, None when not normalised.
      grad: float32 ``[..., D]``.

    Returns:
      float32 ``[..., D]``.
    """
    if inverse_norms is None:
        return grad
    clamped = inverse_norms >= 1.0 / knn.NORM_EPS
    along = jnp.where(clamped, 0.0, jnp.sum(rows * grad, axis=-1, keepdims=True))
    return inverse_norms * (grad - rows * along)


def _add_rows(table: jax.Array, ids: jax.Array, rows: jax.Array, presorted: bool) -> jax.Array:
    """``table.at[ids].add(rows)``: the gradient of gathered rows into the table.

    Many of the ids repeat (a chunk's pixels share a few classes). A plain scatter-add leaves
    that to atomic additions; with ``presorted`` the rows are instead sorted by id and summed
    per id with a segmented scan, so that the scatter writes each id once. Same sums up to the
    order of the additions. (Meant for GPUs, where contended float atomics can be very slow:
    jaxlib 0.10.2–0.11.0 compile them to compare-and-swap loops.)

    Args:
      table: float32 ``[C, D]``.
      ids: int32 ``[...]`` valid row ids.
      rows: float32 ``[..., D]``.
      presorted: sum duplicates before scattering.

    Returns:
      float32 ``[C, D]``.
    """
    if not presorted:
        return table.at[ids].add(rows)
    num_classes, dim = table.shape
    flat_ids = ids.reshape(-1)
    flat_rows = rows.reshape(-1, dim)
    positions = jnp.arange(flat_ids.shape[0], dtype=jnp.int32)
    sorted_ids, order = lax.sort_key_val(flat_ids, positions)
    sorted_rows = flat_rows[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), sorted_ids[1:] != sorted_ids[:-1]])
    _, running = lax.associative_scan(_segment_combine, (starts, sorted_rows))
    ends = jnp.concatenate([starts[1:], jnp.ones((1,), bool)])
    # Each id's last entry writes its sum; every other entry gets its own id past the table
    # (dropped), so that the indices are truly unique, as unique_indices promises.
    targets = jnp.where(ends, sorted_ids, num_classes + positions)
    return table.at[targets].add(running, mode="drop", unique_indices=True)


def _add_rows_by_matmul(
    table: jax.Array,
    classes: jax.Array,
    normalize: bool,
    pixels: jax.Array,
    candidates: jax.Array,
    coefficients: jax.Array,
    classes_per_block: int,
) -> jax.Array:
    """Adds ``Σ_(p,j): candidates[p,j]=c  a[p,j] (u_c − pixels[p])`` to each raw row c.

    The ESS row gradient of candidate j of pixel p is ``a[p,j] (u_c − p)`` (``u_c`` the class
    row as read, :func:`_ess_chunk_coefficients`), so class c receives ``u_c·Σa − Σ a·p``. For a
    block of classes both sums are one matmul of the weights ``W[c, p] = Σ_j a[p,j]·[candidates
    [p,j] = c]`` (built elementwise, never stored per candidate) with the pixels augmented by a
    column of ones: no scatter, no sort, no atomics; the work grows as pixels × C. Then the
    gradient with respect to ``u_c`` is carried to the raw row (linear, so summed first).

    Args:
      table: float32 ``[C, D]``, the gradient so far.
      classes: float32 ``[C, D]``, the table the loss reads.
      normalize: the loss reads ``classes`` scaled to unit rows.
      pixels: float32 ``[P, D]``.
      candidates: int32 ``[P, k + 1]``.
      coefficients: float32 ``[P, k + 1]``.
      classes_per_block: classes per matmul block (the weights are ``[block, P]`` float32).

    Returns:
      float32 ``[C, D]``.
    """
    num_classes, dim = table.shape
    block = min(classes_per_block, num_classes)
    augmented = jnp.concatenate([pixels, jnp.ones((pixels.shape[0], 1), pixels.dtype)], axis=1)

    def add_block(index, grad):
        covered = index * block
        start = jnp.minimum(covered, num_classes - block)
        ids = start + jnp.arange(block, dtype=jnp.int32)
        # The last block starts early to stay inside the table: its classes below `covered`
        # were added by the block before it and get no weight here.
        ids = jnp.where(ids >= covered, ids, -1)
        weights = jnp.zeros((block, pixels.shape[0]), jnp.float32)
        for slot in range(candidates.shape[1]):
            match = candidates[None, :, slot] == ids[:, None]
            weights = weights + jnp.where(match, coefficients[None, :, slot], 0.0)
        sums = jnp.dot(weights, augmented, precision=lax.Precision.HIGHEST)  # [block, D + 1]
        rows, inverse_norms = _read_rows(lax.dynamic_slice_in_dim(classes, start, block), normalize)
        row_grad = rows * sums[:, dim:] - sums[:, :dim]
        row_grad = _raw_row_gradient(rows, inverse_norms, row_grad)
        return lax.dynamic_update_slice_in_dim(
            grad, lax.dynamic_slice_in_dim(grad, start, block) + row_grad, start, 0
        )

    return lax.fori_loop(0, -(-num_classes // block), add_block, table)


def _add_rows_by_segments(
    table: jax.Array,
    classes: jax.Array,
    normalize: bool,
    pixels: jax.Array,
    candidates: jax.Array,
    coefficients: jax.Array,
    entries_per_chunk: int,
) -> jax.Array:
    """The same sums as :func:`_add_rows_by_matmul`, by one sort of every id of the step.

    All ``N·(k+1)`` candidate ids are sorted once; then, chunk by chunk of the sorted entries,
    the values ``[a·p, a]`` are gathered, summed per id with a segmented scan, and each id's
    sum is written once (unique indices: no contended atomics). An id whose entries span two
    chunks is written once by each. Work grows as N·log N, whatever C.

    Args:
      table: float32 ``[C, D]``, the gradient so far.
      classes: float32 ``[C, D]``, the table the loss reads.
      normalize: the loss reads ``classes`` scaled to unit rows.
      pixels: float32 ``[N, D]``.
      candidates: int32 ``[N, k + 1]``.
      coefficients: float32 ``[N, k + 1]`` (0 for padding pixels).
      entries_per_chunk: sorted entries per chunk, a divisor of ``N·(k+1)``.

    Returns:
      float32 ``[C, D]``.
    """
    num_classes, dim = table.shape
    width = candidates.shape[1]
    flat_ids = candidates.reshape(-1)
    flat_coefficients = coefficients.reshape(-1)
    count = flat_ids.shape[0]
    sorted_ids, order = lax.sort_key_val(flat_ids, jnp.arange(count, dtype=jnp.int32))
    chunk = entries_per_chunk

    def add_chunk(index, sums):
        ids = lax.dynamic_slice_in_dim(sorted_ids, index * chunk, chunk)
        entries = lax.dynamic_slice_in_dim(order, index * chunk, chunk)
        a = flat_coefficients[entries][:, None]
        values = jnp.concatenate([a * pixels[entries // width], a], axis=1)  # [chunk, D + 1]
        starts = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
        _, running = lax.associative_scan(_segment_combine, (starts, values))
        ends = jnp.concatenate([starts[1:], jnp.ones((1,), bool)])
        targets = jnp.where(ends, ids, num_classes + jnp.arange(chunk, dtype=jnp.int32))
        return sums.at[targets].add(running, mode="drop", unique_indices=True)

    sums = jnp.zeros((num_classes, dim + 1), jnp.float32)
    sums = lax.fori_loop(0, count // chunk, add_chunk, sums)
    rows, inverse_norms = _read_rows(classes, normalize)
    row_grad = rows * sums[:, dim:] - sums[:, :dim]
    return table + _raw_row_gradient(rows, inverse_norms, row_grad)


def _segment_combine(left, right):
    """Segmented-sum combiner: ``(start flag, running sum)`` pairs."""
    left_start, left_sum = left
    right_start, right_sum = right
    return left_start | right_start, jnp.where(
        right_start[..., None], right_sum, left_sum + right_sum
    )


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
def _loss_sums(pixels, targets, neighbors, valid, nearest, classes, terms):
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
            rows, _ = _read_rows(
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
            own, _ = _read_rows(classes[own_ids], terms.normalize)
            other, _ = _read_rows(classes[nearest_ids], terms.normalize)
            return total + _hinge_chunk_sum(own, other, weights, terms.margin)

        separation_sum = lax.fori_loop(0, -(-num_classes // chunk), separation_step, separation_sum)
    residuals = (pixels, targets, neighbors, valid, nearest, classes)
    return (ess_sum, separation_sum), residuals


def _loss_sums_bwd(terms, residuals, cotangents):
    pixels, targets, neighbors, valid, nearest, classes = residuals
    ess_cotangent, separation_cotangent = cotangents
    table_grad = jnp.zeros_like(classes)
    num_classes = classes.shape[0]

    if terms.with_separation:
        chunk = terms.classes_per_chunk

        def separation_step(index, grad):
            start, own_ids, nearest_ids, weights = _class_chunk(index, chunk, num_classes, nearest)

            def hinge(own, other):
                return _hinge_chunk_sum(own, other, weights, terms.margin)

            own, own_inverse_norms = _read_rows(
                lax.dynamic_slice_in_dim(classes, start, chunk), terms.normalize
            )
            other, other_inverse_norms = _read_rows(classes[nearest_ids], terms.normalize)
            _, pullback = jax.vjp(hinge, own, other)
            own_grad, other_grad = pullback(separation_cotangent)
            own_grad = _raw_row_gradient(own, own_inverse_norms, own_grad)
            other_grad = _raw_row_gradient(other, other_inverse_norms, other_grad)
            grad = lax.dynamic_update_slice_in_dim(
                grad, lax.dynamic_slice_in_dim(grad, start, chunk) + own_grad, start, 0
            )
            # One row per class: little contention, but no atomics where they are avoided.
            return _add_rows(grad, nearest_ids, other_grad, terms.table_gradient != "scatter")

        table_grad = lax.fori_loop(0, -(-num_classes // chunk), separation_step, table_grad)

    pixel_grad = jnp.zeros_like(pixels)
    if terms.with_ess:

        def ess_step(grad, xs):
            chunk_pixels, chunk_targets, chunk_neighbors, chunk_valid = xs
            chunk_candidates = _candidates(chunk_targets, chunk_neighbors)
            rows, inverse_norms = _read_rows(classes[chunk_candidates], terms.normalize)
            if terms.table_gradient == "matmul":
                coefficients, chunk_pixel_grad = _ess_chunk_coefficients(
                    chunk_pixels, rows, chunk_valid, terms.temperature, ess_cotangent
                )
                grad = _add_rows_by_matmul(
                    grad,
                    classes,
                    terms.normalize,
                    chunk_pixels,
                    chunk_candidates,
                    coefficients,
                    terms.classes_per_block,
                )
                return grad, chunk_pixel_grad

            def chunk_sum(chunk_pixels, rows):
                return _ess_chunk_sum(chunk_pixels, rows, chunk_valid, terms.temperature)

            _, pullback = jax.vjp(chunk_sum, chunk_pixels, rows)
            chunk_pixel_grad, rows_grad = pullback(ess_cotangent)
            rows_grad = _raw_row_gradient(rows, inverse_norms, rows_grad)
            grad = _add_rows(grad, chunk_candidates, rows_grad, terms.table_gradient == "sorted")
            return grad, chunk_pixel_grad

        def coefficient_step(carry, xs):
            chunk_pixels, chunk_targets, chunk_neighbors, chunk_valid = xs
            rows, _ = _read_rows(
                classes[_candidates(chunk_targets, chunk_neighbors)], terms.normalize
            )
            coefficients, chunk_pixel_grad = _ess_chunk_coefficients(
                chunk_pixels, rows, chunk_valid, terms.temperature, ess_cotangent
            )
            return carry, (chunk_pixel_grad, coefficients)

        chunks = _pixel_chunks(pixels, targets, neighbors, valid, terms.pixels_per_chunk)
        if terms.table_gradient == "segment":
            # The chunks only give coefficients; one sort of the step's ids sums them.
            _, (pixel_grad, coefficients) = lax.scan(coefficient_step, None, chunks)
            candidates = _candidates(targets, neighbors)
            table_grad = _add_rows_by_segments(
                table_grad,
                classes,
                terms.normalize,
                pixels,
                candidates,
                coefficients.reshape(candidates.shape),
                terms.pixels_per_chunk * candidates.shape[1],
            )
        else:
            table_grad, pixel_grad = lax.scan(ess_step, table_grad, chunks)
        pixel_grad = pixel_grad.reshape(pixels.shape)
    return pixel_grad, None, None, None, None, table_grad


_loss_sums.defvjp(_loss_sums_fwd, _loss_sums_bwd)


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


def _check_table(class_emb: jax.Array, what: str) -> tuple[int, int]:
    """``(C, D)`` of a class table, which must be ``[C, D]`` with C >= 2."""
    if class_emb.ndim != 2:
        raise ValueError(f"{what}: class_emb must be [C, D], got shape {class_emb.shape}")
    num_classes, dim = class_emb.shape
    if num_classes < 2:
        raise ValueError(f"{what} needs at least 2 classes, got C={num_classes}")
    return num_classes, dim


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
    pixels_per_chunk: int | str = _DEFAULT_PIXELS_PER_CHUNK,
    table_gradient: str = "auto",
    negatives: str = "nearest_other",
    search_method: str = "auto",
    separation_ids: jax.Array | None = None,
    neighbor_ids: jax.Array | None = None,
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
        gradient's weights), or ``"auto"`` (by backend, :func:`loss_plan`).
      pixels_per_chunk: as in :func:`ess_loss`, or ``"auto"`` (by backend).
      table_gradient: how row gradients reach the table: ``"scatter"`` (a scatter-add: fastest
        on CPU; atomics on GPUs), ``"sorted"`` (each chunk's rows summed per class id after a
        sort, then written once per id; see ``_add_rows``), ``"matmul"`` (per block of classes,
        a pixels-weighted sum as one matmul; no sort, no scatter; see
        ``_add_rows_by_matmul``), ``"segment"`` (one sort of all the step's candidate ids, then
        per-id sums written once; see ``_add_rows_by_segments``) or ``"auto"`` (:func:`loss_plan`:
        scatter on CPU; matmul up to ``MATMUL_MAX_CLASSES`` classes, segment above, on GPU/TPU).
      negatives: ``"nearest_other"`` (the paper: the k nearest classes other than the target)
        or ``"original"`` (the original code: the k nearest classes, a target among them
        replaced as in :func:`original_rule_negatives`).
      search_method: the nearest-class search's selection (``knn.nearest_class_ids``).
      separation_ids: optional int ``[C]``, each class's nearest other class for the separation
        term (e.g. from :func:`nearest_other_classes` a few steps ago, see
        :func:`refresh_separation_ids`); the hinge is computed on the current rows. None: the
        exact C×C bounded search, now.
      neighbor_ids: optional int ``[B, H, W, k]``, each pixel's k negatives found elsewhere
        (e.g. by ``knn_index.approximate_nearest_class_ids``, excluding the target); None: the
        exact search (``negatives`` then applies).

    Returns:
      ``(total, {"ess": ..., "separation": ...})``, float32 scalars; ``separation`` is 0 when
      ``separation_weight`` is 0 (it is not computed).
    """
    num_classes, dim = _check_table(class_emb, "ess_objective")
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
    if negatives not in NEGATIVE_RULES:
        raise ValueError(f"negatives={negatives!r}; expected one of {NEGATIVE_RULES}")
    original = negatives == "original"
    if neighbor_ids is not None:
        if neighbor_ids.shape != (*labels.shape, num_neighbors):
            raise ValueError(
                f"neighbor_ids {neighbor_ids.shape} must be labels {labels.shape}"
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
            normalize_classes=normalize_classes,
        )
        if original:
            neighbors = original_rule_negatives(neighbors, targets)
    num_pixels = pixels.shape[0]
    chunk = max(1, min(plan.pixels_per_chunk, num_pixels))
    extra = -num_pixels % chunk
    if extra:
        pixels = jnp.pad(pixels, ((0, extra), (0, 0)))
        targets = jnp.pad(targets, (0, extra))
        neighbors = jnp.pad(neighbors, ((0, extra), (0, 0)))
        valid = jnp.pad(valid, (0, extra))
    with_separation = separation_weight != 0
    if not with_separation:
        nearest = jnp.zeros((num_classes,), jnp.int32)
    elif separation_ids is not None:
        if separation_ids.shape != (num_classes,):
            raise ValueError(f"separation_ids {separation_ids.shape} must be (C={num_classes},)")
        nearest = lax.stop_gradient(jnp.asarray(separation_ids, jnp.int32))
    else:
        nearest = _nearest_other_class(
            classes, plan.max_block_bytes, normalize_classes, plan.search_method
        )
    terms = _Terms(
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
    )
    ess_sum, separation_sum = _loss_sums(pixels, targets, neighbors, valid, nearest, classes, terms)
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
    pixels_per_chunk: int = _DEFAULT_PIXELS_PER_CHUNK,
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
        see :func:`original_rule_negatives`).

    Returns:
      float32 scalar; 0 when every pixel is ignored, NaN when a label is out of range.
    """
    _check_table(class_emb, "ess_loss")
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


def _nearest_other_class(
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

    The same ids :func:`ess_objective` finds when it is given no ``separation_ids``.

    Args:
      class_emb: float ``[C, D]``, C >= 2.
      normalize_classes: search among the rows scaled to unit length.
      max_block_bytes: memory budget of the search, or ``"auto"``.
      search_method: block selection (``knn.nearest_class_ids``), or ``"auto"``.

    Returns:
      int32 ``[C]``.
    """
    num_classes, _ = _check_table(class_emb, "nearest_other_classes")
    plan = loss_plan(
        None, num_classes, max_block_bytes=max_block_bytes, search_method=search_method
    )
    classes = jnp.asarray(class_emb, jnp.float32)
    return _nearest_other_class(
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
    num_classes, dim = _check_table(class_emb, "separation_loss")
    classes = jnp.asarray(class_emb, jnp.float32)
    terms = _Terms(
        temperature=0.0,
        margin=float(margin),
        normalize=False,
        pixels_per_chunk=1,
        classes_per_chunk=min(_CLASSES_PER_CHUNK, num_classes),
        with_ess=False,
        with_separation=True,
        table_gradient=loss_plan(None, num_classes).table_gradient,
    )
    nearest = _nearest_other_class(classes, max_block_bytes, False)
    no_pixels = jnp.zeros((0, dim), jnp.float32)
    _, separation_sum = _loss_sums(
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
