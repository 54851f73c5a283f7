"""Training and evaluation: ``train_and_evaluate(config, workdir)`` and the jitted steps.

One step (see ``DESIGN.md``): a batch sharded over the ``data`` axis of a mesh of every device
(all hosts), the replicated :class:`TrainState` donated to ``jax.jit(train_step)``; BatchNorm
statistics are computed over the global batch (the compiler inserts the reductions), as in the
paper's synchronised multi-GPU runs. The embedding path keeps per-pixel outputs at D; nothing of
size pixels×C exists there.

The workdir holds::

    checkpoints/<step>/   latest states (params, batch stats, optimiser, step, data iterator)
    best/<step>/          the state with the best validation mIoU so far
    metrics.jsonl         one JSON object per log or evaluation
    tensorboard/          TensorBoard event files
    config.json           the config of the run

Rerunning the same command resumes from the latest checkpoint; the step rng is
``fold_in(seed, step)`` and the data iterator state is restored, so a resumed run continues the
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxscaleseg import config_schema, knn, losses, metrics, optim
from jaxscaleseg.config_schema import ConfigError
from jaxscaleseg.data import pipeline
from jaxscaleseg.data.synthetic import SyntheticSegmentation
from jaxscaleseg.models import ATROUS_RATES, DeepLabV3Plus, TinyBackbone, build_model

DATA_AXIS = "data"
_META_KEYS = (
    "backbone",
    "head",
    "num_classes",
    "embedding_dim",
    "output_stride",
    "separable",
    "tiny_width",
    "center_embedding",
)
_TINY_DEFAULT_WIDTH = 8  # the width build_model gives the tiny backbone


class DatasetNotPreparedError(RuntimeError):
    """The configured TFDS dataset is missing from ``data_dir``."""


class CheckpointMismatchError(RuntimeError):
    """The workdir holds a checkpoint of a different model or class count."""


class WorkdirError(RuntimeError):
    """The workdir cannot be created or written."""


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


class TrainState(train_state.TrainState):
    """``flax`` train state plus the BatchNorm statistics."""

    batch_stats: Any = None


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
        queries×classes block held at once), or ``"auto"`` (``losses.loss_plan``).
      pixels_per_chunk: pixels per chunk of the ESS loss, or ``"auto"``.
      table_gradient: how row gradients reach the class table (``losses.ess_objective``).
    """

    name: str = "ess"
    num_neighbors: int = 7
    temperature: float = 20.0
    margin: float = 0.2
    separation_weight: float = 1.0
    max_block_bytes: int | str = "auto"
    pixels_per_chunk: int | str = "auto"
    table_gradient: str = "auto"

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
        )


def compute_loss(
    outputs: Mapping[str, jax.Array],
    labels: jax.Array,
    spec: LossSpec,
    class_table: jax.Array | None = None,
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
    )


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
    rng = jax.random.fold_in(base_rng, state.step)

    def loss_fn(params):
        outputs, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        loss, parts = compute_loss(
            outputs, batch["label"], spec, class_table=params.get("class_embedding")
        )
        return loss, (parts, updates["batch_stats"])

    (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats
    )
    out = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        **parts,
    }
    return new_state, out


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


def class_embedding_sums(
    state: TrainState, batch: Mapping[str, jax.Array], num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Per-class sums of the pixel embeddings of one batch (for imprinting the class table).

    The network runs in training mode (batch statistics, as in a training step) and its
    BatchNorm updates are dropped. Memory is O(C·D + pixels·D): a segment sum, no pixels×C array.

    Args:
      state: the train state (embedding head).
      batch: ``{"image": float32 [B, H, W, 3], "label": int32 [B, H, W]}``, -1 ignored.
      num_classes: C (static).

    Returns:
      ``(sums, counts)``: float32 ``[C, D]`` and int32 ``[C]``.
    """
    outputs, _ = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)},
    )
    pixel = outputs["pixel_embedding"].reshape(-1, outputs["pixel_embedding"].shape[-1])
    labels = batch["label"].reshape(-1)
    segment = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    sums = jax.ops.segment_sum(pixel, segment, num_segments=num_classes + 1)[:num_classes]
    counts = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_segments=num_classes + 1)[
        :num_classes
    ]
    return sums, counts


def imprint_class_embeddings(
    params: Mapping[str, Any], sums: jax.Array, counts: jax.Array
) -> dict[str, Any]:
    """Points each seen class's row of the table at its mean pixel embedding.

    Row lengths are kept (the forward pass normalises the rows, and a row's length sets its
    effective learning rate), so only directions change; rows with ``counts == 0`` are kept.

    Args:
      params: model parameters with a top-level ``class_embedding`` float32 ``[C, D]``.
      sums: float32 ``[C, D]`` per-class sums of pixel embeddings.
      counts: int ``[C]`` pixels per class.

    Returns:
      A copy of ``params`` with the new table.
    """
    table = params["class_embedding"]
    length = jnp.linalg.norm(table, axis=-1, keepdims=True)
    direction = sums / jnp.maximum(jnp.linalg.norm(sums, axis=-1, keepdims=True), 1e-12)
    imprinted = jnp.where((counts > 0)[:, None], direction * length, table)
    return {**params, "class_embedding": imprinted}


def _imprint(state, config, train_source, data_sharding, host_batch: int, is_main: bool):
    """``state`` with the class table imprinted from ``config.model.imprint_batches`` batches.

    The batches come from a separate iterator (seed ``config.seed + 1``), so the training
    data order is the same with and without imprinting.
    """
    d = config.dataset
    iterator = pipeline.make_train_iterator(
        train_source,
        batch_size=host_batch,
        crop_size=tuple(int(v) for v in d.crop_size),
        seed=config.seed + 1,
        num_classes=d.num_classes,
        scale_range=tuple(d.scale_range),
        flip=d.flip,
        color_jitter=d.color_jitter,
        worker_count=0,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    sums_fn = jax.jit(functools.partial(class_embedding_sums, num_classes=d.num_classes))
    sums = counts = None
    for _ in range(config.model.imprint_batches):
        batch = _to_global(next(iterator), data_sharding)
        s, c = sums_fn(state, {"image": batch["image"], "label": batch["label"]})
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    if is_main:
        seen = int(jnp.sum(counts > 0))
        print(
            f"imprinted {seen} of {d.num_classes} class embeddings from "
            f"{config.model.imprint_batches} batches",
            flush=True,
        )
    return state.replace(params=imprint_class_embeddings(state.params, sums, counts))


# --------------------------------------------------------------------------- setup


def make_mesh() -> jax.sharding.Mesh:
    """A one-axis (``data``) mesh over every device of every host, with automatic axis types.

    Automatic (not explicit) axis types let the chunked nearest-class search ``lax.map`` over
    a sharded pixel axis.
    """
    return jax.make_mesh(
        (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def _model_meta(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        "backbone": config.model.backbone,
        "head": "softmax" if config.loss.name == "softmax" else "embedding",
        "num_classes": int(config.dataset.num_classes),
        "embedding_dim": int(config.model.embedding_dim),
        "output_stride": int(config.model.output_stride),
        "separable": bool(config.model.separable),
        "tiny_width": int(config.model.tiny_width),
        "center_embedding": bool(config.model.center_embedding),
    }


def make_model(config: ml_collections.ConfigDict):
    """The DeepLabV3+ model a config describes."""
    meta = _model_meta(config)
    if meta["backbone"] == "tiny" and meta["tiny_width"] != _TINY_DEFAULT_WIDTH:
        # build_model's tiny net at another width: backbone w/2w/4w, ASPP 2w, low-level w,
        # decoder 2w (build_model's (16, 8, 16) at w = 8).
        width, dtype = meta["tiny_width"], jnp.dtype(config.model.dtype)
        kw = dict(bn_momentum=config.model.bn_momentum, dtype=dtype)
        return DeepLabV3Plus(
            backbone=TinyBackbone(output_stride=meta["output_stride"], width=width, **kw),
            head=meta["head"],
            num_classes=meta["num_classes"],
            embedding_dim=meta["embedding_dim"],
            atrous_rates=ATROUS_RATES[meta["output_stride"]],
            aspp_features=2 * width,
            low_level_features=width,
            decoder_features=2 * width,
            separable=meta["separable"],
            center_embedding=meta["center_embedding"],
            **kw,
        )
    return build_model(
        meta["backbone"],
        head=meta["head"],
        num_classes=meta["num_classes"],
        embedding_dim=meta["embedding_dim"],
        output_stride=meta["output_stride"],
        dtype=jnp.dtype(config.model.dtype),
        separable=meta["separable"],
        bn_momentum=config.model.bn_momentum,
        center_embedding=meta["center_embedding"],
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    backbone: Any = None,
) -> TrainState:
    """Initialises the model, with imported backbone weights when given (jit-able).

    Args:
      config: a training config.
      rng: init key.
      image_shape: ``(B, H, W, 3)`` of an input batch.
      backbone: ``{"params": ..., "batch_stats": ...}`` replacing the model's ``backbone``
        subtrees (see :func:`_pretrained_backbone`), or None to keep the random init.

    Returns:
      A fresh ``TrainState`` at step 0.
    """
    model = make_model(config)
    variables = model.init({"params": rng}, jnp.zeros(image_shape, jnp.float32), train=False)
    if backbone is not None:
        from jaxscaleseg.models import pretrained  # noqa: PLC0415 (only when configured)

        variables = pretrained.merge_backbone(variables, backbone)
    tx = optim.make_optimizer(config.optim, config.num_train_steps)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )


def _pretrained_backbone(config: ml_collections.ConfigDict, *, fetch_only: bool = False):
    """The backbone variables ``model.pretrained`` names, or a one-line ``ConfigError``.

    The value is a ``torchvision:`` name (the official checkpoint, downloaded into the cache
    once, hash-checked and converted) or the path of converted ``.npz`` variables; see
    :mod:`jaxscaleseg.models.weights_cache`. With ``fetch_only`` the weights are only made
    available (downloaded, checked) and None is returned: training does this before any other
    work so that a missing file fails at once.
    """
    from jaxscaleseg.models import weights_cache  # noqa: PLC0415 (only when configured)

    value, arch = config.model.pretrained, config.model.backbone
    try:
        if fetch_only:
            weights_cache.prefetch(value, arch=arch)
            return None
        return weights_cache.load_backbone(value, arch=arch)
    except weights_cache.WeightsError as e:
        raise ConfigError(f"model.pretrained: {e}") from e


def abstract_train_state(
    config: ml_collections.ConfigDict, image_shape: tuple[int, ...]
) -> TrainState:
    """The shapes and dtypes of the train state, without materialising it."""
    return jax.eval_shape(lambda: create_train_state(config, jax.random.key(0), image_shape))


def _synthetic_sources(config: ml_collections.ConfigDict):
    s = config.dataset.synthetic
    make = functools.partial(
        SyntheticSegmentation,
        config.dataset.num_classes,
        tuple(s.image_size),
        seed=s.seed,
        zipf_exponent=s.zipf_exponent,
        family_size=s.family_size,
    )
    return make(num_examples=s.train_examples, split="train"), make(
        num_examples=s.eval_examples, split="validation"
    )


def make_sources(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """The training and evaluation sources of a config.

    Raises:
      DatasetNotPreparedError: the TFDS dataset is not prepared in ``data_dir``; the message
        names the ``prepare`` command to run.
      ConfigError: the prepared dataset's class count differs from ``dataset.num_classes``.
    """
    d = config.dataset
    if d.name == "synthetic":
        train, evaluation = _synthetic_sources(config)
    else:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; only for real datasets)

        from jaxscaleseg.data import builders  # noqa: PLC0415 (registers the builders)

        name = builders.tfds_name(d.name)
        short = next(k for k, b in builders.BUILDERS.items() if b.name == name)
        full = f"{name}/{d.config}" if d.config else name
        data_dir = os.path.expanduser(d.data_dir)
        cmd = (
            f"python -m jaxscaleseg.data.prepare {short}"
            + (f" --config {d.config}" if d.config else "")
            + f" --manual_dir ARCHIVES --data_dir {d.data_dir}"
        )
        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns about missing folders
        try:
            builder = tfds.builder(full, data_dir=data_dir)
            prepared = builder.is_prepared()
        except Exception as e:  # noqa: BLE001 (tfds raises many kinds here)
            raise DatasetNotPreparedError(
                f"dataset {full} is not prepared in {d.data_dir} ({e}); run: {cmd}"
            ) from e
        finally:
            absl_logging.set_verbosity(verbosity)
        if not prepared:
            raise DatasetNotPreparedError(
                f"dataset {full} is not prepared in {d.data_dir}; run: {cmd}"
            )
        meta_classes = (builder.info.metadata or {}).get("num_classes")
        if meta_classes is not None and int(meta_classes) != d.num_classes:
            raise ConfigError(
                f"dataset.num_classes={d.num_classes} but {full} has {meta_classes} classes"
            )
        train = tfds.data_source(full, split=d.train_split, data_dir=data_dir)
        evaluation = tfds.data_source(full, split=d.eval_split, data_dir=data_dir)
    if d.max_eval_examples and len(evaluation) > d.max_eval_examples:
        evaluation = _Prefix(evaluation, d.max_eval_examples)
    return train, evaluation


class _Prefix:
    """The first ``n`` examples of a source."""

    def __init__(self, source: Any, n: int):
        self._source, self._n = source, int(n)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]


# --------------------------------------------------------------------------- logging


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: Path, resume_step: int, enabled: bool = True):
        self._enabled = enabled
        self._path = workdir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if self._path.exists():  # drop what a killed run logged after its last checkpoint
            kept = [
                line
                for line in self._path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self._path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415 (optional dependency)

            self._tb = SummaryWriter(
                str(workdir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends one record ``{"step": step, **scalars}``."""
        if not self._enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self._path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
    """The records of ``metrics.jsonl`` in a workdir."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Progress:
    """A progress line with loss, rate and ETA (tqdm on a terminal, periodic lines otherwise)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self._bar = None
        self._enabled = enabled
        self._total = total
        self._start = start
        self._t0 = time.perf_counter()
        self._last_print = self._t0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415 (terminal only)

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_print < 10.0 and step < self._total:
            return
        self._last_print = now
        rate = (step - self._start) / max(now - self._t0, 1e-9)
        eta = (self._total - step) / rate if rate > 0 else float("inf")
        print(
            f"step {step}/{self._total}  loss {loss:.4f}  {rate:.2f} steps/s  "
            f"ETA {_format_seconds(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# --------------------------------------------------------------------------- checkpoints


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def _check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror or e})") from e


def _check_meta(workdir: Path, meta: dict[str, Any]) -> None:
    """Refuses a workdir whose checkpoints belong to a different model."""
    path = workdir / "model.json"
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    diffs = [
        f"{k}: checkpoint {stored.get(k)!r} vs config {meta[k]!r}"
        for k in _META_KEYS
        if stored.get(k) != meta[k]
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"workdir {workdir} holds a checkpoint of a different model ({'; '.join(diffs)}); "
            "use another --workdir"
        )


def _managers(workdir: Path, config: ml_collections.ConfigDict):
    items = ("state", "data")
    latest = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        item_names=items,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            create=True,
            enable_async_checkpointing=False,
        ),
    )
    best = ocp.CheckpointManager(
        (workdir / "best").absolute(),
        item_names=("state", "metrics"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        ),
    )
    return latest, best


def load_checkpoint(workdir: str | os.PathLike, best: bool = False) -> dict[str, Any]:
    """The latest (or best) saved state of a workdir as numpy trees.

    Args:
      workdir: a training workdir.
      best: read the best-mIoU checkpoint instead of the latest.

    Returns:
      ``{"step", "params", "batch_stats", "opt_state"}`` as saved (numpy leaves).
    """
    directory = (Path(workdir) / ("best" if best else "checkpoints")).absolute()
    with ocp.CheckpointManager(directory, item_names=("state",)) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]


# --------------------------------------------------------------------------- the loop


def _host_batch_size(global_batch: int, what: str) -> int:
    devices, hosts = jax.device_count(), jax.process_count()
    if global_batch % devices:
        raise ConfigError(f"{what}={global_batch} must be a multiple of the {devices} devices")
    return global_batch // hosts


def _to_global(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def evaluate(
    state: TrainState,
    eval_loader: Any,
    num_classes: int,
    eval_fn: Any,
    sharding: NamedSharding,
) -> dict[str, Any]:
    """Runs the exact evaluation (every valid pixel once) and summarises it.

    Returns:
      ``metrics.summarize`` of the accumulated counts.
    """
    total = metrics.zeros(num_classes)
    for batch in eval_loader:
        counts = eval_fn(state, _to_global(batch, sharding))
        total = metrics.accumulate(total, counts)
    return metrics.summarize(total)


def _config_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, default=list, sort_keys=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains, evaluates and checkpoints; resumes from ``workdir`` when it holds a checkpoint.

    Args:
      config: a training config (see :mod:`jaxscaleseg.config_schema`).
      workdir: directory of checkpoints, logs and TensorBoard files.

    Returns:
      ``{"step": final step, "eval": final validation metrics (scalars), "best_mIoU": ...}``.

    Raises:
      ConfigError, DatasetNotPreparedError, WorkdirError, CheckpointMismatchError: user errors
        with one-line messages.
      NonFiniteLossError: the loss became non-finite; the last good checkpoint stays.
    """
    config_schema.validate(config)
    if config.distributed:
        jax.distributed.initialize()
    workdir = Path(os.path.expanduser(str(workdir)))
    _check_workdir(workdir)
    meta = _model_meta(config)
    _check_meta(workdir, meta)
    if config.model.pretrained:
        _pretrained_backbone(config, fetch_only=True)
    is_main = jax.process_index() == 0

    train_source, eval_source = make_sources(config)
    mesh = make_mesh()
    data_sharding = NamedSharding(mesh, P(DATA_AXIS))
    replicated = NamedSharding(mesh, P())
    host_batch = _host_batch_size(config.batch_size, "batch_size")
    host_eval_batch = _host_batch_size(config.dataset.eval_batch_size, "dataset.eval_batch_size")
    d = config.dataset
    crop = tuple(int(v) for v in d.crop_size)

    train_iter = pipeline.make_train_iterator(
        train_source,
        batch_size=host_batch,
        crop_size=crop,
        seed=config.seed,
        num_classes=d.num_classes,
        scale_range=tuple(d.scale_range),
        flip=d.flip,
        color_jitter=d.color_jitter,
        worker_count=d.worker_count,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        repeat_factor_threshold=d.repeat_factor_threshold or None,
    )
    eval_loader = pipeline.make_eval_iterator(
        eval_source,
        batch_size=host_eval_batch,
        num_classes=d.num_classes,
        crop_size=tuple(d.eval_crop_size) or None,
        pad_to=tuple(d.eval_pad_to) or None,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )

    init_rng, base_rng = jax.random.split(jax.random.key(config.seed))
    image_shape = (config.batch_size, *crop, 3)
    backbone = _pretrained_backbone(config) if config.model.pretrained else None
    state = jax.jit(
        functools.partial(create_train_state, config, image_shape=image_shape),
        out_shardings=replicated,
    )(init_rng, backbone=backbone)
    del backbone

    latest, best = _managers(workdir, config)
    start_step = 0
    best_miou = -1.0
    if latest.latest_step() is not None:
        step = latest.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
        restored = latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=grain.checkpoint.CheckpointRestore(train_iter),
            ),
        )
        tree = restored["state"]
        state = state.replace(
            step=tree["step"],
            params=tree["params"],
            batch_stats=tree["batch_stats"],
            opt_state=tree["opt_state"],
        )
        start_step = int(step)
        if best.latest_step() is not None:
            stored = best.restore(
                best.latest_step(), args=ocp.args.Composite(metrics=ocp.args.JsonRestore())
            )
            best_miou = float(stored["metrics"]["mIoU"])
        if is_main:
            print(f"resuming from step {start_step} in {workdir}", flush=True)
    else:
        if is_main:
            print(f"starting from scratch in {workdir}", flush=True)
        if config.model.class_embedding_init == "imprint" and config.loss.name == "ess":
            state = _imprint(state, config, train_source, data_sharding, host_batch, is_main)
    if is_main:
        (workdir / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        (workdir / "config.json").write_text(_config_json(config) + "\n")

    spec = LossSpec.from_config(config.loss)
    step_fn = jax.jit(
        functools.partial(train_step, spec=spec),
        donate_argnums=0,
        out_shardings=(replicated, replicated),
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, num_classes=d.num_classes), out_shardings=replicated
    )
    base_rng = jax.device_put(base_rng, replicated)
    schedules = optim.schedules(config.optim, config.num_train_steps)
    writer = MetricWriter(workdir, start_step, enabled=is_main)
    progress = _Progress(is_main and config.progress_bar, start_step, config.num_train_steps)

    def save(step: int) -> None:
        latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_tree(state)),
                data=grain.checkpoint.CheckpointSave(train_iter),
            ),
            force=True,
        )

    def run_eval(step: int) -> dict[str, Any]:
        nonlocal best_miou
        t0 = time.perf_counter()
        summary = evaluate(state, eval_loader, d.num_classes, eval_fn, data_sharding)
        scalars = {f"eval_{k}": v for k, v in summary.items() if np.isscalar(v)}
        writer.write(step, {**scalars, "eval_seconds": time.perf_counter() - t0})
        if is_main:
            print(
                f"step {step}: validation mIoU {summary['mIoU']:.4f}  mAcc {summary['mAcc']:.4f}"
                f"  aAcc {summary['aAcc']:.4f}",
                flush=True,
            )
        if summary["mIoU"] > best_miou:
            best_miou = float(summary["mIoU"])
            best.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_state_tree(state)),
                    metrics=ocp.args.JsonSave(
                        {k: float(v) for k, v in summary.items() if np.isscalar(v)}
                    ),
                ),
                force=True,
            )
        return summary

    window: dict[str, list[float]] = {}
    t_window = time.perf_counter()
    summary: dict[str, Any] = {}
    step = start_step
    try:
        for step in range(start_step + 1, config.num_train_steps + 1):
            batch = _to_global(next(train_iter), data_sharding)
            state, step_metrics = step_fn(state, batch, base_rng)
            values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (loss {values['loss']}, grad norm "
                    f"{values['grad_norm']}); the last good checkpoint in "
                    f"{workdir / 'checkpoints'} is kept"
                )
            for k, v in values.items():
                window.setdefault(k, []).append(v)
            progress.update(step, values["loss"])
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                now = time.perf_counter()
                scalars = {f"train_{k}": float(np.mean(v)) for k, v in window.items()}
                scalars["steps_per_second"] = len(window["loss"]) / max(now - t_window, 1e-9)
                for group, schedule in schedules.items():
                    scalars[f"lr_{group}"] = float(schedule(step - 1))
                writer.write(step, scalars)
                window, t_window = {}, now
            evaluating = step == config.num_train_steps or (
                config.eval_every_steps and step % config.eval_every_steps == 0
            )
            if evaluating:
                summary = run_eval(step)
            if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
                save(step)
        if start_step >= config.num_train_steps:
            summary = run_eval(start_step)
    finally:
        progress.close()
        writer.close()
        latest.close()
        best.close()
    if is_main:
        print(
            f"final validation mIoU {summary['mIoU']:.4f} (mAcc {summary['mAcc']:.4f}, aAcc "
            f"{summary['aAcc']:.4f}) after {step} steps; best mIoU {best_miou:.4f}",
            flush=True,
        )
    return {
        "step": int(step),
        "eval": {k: float(v) for k, v in summary.items() if np.isscalar(v)},
        "best_mIoU": best_miou,
    }


__all__ = [
    "CheckpointMismatchError",
    "DatasetNotPreparedError",
    "LossSpec",
    "NonFiniteLossError",
    "TrainState",
    "WorkdirError",
    "abstract_train_state",
    "class_embedding_sums",
    "compute_loss",
    "create_train_state",
    "eval_step",
    "evaluate",
    "imprint_class_embeddings",
    "load_checkpoint",
    "make_mesh",
    "make_model",
    "make_sources",
    "predict",
    "read_metrics",
    "train_and_evaluate",
    "train_step",
]
