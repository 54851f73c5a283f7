"""The k smallest entries of each row, with their positions: the search's selection step.

Chosen per backend by ``knn``: a pyramid of group minima that prunes the columns and a variadic
reduction that keeps an ascending k-list in registers (fast on CPU), and ``lax.top_k`` (the GPU
and TPU default). Two more for small k on GPUs, where XLA's top-k kernel took 37 % of an ESS
step on an H200 (BENCHMARKS §2): k rounds of a row minimum (:func:`smallest_k_by_rounds`, one
memory-bound reduction per round), the minima of contiguous tiles of columns and a top-k over
the members of the k tiles with the smallest minima (:func:`smallest_k_by_tile_minima`, one pass
over the scores and two short top-k's), and a top-k per tile followed by a top-k of the tiles'
survivors (:func:`smallest_k_by_tiles`, far shorter rows for the top-k kernel).

``top_k`` and these three return the k smallest entries in ascending ``(value, position)``
order: equal values come lowest position first, so all three give the same positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def selection_plan(num_cols: int, k: int) -> tuple[int, int]:
    """Group size S and number of pruning levels L for selecting k of ``num_cols``.

    With L levels the columns form a pyramid of group minima (groups of S, groups of S groups,
    ...); the selection scans the ``num_cols / S**L`` top-level minima and then ``k·S``
    candidates per level. The plan minimises that count (each level's gather weighted in).

    Returns:
      ``(S, L)``; ``L = 0`` means one selection over all columns.
    """
    best = (float(num_cols), 1, 0)
    for levels in (1, 2, 3):
        group = max(2, int(round((num_cols / k) ** (1.0 / (levels + 1)))))
        top = -(-num_cols // group**levels)
        cost = top + levels * k * (group + 1)
        if cost < best[0]:
            best = (cost, group, levels)
    return best[1], best[2]


def _insert(
    best_values: tuple[jax.Array, ...],
    best_ids: tuple[jax.Array, ...],
    values: jax.Array,
    ids: jax.Array,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Inserts one candidate into an ascending list of the k best (elementwise over any shape).

    Ties keep the earlier entry, so ids stay distinct.

    Args:
      best_values: k float32 arrays, ascending slot by slot.
      best_ids: k int32 arrays.
      values: float32, one candidate per list.
      ids: int32, the candidates' ids.

    Returns:
      The updated ``(best_values, best_ids)``.
    """
    smaller = [values < slot for slot in best_values]
    new_values = [jnp.where(smaller[0], values, best_values[0])]
    new_ids = [jnp.where(smaller[0], ids, best_ids[0])]
    for slot in range(1, len(best_values)):
        shifted_value = jnp.where(smaller[slot - 1], best_values[slot - 1], values)
        shifted_id = jnp.where(smaller[slot - 1], best_ids[slot - 1], ids)
        new_values.append(jnp.where(smaller[slot], shifted_value, best_values[slot]))
        new_ids.append(jnp.where(smaller[slot], shifted_id, best_ids[slot]))
    return tuple(new_values), tuple(new_ids)


def k_smallest(values: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of each row with their ids, by one variadic reduction.

    The reduction's state is an ascending k-list (k values and k ids); its reducer merges two
    such lists by inserting the second's entries into the first, which is exact whatever order
    XLA combines them in. Each input entry enters as a one-entry list whose other slots are
    constant ``+inf``, so after inlining XLA:CPU reduces this to one insertion per entry in a
    loop that keeps the list in registers; the producer of ``values`` (a gather, a mask) fuses
    into the same loop.

    Args:
      values: float32 ``[R, n]``.
      ids: int32 ``[R, n]``, the entries' ids.
      k: how many to keep.

    Returns:
      ``(values [R, k], ids [R, k])`` ascending; ties keep the earlier entry; unfilled slots
      (fewer than k entries below ``+inf``) hold ``+inf`` and id -1.
    """

    def merge(acc, new):
        best_values, best_ids = acc[:k], acc[k:]
        for slot in range(k):
            best_values, best_ids = _insert(best_values, best_ids, new[slot], new[k + slot])
        return best_values + best_ids

    operands = (values,) + (jnp.full_like(values, jnp.inf),) * (k - 1)
    operands += (ids,) + (jnp.full_like(ids, -1),) * (k - 1)
    inits = (jnp.float32(jnp.inf),) * k + (jnp.int32(-1),) * k
    out = lax.reduce(operands, inits, merge, (1,))
    return jnp.stack(out[:k], axis=-1), jnp.stack(out[k:], axis=-1)


def _group_minima(values: jax.Array, group: int) -> jax.Array:
    """Minima of strided groups: column j of the result covers columns ``j + i·M/S``.

    Taking the minimum of S contiguous slabs is one elementwise fusion, which XLA vectorises far
    better than a reduction over short inner groups.

    Args:
      values: float32 ``[R, M]``, M a multiple of ``group``.
      group: S.

    Returns:
      float32 ``[R, M / S]``.
    """
    width = values.shape[1] // group
    minima = values[:, :width]
    for slab in range(1, group):
        minima = jnp.minimum(minima, values[:, slab * width : (slab + 1) * width])
    return minima


def smallest_k_by_pyramid(
    scores: jax.Array, k: int, group: int, levels: int
) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of each row, ascending, by pruning over a pyramid of minima.

    The columns are cut into groups of S, those into groups of S groups, and so on, and each
    group's minimum is taken (elementwise passes). The k groups with the smallest minima hold
    the k smallest entries (a group outside them lies above k other groups' minima), so the
    search selects among the top level's minima, keeps the k best groups, and descends: at each
    level only the k·S members of the k groups kept are candidates. This replaces a top-k over
    all columns by selections over about ``C / S**L + L·k·S`` candidates.

    Args:
      scores: float32 ``[R, M]``; M a multiple of ``group**levels`` (callers pad with
        ``knn``'s padding score).
      k: how many to keep, at most the number of finite entries per row.
      group: the group size S.
      levels: pyramid levels L (0: one selection over every column).

    Returns:
      ``(values [R, k], positions [R, k] int32)``, ascending by value.
    """
    num_rows = scores.shape[0]
    pyramid = [scores]
    for _ in range(levels):
        pyramid.append(_group_minima(pyramid[-1], group))
    top = pyramid[-1]
    values, ids = k_smallest(top, lax.broadcasted_iota(jnp.int32, top.shape, 1), k)
    for level in reversed(range(levels)):
        finer = pyramid[level]
        width = finer.shape[1] // group
        # Member i of group j is column j + i·width (see _group_minima).
        columns = ids[:, :, None] + width * jnp.arange(group, dtype=jnp.int32)
        columns = jnp.where(ids[:, :, None] < 0, -1, columns).reshape(num_rows, k * group)
        candidates = jnp.take_along_axis(finer, jnp.maximum(columns, 0), axis=1)
        # A slot that no finite entry filled (id -1) must not bring candidates.
        candidates = jnp.where(columns < 0, jnp.inf, candidates)
        values, ids = k_smallest(candidates, columns, k)
    return values, ids


def top_k_smallest(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` selection of the k smallest per row: the fast path on GPU and TPU.

    Args:
      scores: float32 ``[R, M]``.
      k: how many to keep.

    Returns:
      ``(values [R, k], positions [R, k] int32)``, ascending.
    """
    if k == 1:
        positions = jnp.argmin(scores, axis=-1)[:, None].astype(jnp.int32)
        return jnp.take_along_axis(scores, positions, axis=-1), positions
    neg_values, positions = lax.top_k(-scores, k)
    return -neg_values, positions.astype(jnp.int32)


# Sentinel position of an empty slot in the rounds' reduction (above every real position).
_NO_POSITION = jnp.iinfo(jnp.int32).max


def _lexicographic_min(values: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's smallest ``(value, position)`` pair, by one variadic row reduction.

    Args:
      values: float32 ``[R, M]``.
      positions: int32 ``[R, M]``.

    Returns:
      ``(values [R], positions [R])``; ``(+inf, _NO_POSITION)`` for a row of ``+inf`` entries at
      ``_NO_POSITION``.
    """

    def smaller(a, b):
        a_value, a_position = a
        b_value, b_position = b
        take_a = (a_value < b_value) | ((a_value == b_value) & (a_position < b_position))
        return jnp.where(take_a, a_value, b_value), jnp.where(take_a, a_position, b_position)

    inits = (jnp.float32(jnp.inf), jnp.int32(_NO_POSITION))
    return lax.reduce((values, positions), inits, smaller, (1,))


def smallest_k_by_rounds(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of each row by k rounds of a row minimum (no sort, no top-k).

    Round r takes the smallest ``(value, position)`` pair above the one round r − 1 took, in
    lexicographic order, so no entry is masked out by a write: each round is one reduction over
    the block whose mask fuses into its input. That costs k passes over the scores, which on a
    GPU are memory-bound reductions (about 0.15 ms each for a 512 MiB block on an H200), where
    XLA's top-k kernel sorts every row.

    Args:
      scores: float32 ``[R, M]``.
      k: how many to keep, at most M.

    Returns:
      ``(values [R, k], positions [R, k] int32)``, ascending by ``(value, position)`` (the
      order of :func:`top_k_smallest`; ``+inf`` entries are entries like any other). NaN
      entries are never taken: a slot left without an entry holds ``+inf`` and position -1.
    """
    positions = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    values, chosen = [], []
    last_value = jnp.full(scores.shape[:1], -jnp.inf, jnp.float32)
    last_position = jnp.full(scores.shape[:1], -1, jnp.int32)
    for _ in range(k):
        after = (scores > last_value[:, None]) | (
            (scores == last_value[:, None]) & (positions > last_position[:, None])
        )
        last_value, last_position = _lexicographic_min(
            jnp.where(after, scores, jnp.inf), jnp.where(after, positions, _NO_POSITION)
        )
        values.append(last_value)
        chosen.append(last_position)
    values = jnp.stack(values, axis=-1)
    chosen = jnp.stack(chosen, axis=-1)
    return values, jnp.where(chosen == _NO_POSITION, -1, chosen)


# Columns per tile of the tiled top-k: the first top-k runs over rows this long.
TILE_COLUMNS = 128


def smallest_k_by_tiles(
    scores: jax.Array, k: int, tile: int = TILE_COLUMNS
) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of each row: a top-k per tile of columns, then one of the survivors.

    Each row's k smallest entries are among the k smallest of every tile of ``tile`` columns,
    so the second top-k runs over ``k · M / tile`` survivors instead of M. Survivors are laid
    out tile by tile, each tile's ascending, so equal values still come lowest position first.

    Args:
      scores: float32 ``[R, M]``, M a multiple of ``tile`` (``knn`` pads the class axis with its
        padding score).
      k: how many to keep, ``k <= tile``.
      tile: columns per tile.

    Returns:
      ``(values [R, k], positions [R, k] int32)``, ascending by ``(value, position)``.
    """
    num_rows, num_cols = scores.shape
    if num_cols % tile or k > tile:
        raise ValueError(f"tiled top-k needs M={num_cols} a multiple of tile={tile} >= k={k}")
    tiles = num_cols // tile
    values, positions = top_k_smallest(scores.reshape(num_rows * tiles, tile), k)
    positions = positions + tile * (jnp.arange(num_rows * tiles, dtype=jnp.int32) % tiles)[:, None]
    values, chosen = top_k_smallest(values.reshape(num_rows, tiles * k), k)
    return values, jnp.take_along_axis(positions.reshape(num_rows, tiles * k), chosen, axis=1)


def tile_minima_size(num_cols: int, k: int) -> int:
    """Columns per tile of :func:`smallest_k_by_tile_minima`: a power of two near √(M/k).

    It balances the top-k over the M/T tile minima against the one over the k·T members.
    """
    return max(8, 2 ** round(math.log2(max(num_cols / k, 1.0)) / 2))


def smallest_k_by_tile_minima(scores: jax.Array, k: int, tile: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries of each row from the members of the k tiles with the least minima.

    The columns are cut into contiguous tiles of ``tile``; each tile's minimum is one short
    reduction (one pass over the scores). The k smallest entries in ``(value, position)``
    order lie in the k tiles whose ``(minimum, tile index)`` pairs are the smallest: each such
    tile's first minimum comes before any entry of a tile outside them. Those tiles, put back
    in index order, give k·T candidates in position order, and a stable top-k over them keeps
    the lowest position among equal values.

    Args:
      scores: float32 ``[R, M]``, M a multiple of ``tile`` (``knn`` pads the class axis with
        its padding score).
      k: how many to keep.
      tile: columns per tile (:func:`tile_minima_size`).

    Returns:
      ``(values [R, k], positions [R, k] int32)``, ascending by ``(value, position)``.
    """
    num_rows, num_cols = scores.shape
    if num_cols % tile:
        raise ValueError(f"tile minima need M={num_cols} a multiple of tile={tile}")
    tiles = num_cols // tile
    if tiles <= k:
        return top_k_smallest(scores, k)
    minima = jnp.min(scores.reshape(num_rows, tiles, tile), axis=-1)
    _, chosen = top_k_smallest(minima, k)
    chosen = jnp.sort(chosen, axis=1)
    columns = (chosen[:, :, None] * tile + jnp.arange(tile, dtype=jnp.int32)).reshape(
        num_rows, k * tile
    )
    values, picked = top_k_smallest(jnp.take_along_axis(scores, columns, axis=1), k)
    return values, jnp.take_along_axis(columns, picked, axis=1)
