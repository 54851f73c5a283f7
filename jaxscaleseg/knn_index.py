"""Approximate nearest-class search through a two-level index of the class table.

The exact search (``knn``) scores every query against every class: its work grows as N·C. Here
the class table is cut into M cells of S classes each (M·S ≥ C, M about √C), and each query is
scored against the M cell centres, then against the members of its ``probes`` nearest cells
only, re-ranked exactly (the same ranking score ``‖e‖² − 2 q·e`` as the exact search): about
``M + probes·S`` scores per query instead of C, i.e. O(√C).

The cells come from a balanced recursive bisection, deterministic and jittable: the (unit)
class rows are split in two halves along their principal direction (a few power iterations),
and each half again, ``log2 M`` times; every cell then holds exactly S slots (the last ones
padded with id -1). The index holds class ids only, never rows: the rows are read from the
current table at every query, so an index built a few steps ago gives exact scores, only its
cells may have grown less compact. It is rebuilt every n steps (:func:`refresh_index`) and, as
a small int and float array pair, is checkpointed with the train state.

How good it is must be measured (:func:`recall_at_k`, :func:`search_quality`): on embeddings
with no structure (independent random unit vectors) no partition can be good, and the recall
there is low; see BENCHMARKS.md.

Memory: building the index holds a few table-sized arrays (like the table gradient); a query
block holds ``rows · probes · S`` gathered class rows, within ``max_block_bytes``; nothing is
N×C.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import knn, losses
from jaxscaleseg.labels import IGNORE_INDEX

# "union": the stride-4 union search of ``knn_union`` (not through this index); "certified":
# the union where its certificate holds and the exact search elsewhere (``knn_certified``).
SEARCH_MODES = ("exact", "approximate", "union", "certified", "auto")
# ``search="auto"`` takes the approximate search (this index) from this many classes on; None:
# never. BENCHMARKS.md §7: through the index alone recall@7 is 0.84-0.93 at 8 probes.
AUTO_APPROXIMATE_MIN_CLASSES: int | None = None
# ``search="auto"`` takes the certified search (``knn_certified``: the stride-4 union of
# ``knn_union`` where a bound proves its negatives exact, the exact search elsewhere) from this
# many classes on when the loss reads unit-length pixels (``loss.normalize_pixels``), the exact
# search otherwise. BENCHMARKS.md §2 and §7.5: on the CPU step preset it costs 1.55 s at 1 284
# classes and 2.66 s at 100 000 (the exact search: 18.0 s); at 10 000 classes, trained, it
# certified 93-99 % of the pixels and trained at 3.85 steps/s (exact 2.04, union 4.23) with the
# exact search's negatives, where the union alone, though its recall@7 stayed >= 0.99, moved the
# gradients 2e-3 always the same way and ended 0.02-0.03 mIoU lower. Unit-length pixels keep
# the embeddings spatially smooth, which is what the bound (and its speed) needs. Below 10 000
# classes the exact search costs little more, so it stays.
AUTO_CERTIFIED_MIN_CLASSES = 10_000
DEFAULT_PROBES = 8
_POWER_ITERATIONS = 8
# Centre of a cell with no class (only padding): never among the nearest cells.
_FAR = 1e15
_HIGHEST = lax.Precision.HIGHEST


class ClassIndex(NamedTuple):
    """A partition of the class table into equal cells.

    Attributes:
      centroids: float32 ``[M, D]``, the mean of each cell's (unit, when built so) rows.
      members: int32 ``[M, S]``, the class ids of each cell; -1 for padding slots.
    """

    centroids: jax.Array
    members: jax.Array


def resolve_search(search: str, num_classes: int, unit_pixels: bool = False) -> str:
    """``"exact"``, ``"approximate"``, ``"union"`` or ``"certified"``: ``"auto"`` is the
    certified search from ``AUTO_CERTIFIED_MIN_CLASSES`` classes on when ``unit_pixels``, the
    approximate search from ``AUTO_APPROXIMATE_MIN_CLASSES`` on (never while that is None), else
    exact.

    Args:
      search: one of ``SEARCH_MODES``.
      num_classes: C.
      unit_pixels: the loss reads unit-length pixels (``loss.normalize_pixels``).
    """
    if search not in SEARCH_MODES:
        raise ValueError(f"loss.search={search!r}; expected one of {SEARCH_MODES}")
    if search != "auto":
        return search
    if unit_pixels and num_classes >= AUTO_CERTIFIED_MIN_CLASSES:
        return "certified"
    threshold = AUTO_APPROXIMATE_MIN_CLASSES
    return "approximate" if threshold is not None and num_classes >= threshold else "exact"


def default_num_cells(num_classes: int) -> int:
    """M: the power of two nearest √C (at least 1)."""
    return 2 ** max(0, round(math.log2(math.sqrt(max(num_classes, 1)))))


def index_shape(num_classes: int, num_cells: int | None = None) -> tuple[int, int]:
    """``(M, S)`` of the index of a C-class table: M a power of two, ``S = ceil(C / M)``."""
    cells = default_num_cells(num_classes) if num_cells is None else int(num_cells)
    if cells < 1 or cells & (cells - 1) or cells > num_classes:
        raise ValueError(
            f"num_cells={num_cells} must be a power of two between 1 and C={num_classes}"
        )
    return cells, -(-num_classes // cells)


def _principal_directions(centered: jax.Array) -> jax.Array:
    """float32 ``[G, D]``: each group's leading principal direction (power iteration from a
    fixed start, so deterministic), of ``centered`` float32 ``[G, n, D]``."""
    dim = centered.shape[-1]
    direction = jnp.full(centered.shape[::2], 1.0 / math.sqrt(dim), jnp.float32)
    # A fixed, non-symmetric start: unlikely to be orthogonal to the principal direction.
    direction = direction * (1.0 + jnp.arange(dim, dtype=jnp.float32) / dim)
    for _ in range(_POWER_ITERATIONS):
        scores = jnp.einsum("gnd,gd->gn", centered, direction, precision=_HIGHEST)
        direction = jnp.einsum("gnd,gn->gd", centered, scores, precision=_HIGHEST)
        direction = knn.unit_rows(direction)
    return direction


@functools.partial(jax.jit, static_argnames=("num_cells", "normalize_classes"))
def build_index(
    class_emb: jax.Array, *, num_cells: int | None = None, normalize_classes: bool = False
) -> ClassIndex:
    """Partitions the class table into M equal cells by recursive principal-axis bisection.

    Jittable and deterministic (no random state; ties keep the lower id).

    Args:
      class_emb: float ``[C, D]``.
      num_cells: M, a power of two ≤ C; None: :func:`default_num_cells`.
      normalize_classes: partition the rows scaled to unit length (as the loss reads them).

    Returns:
      :class:`ClassIndex` with ``centroids [M, D]`` and ``members [M, S]``, ``S = ceil(C/M)``.
    """
    num_classes, dim = class_emb.shape
    cells, size = index_shape(num_classes, num_cells)
    rows = lax.stop_gradient(jnp.asarray(class_emb, jnp.float32))
    if normalize_classes:
        rows = knn.unit_rows(rows)
    total = cells * size
    rows = jnp.pad(rows, ((0, total - num_classes), (0, 0)))
    real = jnp.arange(total) < num_classes
    ids = jnp.arange(total, dtype=jnp.int32)[None, :]
    for level in range(int(math.log2(cells))):
        weights = real[ids][..., None].astype(jnp.float32)  # [G, n, 1]
        group_rows = rows[ids]
        mean = jnp.sum(group_rows * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
        centered = (group_rows - mean[:, None, :]) * weights
        direction = _principal_directions(centered)
        projection = jnp.einsum("gnd,gd->gn", centered, direction, precision=_HIGHEST)
        # Padding sorts last, so that it fills the last cells' tails.
        projection = jnp.where(real[ids], projection, jnp.inf)
        order = jnp.argsort(projection, axis=1, stable=True)
        ids = jnp.take_along_axis(ids, order, axis=1).reshape(2 ** (level + 1), -1)
    members = jnp.where(ids < num_classes, ids, -1)
    weights = (members >= 0)[..., None].astype(jnp.float32)
    counts = jnp.sum(weights, axis=1)
    centroids = jnp.sum(rows[jnp.maximum(members, 0)] * weights, axis=1) / jnp.maximum(counts, 1.0)
    centroids = jnp.where(counts > 0, centroids, _FAR)
    return ClassIndex(centroids=centroids, members=members.astype(jnp.int32))


def refresh_index(
    index: ClassIndex, class_emb: jax.Array, step: jax.Array, every: int, **build_kwargs
) -> ClassIndex:
    """``index``, rebuilt from ``class_emb`` where ``step % every == 0`` (one ``lax.cond``).

    Args:
      index: the index of the last rebuild (same shapes as a new one).
      class_emb: float ``[C, D]``, the current table.
      step: int scalar, the step about to be taken (traced is fine).
      every: rebuild period n >= 1 (static).
      **build_kwargs: passed to :func:`build_index`.
    """
    if int(every) < 1:
        raise ValueError(f"index rebuild period every={every} must be >= 1")
    if every == 1:
        return build_index(class_emb, **build_kwargs)
    return lax.cond(
        jnp.asarray(step) % every == 0,
        lambda: build_index(class_emb, **build_kwargs),
        lambda: ClassIndex(*(jnp.asarray(leaf) for leaf in index)),
    )


@functools.partial(jax.jit, static_argnames=("k", "probes", "normalize_classes", "max_block_bytes"))
def approximate_nearest_class_ids(
    queries: jax.Array,
    class_emb: jax.Array,
    index: ClassIndex,
    k: int,
    *,
    probes: int = DEFAULT_PROBES,
    exclude: jax.Array | None = None,
    normalize_classes: bool = False,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
) -> jax.Array:
    """Ids of (approximately) the k nearest classes of each query, through ``index``.

    Each query's ``probes`` nearest cell centres are found exactly (``knn.nearest_class_ids``
    over the M centres); the members of those cells are re-ranked by the exact ranking score
    ``‖e‖² − 2 q·e`` on the current rows of ``class_emb``. Rows of queries are processed in
    blocks whose gathered class rows fit ``max_block_bytes``.

    Args:
      queries: ``[..., D]`` float (computed in float32).
      class_emb: float ``[C, D]``, the current table (the index may be older).
      index: :class:`ClassIndex` of a C-class table.
      k: neighbours per query, ``1 <= k`` and ``k + 1 <= probes·S``.
      probes: cells searched per query, ``1 <= probes <= M``.
      exclude: optional int ``[...]``: one class id per query never returned.
      normalize_classes: score against the rows scaled to unit length.
      max_block_bytes: budget for a block's gathered rows and scores, or ``"auto"``.

    Returns:
      int32 ``[..., k]``, nearest first (among the probed cells' members). Where fewer than k
      members qualify the remaining slots repeat a valid id (never out of range).
    """
    num_classes, dim = class_emb.shape
    cells, size = index.members.shape
    if index.centroids.shape != (cells, dim):
        raise ValueError(f"index centroids {index.centroids.shape} must be (M={cells}, D={dim})")
    if queries.shape[-1] != dim:
        raise ValueError(f"queries have dimension {queries.shape[-1]} but classes have {dim}")
    if not 1 <= probes <= cells:
        raise ValueError(f"probes={probes} must be between 1 and the index's M={cells} cells")
    width = probes * size
    if not 1 <= k < width:
        raise ValueError(f"k={k} must be between 1 and probes·S - 1 = {width - 1}")
    lead_shape = queries.shape[:-1]
    flat = lax.stop_gradient(queries).reshape(-1, dim).astype(jnp.float32)
    num_queries = flat.shape[0]
    if num_queries == 0:
        return jnp.zeros((*lead_shape, k), jnp.int32)
    excluded = (
        jnp.full((num_queries,), -1, jnp.int32)
        if exclude is None
        else jnp.asarray(exclude, jnp.int32).reshape(-1)
    )
    budget = knn.resolve_block_bytes(max_block_bytes)
    # lax.top_k over the few centres: the pyramid's reduction compiles slowly for large k.
    probed = knn.nearest_class_ids(
        flat, index.centroids, probes, max_block_bytes=budget, method="top_k"
    )
    classes = lax.stop_gradient(jnp.asarray(class_emb, jnp.float32))
    # A block holds its gathered rows (D floats) and a few per-candidate values.
    rows = int(min(num_queries, max(1, budget // (width * (dim + 4) * 4))))

    def search(block_index):
        start = jnp.minimum(block_index * rows, num_queries - rows)
        query = lax.dynamic_slice_in_dim(flat, start, rows)
        ids = index.members[lax.dynamic_slice_in_dim(probed, start, rows)].reshape(rows, width)
        ex = lax.dynamic_slice_in_dim(excluded, start, rows)
        gathered = classes[jnp.maximum(ids, 0)]
        if normalize_classes:
            gathered = knn.unit_rows(gathered)
        dots = jnp.einsum("rd,rcd->rc", query, gathered, precision=_HIGHEST)
        scores = jnp.sum(gathered * gathered, axis=-1) - 2.0 * dots
        scores = jnp.where((ids < 0) | (ids == ex[:, None]), jnp.inf, scores)
        neg_scores, positions = lax.top_k(-scores, k)
        chosen = jnp.take_along_axis(ids, positions, axis=1)
        # Unfilled slots (score +inf) repeat the nearest id found.
        return jnp.where(jnp.isfinite(neg_scores) & (chosen >= 0), chosen, chosen[:, :1])

    num_blocks = -(-num_queries // rows)
    if num_blocks == 1:
        ids = search(0)
    else:
        blocks = lax.map(search, jnp.arange(num_blocks))
        overlap = num_blocks * rows - num_queries
        ids = jnp.concatenate([blocks[:-1].reshape(-1, k), blocks[-1, overlap:]], axis=0)
    return jnp.clip(ids, 0, num_classes - 1).reshape(*lead_shape, k)


def recall_at_k(
    approximate_ids: jax.Array, exact_ids: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """Mean over queries of ``|approximate ∩ exact| / k``: recall@k of a search.

    Args:
      approximate_ids: int ``[..., k]`` (an id repeated counts once).
      exact_ids: int ``[..., k]``, the exact k nearest (distinct).
      valid: optional bool ``[...]``: the queries that count (0 when none does).

    Returns:
      float32 scalar in [0, 1].
    """
    if approximate_ids.shape != exact_ids.shape:
        raise ValueError(f"ids {approximate_ids.shape} and {exact_ids.shape} must match")
    found = jnp.any(exact_ids[..., :, None] == approximate_ids[..., None, :], axis=-1)
    per_query = jnp.mean(found.astype(jnp.float32), axis=-1)
    if valid is None:
        return jnp.mean(per_query)
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    return jnp.sum(jnp.where(valid, per_query, 0.0)) / count


def sampled_quality(
    pixel_emb: jax.Array,
    labels: jax.Array,
    class_emb: jax.Array,
    approximate_ids: jax.Array,
    *,
    temperature: float = 20.0,
    normalize_classes: bool = False,
    ignore_index: int = IGNORE_INDEX,
    sample: int = 4096,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
    normalize_pixels: bool = False,
) -> dict[str, jax.Array]:
    """Recall@k of given approximate negatives and the ESS loss's relative error, on a sample.

    The sample is every ``ceil(N / sample)``-th pixel (deterministic, cheap enough to log every
    training step: one exact search of the sample). The exact search excludes each pixel's
    target, as the ESS loss's negatives (the approximate ids must too).

    Args:
      pixel_emb: float ``[..., D]``; labels: int ``[...]`` (``ignore_index`` pixels excluded).
      class_emb: float ``[C, D]``.
      approximate_ids: int ``[..., k]``, each pixel's approximate k nearest other classes.
      temperature: the ESS loss's T; normalize_classes, max_block_bytes: as in
        :func:`approximate_nearest_class_ids`.
      sample: at most this many pixels.
      normalize_pixels: the ESS loss reads the pixels scaled to unit length.

    Returns:
      ``{"recall": recall@k over the sample's labelled pixels, "ess_relative_error":
      |ESS(approximate) − ESS(exact)| / |ESS(exact)|}``, float32 scalars.
    """
    num_classes, dim = class_emb.shape
    k = approximate_ids.shape[-1]
    pixels = lax.stop_gradient(jnp.asarray(pixel_emb, jnp.float32)).reshape(-1, dim)
    flat_labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    stride = max(1, -(-pixels.shape[0] // int(sample)))
    pixels, flat_labels = pixels[::stride], flat_labels[::stride]
    approximate = jnp.asarray(approximate_ids, jnp.int32).reshape(-1, k)[::stride]
    valid = (flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < num_classes)
    table = lax.stop_gradient(class_emb)
    exact = knn.nearest_class_ids(
        pixels,
        table,
        k,
        exclude=jnp.where(valid, flat_labels, 0),
        max_block_bytes=max_block_bytes,
        normalize_classes=normalize_classes,
    )

    def ess(neighbor_ids):
        return losses.ess_objective(
            pixels,
            flat_labels,
            table,
            num_neighbors=k,
            temperature=temperature,
            separation_weight=0.0,
            normalize_classes=normalize_classes,
            ignore_index=ignore_index,
            max_block_bytes=max_block_bytes,
            neighbor_ids=neighbor_ids,
            normalize_pixels=normalize_pixels,
        )[1]["ess"]

    exact_loss = ess(exact)
    error = jnp.abs(ess(approximate) - exact_loss) / jnp.maximum(jnp.abs(exact_loss), 1e-30)
    return {"recall": recall_at_k(approximate, exact, valid), "ess_relative_error": error}


def search_quality(
    pixel_emb: jax.Array,
    labels: jax.Array,
    class_emb: jax.Array,
    index: ClassIndex,
    *,
    num_neighbors: int = 7,
    probes: int = DEFAULT_PROBES,
    temperature: float = 20.0,
    normalize_classes: bool = False,
    ignore_index: int = IGNORE_INDEX,
    sample: int = 4096,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
) -> dict[str, jax.Array]:
    """:func:`sampled_quality` of the search through ``index`` (``probes`` cells, the sample's
    pixels only searched); arguments as there and in :func:`approximate_nearest_class_ids`."""
    num_classes, dim = class_emb.shape
    pixels = jnp.asarray(pixel_emb, jnp.float32).reshape(-1, dim)
    flat_labels = jnp.asarray(labels, jnp.int32).reshape(-1)
    stride = max(1, -(-pixels.shape[0] // int(sample)))
    pixels, flat_labels = pixels[::stride], flat_labels[::stride]
    valid = (flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < num_classes)
    approximate = approximate_nearest_class_ids(
        pixels,
        class_emb,
        index,
        num_neighbors,
        probes=probes,
        exclude=jnp.where(valid, flat_labels, 0),
        normalize_classes=normalize_classes,
        max_block_bytes=max_block_bytes,
    )
    return sampled_quality(
        pixels,
        flat_labels,
        class_emb,
        approximate,
        temperature=temperature,
        normalize_classes=normalize_classes,
        ignore_index=ignore_index,
        sample=pixels.shape[0],
        max_block_bytes=max_block_bytes,
    )
