"""The exact nearest class of every pixel of a large image, certified where cheap.

Inference's ``search="certified"``, and the training's ``loss.search="certified"`` (which
``"auto"`` takes from ``knn_index.AUTO_CERTIFIED_MIN_CLASSES`` classes with unit-length pixels;
there ``search_uncertified`` completes the union's k nearest lists). The union of
``knn_union`` gives each pixel the nearest of its four stride-4 grid points' K' candidates,
fast but not always exact. Here the union comes with a bound that says where it is exact, and
the pixels where the bound fails are searched exactly over the whole table, so the result is
the exact assignment (up to float32 rounding of near-ties; the bounds keep a margin for it)
whatever the features.

Scores are the searches' ranking scores ``score_q(e) = ‖e‖² − 2 q·e`` (lower is nearer). The
features are resized to a ×4 coarser grid and renormalised (as ``knn_union.approximate_assign``;
nearly the model's stride-4 map), and each grid point's K' nearest classes are searched exactly,
with its K'-th score ``tᵢ``. For the bilinear blend ``b = Σᵢ wᵢ sᵢ`` of a pixel's grid points, a
class outside all four lists scores at least ``Σᵢ wᵢ tᵢ`` at b (the score is linear in the
query), and at the pixel p itself at least ``Σᵢ wᵢ tᵢ − 2‖p − b‖R`` (Cauchy–Schwarz; R the
largest class norm). A pixel whose best candidate scores no more than that is certified.

Cost: the grid's search (``N/16`` queries over C), ``4K'`` scores per pixel, and an exact search
of the uncertified pixels — few on a trained model's (spatially smooth) features, nearly all on
features without spatial structure, where the cost is the exact search's plus the rest. The
fraction certified is returned beside the ids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg import knn, knn_union

# Queries searched together where a bound fails, at the least (the exact search blocks them
# itself); more, up to _MAX_FALLBACK_CHUNK (whose gathered queries stay small beside the
# features), where the block budget holds more rows of the whole table (``fallback_chunk``).
_FALLBACK_CHUNK = 512
_MAX_FALLBACK_CHUNK = 2**14
# Float32 scores carry rounding of about D·2⁻²³ of their magnitude (a dot product of D terms);
# bounds keep 8× that as a margin, so that a rounding never certifies a wrong answer.
_ROUNDING_MARGIN = 8 * 2.0**-23


def fallback_chunk(num_queries: int, num_classes: int, max_block_bytes: int) -> int:
    """Queries per exact search of the uncertified rows: as many rows of all ``num_classes``
    classes as one search block holds (a GPU's 1 GiB budget holds 13 421 rows of 10 000
    classes: one loop iteration where 512-row chunks would take 27), within ``_FALLBACK_CHUNK``
    (512, what a CPU's 8 MiB budget gets at 10 000 classes and more) and
    ``_MAX_FALLBACK_CHUNK`` (16 384), and at most ``num_queries``."""
    rows = knn.block_elements(max_block_bytes) // max(num_classes, 1)
    return int(max(1, min(num_queries, min(max(_FALLBACK_CHUNK, rows), _MAX_FALLBACK_CHUNK))))


def search_uncertified(
    queries: jax.Array,
    ids: jax.Array,
    certified: jax.Array,
    class_emb: jax.Array,
    *,
    max_block_bytes: int,
    exclude: jax.Array | None = None,
    normalize_classes: bool = False,
    chunk: int | None = None,
) -> jax.Array:
    """``ids`` with the rows that are not ``certified`` replaced by the exact search's (the
    inference's ``certified`` search and the training's ``loss.search = "certified"``).

    The uncertified rows are gathered into chunks of ``chunk`` queries and searched over the
    whole table (``knn.nearest_class_ids``), as many chunks as there are such rows (a
    ``lax.while_loop``): the cost follows the count, none when every row is certified.

    Args:
      queries: float32 ``[N, D]``.
      ids: int32 ``[N, k]``, nearest first.
      certified: bool ``[N]``.
      class_emb: float32 ``[C, D]``.
      max_block_bytes: the exact search's block budget (bytes).
      exclude: optional int ``[N]``: one class id per row never returned (as the search's).
      normalize_classes: search against the unit-length rows of ``class_emb``.
      chunk: queries per exact search; None: :func:`fallback_chunk`.

    Returns:
      int32 ``[N, k]``.
    """
    num, k = ids.shape
    if chunk is None:
        chunk = fallback_chunk(num, class_emb.shape[0], max_block_bytes)
    # No gradient flows through a search; without a tangent on its operands, JAX's partial
    # evaluation (under `grad`) leaves the loop whole instead of hoisting the exact search's
    # class blocks out of it (a second copy of the table, all column blocks at once).
    queries = lax.stop_gradient(queries)
    class_emb = lax.stop_gradient(class_emb)
    chunk = int(min(chunk, num))
    slots = -(-num // chunk) * chunk
    pending = jnp.logical_not(certified)
    count = jnp.sum(pending, dtype=jnp.int32)
    # The pending rows first, then `num` (out of range: their writes are dropped).
    order = jnp.nonzero(pending, size=slots, fill_value=num)[0].astype(jnp.int32)

    def body(state):
        index, ids = state
        rows = lax.dynamic_slice_in_dim(order, index * chunk, chunk)
        safe = jnp.minimum(rows, num - 1)
        found = knn.nearest_class_ids(
            queries[safe],
            class_emb,
            k,
            exclude=None if exclude is None else exclude[safe],
            max_block_bytes=max_block_bytes,
            method=knn_union.list_method(k),
            normalize_classes=normalize_classes,
        )
        return index + 1, ids.at[rows].set(found, mode="drop")

    _, ids = lax.while_loop(lambda state: state[0] * chunk < count, body, (jnp.int32(0), ids))
    return ids


@functools.partial(jax.jit, static_argnames=("candidates", "max_block_bytes"))
def certified_assign(
    features: jax.Array,
    class_emb: jax.Array,
    *,
    candidates: int = knn_union.DEFAULT_CANDIDATES,
    max_block_bytes: int | str = "auto",
) -> tuple[jax.Array, jax.Array]:
    """The exact nearest class of each pixel: the union's answer where certified, else searched.

    Args:
      features: float ``[B, H, W, D]`` pixel embeddings (any; spatially smooth ones are fast).
      class_emb: float ``[C, D]``.
      candidates: K', classes searched per grid point (capped at C).
      max_block_bytes: block budget of the searches, or ``"auto"``.

    Returns:
      ``(ids, certified)``: int32 ``[B, H, W]`` class ids and float32 scalar, the fraction of
      pixels the bound certified (the rest were searched over the whole table).
    """
    if features.ndim != 4:
        raise ValueError(f"the certified assignment takes [B, H, W, D], got {features.shape}")
    batch, height, width, dim = features.shape
    candidates = int(min(candidates, class_emb.shape[0]))
    if candidates < 1:
        raise ValueError(f"candidates={candidates} must be >= 1")
    budget = knn.resolve_block_bytes(max_block_bytes)
    classes = lax.stop_gradient(jnp.asarray(class_emb, jnp.float32))
    queries = lax.stop_gradient(jnp.asarray(features, jnp.float32))
    points = knn_union.coarse_grid(queries)
    point_ids, kth = knn_union.exact_source_lists(
        points, classes, candidates, normalize_classes=False, max_block_bytes=budget
    )
    # Each pixel's distance to the blend of its grid points loosens its bound (2R‖p − b‖), and
    # so does float32 rounding (the margin times R² + 2R·max(‖p‖, 1)); the re-rank's blocks
    # compute it, each from its own pixels and grid points.
    radius = jnp.sqrt(jnp.max(jnp.sum(classes * classes, -1)))
    margin = _ROUNDING_MARGIN * dim
    slack = knn_union.Slack(points, 2.0 * radius, margin * 2.0 * radius, margin * radius * radius)
    ids, certified = knn_union.rerank_source_lists(
        queries, point_ids, kth, classes, 1, max_block_bytes=budget, slack=slack
    )
    ids = search_uncertified(
        queries.reshape(-1, dim),
        ids.reshape(-1, 1),
        certified.reshape(-1),
        classes,
        max_block_bytes=budget,
    )
    return ids.reshape(batch, height, width), jnp.mean(certified.astype(jnp.float32))
