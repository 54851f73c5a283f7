"""Nearest classes of full-resolution pixels from the candidates of their stride-4 sources.

The embedding head L2-normalises its pixel embeddings at the decoder's resolution (stride 4)
and upsamples them bilinearly, so each full-resolution embedding is a blend
``p = Σᵢ wᵢ sᵢ`` of (at most) four source embeddings with weights ``wᵢ ≥ 0`` summing to 1. The
ranking score of the searches, ``score_q(e) = ‖e‖² − 2 q·e``, is linear in q, so

    score_p(e) = Σᵢ wᵢ score_sᵢ(e).

Here each source's ``candidates`` (K') nearest classes are searched (16× fewer queries than
pixels), each full-resolution pixel takes the union of its sources' lists and re-ranks it
exactly against its own embedding. The blend also gives a certificate: a class outside every
source's list scores at least ``tᵢ`` (the source's K'-th score) at each source, hence at least
``Σᵢ wᵢ tᵢ`` at the pixel; when the pixel's k-th best candidate scores no more than that bound,
its k nearest are exactly the exact search's (``certified``; up to float32 rounding of ties).

Work is grouped by *cells*: the output pixels that share the same pair of source rows and pair
of source columns (4×4 pixels at a ×4 upsampling, fewer at the borders). A cell gathers its
union's class rows once and scores its pixels against them in one small matmul, so the class
rows are read ``4K'`` per 16 pixels instead of per pixel. Cell rows are processed in blocks
within ``max_block_bytes``, each block gathering its own cells' queries and lists (no per-cell
copy of the whole batch); nothing is N×C.

Cost: the sources' search (``N/16`` queries, exact over C, or sub-linear through a
``knn_index`` index) plus ``4K'`` scores per pixel, independent of C.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxscaleseg import knn, knn_index

DEFAULT_CANDIDATES = 32
_MAX_PYRAMID_K = 8
_HIGHEST = lax.Precision.HIGHEST


class Slack(NamedTuple):
    """What loosens each pixel's certificate bound when the pixel need not be exactly the blend
    of its sources (``knn_certified``): ``per_departure·‖p − b‖ + per_length·max(‖p‖, 1) +
    constant``, b the pixel's bilinear blend of ``sources``. Computed inside the re-rank's
    blocks, so no full-resolution copy of the blend is ever held.

    Attributes:
      sources: float32 ``[B, h, w, D]``, the grid the blend is made of.
      per_departure, per_length, constant: float32 scalars.
    """

    sources: jax.Array
    per_departure: jax.Array
    per_length: jax.Array
    constant: jax.Array


class AxisCells(NamedTuple):
    """How one axis of a bilinear (half-pixel centres) upsampling groups into cells.

    Cell ``c`` (``0 <= c <= n_in``) holds the outputs whose sample position lies in
    ``[c − 1, c)``, blended from sources ``(max(c − 1, 0), min(c, n_in − 1))``.

    Attributes:
      sources: int32 ``[n_in + 1, 2]``, the two sources of each cell.
      members: int32 ``[n_in + 1, G]``, the outputs of each cell (-1: empty slot).
      weights: float64 ``[n_in + 1, G, 2]``, each member's weights on the two sources.
      cell_of: int32 ``[n_out]``; slot_of: int32 ``[n_out]``: where each output sits.
    """

    sources: np.ndarray
    members: np.ndarray
    weights: np.ndarray
    cell_of: np.ndarray
    slot_of: np.ndarray


def axis_cells(n_in: int, n_out: int) -> AxisCells:
    """The cells of one axis upsampled from ``n_in`` to ``n_out`` positions, as
    ``jax.image.resize(..., "bilinear", antialias=False)`` samples it (NumPy, static)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"axis sizes must be >= 1, got {n_in} -> {n_out}")
    position = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    cell = np.clip(np.floor(position).astype(np.int64) + 1, 0, n_in)
    low, high = np.maximum(cell - 1, 0), np.minimum(cell, n_in - 1)
    frac = np.where(high > low, np.clip(position - low, 0.0, 1.0), 0.0)
    slot = np.zeros(n_out, np.int64)
    counts = np.zeros(n_in + 1, np.int64)
    for o, c in enumerate(cell):
        slot[o] = counts[c]
        counts[c] += 1
    size = int(counts.max())
    members = np.full((n_in + 1, size), -1, np.int32)
    weights = np.zeros((n_in + 1, size, 2))
    members[cell, slot] = np.arange(n_out)
    weights[cell, slot, 0] = 1.0 - frac
    weights[cell, slot, 1] = frac
    sources = np.stack(
        [np.maximum(np.arange(n_in + 1) - 1, 0), np.minimum(np.arange(n_in + 1), n_in - 1)], 1
    )
    return AxisCells(
        sources.astype(np.int32), members, weights, cell.astype(np.int32), slot.astype(np.int32)
    )


def list_method(k: int) -> str:
    """The exact selection (``knn.nearest_class_ids``'s ``method``) for lists of k classes.

    The pyramid selection's reduction compiles for minutes on CPU at k = 16 (measured), so
    longer lists take another exact selection (same ids, same order): on CPU the tile minima,
    which searched 8 192 sources for K' = 32 of 100 000 classes in 1.9 s against lax.top_k's
    2.7 s (1 284 and 10 000 classes: no slower); elsewhere lax.top_k until a GPU measurement
    (``benchmarks.gpu_check``'s selection rows) says otherwise.
    """
    if k <= _MAX_PYRAMID_K:
        return "auto"
    return "tile_minima" if jax.default_backend() == "cpu" else "top_k"


def coarse_grid(features: jax.Array) -> jax.Array:
    """float32 ``[B, ceil(H/4), ceil(W/4), D]``: features ``[B, H, W, D]`` resized bilinearly
    (half-pixel centres) to a ×4 coarser grid and renormalised — nearly the model's stride-4
    map when they come from one whole-image pass (the inference assignments' sources)."""
    batch, height, width, dim = features.shape
    features = jnp.asarray(features, jnp.float32)
    if height % 4 == 0 and width % 4 == 0:
        # Exactly ×4: each grid point samples position 4i + 1.5, the mean of rows (columns)
        # 4i + 1 and 4i + 2. Four strided slices fuse into one pass; the resize's matmuls
        # held two [B, H/4, W, D]-sized intermediates (BENCHMARKS §7.3).
        inner = [features[:, i::4, j::4] for i in (1, 2) for j in (1, 2)]
        return knn.unit_rows(0.25 * (inner[0] + inner[1] + inner[2] + inner[3]))
    shape = (batch, -(-height // 4), -(-width // 4), dim)
    return knn.unit_rows(jax.image.resize(features, shape, "bilinear", antialias=False))


def exact_source_lists(
    sources: jax.Array,
    classes: jax.Array,
    candidates: int,
    *,
    normalize_classes: bool,
    max_block_bytes: int,
) -> tuple[jax.Array, jax.Array]:
    """Each source's exact K' nearest classes and the K'-th one's score.

    Args:
      sources: float32 ``[..., D]``.
      classes: float32 ``[C, D]``.
      candidates: K'.
      normalize_classes: search against the unit-length rows of ``classes``.
      max_block_bytes: the search's block budget (bytes).

    Returns:
      ``(ids, bound)``: int32 ``[..., K']`` nearest first, and float32 ``[...]`` the K'-th
      one's ranking score ``‖e‖² − 2 s·e`` (the union certificate's bound).
    """
    ids = knn.nearest_class_ids(
        sources,
        classes,
        candidates,
        max_block_bytes=max_block_bytes,
        normalize_classes=normalize_classes,
        method=list_method(candidates),
    )
    last = classes[ids[..., -1]]
    if normalize_classes:
        last = knn.unit_rows(last)
    bound = jnp.sum(last * last, -1) - 2.0 * jnp.sum(last * sources, -1)
    return ids, bound


def _source_search(sources, classes, candidates, normalize, budget, index, probes):
    """ids int32 ``[B, h, w, K']`` of each source's nearest classes and, for an exact search,
    float32 ``[B, h, w]`` the K'-th one's score (the certificate's bound); None otherwise."""
    if index is None:
        return exact_source_lists(
            sources, classes, candidates, normalize_classes=normalize, max_block_bytes=budget
        )
    ids = knn_index.approximate_nearest_class_ids(
        sources,
        classes,
        index,
        candidates,
        probes=probes,
        normalize_classes=normalize,
        max_block_bytes=budget,
    )
    return ids, None


def _repeated(ids: jax.Array, candidates: int) -> jax.Array:
    """bool ``[..., 4K']``: the ids of ``[..., 4K']`` (four lists of K' distinct ids, one after
    the other) that an earlier list holds too (a comparison of list pairs: no sort, which is
    slow on CPU)."""
    lists = ids.reshape(*ids.shape[:-1], 4, candidates)
    seen = [jnp.zeros(lists.shape[:-2] + (candidates,), bool)]
    for j in range(1, 4):
        earlier = lists[..., :j, :].reshape(*lists.shape[:-2], j * candidates)
        seen.append(jnp.any(lists[..., j, :, None] == earlier[..., None, :], axis=-1))
    return jnp.concatenate(seen, -1)


@functools.partial(
    jax.jit,
    static_argnames=("k", "candidates", "normalize_classes", "max_block_bytes", "probes"),
)
def union_nearest_class_ids(
    queries: jax.Array,
    sources: jax.Array,
    class_emb: jax.Array,
    k: int,
    *,
    candidates: int = DEFAULT_CANDIDATES,
    exclude: jax.Array | None = None,
    normalize_classes: bool = False,
    index: knn_index.ClassIndex | None = None,
    probes: int = knn_index.DEFAULT_PROBES,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
) -> tuple[jax.Array, jax.Array]:
    """The k nearest classes of each full-resolution pixel among its sources' candidates.

    Args:
      queries: float ``[B, H, W, D]``, the full-resolution pixel embeddings (re-ranked
        exactly); the certificate assumes they are the bilinear upsampling of ``sources``.
      sources: float ``[B, h, w, D]``, the stride-4 embeddings (``h <= H``, ``w <= W``).
      class_emb: float ``[C, D]``.
      k: neighbours per pixel, ``1 <= k <= K'`` (``K' − 1`` with ``exclude``).
      candidates: K', classes searched per source, ``<= C``.
      exclude: optional int ``[B, H, W]``: one class id per pixel never returned (its target).
      normalize_classes: search against the rows of ``class_emb`` scaled to unit length.
      index: optional ``knn_index.ClassIndex`` of the table: the sources' lists come from the
        approximate search through it (sub-linear in C; no certificate then).
      probes: cells probed per source with ``index``.
      max_block_bytes: budget of a block's gathered rows and scores, or ``"auto"``.

    Returns:
      ``(ids, certified)``: int32 ``[B, H, W, k]`` nearest first among the candidates (where
      fewer than k qualify, the last slots repeat the nearest), and bool ``[B, H, W]``, True
      where the ids are provably the exact k nearest (always False with ``index``).
    """
    batch, height, width, dim = queries.shape
    num_classes = class_emb.shape[0]
    if sources.ndim != 4 or sources.shape[0] != batch or sources.shape[-1] != dim:
        raise ValueError(f"sources {sources.shape} must be [B={batch}, h, w, D={dim}]")
    if not sources.shape[1] <= height or not sources.shape[2] <= width:
        raise ValueError(f"sources {sources.shape[1:3]} larger than queries {(height, width)}")
    if not 1 <= candidates <= num_classes:
        raise ValueError(f"candidates={candidates} must be between 1 and C={num_classes}")
    if not 1 <= k <= candidates - (exclude is not None):
        raise ValueError(f"k={k} must be between 1 and candidates={candidates} (less one excluded)")
    budget = knn.resolve_block_bytes(max_block_bytes)
    classes = lax.stop_gradient(jnp.asarray(class_emb, jnp.float32))
    src = lax.stop_gradient(jnp.asarray(sources, jnp.float32))
    src_ids, src_bound = _source_search(
        src, classes, candidates, normalize_classes, budget, index, probes
    )
    return rerank_source_lists(
        queries,
        src_ids,
        src_bound,
        classes,
        k,
        exclude=exclude,
        normalize_classes=normalize_classes,
        max_block_bytes=budget,
    )


def rerank_source_lists(
    queries: jax.Array,
    src_ids: jax.Array,
    src_bound: jax.Array | None,
    class_emb: jax.Array,
    k: int,
    *,
    exclude: jax.Array | None = None,
    normalize_classes: bool = False,
    max_block_bytes: int = knn.DEFAULT_MAX_BLOCK_BYTES,
    slack: Slack | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The k best of each full-resolution pixel among its four sources' given lists.

    Args:
      queries: float ``[B, H, W, D]``, the full-resolution pixel embeddings.
      src_ids: int32 ``[B, h, w, K']``, each stride-4 source's K' nearest classes (distinct).
      src_bound: float32 ``[B, h, w]``, each source's K'-th score when its list is the exact
        K' nearest (the certificate's bound), or None: nothing is certified.
      class_emb: float ``[C, D]``.
      k: neighbours per pixel, ``1 <= k <= K'`` (``K' − 1`` with ``exclude``).
      exclude: optional int ``[B, H, W]``: one class id per pixel never returned.
      normalize_classes: score against the unit-length rows of ``class_emb``.
      max_block_bytes: budget of a block's gathered rows and scores (bytes).
      slack: optional :class:`Slack`, subtracted from each pixel's bound (for pixels that may
        depart from their sources' bilinear blend, see ``knn_certified``).

    Returns:
      ``(ids, certified)`` as :func:`union_nearest_class_ids`.
    """
    batch, height, width, dim = queries.shape
    num_classes = class_emb.shape[0]
    candidates = src_ids.shape[-1]
    budget = int(max_block_bytes)
    classes = lax.stop_gradient(jnp.asarray(class_emb, jnp.float32))
    rows, cols = axis_cells(src_ids.shape[1], height), axis_cells(src_ids.shape[2], width)
    cells_y, cells_x = rows.members.shape[0], cols.members.shape[0]
    units = batch * cells_y  # a unit is one row of cells
    pixels = rows.members.shape[1] * cols.members.shape[1]
    # Each block gathers its own units' queries, lists and bounds from these: all the cells'
    # at once would copy the queries and hold each source's list four times (BENCHMARKS §2:
    # 10 MB more at the train step's peak on the CPU preset).
    flat = {
        "q": lax.stop_gradient(queries).astype(jnp.float32).reshape(-1, dim),
        "ex": None if exclude is None else jnp.asarray(exclude, jnp.int32).reshape(-1),
        "ids": src_ids.reshape(-1, candidates),
        "bound": None if src_bound is None else src_bound.reshape(-1),
        "slack": None
        if slack is None
        else slack._replace(sources=jnp.asarray(slack.sources, jnp.float32).reshape(-1, dim)),
    }
    rerank = functools.partial(
        _rerank_units,
        flat=flat,
        cells=_UnitCells.of(rows, cols, height, width),
        classes=classes,
        k=k,
        candidates=candidates,
        normalize=normalize_classes,
    )
    # A unit's gathered rows, scores and queries.
    unit_bytes = cells_x * (4 * candidates * (dim + 2 * pixels + 2) + pixels * (dim + 2 * k)) * 4
    if slack is not None:  # each pixel's blend, and its four weighted sources
        unit_bytes += cells_x * pixels * 5 * dim * 4
    per_block = max(1, budget // max(unit_bytes, 1))
    ids, certified = _blockwise(rerank, {"unit": jnp.arange(units)}, units, per_block)
    gy, gx = rows.members.shape[1], cols.members.shape[1]
    # Back to pixels: (cell, slot) pairs of rows, then of columns, as one index per axis (an
    # index per pixel would be a [H, W, 4] array, 4x the ids' size).
    row_of = rows.cell_of * gy + rows.slot_of
    col_of = cols.cell_of * gx + cols.slot_of

    def to_pixels(cell_major):
        slots = cell_major.reshape(batch, cells_y, cells_x, gy, gx, -1)
        slots = jnp.swapaxes(slots, 2, 3).reshape(batch, cells_y * gy, cells_x * gx, -1)
        return jnp.take(jnp.take(slots, row_of, axis=1), col_of, axis=2)

    ids = jnp.clip(to_pixels(ids), 0, num_classes - 1)
    return ids, to_pixels(certified)[..., 0]


class _UnitCells(NamedTuple):
    """Static tables locating the pixels and sources of a unit (one row of cells).

    Attributes:
      pixel_rows: int32 ``[h+1, Gy]``, the output rows of each row of cells (empty slots
        repeat row 0); pixel_cols: int32 ``[w+1, Gx]``, the same for columns.
      source_rows: int32 ``[h+1, 2]``; source_cols: int32 ``[w+1, 2]``: the cells' sources.
      row_weights: float32 ``[h+1, Gy, 2]``; col_weights: float32 ``[w+1, Gx, 2]``: each
        pixel row's (column's) weights on its cell's two source rows (columns); a pixel's
        weights on its cell's four sources are their products (:func:`_unit_weights`). Kept
        per axis: the product table was 34 MB of constants for a 1024×2048 image.
      shape: ``(H, W, h, w)``, the output's and the sources' sizes.
    """

    pixel_rows: np.ndarray
    pixel_cols: np.ndarray
    source_rows: np.ndarray
    source_cols: np.ndarray
    row_weights: np.ndarray
    col_weights: np.ndarray
    shape: tuple[int, int, int, int]

    @classmethod
    def of(cls, rows: AxisCells, cols: AxisCells, height: int, width: int) -> _UnitCells:
        shape = (height, width, rows.sources.shape[0] - 1, cols.sources.shape[0] - 1)
        return cls(
            np.maximum(rows.members, 0),
            np.maximum(cols.members, 0),
            rows.sources,
            cols.sources,
            rows.weights.astype(np.float32),
            cols.weights.astype(np.float32),
            shape,
        )


def _unit_weights(cells: _UnitCells, cell_row: jax.Array) -> jax.Array:
    """float32 ``[U, X, Gy·Gx, 4]``: each pixel's weights on its cell's four sources (rows
    major, as the sources' order), for the rows of cells ``cell_row`` (int32 ``[U]``)."""
    rows = jnp.asarray(cells.row_weights)[cell_row]  # [U, Gy, 2]
    cols = jnp.asarray(cells.col_weights)  # [X, Gx, 2]
    weights = rows[:, None, :, None, :, None] * cols[None, :, None, :, None, :]
    return weights.reshape(*weights.shape[:2], -1, 4)


def _rerank_units(block, *, flat, cells: _UnitCells, classes, k, candidates, normalize):
    """:func:`_rerank` of units ``block["unit"]`` (int32 ``[U]``, unit = b·(h+1) + cell row),
    their queries, excluded ids, lists and bounds gathered here from ``flat``: ``{"q": float32
    [B·H·W, D], "ex": int32 [B·H·W] or None, "ids": int32 [B·h·w, K'], "bound": float32
    [B·h·w] or None, "slack": :class:`Slack` with sources float32 [B·h·w, D], or None}``."""
    height, width, src_height, src_width = cells.shape
    unit = block["unit"]
    batch, cell_row = unit // cells.pixel_rows.shape[0], unit % cells.pixel_rows.shape[0]
    rows = jnp.asarray(cells.pixel_rows)[cell_row] + (batch * height)[:, None]  # [U, Gy]
    pixel = rows[:, None, :, None] * width + cells.pixel_cols[None, :, None, :]
    pixel = pixel.reshape(*pixel.shape[:2], -1)  # [U, X, P], flat over B·H·W
    rows = jnp.asarray(cells.source_rows)[cell_row] + (batch * src_height)[:, None]  # [U, 2]
    source = rows[:, None, :, None] * src_width + cells.source_cols[None, :, None, :]
    source = source.reshape(*source.shape[:2], 4)  # [U, X, 4], flat over B·h·w
    queries = flat["q"][pixel]
    if flat["bound"] is None:  # nothing is certified: a bound below every score
        bound = jnp.full(pixel.shape, -jnp.inf)
    else:
        # Each pixel's certificate bound Σᵢ wᵢ tᵢ from its cell's four sources' K'-th scores:
        # a product and a sum, not an einsum (as a dot with (unit, cell) batch dimensions it is
        # a loop of tiny matmuls on CPU, measured 10x slower than the whole re-rank).
        weights = _unit_weights(cells, cell_row)  # [U, X, P, 4]
        bound = jnp.sum(weights * flat["bound"][source][:, :, None, :], axis=-1)
        if flat["slack"] is not None:
            bound = bound - _slack(flat["slack"], queries, weights, source)
    units = {
        "q": queries,
        "ex": jnp.full(pixel.shape, -1, jnp.int32) if flat["ex"] is None else flat["ex"][pixel],
        "ids": flat["ids"][source].reshape(*source.shape[:2], 4 * candidates),
        "bound": bound,
    }
    return _rerank(units, classes=classes, k=k, candidates=candidates, normalize=normalize)


def _slack(slack: Slack, queries, weights, source):
    """float32 ``[U, X, P]``: :class:`Slack` of pixels ``queries [U, X, P, D]`` whose blends
    are ``weights [U, X, P, 4]`` of sources ``source [U, X, 4]`` (rows of ``slack.sources``)."""
    points = slack.sources[source]  # [U, X, 4, D]
    blend = jnp.sum(weights[..., None] * points[:, :, None, :, :], axis=3)
    departure = jnp.sqrt(jnp.sum((queries - blend) ** 2, -1))
    length = jnp.sqrt(jnp.sum(queries * queries, -1))
    return (
        slack.per_departure * departure
        + slack.per_length * jnp.maximum(length, 1.0)
        + slack.constant
    )


def _rerank(block, *, classes, k, candidates, normalize):
    """The k best of each pixel among its cell's candidates, and whether they are certified.

    Args:
      block: ``{"q": float32 [U, X, P, D], "ex": int32 [U, X, P], "ids": int32 [U, X, 4K'],
        "bound": float32 [U, X, P]}``: U rows of X cells of P pixel slots.

    Returns:
      ``(int32 [U, X, P, k], bool [U, X, P])``.
    """
    ids = block["ids"]
    gathered = classes[ids]
    if normalize:
        gathered = knn.unit_rows(gathered)
    dots = jnp.einsum("ucpd,ucjd->ucpj", block["q"], gathered, precision=_HIGHEST)
    scores = jnp.sum(gathered * gathered, -1)[:, :, None, :] - 2.0 * dots
    drop = _repeated(ids, candidates)[:, :, None, :] | (
        ids[:, :, None, :] == block["ex"][..., None]
    )
    masked = jnp.where(drop, -jnp.inf, -scores)
    if k == 1:  # one pass (inference's assignment), no top-k
        positions = jnp.argmax(masked, axis=-1)[..., None]
        neg = jnp.take_along_axis(masked, positions, -1)
    else:  # a 2-D top_k: XLA:CPU lowered the 4-D one to a full sort (measured 4x slower)
        neg, positions = lax.top_k(masked.reshape(-1, ids.shape[-1]), k)
        neg, positions = neg.reshape(*drop.shape[:-1], k), positions.reshape(*drop.shape[:-1], k)
    chosen = jnp.take_along_axis(jnp.broadcast_to(ids[:, :, None, :], drop.shape), positions, -1)
    chosen = jnp.where(jnp.isfinite(neg), chosen, chosen[..., :1])
    return chosen, jnp.isfinite(neg[..., -1]) & (-neg[..., -1] <= block["bound"])


def _blockwise(fn, arrays: dict[str, jax.Array], units: int, per_block: int):
    """``fn`` over blocks of ``per_block`` units of ``arrays`` (leading axis ``units``), by
    ``lax.map``; the last block starts early to stay inside, its repeated units dropped."""
    per_block = int(min(units, per_block))
    num_blocks = -(-units // per_block)

    def block(index):
        start = jnp.minimum(index * per_block, units - per_block)
        return fn({n: lax.dynamic_slice_in_dim(a, start, per_block) for n, a in arrays.items()})

    if num_blocks == 1:
        return block(0)
    outs = lax.map(block, jnp.arange(num_blocks))
    overlap = num_blocks * per_block - units
    return tuple(
        jnp.concatenate([o[:-1].reshape(-1, *o.shape[2:]), o[-1, overlap:]], 0) for o in outs
    )


@functools.partial(jax.jit, static_argnames=("candidates", "max_block_bytes"))
def approximate_assign(
    features: jax.Array,
    class_emb: jax.Array,
    *,
    candidates: int = DEFAULT_CANDIDATES,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
) -> jax.Array:
    """The approximate nearest class of each pixel (inference), through a ×4 coarser grid.

    The features are resized bilinearly (half-pixel centres) to ``ceil(H/4) × ceil(W/4)`` and
    renormalised — nearly the model's own stride-4 map when they come from one whole-image
    pass — and each pixel takes the nearest class of the union of its four grid points'
    ``candidates`` nearest (:func:`union_nearest_class_ids` with k = 1; no certificate: the
    features are not exactly a blend of that grid). Work: ``N/16`` queries against C plus
    ``4K'`` scores per pixel.

    Args:
      features: float ``[B, H, W, D]`` pixel embeddings.
      class_emb: float ``[C, D]``.
      candidates: K' (capped at C).
      max_block_bytes: memory budget of the searches, or ``"auto"``.

    Returns:
      int32 ``[B, H, W]`` class ids.
    """
    if features.ndim != 4:
        raise ValueError(f"the approximate assignment takes [B, H, W, D], got {features.shape}")
    ids, _ = union_nearest_class_ids(
        features,
        coarse_grid(features),
        class_emb,
        1,
        candidates=min(int(candidates), class_emb.shape[0]),
        max_block_bytes=max_block_bytes,
    )
    return ids[..., 0]
