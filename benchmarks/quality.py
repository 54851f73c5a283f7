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
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.results_files import write_tables
from jaxscaleseg import config_schema, evaluation, steps, training
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
    "gpu": Preset(
        steps=4000, batch=32, image_size=64, train_examples=4000, eval_examples=500,
        class_counts=(150, 1284, 10_000), seeds=(0, 1, 2), scale_examples=True,
    ),
}  # fmt: skip


def examples(preset: Preset, num_classes: int) -> tuple[int, int]:
    """(training, validation) examples of a cell."""
    scale = max(1.0, num_classes / REFERENCE_CLASSES) if preset.scale_examples else 1.0
    return math.ceil(preset.train_examples * scale), math.ceil(preset.eval_examples * scale)


def make_config(preset: Preset, num_classes: int, head: str, seed: int, data: str = "uniform"):
    """The demo config changed to one benchmark cell.

    Args:
      preset: the budget (steps, batch, image size, dataset sizes).
      num_classes: C of the synthetic dataset.
      head: ``"ess"`` or ``"softmax"``.
      seed: training seed (initialisation, data order, augmentation); the dataset itself is
        the synthetic set's seed 0 for every cell.
      data: one of ``SETS``.

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
    config_schema.validate(config)
    config.lock()
    return config


def step_peak_mb(config) -> float:
    """Compiled peak memory of one train step (arguments + outputs + temporaries - aliased)."""
    size = tuple(config.dataset.crop_size)
    image_shape = (config.batch_size, *size, 3)
    state = steps.abstract_train_state(config, image_shape)
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
    preset: Preset, num_classes: int, head: str, seed: int, data: str, workdir: Path
) -> dict:
    """Trains (or resumes) one cell, evaluates its last checkpoint and returns its row."""
    config = make_config(preset, num_classes, head, seed, data)
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
    print(describe(preset), flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality_{args.preset}"
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    rows = []
    for num_classes in preset.class_counts:
        for data in preset.sets:
            for seed in preset.seeds:
                for head in args.heads:
                    name = f"C{num_classes}_{data}_{head}_seed{seed}"
                    workdir = Path(args.workdir) / args.preset / name
                    row = run_cell(preset, num_classes, head, seed, data, workdir)
                    rows.append(row)
                    print(
                        f"  C = {num_classes:,} {data} {head} seed {seed}: mIoU "
                        f"{row['mIoU']:.4f} (rare {row['mIoU_rare']:.4f}, common "
                        f"{row['mIoU_common']:.4f}, frequent {row['mIoU_frequent']:.4f}; "
                        f"{row['seconds_this_call']:.0f} s)",
                        flush=True,
                    )
                    total = time.perf_counter() - start
                    header = (
                        f"`{command.strip()}`\n\n{describe(preset)}\n\n"
                        f"Total wall time of this call: {total / 60:.1f} min "
                        f"({len(rows)} cells; finished cells found in the workdir are only "
                        "re-evaluated)."
                    )
                    write_tables(rows, stem, header, markdown(rows))
    print()
    print(markdown(rows))
    print(f"total wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return rows


if __name__ == "__main__":
    main()
