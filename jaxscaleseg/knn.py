"""Exact nearest-class search with bounded memory.

The embedding head scores a pixel against classes by Euclidean distance. Training needs each
pixel's k nearest classes (the negatives of the ESS loss) and inference needs the nearest one.
Neither may hold a pixels×classes array: with N = 2·256·256 pixels and C = 100 000 classes that
would be 52 GB. Here the queries are cut into row blocks, and the class axis into column blocks
when a single row of the block would not fit, so that the queries×classes block in memory never
exceeds ``max_block_bytes`` whatever C is.

Speed: the distances of one block are a single matmul (``‖q − e‖² = ‖q‖² + ‖e‖² − 2 q·e``); what
costs is choosing the k smallest per row. Instead of a top-k over the whole class axis, the class
axis is split into groups, each group's minimum is taken (one fused pass), the k groups with the
smallest minima are kept — they contain the k nearest classes, since a group outside them has at
least k elements no larger than its own minimum — and the exact top-k runs over those k groups
only. The distances returned are recomputed as ``‖q − e‖`` from the chosen rows, so they are
accurate even where the expansion above cancels.

On CPU (``method="pyramid"``) every such selection is one XLA reduction whose reducer merges
ascending k-lists: XLA:CPU compiles it into a single loop per row that keeps the k-list in
registers, so a selection costs one pass over its candidates instead of a loop of small array
operations, and the blocks are kept small enough to stay in the CPU's cache.

On GPU and TPU (``method="top_k"``) each block's k smallest come from ``lax.top_k`` over the
whole block. ``"min_rounds"`` (k rounds of a row minimum), ``"tile_minima"`` (the minima of
contiguous tiles of classes, then a top-k over the members of the k tiles with the least
minima) and ``"tiled_top_k"`` (a top-k per tile of 128 classes, then one over the survivors)
are the same selection for small k by other kernels, kept as options until a GPU measurement
picks one (``benchmarks.gpu_check``); the four return the same ids, equal distances broken by
the lower class id (see ``selection``).

No gradient flows through the search: it returns integer ids and distances computed under
``stop_gradient``; losses recompute the distances they differentiate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import selection

DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20
# What ``max_block_bytes="auto"`` means on each backend. CPU: the training configs' cache-sized
# budget (the CPU figures of BENCHMARKS.md §2 were measured with it). GPU/TPU: every iteration of
# the search loop is at least one kernel launch, so blocks of a GiB (C = 1 284 at N = 8·512²:
# about 20 row blocks instead of 2 571 at 8 MiB).
AUTO_BLOCK_BYTES = {"cpu": 8 * 2**20}
ACCELERATOR_BLOCK_BYTES = 2**30
# No block reaches 2³¹ elements whatever the budget (XLA's GPU top-k indexes a block's rows in
# 32 bits); half of that leaves room for the padding of the pyramid's class axis.
MAX_BLOCK_ELEMENTS = 2**30
# Rows of queries processed together below which the class axis is cut into column blocks.
_MIN_ROWS_PER_BLOCK = 32
# Rows of a column block: each column block's class rows are read (and, but for the tile
# minima, rebuilt as [−2e, ‖e‖²]) once per row block, so taller blocks do that less often. On
# CPU at 100 000 classes and 8 MiB, 64 rows instead of 32: the exact k = 8 search of 4 096
# queries 0.34 → 0.22 s, the tile minima's K' = 32 of 8 192 queries 0.81 → 0.60 s, same
# temporaries (BENCHMARKS.md §2).
_COLUMN_BLOCK_ROWS = 64
# Each block element is a float32 score, and XLA may hold it and one masked copy at once.
_BYTES_PER_BLOCK_ELEMENT = 8
_HIGHEST = lax.Precision.HIGHEST
# The pyramid selection (CPU) works on blocks of about this many bytes (at least
# _MIN_ROWS_PER_BLOCK rows, never above the budget): a block that stays in the cache between the
# matmul and the passes that read it is faster than a larger one.
_SELECTION_BLOCK_BYTES = 2 * 2**20
# Largest k the reduction-based selection takes (its reducer grows as k²); beyond it the
# pyramid method selects with lax.top_k.
_MAX_REDUCE_K = 16
# Ranking score of padding classes: above any real score (scores are at most ‖e‖² + 2‖q‖‖e‖).
_PAD_SCORE = 1e30


# Lower bound on a row's norm where rows are normalised (as ``models.l2_normalize``).
NORM_EPS = 1e-12


def inverse_norms(rows: jax.Array) -> jax.Array:
    """``1 / max(‖rows‖, NORM_EPS)`` along the last axis, kept (size 1).

    Args:
      rows: float32 ``[..., D]``.

    Returns:
      float32 ``[..., 1]``.
    """
    squared = jnp.sum(rows * rows, axis=-1, keepdims=True)
    return lax.rsqrt(jnp.maximum(squared, NORM_EPS * NORM_EPS))


def unit_rows(rows: jax.Array) -> jax.Array:
    """``rows / max(‖rows‖, NORM_EPS)`` along the last axis (as ``models.l2_normalize``).

    Plain automatic differentiation: meant for the few rows a block or chunk reads, not for a
    whole table (see ``models.l2_normalize`` for that).

    Args:
      rows: float32 ``[..., D]``.

    Returns:
      float32 ``[..., D]``.
    """
    return rows * inverse_norms(rows)


def resolve_block_bytes(max_block_bytes: int | str, backend: str | None = None) -> int:
    """The block budget in bytes: an int as given, ``"auto"`` by backend.

    Args:
      max_block_bytes: a positive int, or ``"auto"``: ``AUTO_BLOCK_BYTES[backend]`` (8 MiB on
        CPU), ``ACCELERATOR_BLOCK_BYTES`` (1 GiB) on any other backend.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; None: ``jax.default_backend()``.

    Returns:
      int bytes.
    """
    if isinstance(max_block_bytes, str):
        if max_block_bytes != "auto":
            raise ValueError(f"max_block_bytes={max_block_bytes!r}; expected 'auto' or an int")
        backend = backend or jax.default_backend()
        return AUTO_BLOCK_BYTES.get(backend, ACCELERATOR_BLOCK_BYTES)
    if int(max_block_bytes) < 1:
        raise ValueError(f"max_block_bytes={max_block_bytes} must be positive")
    return int(max_block_bytes)


def block_elements(max_block_bytes: int) -> int:
    """Scores a block may hold: the budget at 8 bytes per element, below ``MAX_BLOCK_ELEMENTS``."""
    return min(max(max_block_bytes // _BYTES_PER_BLOCK_ELEMENT, 1), MAX_BLOCK_ELEMENTS)


def block_shape(
    num_queries: int,
    num_classes: int,
    max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
) -> tuple[int, int]:
    """Chooses the (rows, classes) block processed at once so that it fits the budget.

    Args:
      num_queries: N, the number of query vectors.
      num_classes: C.
      max_block_bytes: budget for the queries×classes scores held at once (a block and one
        masked copy, 8 bytes per element). Below ``_MIN_ROWS_PER_BLOCK`` rows of the whole
        table, the class axis is cut into column blocks of ``_COLUMN_BLOCK_ROWS`` rows.

    Returns:
      ``(rows, cols)`` with ``rows * cols * 8 <= max_block_bytes`` (for budgets of at least
      a few hundred bytes) and ``rows * cols <= MAX_BLOCK_ELEMENTS``, ``rows <= num_queries``
      and ``cols <= num_classes``.
    """
    elements = block_elements(max_block_bytes)
    if elements // num_classes >= min(_MIN_ROWS_PER_BLOCK, num_queries):
        rows = min(num_queries, elements // num_classes)
        return max(rows, 1), num_classes
    rows = min(_COLUMN_BLOCK_ROWS, num_queries)
    cols = max(elements // rows, 1)
    return rows, min(cols, num_classes)


def _selection_block_shape(
    num_queries: int, num_classes: int, max_block_bytes: int
) -> tuple[int, int]:
    """Block shape for the pyramid selection: about cache-sized, within the budget.

    Rows of all C classes, as few as fill ``_SELECTION_BLOCK_BYTES`` but at least
    ``_MIN_ROWS_PER_BLOCK``, when the budget allows them; otherwise the budget's own shape
    (column blocks).
    """
    rows = min(
        num_queries,
        max(_MIN_ROWS_PER_BLOCK, _SELECTION_BLOCK_BYTES // _BYTES_PER_BLOCK_ELEMENT // num_classes),
    )
    if rows * num_classes <= block_elements(max_block_bytes):
        return rows, num_classes
    return block_shape(num_queries, num_classes, max_block_bytes)


def _augmented_classes(classes: jax.Array, start, cols: int, covered, normalize: bool) -> jax.Array:
    """Rows ``[−2e, ‖e‖²]`` of classes ``start .. start + cols``, built for one column block.

    Args:
      classes: float32 ``[C, D]``.
      start: first class of the block (``start + cols <= C``).
      cols: classes in the block.
      covered: classes below this id are masked (they score ``_PAD_SCORE``): the last column
        block starts early so that it stays inside the table, and its overlap with the block
        before it must not be counted twice.
      normalize: scale each class row to unit length first.

    Returns:
      float32 ``[cols, D + 1]``.
    """
    block = lax.dynamic_slice_in_dim(classes, start, cols)
    if normalize:
        block = unit_rows(block)
    norms = jnp.sum(block * block, axis=-1, keepdims=True)
    ids = start + lax.broadcasted_iota(jnp.int32, (cols, 1), 0)
    return jnp.concatenate([-2.0 * block, jnp.where(ids < covered, _PAD_SCORE, norms)], axis=1)


def _search_rows(
    queries: jax.Array,
    classes: jax.Array,
    table: jax.Array | None,
    k: int,
    cols: int,
    select: Callable,
    merge: Callable,
    normalize: bool,
) -> jax.Array:
    """Ids of the k nearest classes for one block of query rows.

    The ranking score ``‖e‖² − 2 q·e`` (the squared distance less ``‖q‖²``) comes out of one
    matmul of augmented rows ``[q, 1]·[−2e, ‖e‖²]``; an elementwise epilogue instead would be
    fused into every consumer of the block and slow the selection several times over on CPU.

    Args:
      queries: float32 ``[R, D]``.
      classes: float32 ``[C, D]``.
      table: float32 ``[C', D + 1]`` rows ``[−2e, ‖e‖²]`` (C' >= C a multiple of the selection
        unit; padding rows ``[0, _PAD_SCORE]``) when the class axis is one block (``cols =
        C'``); None when it is cut into column blocks of ``cols < C`` classes, whose rows are
        then built block by block so that no second copy of the class table is held.
      k: neighbours per query.
      cols: classes per column block (a multiple of the selection's group unit).
      select: ``select(scores [R, cols], k) -> (values [R, k], positions [R, k])``.
      merge: ``merge(values [R, m], ids [R, m], k) -> (values [R, k], ids [R, k])``, the k
        smallest of m, for the running result over column blocks.
      normalize: scale each class row of a column block to unit length (``table`` is built
        from unit rows already).

    Returns:
      int32 ``[R, k]``, ascending by distance.
    """
    augmented = jnp.concatenate([queries, jnp.ones((queries.shape[0], 1), jnp.float32)], 1)
    if table is not None:
        return select(jnp.dot(augmented, table.T, precision=_HIGHEST), k)[1]

    num_classes = classes.shape[0]

    def add_block(best, block_index):
        covered = block_index * cols
        start = jnp.minimum(covered, num_classes - cols)
        block = _augmented_classes(classes, start, cols, covered, normalize)
        values, positions = select(jnp.dot(augmented, block.T, precision=_HIGHEST), k)
        merged = merge(
            jnp.concatenate([best[0], values], axis=1),
            jnp.concatenate([best[1], positions + start], axis=1),
            k,
        )
        return merged, None

    init = (
        jnp.full((queries.shape[0], k), jnp.inf, jnp.float32),
        jnp.full((queries.shape[0], k), -1, jnp.int32),
    )
    (_, ids), _ = lax.scan(add_block, init, jnp.arange(-(-num_classes // cols)))
    return ids


SEARCH_METHODS = ("auto", "pyramid", "top_k", "min_rounds", "tile_minima", "tiled_top_k")


def resolve_method(method: str, backend: str | None = None) -> str:
    """A named selection method: ``"auto"`` is the pyramid on CPU, ``lax.top_k`` elsewhere.

    Args:
      method: one of ``SEARCH_METHODS``.
      backend: None: ``jax.default_backend()``.
    """
    if method not in SEARCH_METHODS:
        raise ValueError(f"method={method!r}; expected one of {SEARCH_METHODS}")
    if method == "auto":
        return "pyramid" if (backend or jax.default_backend()) == "cpu" else "top_k"
    return method


def _drop_excluded(ids: jax.Array, exclude: jax.Array) -> jax.Array:
    """The first k of k+1 ascending ids once ``exclude`` is removed.

    Args:
      ids: int32 ``[N, k + 1]`` nearest first.
      exclude: int32 ``[N]``.

    Returns:
      int32 ``[N, k]``: ``ids`` without ``exclude`` (or without the last entry when
      ``exclude`` is not among them).
    """
    seen = jnp.cumsum(ids == exclude[:, None], axis=-1) > 0  # at or after the excluded entry
    return jnp.where(seen[:, :-1], ids[:, 1:], ids[:, :-1])


def _block_plan(method: str, num_queries: int, num_classes: int, max_block_bytes: int, wanted: int):
    """Block shape and selection functions of one search.

    Returns:
      ``(rows, cols, select, merge, tile)``: the queries×classes block shape (``cols`` rounded
      to whole top-level groups of the pyramid, and at least C when one column block covers the
      table), ``select(scores, count)``, ``merge(values, ids, count)``, and the tile of the
      tile-minima method (None for the others), whose column blocks search in two passes
      (:func:`_search_by_tile_minima`) rather than through ``select`` and ``merge``.
    """
    tile = None
    if method == "pyramid" and wanted <= _MAX_REDUCE_K:
        rows, cols = _selection_block_shape(num_queries, num_classes, max_block_bytes)
        group, levels = selection.selection_plan(max(cols, wanted), wanted)
        unit = group**levels

        def select(scores, count):
            return selection.smallest_k_by_pyramid(scores, count, group, levels)

        merge = selection.k_smallest
    else:
        unit = 1
        choose = selection.top_k_smallest
        if method == "min_rounds":
            choose = selection.smallest_k_by_rounds
        if method == "tile_minima":
            unit = tile = selection.tile_minima_size(num_classes, wanted)
            choose = functools.partial(selection.smallest_k_by_tile_minima, tile=unit)
        if method == "tiled_top_k" and wanted <= selection.TILE_COLUMNS < num_classes:
            # Whole tiles (the padding classes score _PAD_SCORE); the block shape is that of
            # the padded class axis, so that padding never takes a block past the budget.
            unit = selection.TILE_COLUMNS
            choose = selection.smallest_k_by_tiles
        rows, cols = block_shape(num_queries, -(-num_classes // unit) * unit, max_block_bytes)
        cols = min(cols, num_classes)

        def select(scores, count):
            return choose(scores, count)

        def merge(values, ids, count):
            # The running best comes first, so ties keep the lower class id.
            values, positions = selection.top_k_smallest(values, count)
            return values, jnp.take_along_axis(ids, positions, axis=1)

    if cols < num_classes:  # column blocks of whole top-level groups, as even as the unit allows
        num_col_blocks = -(-num_classes // cols)
        cols = max((-(-num_classes // num_col_blocks)) // unit, 1) * unit
    if cols >= num_classes:  # one column block: pad the class axis to whole top-level groups
        cols = -(-num_classes // unit) * unit
    return rows, cols, select, merge, tile


def _search_by_tile_minima(
    queries: jax.Array, classes: jax.Array, k: int, cols: int, tile: int, normalize: bool
) -> jax.Array:
    """The tile-minima selection over column blocks, in two passes and without merges.

    The first pass scores each column block and keeps only its tiles' minima. The k tiles with
    the least minima over the whole table hold the k nearest classes (as in
    ``selection.smallest_k_by_tile_minima``), so the second pass gathers their k·T members,
    scores them and selects once. Selecting in each column block and merging with the running
    best instead takes two top-k per block: on CPU (8 192 queries, K' = 32, 100 000 classes,
    8 MiB blocks, BENCHMARKS.md §2) 1.22 s against 0.60 s here.

    Args:
      queries: float32 ``[R, D]``.
      classes: float32 ``[C, D]``.
      k: neighbours per query.
      cols: classes per column block (< C, a multiple of ``tile``).
      tile: classes per tile.
      normalize: score against the unit-length class rows.

    Returns:
      int32 ``[R, k]``, ascending by distance.
    """
    num_rows = queries.shape[0]
    num_classes = classes.shape[0]
    num_blocks = -(-num_classes // cols)
    last_covered = (num_blocks - 1) * cols  # the last block starts early; below this it is masked

    def scored(rows, dots):
        """‖e‖² − 2 q·e of the (unit) class rows ``rows [..., D]`` from their dots with q."""
        if not normalize:
            return jnp.sum(rows * rows, -1) - 2.0 * dots
        scale = inverse_norms(rows)[..., 0]
        return jnp.sum(rows * rows, -1) * scale * scale - 2.0 * dots * scale

    def block_minima(_, block_index):
        # A dot of the raw rows and an epilogue, fused into the reduction (its only consumer),
        # so that no block of augmented rows is rebuilt for every row block.
        covered = block_index * cols
        start = jnp.minimum(covered, num_classes - cols)
        rows = lax.dynamic_slice_in_dim(classes, start, cols)
        scores = scored(rows, jnp.dot(queries, rows.T, precision=_HIGHEST))
        ids = start + jnp.arange(cols, dtype=jnp.int32)
        scores = jnp.where(ids < covered, _PAD_SCORE, scores)
        return None, jnp.min(scores.reshape(num_rows, cols // tile, tile), axis=-1)

    _, minima = lax.scan(block_minima, None, jnp.arange(num_blocks))  # [blocks, R, cols/T]
    minima = jnp.moveaxis(minima, 0, 1).reshape(num_rows, -1)
    _, chosen = selection.top_k_smallest(minima, k)
    chosen = jnp.sort(chosen, axis=1)  # tiles in class order: ties keep the lower class id
    block_index, tile_index = chosen // (cols // tile), chosen % (cols // tile)
    first = jnp.minimum(block_index * cols, num_classes - cols) + tile_index * tile
    members = (first[:, :, None] + jnp.arange(tile, dtype=jnp.int32)).reshape(num_rows, -1)
    rows = classes[members]  # [R, k·T, D]
    scores = scored(rows, jnp.einsum("rd,rmd->rm", queries, rows, precision=_HIGHEST))
    last_block = jnp.repeat(block_index == num_blocks - 1, tile, axis=1)
    scores = jnp.where(last_block & (members < last_covered), _PAD_SCORE, scores)
    _, picked = selection.top_k_smallest(scores, k)
    return jnp.take_along_axis(members, picked, axis=1)


def _whole_table(classes: jax.Array, cols: int, normalize: bool) -> jax.Array:
    """Rows ``[−2e, ‖e‖²]`` of every class, padded to ``cols`` rows that score ``_PAD_SCORE``.

    Args:
      classes: float32 ``[C, D]``.
      cols: padded class count, ``>= C``.
      normalize: scale each class row to unit length first.

    Returns:
      float32 ``[cols, D + 1]``.
    """
    num_classes, dim = classes.shape
    if normalize:
        classes = unit_rows(classes)
    table = jnp.concatenate([-2.0 * classes, jnp.sum(classes * classes, -1, keepdims=True)], axis=1)
    pad = cols - num_classes
    if pad:
        padding = jnp.zeros((pad, dim + 1), jnp.float32).at[:, dim].set(_PAD_SCORE)
        table = jnp.concatenate([table, padding], axis=0)
    return table


def nearest_class_ids(
    queries: jax.Array,
    class_emb: jax.Array,
    k: int,
    *,
    exclude: jax.Array | None = None,
    max_block_bytes: int | str = DEFAULT_MAX_BLOCK_BYTES,
    method: str = "auto",
    normalize_classes: bool = False,
) -> jax.Array:
    """Ids of the k nearest classes of each query (Euclidean), exact, without distances.

    Args:
      queries: ``[..., D]`` float (bfloat16 accepted; the search runs in float32).
      class_emb: ``[C, D]`` float.
      k: number of neighbours, ``1 <= k <= C`` (``C - 1`` when ``exclude`` is given).
      exclude: int ``[...]`` (the leading shape of ``queries``): for each query one class id
        that is never returned (e.g. its target). Ids outside ``[0, C)`` exclude nothing.
      max_block_bytes: budget for the queries×classes block held at once, or ``"auto"``
        (by backend, see :func:`resolve_block_bytes`).
      method: how each block's k smallest are selected: ``"pyramid"`` (pruning over group
        minima with one reduction per selection, on cache-sized blocks within the budget;
        fastest on CPU), ``"top_k"`` (``lax.top_k``, the GPU and TPU default), ``"min_rounds"``,
        ``"tile_minima"`` or ``"tiled_top_k"`` (small-k selections for GPUs, see the module
        docstring) or
        ``"auto"`` (by the default backend). All are exact; all but the pyramid break equal
        distances by the lower class id.
      normalize_classes: search against the rows of ``class_emb`` scaled to unit length
        (``unit_rows``), scaled block by block so that no normalised copy of a table too large
        for one block is held.

    Returns:
      int32 ``[..., k]``, nearest first.
    """
    method = resolve_method(method)
    max_block_bytes = resolve_block_bytes(max_block_bytes)
    num_classes, dim = class_emb.shape
    if queries.shape[-1] != dim:
        raise ValueError(
            f"queries have dimension {queries.shape[-1]} but class embeddings have {dim}"
        )
    limit = num_classes - (exclude is not None)
    if not 1 <= k <= limit:
        raise ValueError(
            f"k={k} must be between 1 and {limit} (C={num_classes}"
            f"{', one class excluded per query' if exclude is not None else ''})"
        )
    lead_shape = queries.shape[:-1]
    flat = lax.stop_gradient(queries).reshape(-1, dim).astype(jnp.float32)
    num_queries = flat.shape[0]
    if num_queries == 0:
        return jnp.zeros((*lead_shape, k), jnp.int32)
    classes = lax.stop_gradient(class_emb).astype(jnp.float32)
    # Exclusion: search one more neighbour and drop the excluded id afterwards, so the block
    # itself needs no mask.
    wanted = k + (exclude is not None)
    rows, cols, select, merge, tile = _block_plan(
        method, num_queries, num_classes, max_block_bytes, wanted
    )
    table = None
    if cols >= num_classes:  # one column block: the whole (padded) table is built once
        table = _whole_table(classes, cols, normalize_classes)

    # Column blocks of the tile minima search in two passes, given more tiles than wanted.
    two_pass = table is None and tile is not None
    two_pass = two_pass and -(-num_classes // cols) * (cols // tile) > wanted

    def search(block_index):
        # The last row block starts early so that it stays inside the queries; its rows that
        # the block before it covered are dropped below.
        start = jnp.minimum(block_index * rows, num_queries - rows)
        block = lax.dynamic_slice_in_dim(flat, start, rows)
        if two_pass:
            return _search_by_tile_minima(block, classes, wanted, cols, tile, normalize_classes)
        return _search_rows(block, classes, table, wanted, cols, select, merge, normalize_classes)

    num_row_blocks = -(-num_queries // rows)
    if num_row_blocks == 1:
        ids = search(0)
    else:
        blocks = lax.map(search, jnp.arange(num_row_blocks))
        overlap = num_row_blocks * rows - num_queries
        ids = jnp.concatenate([blocks[:-1].reshape(-1, wanted), blocks[-1, overlap:]], axis=0)
    if exclude is not None:
        ids = _drop_excluded(ids, jnp.asarray(exclude, jnp.int32).reshape(-1))
    # Slots stay -1 only for non-finite queries; keep every id a valid index.
    ids = jnp.clip(ids, 0, num_classes - 1)
    return ids.reshape(*lead_shape, k)


def pairwise_distance(queries: jax.Array, classes: jax.Array) -> jax.Array:
    """Euclidean distance ``‖q − e‖₂`` with a finite gradient where q = e.

    Args:
      queries: float ``[..., D]``.
      classes: float ``[..., D]`` broadcastable against ``queries``.

    Returns:
      float ``[...]``. At ``q = e`` the value is ~1e-6 (the square is clamped at 1e-12 before
      the root) and the gradient is 0.
    """
    diff = queries - classes
    squared = jnp.sum(diff * diff, axis=-1)
    return jnp.sqrt(jnp.maximum(squared, 1e-12))


def nearest_classes(
    queries: jax.Array,
    class_emb: jax.Array,
    k: int,
    *,
    exclude: jax.Array | None = None,
    max_block_bytes: int | str = DEFAULT_MAX_BLOCK_BYTES,
    method: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """The k nearest classes of each query and their distances, exact and memory-bounded.

    Args:
      queries: ``[..., D]`` float (bfloat16 accepted; computed in float32). Need not be unit
        length.
      class_emb: ``[C, D]`` float.
      k: number of neighbours, ``1 <= k <= C`` (``C - 1`` when ``exclude`` is given).
      exclude: optional int ``[...]``: one class id per query never returned.
      max_block_bytes: budget for the queries×classes block held at once (default 64 MiB;
        ``"auto"``: by backend).
      method: block selection, see :func:`nearest_class_ids`.

    Returns:
      ``(distances, indices)``: float32 ``[..., k]`` Euclidean distances, ascending, and the
      int32 class ids. No gradient flows through either.
    """
    ids = nearest_class_ids(
        queries, class_emb, k, exclude=exclude, max_block_bytes=max_block_bytes, method=method
    )
    q = lax.stop_gradient(queries).astype(jnp.float32)
    e = lax.stop_gradient(class_emb).astype(jnp.float32)
    distances = pairwise_distance(q[..., None, :], e[ids])
    # Recomputed distances can swap exact near-ties of the ranking scores; keep them ascending.
    distances, ids = lax.sort((distances, ids), dimension=-1, num_keys=1)
    return distances, ids


def assign(
    queries: jax.Array,
    class_emb: jax.Array,
    *,
    max_block_bytes: int | str = DEFAULT_MAX_BLOCK_BYTES,
    method: str = "auto",
) -> jax.Array:
    """The nearest class of each query (inference for the embedding head).

    Args:
      queries: ``[..., D]`` float pixel embeddings.
      class_emb: ``[C, D]`` float class embeddings.
      max_block_bytes: budget for the queries×classes block held at once, or ``"auto"``.
      method: block selection, see :func:`nearest_class_ids`.

    Returns:
      int32 ``[...]`` class ids.
    """
    ids = nearest_class_ids(queries, class_emb, 1, max_block_bytes=max_block_bytes, method=method)
    return ids[..., 0]
