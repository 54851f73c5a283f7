"""The class table's rows as the ESS loss reads them, and their gradient written back.

The loss gathers k+1 rows per pixel from a ``[C, D]`` table (optionally normalising each row
where it is read) and must return one ``[C, D]`` gradient. How the many per-pixel row gradients
are summed into the table is the expensive part on accelerators (contended float atomics), so
it comes in several methods chosen by ``loss_plan``: a plain scatter-add, a sorted segmented
scatter per chunk, a matmul of per-class weights with the pixels, or one sort of the step's ids
and a segment sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import knn


def check_table(class_emb: jax.Array, what: str) -> tuple[int, int]:
    """``(C, D)`` of a class table, which must be ``[C, D]`` with C >= 2."""
    if class_emb.ndim != 2:
        raise ValueError(f"{what}: class_emb must be [C, D], got shape {class_emb.shape}")
    num_classes, dim = class_emb.shape
    if num_classes < 2:
        raise ValueError(f"{what} needs at least 2 classes, got C={num_classes}")
    return num_classes, dim


def read_rows(raw: jax.Array, normalize: bool) -> tuple[jax.Array, jax.Array | None]:
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


def raw_row_gradient(
    rows: jax.Array, inverse_norms: jax.Array | None, grad: jax.Array
) -> jax.Array:
    """The gradient with respect to the raw rows, from that with respect to ``rows``.

    ``d(r/‖r‖)ᵀg = (g − u ⟨u, g⟩) / ‖r‖`` with ``u = r/‖r‖``; where the norm is clamped the
    scale is constant and the gradient is ``g / eps`` (as ``models.l2_normalize``).

    Args:
      rows: float32 ``[..., D]`` from :func:`read_rows`.
      inverse_norms: float32 ``[..., 1]`` from :func:`read_rows`, None when not normalised.
      grad: float32 ``[..., D]``.

    Returns:
      float32 ``[..., D]``.
    """
    if inverse_norms is None:
        return grad
    clamped = inverse_norms >= 1.0 / knn.NORM_EPS
    along = jnp.where(clamped, 0.0, jnp.sum(rows * grad, axis=-1, keepdims=True))
    return inverse_norms * (grad - rows * along)


def add_rows(table: jax.Array, ids: jax.Array, rows: jax.Array, presorted: bool) -> jax.Array:
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


def add_rows_by_matmul(
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
    row as read, ``loss_sums._ess_chunk_coefficients``), so class c receives
    ``u_c·Σa − Σ a·p``. For a block of classes both sums are one matmul of the weights
    ``W[c, p] = Σ_j a[p,j]·[candidates[p,j] = c]`` (built elementwise, never stored per
    candidate) with the pixels augmented by a column of ones: no scatter, no sort, no atomics;
    the work grows as pixels × C. Then the gradient with respect to ``u_c`` is carried to the
    raw row (linear, so summed first).

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
        rows, inverse_norms = read_rows(lax.dynamic_slice_in_dim(classes, start, block), normalize)
        row_grad = rows * sums[:, dim:] - sums[:, :dim]
        row_grad = raw_row_gradient(rows, inverse_norms, row_grad)
        return lax.dynamic_update_slice_in_dim(
            grad, lax.dynamic_slice_in_dim(grad, start, block) + row_grad, start, 0
        )

    return lax.fori_loop(0, -(-num_classes // block), add_block, table)


def add_rows_by_segments(
    table: jax.Array,
    classes: jax.Array,
    normalize: bool,
    pixels: jax.Array,
    candidates: jax.Array,
    coefficients: jax.Array,
    entries_per_chunk: int,
) -> jax.Array:
    """The same sums as :func:`add_rows_by_matmul`, by one sort of every id of the step.

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
    rows, inverse_norms = read_rows(classes, normalize)
    row_grad = rows * sums[:, dim:] - sums[:, :dim]
    return table + raw_row_gradient(rows, inverse_norms, row_grad)


def _segment_combine(left, right):
    """Segmented-sum combiner: ``(start flag, running sum)`` pairs."""
    left_start, left_sum = left
    right_start, right_sum = right
    return left_start | right_start, jnp.where(
        right_start[..., None], right_sum, left_sum + right_sum
    )
