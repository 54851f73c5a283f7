"""Accuracy at many classes: ESS beside the softmax baseline, trained for the same budget.

    python -m benchmarks.quality --preset cpu   # C = 1 284, 2 sets x 2 seeds x 2 heads
    python -m benchmarks.quality --preset gpu   # C = 150, 1 284, 10 000, 2 sets x 3 seeds

Each cell trains the demo's recipe (``configs/synthetic.py``: the built-in synthetic set, the
tiny DeepLabV3+ at width 32, Adam 0.005 with poly schedules, centred embeddings and an imprinted
class table for ESS) from scratch, with the *same* data, batch, steps, backbone and seed for
both heads, which differ only in the head and its loss: ``softmax`` (C logits per pixel,
cross-entropy) and ``ess`` (D-dimensional pixel embeddings, ESS + separation loss). The sets:

* ``uniform``: the demo's set, every class equally frequent, no look-alikes;
* ``long_tail``: Zipf's law with exponent 1 over the classes (at 1 284 classes and 4 000
  training images the rarest classes are in 1-2 images, the most frequent in ~2 000) and
  families of 4 look-alike classes that differ only in the stripe angle;
* ``zipf`` and ``families`` (not in the presets): one of the two properties alone.

Each cell reports the validation mIoU and the rare/common/frequent mIoU (LVIS's bins from the
number of training images a class is in, see ``jaxscaleseg.metrics``) of an exact evaluation of
the final checkpoint on the whole validation split, the median step time (the logged windows
after the first, which holds compilation), the compiled peak memory of the train step
(arguments + outputs + temporaries, ``memory_analysis``) and the cell's wall time; the table
gives the mean and the sample standard deviation over seeds, and the header the total wall time.

Results go to ``benchmarks/results/quality_<preset>.csv`` (one row per cell) and ``.md``; each
cell's workdir under ``--workdir``, so an interrupted benchmark resumes its unfinished cells and
only re-evaluates the finished ones.

Cells run in the order seed, class count, set, head (all cells of the first seed first, the
preset's first class count first), so a run cut short has compared both heads on as many
settings as it could. ``--jobs N`` runs N cells at once, each in its own process (with
``--worker_count`` input workers; its output appended to ``quality_<preset>.log`` when it
ends), the tables rewritten as each cell finishes; ``--time_limit_s T`` starts no cell that
the cells finished so far say cannot end within T seconds of the start, stops the ones still
running at T, and lists them, with the step each reached, under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.results_files import write_tables
from jaxscaleseg import config_schema, evaluation, initial_state, steps, training
from jaxscaleseg import workdir as workdir_lib

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
HEADS = ("ess", "softmax")
# (zipf_exponent, family_size) of dataset.synthetic for each set.
SETS = {
    "uniform": (0.0, 1),
    "long_tail": (1.0, 4),
    "zipf": (1.0, 1),
    "families": (0.0, 4),
}
BINS = ("rare", "common", "frequent")
REFERENCE_CLASSES = 1284  # train/eval sizes are given for this many classes


@dataclasses.dataclass(frozen=True)
class Preset:
    """One quality-benchmark setting (everything else comes from ``configs/synthetic.py``).

    ``train_examples`` and ``eval_examples`` are for up to 1 284 classes; with
    ``scale_examples`` they grow in proportion above that, so a class is in about as many
    images at every C.
    """

    steps: int
    batch: int
    image_size: int
    train_examples: int
    eval_examples: int
    class_counts: tuple[int, ...]
    seeds: tuple[int, ...]
    sets: tuple[str, ...] = ("uniform", "long_tail")
    backbone: str = "tiny"
    scale_examples: bool = False


PRESETS = {
    # The demo's recipe (README: ESS 0.338 on CPU and softmax 0.348 on a GPU at 1 284 classes)
    # with 500 validation images, so that every class of the long-tailed set is in at least one.
    "cpu": Preset(
        steps=1600, batch=16, image_size=64, train_examples=4000, eval_examples=500,
        class_counts=(1284,), seeds=(0, 1),
    ),
    # 1 284 first: the paper's class count (cells run in this order, see the docstring).
    "gpu": Preset(
        steps=4000, batch=32, image_size=64, train_examples=4000, eval_examples=500,
        class_counts=(1284, 10_000, 150), seeds=(0, 1, 2), scale_examples=True,
    ),
}  # fmt: skip
ROW_FILE = "quality_row.json"  # a finished cell's row, in its workdir (``--jobs``)


def examples(preset: Preset, num_classes: int) -> tuple[int, int]:
    """(training, validation) examples of a cell."""
    scale = max(1.0, num_classes / REFERENCE_CLASSES) if preset.scale_examples else 1.0
    return math.ceil(preset.train_examples * scale), math.ceil(preset.eval_examples * scale)


def make_config(
    preset: Preset,
    num_classes: int,
    head: str,
    seed: int,
    data: str = "uniform",
    worker_count: int | str = "auto",
):
    """The demo config changed to one benchmark cell.

    Args:
      preset: the budget (steps, batch, image size, dataset sizes).
      num_classes: C of the synthetic dataset.
      head: ``"ess"`` or ``"softmax"``.
      seed: training seed (initialisation, data order, augmentation); the dataset itself is
        the synthetic set's seed 0 for every cell.
      data: one of ``SETS``.
      worker_count: input worker processes (``dataset.worker_count``).

    Returns:
      A validated, locked ``ConfigDict``.
    """
    if data not in SETS:
        raise ValueError(f"unknown set {data!r}; known: {sorted(SETS)}")
    config = config_schema.sibling_config(str(ROOT / "configs" / "synthetic.py"), "synthetic")
    config.unlock()
    config.seed = seed
    config.loss.name = head
    config.dataset.num_classes = num_classes
    size = (preset.image_size, preset.image_size)
    config.dataset.synthetic.image_size = size
    config.dataset.crop_size = size
    train, evaluation = examples(preset, num_classes)
    config.dataset.synthetic.train_examples = train
    config.dataset.synthetic.eval_examples = evaluation
    exponent, family_size = SETS[data]
    config.dataset.synthetic.zipf_exponent = exponent
    config.dataset.synthetic.family_size = family_size
    config.batch_size = preset.batch
    config.num_train_steps = preset.steps
    config.eval_every_steps = 0
    config.checkpoint_every_steps = max(1, preset.steps // 4)
    config.log_every_steps = max(1, min(50, preset.steps // 4))
    config.progress_bar = False
    config.model.backbone = preset.backbone
    config.dataset.worker_count = worker_count
    config_schema.validate(config)
    config.lock()
    return config


def step_peak_mb(config) -> float:
    """Compiled peak memory of one train step (arguments + outputs + temporaries - aliased)."""
    size = tuple(config.dataset.crop_size)
    image_shape = (config.batch_size, *size, 3)
    state = initial_state.abstract_train_state(config, image_shape)
    batch = {
        "image": jax.ShapeDtypeStruct(image_shape, jnp.float32),
        "label": jax.ShapeDtypeStruct(image_shape[:3], jnp.int32),
    }
    spec = steps.LossSpec.from_config(config.loss)
    step = jax.jit(functools.partial(steps.train_step, spec=spec), donate_argnums=0)
    memory = step.lower(state, batch, jax.random.key(0)).compile().memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return peak / 2**20


def step_seconds(logged: list[dict]) -> float:
    """Median seconds per step over the logged windows after the first (which compiles)."""
    rates = [m["steps_per_second"] for m in logged if "steps_per_second" in m][1:]
    return 1.0 / statistics.median(rates) if rates else float("nan")


def run_cell(
    preset: Preset,
    num_classes: int,
    head: str,
    seed: int,
    data: str,
    workdir: Path,
    worker_count: int | str = "auto",
) -> dict:
    """Trains (or resumes) one cell, evaluates its last checkpoint and returns its row."""
    config = make_config(preset, num_classes, head, seed, data, worker_count)
    start = time.perf_counter()
    result = training.train_and_evaluate(config, workdir)
    scores = evaluation.run(config, workdir, checkpoint="latest", print_classes=0)
    seconds = time.perf_counter() - start
    logged = [m for m in workdir_lib.read_metrics(workdir) if "train_loss" in m]
    row = {
        "C": num_classes,
        "set": data,
        "head": head,
        "seed": seed,
        "steps": result["step"],
        "mIoU": scores["mIoU"],
        "mAcc": scores["mAcc"],
        "aAcc": scores["aAcc"],
        **{f"mIoU_{b}": scores[f"mIoU_{b}"] for b in BINS},
        **{f"classes_{b}": scores[f"classes_{b}"] for b in BINS},
        "step_seconds": step_seconds(logged),
        "step_peak_mb": step_peak_mb(config),
        "final_train_loss": logged[-1]["train_loss"] if logged else float("nan"),
        "seconds_this_call": seconds,
    }
    return {k: (float("nan") if v is None else v) for k, v in row.items()}


def _mean_sd(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """Rows as a Markdown table: one line per (C, set, head), mean ± sd over seeds."""
    lines = [
        "| C | set | head | seeds | mIoU | rare | common | frequent | step time | step peak |"
        " cell time |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["C"], r["set"], r["head"]), []).append(r)
    for (c, data, head), cell in sorted(groups.items()):

        def col(key, cell=cell):
            return [r[key] for r in cell]

        bins = [f"{_mean_sd(col(f'mIoU_{b}'))} ({cell[0][f'classes_{b}']})" for b in BINS]
        lines.append(
            f"| {c:,} | {data} | {head} | {len(cell)} | {_mean_sd(col('mIoU'))} | "
            + " | ".join(bins)
            + f" | {statistics.mean(col('step_seconds')):.3f} s"
            f" | {statistics.mean(col('step_peak_mb')):,.0f} MB"
            f" | {statistics.mean(col('seconds_this_call')) / 60:.1f} min |"
        )
    return "\n".join(lines)


def describe(preset: Preset) -> str:
    return (
        f"configs/synthetic.py with {preset.steps} steps, batch {preset.batch}, "
        f"{preset.image_size}×{preset.image_size} images, {preset.train_examples} training / "
        f"{preset.eval_examples} validation examples"
        + (" (times C / 1 284 above 1 284 classes)" if preset.scale_examples else "")
        + f", backbone {preset.backbone}, sets {', '.join(preset.sets)}, seeds "
        f"{', '.join(map(str, preset.seeds))}; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, {platform.machine()}"
    )


@dataclasses.dataclass(frozen=True)
class Cell:
    """One benchmark cell: a class count, a set, a seed and a head."""

    num_classes: int
    data: str
    seed: int
    head: str

    @property
    def name(self) -> str:
        return f"C{self.num_classes}_{self.data}_{self.head}_seed{self.seed}"


def cell_order(preset: Preset, heads) -> list[Cell]:
    """The cells in the order they run: by seed, then class count, set and head."""
    return [
        Cell(num_classes, data, seed, head)
        for seed in preset.seeds
        for num_classes in preset.class_counts
        for data in preset.sets
        for head in heads
    ]


def _report(cell: Cell, row: dict) -> None:
    print(
        f"  C = {cell.num_classes:,} {cell.data} {cell.head} seed {cell.seed}: mIoU "
        f"{row['mIoU']:.4f} (rare {row['mIoU_rare']:.4f}, common {row['mIoU_common']:.4f}, "
        f"frequent {row['mIoU_frequent']:.4f}; {row['seconds_this_call']:.0f} s)",
        flush=True,
    )


def last_logged_step(workdir: Path) -> int:
    """The last training step a cell's workdir logged (0: none)."""
    if not (workdir / "metrics.jsonl").exists():
        return 0
    steps = [m["step"] for m in workdir_lib.read_metrics(workdir) if "train_loss" in m]
    return max(steps, default=0)


@dataclasses.dataclass
class _Job:
    cell: Cell
    process: subprocess.Popen
    started: float
    log: Path


def run_jobs(
    cells: list[Cell],
    argv: list[str],
    root: Path,
    jobs: int,
    time_limit_s: float,
    log_path: Path,
    on_row,
) -> list[str]:
    """Runs each cell in its own process, ``jobs`` at once, within ``time_limit_s`` (0: none).

    Args:
      cells: in the order they start.
      argv: this command's arguments (each child adds ``--cell``).
      root: the preset's workdir folder (``<workdir>/<preset>``).
      jobs: processes at once.
      time_limit_s: seconds from now after which running cells are stopped (0: no limit).
      log_path: the children's output is appended here as each ends.
      on_row: ``on_row(cell, row)`` for each finished cell.

    Returns:
      One line per cell that did not finish (crashed, stopped at the limit, not started).
    """
    start = time.monotonic()
    queue, running, durations, unfinished = list(cells), [], [], []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The children import this package from wherever the parent runs.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # Cells share the accelerator: no process may take most of its memory up front.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

    def end(job: _Job, status: str) -> None:
        seconds = time.monotonic() - job.started
        with open(log_path, "a") as f:
            f.write(f"===== {job.cell.name}: {status} after {seconds:.0f} s\n")
            f.write(job.log.read_text(errors="replace") + "\n")
        print(f"[{time.monotonic() - start:6.0f} s] {job.cell.name}: {status}", flush=True)

    while queue or running:
        elapsed = time.monotonic() - start
        # A cell starts only if the cells finished so far say it can end within the limit.
        expected = statistics.mean(durations) if durations else 0.0
        while queue and len(running) < jobs:
            if time_limit_s and elapsed + expected > time_limit_s:
                unfinished += [f"{c.name}: not started (time limit)" for c in queue]
                queue = []
                break
            cell = queue.pop(0)
            workdir = root / cell.name
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / ROW_FILE).unlink(missing_ok=True)
            log = workdir / "quality_cell.log"
            command = [sys.executable, "-m", "benchmarks.quality", *argv]
            command += ["--cell", json.dumps(dataclasses.asdict(cell))]
            with open(log, "w") as out:
                process = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            running.append(_Job(cell, process, time.monotonic(), log))
        time.sleep(0.5)
        late = time_limit_s and time.monotonic() - start > time_limit_s
        for job in list(running):
            code = job.process.poll()
            if code is None and not late:
                continue
            running.remove(job)
            workdir = root / job.cell.name
            if code is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
                status = f"stopped at the time limit at step {last_logged_step(workdir)}"
            elif code == 0 and (workdir / ROW_FILE).exists():
                durations.append(time.monotonic() - job.started)
                on_row(job.cell, json.loads((workdir / ROW_FILE).read_text()))
                status = "ok"
            else:
                status = f"crashed (exit code {code})"
            end(job, status)
            if status != "ok":
                unfinished.append(f"{job.cell.name}: {status}")
    return unfinished


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--classes", type=int, nargs="*", help="override the class counts")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--sets", nargs="*", choices=sorted(SETS), help="override the sets")
    parser.add_argument("--steps", type=int, help="override the number of training steps")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--image_size", type=int)
    parser.add_argument("--train_examples", type=int)
    parser.add_argument("--eval_examples", type=int)
    parser.add_argument("--backbone")
    parser.add_argument("--heads", nargs="*", choices=HEADS, default=list(HEADS))
    parser.add_argument("--workdir", default="workdirs/quality", help="run directories")
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument(
        "--jobs", type=int, default=0, help="cells at once, each its own process (0: in this one)"
    )
    parser.add_argument(
        "--time_limit_s", type=float, default=0, help="stop cells after this (0: no limit)"
    )
    parser.add_argument(
        "--worker_count",
        default="auto",
        help="input workers per cell ('auto': dataset.worker_count's; with --jobs, CPUs/jobs"
        " - 1); a cell resumes only with the count it was started with",
    )
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (--jobs)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    overrides = {
        "class_counts": tuple(args.classes) if args.classes else None,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "sets": tuple(args.sets) if args.sets else None,
        "steps": args.steps,
        "batch": args.batch,
        "image_size": args.image_size,
        "train_examples": args.train_examples,
        "eval_examples": args.eval_examples,
        "backbone": args.backbone,
    }
    preset = dataclasses.replace(
        PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None}
    )
    workers = args.worker_count
    if workers == "auto" and args.jobs:
        workers = max(1, (os.cpu_count() or 1) // args.jobs - 1)
    workers = workers if workers == "auto" else int(workers)
    root = Path(args.workdir) / args.preset
    if args.cell:  # a child of --jobs: one cell, its row into its workdir
        cell = Cell(**json.loads(args.cell))
        workdir = root / cell.name
        row = run_cell(preset, cell.num_classes, cell.head, cell.seed, cell.data, workdir, workers)
        (workdir / ROW_FILE).write_text(json.dumps(row))
        return [row]
    if args.jobs:
        # Set before this process first touches jax: it must not take the accelerator's memory
        # that the cells' processes need (they inherit the setting).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    print(describe(preset), flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{args.preset}"
    command = "python -m benchmarks.quality " + " ".join(argv)
    start = time.perf_counter()
    rows, unfinished = [], []

    def write(cell: Cell, row: dict | None) -> None:
        if row is not None:
            rows.append(row)
            _report(cell, row)
        total = time.perf_counter() - start
        header = (
            f"`{command.strip()}`\n\n{describe(preset)}\n\n"
            f"Total wall time of this call: {total / 60:.1f} min "
            f"({len(rows)} cells; finished cells found in the workdir are only "
            "re-evaluated)."
        )
        table = markdown(rows)
        if unfinished:
            table += "\n\nNot finished:\n" + "\n".join(f"- {line}" for line in unfinished)
        write_tables(rows, stem, header, table)

    cells = cell_order(preset, args.heads)
    if args.jobs:
        jobs_argv = [a for a in argv if a != "--cell"]
        log_path = Path(f"{stem}.log")
        log_path.write_text("")
        unfinished += run_jobs(
            cells, jobs_argv, root, args.jobs, args.time_limit_s, log_path, write
        )
    else:
        for index, cell in enumerate(cells):
            if args.time_limit_s and time.perf_counter() - start > args.time_limit_s:
                unfinished += [f"{c.name}: not started (time limit)" for c in cells[index:]]
                break
            row = run_cell(
                preset, cell.num_classes, cell.head, cell.seed, cell.data, root / cell.name,
                workers,
            )  # fmt: skip
            write(cell, row)
    write(cells[0], None)  # the final header and the unfinished cells
    print()
    print(markdown(rows))
    for line in unfinished:
        print(f"not finished: {line}")
    print(f"total wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return rows


if __name__ == "__main__":
    main()
