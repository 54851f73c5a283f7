"""Accuracy at many classes: ESS beside the softmax baseline, trained for the same budget.

    python -m benchmarks.quality --preset cpu     # this 2-core machine, about 26 minutes
    python -m benchmarks.quality --preset gpu     # larger images, longer schedule

For each class count C (150, 1 284 and 10 000 by default) and each head, it trains the demo's
setup (``configs/synthetic.py``: the built-in synthetic dataset, the tiny DeepLabV3+, Adam with
poly schedules) from scratch with the *same* data, batch, number of steps and seed, then reports
the validation mIoU (exact evaluation on the whole validation split) and the training time.
Only the head and its loss differ: ``softmax`` (C logits per pixel, cross-entropy) and ``ess``
(D-dimensional pixel embeddings, ESS loss + separation loss).

Results go to ``benchmarks/results/quality_<preset>.csv`` and ``.md``; each run's workdir
(checkpoints, ``metrics.jsonl``) under ``--workdir``, so an interrupted benchmark resumes
the unfinished runs and skips the finished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import jax

from benchmarks.results_files import write_tables
from jaxscaleseg import config_schema, training
from jaxscaleseg import workdir as workdir_lib

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
HEADS = ("ess", "softmax")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One quality-benchmark setting (everything else comes from ``configs/synthetic.py``)."""

    steps: int
    batch: int
    image_size: int
    train_examples: int
    eval_examples: int
    class_counts: tuple[int, ...] = (150, 1284, 10_000)
    seeds: tuple[int, ...] = (0,)
    backbone: str = "tiny"


PRESETS = {
    "cpu": Preset(steps=250, batch=8, image_size=64, train_examples=4000, eval_examples=100),
    "gpu": Preset(steps=4000, batch=16, image_size=128, train_examples=20_000, eval_examples=500),
}


def make_config(preset: Preset, num_classes: int, head: str, seed: int):
    """The demo config changed to one benchmark cell.

    Args:
      preset: the budget (steps, batch, image size, dataset sizes).
      num_classes: C of the synthetic dataset.
      head: ``"ess"`` or ``"softmax"``.
      seed: training seed (initialisation, data order, augmentation); the dataset itself is
        the synthetic set's seed 0 for every cell.

    Returns:
      A validated, locked ``ConfigDict``.
    """
    config = config_schema.sibling_config(str(ROOT / "configs" / "synthetic.py"), "synthetic")
    config.unlock()
    config.seed = seed
    config.loss.name = head
    config.dataset.num_classes = num_classes
    size = (preset.image_size, preset.image_size)
    config.dataset.synthetic.image_size = size
    config.dataset.crop_size = size
    config.dataset.synthetic.train_examples = preset.train_examples
    config.dataset.synthetic.eval_examples = preset.eval_examples
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


def run_cell(preset: Preset, num_classes: int, head: str, seed: int, workdir: Path) -> dict:
    """Trains (or resumes) one cell and returns its result row."""
    config = make_config(preset, num_classes, head, seed)
    start = time.perf_counter()
    result = training.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    logged = [m for m in workdir_lib.read_metrics(workdir) if "train_loss" in m]
    return {
        "C": num_classes,
        "head": head,
        "seed": seed,
        "steps": result["step"],
        "mIoU": result["eval"]["mIoU"],
        "mAcc": result["eval"]["mAcc"],
        "aAcc": result["eval"]["aAcc"],
        "final_train_loss": logged[-1]["train_loss"] if logged else float("nan"),
        "seconds_this_call": seconds,
    }


def markdown(rows: list[dict]) -> str:
    """Rows as a Markdown table, ESS beside softmax for each C and seed."""
    lines = [
        "| C | seed | ESS mIoU | softmax mIoU | ESS mAcc | softmax mAcc |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    cells = {(r["C"], r["seed"], r["head"]): r for r in rows}
    for c, seed in sorted({(r["C"], r["seed"]) for r in rows}):
        ess, soft = cells.get((c, seed, "ess")), cells.get((c, seed, "softmax"))

        def cell(row, key):
            return f"{row[key]:.4f}" if row else "—"

        lines.append(
            f"| {c:,} | {seed} | {cell(ess, 'mIoU')} | {cell(soft, 'mIoU')} | "
            f"{cell(ess, 'mAcc')} | {cell(soft, 'mAcc')} |"
        )
    return "\n".join(lines)


def describe(preset: Preset) -> str:
    return (
        f"configs/synthetic.py with {preset.steps} steps, batch {preset.batch}, "
        f"{preset.image_size}×{preset.image_size} images, {preset.train_examples} training / "
        f"{preset.eval_examples} validation examples, backbone {preset.backbone}; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
        f"{platform.machine()}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--classes", type=int, nargs="*", help="override the class counts")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
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
    header = f"`{command.strip()}`\n\n{describe(preset)}"
    rows = []
    for num_classes in preset.class_counts:
        for seed in preset.seeds:
            for head in args.heads:
                workdir = Path(args.workdir) / args.preset / f"C{num_classes}_{head}_seed{seed}"
                row = run_cell(preset, num_classes, head, seed, workdir)
                rows.append(row)
                print(
                    f"  C = {num_classes:,} {head} seed {seed}: mIoU {row['mIoU']:.4f} "
                    f"({row['seconds_this_call']:.0f} s)",
                    flush=True,
                )
                write_tables(rows, stem, header, markdown(rows))
    print()
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
