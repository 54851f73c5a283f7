"""The jitted pieces of training: the state, the loss, ``train_step`` and ``eval_step``.

One step (see ``DESIGN.md``): a batch sharded over the ``data`` axis of a mesh of every device
(all hosts), the replicated :class:`TrainState` donated to ``jax.jit(train_step)``; BatchNorm
statistics are computed over the global batch (the compiler inserts the reductions), as in the
paper's synchronised multi-GPU runs. The embedding path keeps per-pixel outputs at D; nothing of
size pixels×C exists there.

This module imports only JAX, flax, optax and the numerical modules (no input pipeline, no
TFDS, no TensorBoard), so benchmarks can build and time a step on a machine that has only those;
the loop that drives it is :mod:`jaxscaleseg.training`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding

from jaxscaleseg import (
    knn,
    knn_certified,
    knn_index,
    knn_union,
    losses,
    metrics,
    nearest_other,
    pixel_length,
)

DATA_AXIS = "data"


class TrainState(train_state.TrainState):
    """``flax`` train state plus the BatchNorm statistics.

    ``separation_ids``: int32 ``[C]``, the separation term's nearest-other-class ids of the
    last refresh, when ``loss.separation_refresh_every > 1`` (checkpointed); None otherwise.
    ``class_index``: ``{"centroids": float32 [M, D], "members": int32 [M, S]}``, the
    approximate search's index of the last rebuild (``knn_index.ClassIndex``), when the loss
    searches approximately (checkpointed); None otherwise.
    """

    batch_stats: Any = None
    separation_ids: Any = None
    class_index: Any = None


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss settings a step is compiled for (hashable: a static ``jit`` argument).

    Attributes:
      name: ``"softmax"`` or ``"ess"``.
      num_neighbors: k, ESS negatives per pixel.
      temperature: T, logits are ``-T * distance``.
      margin: separation margin.
      separation_weight: weight of ``separation_loss``.
      max_block_bytes: memory budget of the nearest-class searches (the largest
        queries×classes block held at once), or ``"auto"`` (``loss_plan.loss_plan``).
      pixels_per_chunk: pixels per chunk of the ESS loss, or ``"auto"``.
      table_gradient: how row gradients reach the class table (``losses.ess_objective``).
      selection: how the exact searches select each block's k nearest (``knn.SEARCH_METHODS``).
      negatives: how each pixel's k negatives are chosen (``negatives.NEGATIVE_RULES``).
      separation_refresh_every: n, the separation term's nearest-other-class ids are searched
        on the steps ``step % n == 0`` and carried in the state between (1: every step).
      search: the pixels' nearest-class search, ``"exact"``, ``"approximate"`` (the class
        index), ``"union"`` (``knn_union``: the stride-4 sources' candidates re-ranked),
        ``"certified"`` (the union's negatives where its certificate proves them exact, the
        exact search's for the other pixels: exact negatives; reports ``search_certified``,
        the fraction certified) or ``"auto"`` (``knn_index.resolve_search``).
      search_candidates: K', classes searched per stride-4 source by the union search.
      search_quality_sample: with an approximate search, the training loop measures its
        recall@k against the exact search and the ESS loss's relative error at each log step,
        on a sample of this many pixels of that step's batch (:func:`search_quality`:
        ``search_recall``, ``search_ess_rel_error``; 0: not measured).
      search_probes: cells probed per pixel by the approximate search.
      index_refresh_every: the approximate search's index is rebuilt on the steps
        ``step % n == 0``.
      normalize_pixels: the ESS loss reads the full-resolution pixel embeddings scaled to
        unit length (``losses.ess_objective``; see ``pixel_length``).
    """

    name: str = "ess"
    num_neighbors: int = 7
    temperature: float = 20.0
    margin: float = 0.2
    separation_weight: float = 1.0
    max_block_bytes: int | str = "auto"
    pixels_per_chunk: int | str = "auto"
    table_gradient: str = "auto"
    selection: str = "auto"
    negatives: str = "nearest_other"
    separation_refresh_every: int = 1
    search: str = "auto"
    search_probes: int = knn_index.DEFAULT_PROBES
    index_refresh_every: int = 10
    search_candidates: int = knn_union.DEFAULT_CANDIDATES
    search_quality_sample: int = 4096
    normalize_pixels: bool = False

    def approximate(self, num_classes: int) -> bool:
        """The ESS negatives come from the approximate search (``knn_index``)."""
        return self.resolved_search(num_classes) == "approximate"

    def measures_search(self, num_classes: int) -> bool:
        """The loss's negatives come from an approximate search whose quality is measured
        (:func:`search_quality`, at log steps): ESS, not exact, a sample > 0."""
        return (
            self.name == "ess"
            and self.search_quality_sample > 0
            and self.resolved_search(num_classes) != "exact"
        )

    def resolved_search(self, num_classes: int) -> str:
        """The pixels' search at C = ``num_classes`` (``"exact"`` for the softmax loss)."""
        if self.name != "ess":
            return "exact"
        return knn_index.resolve_search(self.search, num_classes, self.normalize_pixels)

    @property
    def carries_separation_ids(self) -> bool:
        """The step carries the separation ids in the state (refreshed every n > 1 steps)."""
        return (
            self.name == "ess" and self.separation_weight != 0 and self.separation_refresh_every > 1
        )

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> LossSpec:
        """Reads the ``loss`` section of a config."""
        return cls(
            name=config.name,
            num_neighbors=int(config.num_neighbors),
            temperature=float(config.temperature),
            margin=float(config.margin),
            separation_weight=float(config.separation_weight),
            max_block_bytes=config.max_block_bytes,
            pixels_per_chunk=config.pixels_per_chunk,
            table_gradient=config.table_gradient,
            selection=config.selection,
            negatives=config.negatives,
            separation_refresh_every=int(config.separation_refresh_every),
            search=config.search,
            search_probes=int(config.search_probes),
            index_refresh_every=int(config.index_refresh_every),
            search_candidates=int(config.search_candidates),
            search_quality_sample=int(config.search_quality_sample),
            normalize_pixels=bool(config.normalize_pixels),
        )


def compute_loss(
    outputs: Mapping[str, jax.Array],
    labels: jax.Array,
    spec: LossSpec,
    class_table: jax.Array | None = None,
    separation_ids: jax.Array | None = None,
    neighbor_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The configured loss of one batch.

    Args:
      outputs: the model's outputs: ``{"logits": [B, H, W, C]}`` or ``{"pixel_embedding":
        [B, H, W, D], "class_embedding": [C, D]}``.
      labels: int32 ``[B, H, W]``, -1 ignored.
      spec: which loss and its settings.
      class_table: optional float32 ``[C, D]``, the model's raw (unnormalised) class table;
        when given, the ESS terms read it and normalise the rows they use, in place of
        ``outputs["class_embedding"]`` (the same values and gradients, without a normalised
        copy of the table or of its gradient: the training step passes it).
      separation_ids: optional int32 ``[C]``, the separation term's partners
        (``losses.ess_objective``); None: searched now.
      neighbor_ids: optional int32 ``[B, H, W, k]``, each pixel's negatives found elsewhere
        (the approximate search); None: the exact search.

    Returns:
      ``(total, parts)``: float32 scalar and a dict of its named scalar terms.
    """
    if spec.name == "softmax":
        ce = losses.softmax_cross_entropy(outputs["logits"], labels)
        return ce, {"cross_entropy": ce}
    return losses.ess_objective(
        outputs["pixel_embedding"],
        labels,
        outputs["class_embedding"] if class_table is None else class_table,
        num_neighbors=spec.num_neighbors,
        temperature=spec.temperature,
        margin=spec.margin,
        separation_weight=spec.separation_weight,
        normalize_classes=class_table is not None,
        max_block_bytes=spec.max_block_bytes,
        pixels_per_chunk=spec.pixels_per_chunk,
        table_gradient=spec.table_gradient,
        search_method=spec.selection,
        negatives=spec.negatives,
        separation_ids=separation_ids,
        neighbor_ids=neighbor_ids,
        normalize_pixels=spec.normalize_pixels,
    )


def _refreshed_separation_ids(state: TrainState, spec: LossSpec) -> jax.Array | None:
    """The separation ids this step uses (refreshed every ``separation_refresh_every`` steps),
    or None when the state carries none."""
    if not spec.carries_separation_ids:
        return None
    table = state.params.get("class_embedding")
    if table is None or state.separation_ids is None:
        raise ValueError(
            "loss.separation_refresh_every > 1 needs a class_embedding parameter and a state"
            " made by create_train_state with that config"
        )
    return nearest_other.refresh_separation_ids(
        state.separation_ids,
        table,
        state.step,
        spec.separation_refresh_every,
        normalize_classes=True,
        max_block_bytes=spec.max_block_bytes,
        search_method=spec.selection,
    )


def _refreshed_class_index(state: TrainState, spec: LossSpec) -> Any:
    """The approximate search's index this step uses (rebuilt every ``index_refresh_every``
    steps), or None when the state carries none."""
    if state.class_index is None:
        return None
    table = state.params["class_embedding"]
    if not spec.approximate(table.shape[0]):
        raise ValueError("the state carries a class index but loss.search is exact")
    return knn_index.refresh_index(
        knn_index.ClassIndex(**state.class_index),
        table,
        state.step,
        spec.index_refresh_every,
        num_cells=state.class_index["members"].shape[0],
        normalize_classes=True,
    )


def _approximate_neighbors(outputs, params, labels, class_index, spec: LossSpec):
    """``(ids, certified)``: int32 ``[B, H, W, k]`` the ESS negatives of the approximate
    searches (through the class index, or the stride-4 union, completed by the exact search
    where its certificate fails with ``"certified"``), and with ``"certified"`` the float32
    fraction of pixels certified (else None); ``(None, None)``: the loss searches exactly."""
    if class_index is not None:
        ids = knn_index.approximate_nearest_class_ids(
            outputs["pixel_embedding"],
            params["class_embedding"],
            class_index,
            spec.num_neighbors,
            probes=spec.search_probes,
            exclude=labels,
            normalize_classes=True,
            max_block_bytes=spec.max_block_bytes,
        )
        return ids, None
    if spec.name != "ess":
        return None, None
    search = spec.resolved_search(params["class_embedding"].shape[0])
    if search not in ("union", "certified"):
        return None, None
    ids, certified = knn_union.union_nearest_class_ids(
        outputs["pixel_embedding"],
        outputs["coarse_pixel_embedding"],
        params["class_embedding"],
        spec.num_neighbors,
        candidates=spec.search_candidates,
        exclude=labels,
        normalize_classes=True,
        max_block_bytes=spec.max_block_bytes,
    )
    if search == "union":
        return ids, None
    pixels = outputs["pixel_embedding"]
    exact = knn_certified.search_uncertified(
        pixels.reshape(-1, pixels.shape[-1]),
        ids.reshape(-1, spec.num_neighbors),
        certified.reshape(-1),
        params["class_embedding"],
        exclude=labels.reshape(-1),
        normalize_classes=True,
        max_block_bytes=knn.resolve_block_bytes(spec.max_block_bytes),
    )
    return exact.reshape(ids.shape), jnp.mean(certified.astype(jnp.float32))


def _training_forward(state: TrainState, params: Any, images: jax.Array, rng: jax.Array):
    """The network in training mode: ``(outputs, {"batch_stats": updated statistics})``."""
    return state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats},
        images,
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )


class StepGradients(NamedTuple):
    """What one step computes before the optimiser (:func:`step_gradients`).

    Attributes:
      loss: float32 scalar, the configured loss of the batch.
      parts: dict of float32 scalars: the loss's named terms, ``pixel_norm`` for the embedding
        head and ``search_certified`` for the certified search.
      batch_stats: the updated BatchNorm statistics.
      grads: the loss's gradients, a tree like ``state.params``.
      separation_ids: int32 ``[C]``, the separation ids the step used (to be carried), or None.
      class_index: the approximate search's index the step used (to be carried), or None.
    """

    loss: jax.Array
    parts: dict[str, jax.Array]
    batch_stats: Any
    grads: Any
    separation_ids: jax.Array | None
    class_index: Any


def step_gradients(
    state: TrainState, batch: Mapping[str, jax.Array], base_rng: jax.Array, spec: LossSpec
) -> StepGradients:
    """The loss of one batch at ``state`` and its gradients, as :func:`train_step` computes them
    (same dropout key, refreshed separation ids and class index), before the update.

    Args:
      state, batch, base_rng, spec: as in :func:`train_step`.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    separation_ids = _refreshed_separation_ids(state, spec)
    class_index = _refreshed_class_index(state, spec)

    def loss_fn(params):
        outputs, updates = _training_forward(state, params, batch["image"], rng)
        neighbor_ids, certified = _approximate_neighbors(
            outputs, params, batch["label"], class_index, spec
        )
        loss, parts = compute_loss(
            outputs,
            batch["label"],
            spec,
            class_table=params.get("class_embedding"),
            separation_ids=separation_ids,
            neighbor_ids=neighbor_ids,
        )
        if certified is not None:
            parts = {**parts, "search_certified": certified}
        if "pixel_embedding" in outputs:
            parts = {**parts, "pixel_norm": pixel_length.mean_length(outputs["pixel_embedding"])}
        return loss, (parts, updates["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return StepGradients(loss, parts, batch_stats, grads, separation_ids, class_index)


def train_step(
    state: TrainState, batch: Mapping[str, jax.Array], base_rng: jax.Array, spec: LossSpec
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step.

    Args:
      state: the train state (donated by the jitted caller).
      batch: ``{"image": float32 [B, H, W, 3], "label": int32 [B, H, W]}``, sharded over the
        batch axis.
      base_rng: the run's base key; the step's dropout key is ``fold_in(base_rng, step)``.
      spec: the loss (static).

    Returns:
      ``(new_state, metrics)`` with scalar ``loss``, its parts, ``grad_norm``, ``param_norm``
      and ``update_norm``.
    """
    computed = step_gradients(state, batch, base_rng, spec)
    grads = computed.grads
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=computed.batch_stats,
    )
    if computed.separation_ids is not None:
        new_state = new_state.replace(separation_ids=computed.separation_ids)
    if computed.class_index is not None:
        new_state = new_state.replace(class_index=computed.class_index._asdict())
    out = {
        "loss": computed.loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        **computed.parts,
    }
    return new_state, out


def search_quality(
    state: TrainState, batch: Mapping[str, jax.Array], base_rng: jax.Array, spec: LossSpec
) -> dict[str, jax.Array]:
    """How good the step's approximate search is on this batch, at this state.

    The network's forward pass as :func:`train_step` runs it (same dropout key, batch
    statistics), the same approximate negatives, then ``knn_index.sampled_quality`` on
    ``spec.search_quality_sample`` of the pixels: one exact search of the sample. The training
    loop calls it at log steps, before the step (the state is donated to the step), rather than
    every step inside it: the step then holds none of its buffers at its memory peak.

    Returns:
      ``{"search_recall", "search_ess_rel_error"}``, float32 scalars; ``{}`` where the loss
      searches exactly (see :meth:`LossSpec.measures_search`).
    """
    table = state.params.get("class_embedding")
    if table is None or not spec.measures_search(table.shape[0]):
        return {}
    rng = jax.random.fold_in(base_rng, state.step)
    outputs, _ = _training_forward(state, state.params, batch["image"], rng)
    neighbor_ids, _ = _approximate_neighbors(
        outputs, state.params, batch["label"], _refreshed_class_index(state, spec), spec
    )
    quality = knn_index.sampled_quality(
        outputs["pixel_embedding"],
        batch["label"],
        table,
        neighbor_ids,
        temperature=spec.temperature,
        normalize_classes=True,
        sample=spec.search_quality_sample,
        max_block_bytes=spec.max_block_bytes,
        normalize_pixels=spec.normalize_pixels,
    )
    return {
        "search_recall": quality["recall"],
        "search_ess_rel_error": quality["ess_relative_error"],
    }


def predict(state: TrainState, images: jax.Array) -> jax.Array:
    """Predicted class ids ``int32 [B, H, W]`` for normalised ``images [B, H, W, 3]``."""
    outputs = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    if "logits" in outputs:
        return jnp.argmax(outputs["logits"], axis=-1).astype(jnp.int32)
    return knn.assign(outputs["pixel_embedding"], outputs["class_embedding"])


def eval_step(
    state: TrainState, batch: Mapping[str, jax.Array], num_classes: int
) -> metrics.ClassCounts:
    """Per-class counts of one evaluation batch.

    Args:
      state: the train state.
      batch: ``{"image": [B, H, W, 3], "label": int32 [B, H, W], "valid": bool [B, H, W]}``.
      num_classes: C (static).

    Returns:
      ``ClassCounts`` of int32 ``[C]`` (summed over the whole, possibly sharded, batch).
    """
    pred = predict(state, batch["image"])
    return metrics.batch_counts(pred, batch["label"], num_classes, valid=batch["valid"])


def make_mesh() -> jax.sharding.Mesh:
    """A one-axis (``data``) mesh over every device of every host, with automatic axis types.

    Automatic (not explicit) axis types let the chunked nearest-class search ``lax.map`` over
    a sharded pixel axis.
    """
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def to_global(batch: Mapping[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """A host's share of a batch as global arrays sharded by ``sharding``."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


__all__ = [
    "DATA_AXIS",
    "LossSpec",
    "TrainState",
    "compute_loss",
    "eval_step",
    "make_mesh",
    "predict",
    "search_quality",
    "to_global",
    "train_step",
]
