"""The training loop: ``train_and_evaluate(config, workdir)``.

Builds the data (:mod:`jaxscaleseg.data.sources`), the state and the jitted steps
(:mod:`jaxscaleseg.steps`), resumes from the workdir (:mod:`jaxscaleseg.workdir`) and runs the
steps, logging (:mod:`jaxscaleseg.logs`), evaluating and checkpointing on schedule.

Rerunning the same command resumes from the latest checkpoint; the step rng is
``fold_in(seed, step)`` and the data iterator state is restored, so a resumed run continues the
uninterrupted one exactly.

The host never waits for the device without need: the next batch is put on the devices while
the current step runs, and a step's metrics are fetched one step late (the device then already
holds the next step) or at a log, evaluation or checkpoint step. Non-finite metrics still stop
the run before any checkpoint of the bad state is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxscaleseg import config_schema, initial_state, logs, metrics, multihost, optim, steps
from jaxscaleseg import workdir as workdir_lib
from jaxscaleseg.data import sources
from jaxscaleseg.errors import ConfigError, NonFiniteLossError
from jaxscaleseg.imprint import imprint
from jaxscaleseg.steps import TrainState


@dataclasses.dataclass
class Run:
    """What the loop needs, built once by :func:`setup` (the train state is passed apart).

    Attributes:
      config: the training config.
      workdir: the run's folder.
      is_main: this is process 0 (it prints and writes metrics).
      checkpoints: the latest/best checkpoint folders.
      train_iter: this host's training batches (checkpointed with the state).
      eval_loader: this host's evaluation batches (re-iterable).
      step_fn: jitted ``train_step`` (state donated).
      eval_fn: jitted ``eval_step``.
      quality_fn: jitted ``search_quality`` (called at log steps), or None where the loss
        searches exactly.
      base_rng: the run's base key (replicated).
      data_sharding: the batch sharding.
      start_step: the step the state is at.
      best_miou: the best validation mIoU so far (-1 when none).
    """

    config: ml_collections.ConfigDict
    workdir: Any
    is_main: bool
    checkpoints: workdir_lib.RunCheckpoints
    train_iter: Any
    eval_loader: Any
    step_fn: Any
    eval_fn: Any
    quality_fn: Any
    base_rng: jax.Array
    data_sharding: NamedSharding
    start_step: int = 0
    best_miou: float = -1.0


def host_batch_size(global_batch: int, what: str) -> int:
    """This host's share of a global batch; the batch must divide over the devices."""
    devices, hosts = jax.device_count(), jax.process_count()
    if global_batch % devices:
        raise ConfigError(f"{what}={global_batch} must be a multiple of the {devices} devices")
    return global_batch // hosts


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
        counts = eval_fn(state, steps.to_global(batch, sharding))
        total = metrics.accumulate(total, counts)
    return metrics.summarize(total)


def config_json(config: ml_collections.ConfigDict) -> str:
    """The config as sorted, indented JSON."""
    return json.dumps(config.to_dict(), indent=2, default=list, sort_keys=True)


def _initial_state(config, image_shape, replicated: NamedSharding) -> TrainState:
    init_rng = jax.random.split(jax.random.key(config.seed))[0]
    backbone = initial_state.pretrained_backbone(config) if config.model.pretrained else None
    return jax.jit(
        functools.partial(initial_state.create_train_state, config, image_shape=image_shape),
        out_shardings=replicated,
    )(init_rng, backbone=backbone)


def _base_rng(seed: int, replicated: NamedSharding) -> jax.Array:
    """The run's base key on every device (computed there: with several processes, a host
    value cannot be put on devices another process holds)."""
    return jax.jit(lambda: jax.random.split(jax.random.key(seed))[1], out_shardings=replicated)()


def setup(config: ml_collections.ConfigDict, workdir: Any) -> tuple[Run, TrainState]:
    """Checks the config and workdir, builds the data, state and steps, resumes if it can.

    Returns:
      ``(run, state)``: the state at ``run.start_step`` (restored, or fresh and imprinted).
    """
    config_schema.validate(config)
    workdir = workdir_lib.prepare(workdir)
    model_args = initial_state.model_args(config)
    workdir_lib.check_model(workdir, model_args)
    if config.model.pretrained:
        initial_state.pretrained_backbone(config, fetch_only=True)
    is_main = jax.process_index() == 0
    train_source, eval_source = sources.make_sources(config)
    if is_main:
        print(sources.describe_splits(config, train_source, eval_source), flush=True)
    mesh = steps.make_mesh()
    data_sharding, replicated = NamedSharding(mesh, P(steps.DATA_AXIS)), NamedSharding(mesh, P())
    host_batch = host_batch_size(config.batch_size, "batch_size")
    host_eval_batch = host_batch_size(config.dataset.eval_batch_size, "dataset.eval_batch_size")
    train_iter = sources.train_iterator(config, train_source, host_batch, seed=config.seed)
    image_shape = (config.batch_size, *(int(v) for v in config.dataset.crop_size), 3)
    state = _initial_state(config, image_shape, replicated)
    spec = steps.LossSpec.from_config(config.loss)
    search = spec.resolved_search(config.dataset.num_classes)
    if is_main and spec.search == "auto" and search != "exact":
        logged = (
            "the share of pixels its bound certifies is logged as search_certified, the others"
            " are searched exactly"
            if search == "certified"
            else "its recall@k against the exact search is logged as search_recall"
        )
        print(
            f"loss.search 'auto': the {search} search at {config.dataset.num_classes} classes"
            f" ({logged})",
            flush=True,
        )
    run = Run(
        config=config,
        workdir=workdir,
        is_main=is_main,
        checkpoints=workdir_lib.RunCheckpoints(
            workdir, config.keep_checkpoints, log=_warn if is_main else _quiet
        ),
        train_iter=train_iter,
        eval_loader=sources.eval_iterator(config, eval_source, host_eval_batch),
        step_fn=jax.jit(
            functools.partial(steps.train_step, spec=spec),
            donate_argnums=0,
            out_shardings=(replicated, replicated),
        ),
        eval_fn=jax.jit(
            functools.partial(steps.eval_step, num_classes=config.dataset.num_classes),
            out_shardings=replicated,
        ),
        quality_fn=jax.jit(
            functools.partial(steps.search_quality, spec=spec), out_shardings=replicated
        )
        if spec.measures_search(config.dataset.num_classes)
        else None,
        base_rng=_base_rng(config.seed, replicated),
        data_sharding=data_sharding,
    )
    state = _resume_or_start(run, state, train_source, host_batch)
    if is_main:
        workdir_lib.write_run_files(workdir, model_args, config_json(config))
    return run, state


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    del message


def _resume_or_start(run: Run, state: TrainState, train_source: Any, host_batch: int):
    """The restored state (setting ``run.start_step``), or the fresh one; ``run.best_miou``
    comes from ``best/`` either way (a kill may leave it ahead of ``checkpoints/``)."""
    run.best_miou = run.checkpoints.best_miou()
    restored = run.checkpoints.restore_latest(workdir_lib.state_tree(state), run.train_iter)
    if restored is not None:
        tree, run.start_step = restored
        state = state.replace(**tree)
        if run.is_main:
            print(f"resuming from step {run.start_step} in {run.workdir}", flush=True)
        return state
    if run.is_main:
        print(f"starting from scratch in {run.workdir}", flush=True)
    c = run.config
    if c.model.class_embedding_init == "imprint" and c.loss.name == "ess":
        state = imprint(state, c, train_source, host_batch, run.data_sharding, run.is_main)
    return state


class Window:
    """Step metrics since the last log line, and the time they took."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.start = time.perf_counter()

    def add(self, step: int, device_metrics: Any, workdir: Any) -> float:
        """Fetches one step's metrics, checks them and keeps them; returns the loss.

        Raises:
          NonFiniteLossError: the loss or gradient norm is not finite.
        """
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss {values['loss']}, grad norm "
                f"{values['grad_norm']}); the last good checkpoint in "
                f"{workdir / workdir_lib.LATEST_DIR} is kept"
            )
        for k, v in values.items():
            self.values.setdefault(k, []).append(v)
        return values["loss"]

    def scalars(self, step: int, schedules: dict[str, Any]) -> dict[str, float]:
        """The window's means, its rate and the learning rates at ``step``; then resets."""
        now = time.perf_counter()
        out = {f"train_{k}": float(np.mean(v)) for k, v in self.values.items()}
        out["steps_per_second"] = len(self.values["loss"]) / max(now - self.start, 1e-9)
        for group, schedule in schedules.items():
            out[f"lr_{group}"] = float(schedule(step - 1))
        self.values, self.start = {}, now
        return out


# Below this mean length of the full-resolution pixel embeddings (blends of unit stride-4
# embeddings) the run is warned once: the trained demo's are ~0.98, runs whose neighbouring
# stride-4 embeddings had turned apart measured 0.44-0.61 (BENCHMARKS §7.5).
SHORT_PIXEL_NORM = 0.8


def short_pixels_warning(step: int, scalars: dict[str, float], config) -> str | None:
    """A warning when a log window's mean pixel-embedding length (``train_pixel_norm``) is
    below ``SHORT_PIXEL_NORM`` while the loss reads the raw blends; else None."""
    norm = scalars.get("train_pixel_norm")
    if norm is None or norm >= SHORT_PIXEL_NORM or config.loss.normalize_pixels:
        return None
    return (
        f"step {step}: the full-resolution pixel embeddings average length {norm:.2f}"
        f" (< {SHORT_PIXEL_NORM}): neighbouring stride-4 embeddings point apart, which pulls"
        " every distance towards 1 and the ESS loss towards log(k+1) whatever the label; consider"
        " --config.loss.normalize_pixels=True and --config.model.imprint_batches=epoch"
    )


def run_eval(run: Run, state: TrainState, step: int, writer: logs.MetricWriter) -> dict:
    """Evaluates, logs, and saves the best checkpoint when mIoU improved."""
    t0 = time.perf_counter()
    d = run.config.dataset
    with sources.naming_bad_labels(run.config, d.eval_split):
        summary = evaluate(state, run.eval_loader, d.num_classes, run.eval_fn, run.data_sharding)
    scalars = {k: float(v) for k, v in summary.items() if np.isscalar(v)}
    writer.write(
        step,
        {**{f"eval_{k}": v for k, v in scalars.items()}, "eval_seconds": time.perf_counter() - t0},
    )
    if run.is_main:
        print(
            f"step {step}: validation mIoU {summary['mIoU']:.4f}  mAcc {summary['mAcc']:.4f}"
            f"  aAcc {summary['aAcc']:.4f}",
            flush=True,
        )
    if summary["mIoU"] > run.best_miou:
        run.best_miou = float(summary["mIoU"])
        run.checkpoints.save_best(step, workdir_lib.state_tree(state), scalars)
    return summary


def next_batch(run: Run) -> dict[str, jax.Array]:
    """This host's next training batch, put on the devices (sharded over the batch axis)."""
    with sources.naming_bad_labels(run.config, run.config.dataset.train_split):
        batch = next(run.train_iter)
    return steps.to_global(batch, run.data_sharding)


def train_loop(run: Run, state: TrainState, writer: logs.MetricWriter, progress) -> tuple:
    """Runs the steps from ``run.start_step`` to ``num_train_steps``.

    Returns:
      ``(final step, last evaluation summary)``.
    """
    c = run.config
    last = c.num_train_steps
    schedules = optim.schedules(c.optim, last)
    window, pending, summary, warned = Window(), None, {}, False
    step = run.start_step
    batch = next_batch(run) if step < last else None
    for step in range(run.start_step + 1, last + 1):
        logging = step % c.log_every_steps == 0 or step == last
        # The approximate search's quality, on this step's batch before the step (which takes
        # the state's buffers): at log steps only, so the step itself never holds its buffers.
        quality = run.quality_fn(state, batch, run.base_rng) if logging and run.quality_fn else {}
        state, device_metrics = run.step_fn(state, batch, run.base_rng)
        device_metrics = {**device_metrics, **quality}
        saving = step % c.checkpoint_every_steps == 0 or step == last
        # The next batch goes to the devices while this step runs, except before a save
        # (the saved iterator position must be right after this step's batch).
        batch = None if saving or step == last else next_batch(run)
        if pending is not None:  # the previous step's metrics: no wait for this one
            progress.update(pending[0], window.add(*pending, run.workdir))
        pending = (step, device_metrics)
        evaluating = step == last or (c.eval_every_steps and step % c.eval_every_steps == 0)
        if logging or evaluating or saving:
            progress.update(step, window.add(*pending, run.workdir))
            pending = None
        if logging:
            scalars = window.scalars(step, schedules)
            writer.write(step, scalars)
            warning = None if warned else short_pixels_warning(step, scalars, c)
            if warning and run.is_main:
                _warn(warning)
                warned = True
        if evaluating:
            summary = run_eval(run, state, step, writer)
        if saving:
            run.checkpoints.save_latest(step, workdir_lib.state_tree(state), run.train_iter)
            if step < last:
                batch = next_batch(run)
    if run.start_step >= last:  # a finished run, rerun: its final evaluation is on record
        summary = recorded_eval(run.workdir, run.start_step) or run_eval(
            run, state, run.start_step, writer
        )
    return step, summary


def recorded_eval(workdir: Any, step: int) -> dict[str, float] | None:
    """The evaluation scalars ``metrics.jsonl`` holds for ``step`` (None if it holds none)."""
    for record in reversed(workdir_lib.read_metrics(workdir)):
        if record["step"] == step and "eval_mIoU" in record:
            return {
                k[len("eval_") :]: v
                for k, v in record.items()
                if k.startswith("eval_") and k != "eval_seconds"
            }
    return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains, evaluates and checkpoints; resumes from ``workdir`` when it holds a checkpoint.

    Args:
      config: a training config (see :mod:`jaxscaleseg.config_schema`).
      workdir: directory of checkpoints, logs and TensorBoard files (see
        :mod:`jaxscaleseg.workdir`).

    Returns:
      ``{"step": final step, "eval": final validation metrics (scalars), "best_mIoU": ...}``.

    Raises:
      UserError (ConfigError, DatasetNotPreparedError, WorkdirError, ModelMismatchError):
        one-line messages; a workdir in use by another training process, or a disk that
        fills, is a WorkdirError.
      NonFiniteLossError: the loss became non-finite; the last good checkpoint stays.
      DistributedError: ``distributed``: the processes could not join.
    """
    if config.distributed:
        multihost.initialize(config)
    path = workdir_lib.prepare(workdir)
    lock = workdir_lib.RunLock(path) if jax.process_index() == 0 else None
    try:
        run, state = setup(config, path)
        writer = logs.MetricWriter(run.workdir, run.start_step, enabled=run.is_main)
        progress = logs.Progress(
            run.is_main and config.progress_bar, run.start_step, config.num_train_steps
        )
        try:
            step, summary = train_loop(run, state, writer, progress)
        finally:
            progress.close()
            writer.close()
            run.checkpoints.close()
    finally:
        if lock is not None:
            lock.release()
    if run.is_main:
        print(
            f"final validation mIoU {summary['mIoU']:.4f} (mAcc {summary['mAcc']:.4f}, aAcc "
            f"{summary['aAcc']:.4f}) after {step} steps; best mIoU {run.best_miou:.4f}",
            flush=True,
        )
    return {
        "step": int(step),
        "eval": {k: float(v) for k, v in summary.items() if np.isscalar(v)},
        "best_mIoU": run.best_miou,
    }


__all__ = [
    "Run",
    "Window",
    "evaluate",
    "recorded_eval",
    "setup",
    "short_pixels_warning",
    "train_and_evaluate",
    "train_loop",
]
