"""Evaluates a checkpoint over a whole split at full resolution.

    python -m jaxscaleseg.evaluate --config configs/synthetic.py --workdir workdirs/demo \\
        [--checkpoint best|latest|STEP] [--split validation] \\
        [--mode slide --crop_size 512,512 --stride 341,341] [--flip] [--scales common]

Every labelled pixel of every image counts once, at the image's own size (the padding the
evaluation pipeline adds to form batches is cropped away before inference). Inference is
whole-image or sliding-window, optionally with horizontal-flip and multi-scale test-time
augmentation (``--scales common`` = 0.5, 0.75, ..., 1.75), merged in embedding space for the
embedding head (see :mod:`jaxscaleseg.inference`). Defaults come from the config's optional
``inference`` section (``mode``, ``crop_size``, ``stride``, ``flip``, ``scales``), flags
override them.

Prints aAcc, mIoU, mAcc, fwIoU and the per-class IoU table sorted by IoU, and writes
``eval_<split>_<checkpoint>[_<settings>].json`` and ``.csv`` in the workdir. User errors (missing
checkpoint, dataset not prepared, bad flags) end with one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxscaleseg import inference, metrics
from jaxscaleseg.data import pipeline

# --------------------------------------------------------------------------- library


def _valid_size(valid: np.ndarray) -> tuple[int, int]:
    """``(h, w)`` of the top-left rectangle where ``valid`` [H, W] is True."""
    return int(valid.any(axis=1).sum()), int(valid.any(axis=0).sum())


def predict_batch(predictor: inference.Predictor, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Predictions for a padded evaluation batch, each image inferred at its own size.

    Images filling the whole batch shape are inferred together; the others one by one on their
    valid (top-left) part, so padding never enters the model or the sliding windows.

    Args:
      predictor: the model and inference settings.
      batch: ``{"image": float32 [B, H, W, 3], "valid": bool [B, H, W], ...}`` from
        ``pipeline.make_eval_iterator``.

    Returns:
      int32 ``[B, H, W]``; 0 where ``valid`` is False.
    """
    images, valid = np.asarray(batch["image"]), np.asarray(batch["valid"])
    out = np.zeros(valid.shape, np.int32)
    sizes = [_valid_size(v) for v in valid]
    full = [i for i, s in enumerate(sizes) if s == valid.shape[1:]]
    if full:
        out[full] = np.asarray(predictor.predict_normalized(images[full]))
    for i, (h, w) in enumerate(sizes):
        if i in full or h == 0 or w == 0:
            continue
        out[i, :h, :w] = np.asarray(predictor.predict_normalized(images[i : i + 1, :h, :w]))[0]
    return out


_batch_counts = jax.jit(metrics.batch_counts, static_argnames="num_classes")


def evaluate_batches(
    predictor: inference.Predictor,
    batches: Iterable[dict[str, np.ndarray]],
    num_classes: int,
    *,
    log_every_seconds: float = 0.0,
) -> tuple[metrics.ClassCounts, int]:
    """Accumulated per-class counts over evaluation batches.

    Args:
      predictor: the model and inference settings.
      batches: padded batches with ``image``, ``label`` and ``valid`` (see
        ``pipeline.make_eval_iterator``).
      num_classes: C.
      log_every_seconds: print progress to stderr at most this often (0: never).

    Returns:
      ``(counts, number of images)``: int64 ``ClassCounts``.
    """
    total = metrics.zeros(num_classes)
    images = 0
    last = t0 = time.perf_counter()
    for batch in batches:
        predictions = predict_batch(predictor, batch)
        counts = _batch_counts(
            predictions, batch["label"], num_classes=num_classes, valid=batch["valid"]
        )
        total = metrics.accumulate(total, counts)
        images += int(np.asarray(batch["valid"]).any(axis=(1, 2)).sum())
        now = time.perf_counter()
        if log_every_seconds and now - last >= log_every_seconds:
            print(f"{images} images, {now - t0:.0f} s", file=sys.stderr, flush=True)
            last = now
    return total, images


def evaluate_source(
    predictor: inference.Predictor, source: Any, *, batch_size: int = 1, **kwargs
) -> tuple[metrics.ClassCounts, int]:
    """:func:`evaluate_batches` over a random-access source at full resolution."""
    batches = pipeline.make_eval_iterator(
        source, batch_size=batch_size, num_classes=predictor.num_classes
    )
    return evaluate_batches(predictor, batches, predictor.num_classes, **kwargs)


def _number(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def results(counts: metrics.ClassCounts, class_names: Sequence[str], **info: Any) -> dict[str, Any]:
    """The summary and the per-class table of accumulated counts.

    Args:
      counts: accumulated ``ClassCounts``.
      class_names: C names.
      **info: extra entries stored as they are (split, checkpoint, step, ...).

    Returns:
      ``{**info, "aAcc", "mIoU", "mAcc", "fwIoU" (from ``metrics.summarize``; None when
      undefined), "labelled_pixels", "per_class": [...]}``; ``per_class`` holds one entry per
      class present in the labels or the predictions, ``{"class_id", "name", "iou", "acc",
      "labelled", "predicted", "true_positive"}``, sorted by decreasing IoU (then id).
    """
    summary = metrics.summarize(counts)
    tp, predicted, labelled = (np.asarray(c, np.int64) for c in counts)
    iou, acc = summary["per_class_iou"], summary["per_class_acc"]
    present = np.flatnonzero(~np.isnan(iou))
    order = present[np.lexsort((present, -iou[present]))]
    table = [
        {
            "class_id": int(c),
            "name": str(class_names[c]),
            "iou": float(iou[c]),
            "acc": _number(acc[c]),
            "labelled": int(labelled[c]),
            "predicted": int(predicted[c]),
            "true_positive": int(tp[c]),
        }
        for c in order
    ]
    return {
        **info,
        **{k: _number(summary[k]) for k in ("aAcc", "mIoU", "mAcc", "fwIoU")},
        "labelled_pixels": int(labelled.sum()),
        "per_class": table,
    }


def result_stem(split: str, checkpoint: str | int, settings: inference.InferenceSettings) -> str:
    """``eval_<split>_<checkpoint>`` plus ``_slide``/``_flip``/``_ms`` for non-default settings."""
    stem = f"eval_{split}_{checkpoint}"
    if settings.mode == "slide":
        stem += "_slide"
    if settings.flip:
        stem += "_flip"
    if tuple(settings.scales) != (1.0,):
        stem += "_ms"
    return stem


def write_results(result: dict[str, Any], directory: str | os.PathLike, stem: str) -> list[Path]:
    """Writes ``<stem>.json`` (everything) and ``<stem>.csv`` (the per-class table).

    Returns:
      The two paths.
    """
    directory = Path(directory)
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    fields = ["rank", "class_id", "name", "iou", "acc", "labelled", "predicted", "true_positive"]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for rank, row in enumerate(result["per_class"], 1):
            writer.writerow({"rank": rank, **row})
    return [json_path, csv_path]


def _fmt(x: float | None) -> str:
    return "  n/a " if x is None else f"{100.0 * x:6.2f}"


def format_results(result: dict[str, Any], max_classes: int = 40) -> str:
    """A readable table: the four scores, then per-class IoU/accuracy sorted by IoU.

    Args:
      result: from :func:`results`.
      max_classes: print at most this many classes (the best and the worst halves); -1: all.

    Returns:
      Multi-line text (percentages).
    """
    lines = [
        "  ".join(f"{k} {_fmt(result[k]).strip()}" for k in ("aAcc", "mIoU", "mAcc", "fwIoU")),
        f"{len(result['per_class'])} classes present, {result['labelled_pixels']} labelled pixels",
        "",
    ]
    table = result["per_class"]
    width = max([len(r["name"]) for r in table] + [5])
    lines.append(f"{'rank':>5}  {'id':>6}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}  pixels")
    rows = list(enumerate(table, 1))
    skipped = 0
    if 0 <= max_classes < len(rows):
        head = (max_classes + 1) // 2
        skipped = len(rows) - max_classes
        rows = rows[:head] + [None] + rows[len(rows) - (max_classes - head) :]
    for item in rows:
        if item is None:
            lines.append(f"{'...':>5}  ({skipped} more classes in the CSV)")
            continue
        rank, r = item
        lines.append(
            f"{rank:>5}  {r['class_id']:>6}  {r['name']:<{width}}  {_fmt(r['iou'])}  "
            f"{_fmt(r['acc'])}  {r['labelled']}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- flags


def define_inference_flags(flag_values: flags.FlagValues) -> None:
    """Defines ``--mode``, ``--crop_size``, ``--stride``, ``--flip``, ``--scales``."""
    flags.DEFINE_enum(
        "mode",
        None,
        list(inference.MODES),
        "whole image or sliding windows",
        flag_values=flag_values,
    )
    flags.DEFINE_string("crop_size", None, "sliding-window size H,W", flag_values=flag_values)
    flags.DEFINE_string(
        "stride",
        None,
        "sliding-window stride H,W (default 2/3 of the crop)",
        flag_values=flag_values,
    )
    flags.DEFINE_boolean(
        "flip", None, "horizontal-flip test-time augmentation", flag_values=flag_values
    )
    flags.DEFINE_string(
        "scales",
        None,
        "test scales, comma-separated, or 'common' (0.5,0.75,...,1.75)",
        flag_values=flag_values,
    )


def _pair(text: str | None, name: str) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"--{name} must be H,W (positive integers), got {text!r}")
    return values


def _scales(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    if text.strip() == "common":
        return inference.COMMON_SCALES
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--scales must be numbers or 'common', got {text!r}") from None


def inference_settings(
    config: ml_collections.ConfigDict, flag_values: flags.FlagValues
) -> inference.InferenceSettings:
    """Settings from the config's ``inference`` section overridden by the flags."""
    return inference.InferenceSettings.from_config(
        config,
        mode=flag_values.mode,
        crop_size=_pair(flag_values.crop_size, "crop_size"),
        stride=_pair(flag_values.stride, "stride"),
        flip=flag_values.flip,
        scales=_scales(flag_values.scales),
    )


def one_line(error: BaseException) -> str:
    """An exception as one line of text."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


# --------------------------------------------------------------------------- CLI

_FLAGS = flags.FlagValues()  # our own flag set: importable next to other CLIs
config_flags.DEFINE_config_file(
    "config", None, "The run's config file (configs/<name>.py).", flag_values=_FLAGS
)
flags.DEFINE_string("workdir", None, "The training workdir.", flag_values=_FLAGS)
flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.", flag_values=_FLAGS)
flags.DEFINE_string(
    "split", None, "Split to evaluate (default: dataset.eval_split).", flag_values=_FLAGS
)
flags.DEFINE_integer(
    "batch_size", None, "Images per batch (default: dataset.eval_batch_size).", flag_values=_FLAGS
)
flags.DEFINE_integer(
    "max_examples", 0, "Evaluate only the first N images (0: the whole split).", flag_values=_FLAGS
)
flags.DEFINE_integer(
    "print_classes", 40, "Classes printed (best and worst halves; -1: all).", flag_values=_FLAGS
)
define_inference_flags(_FLAGS)


class _First:
    """The first ``n`` examples of a source."""

    def __init__(self, source: Any, n: int):
        self._source, self._n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]


def _eval_source(config: ml_collections.ConfigDict, split: str, max_examples: int):
    """The source of ``split`` (every example unless ``max_examples``)."""
    from jaxscaleseg import training  # noqa: PLC0415 (after flag parsing: fast errors)

    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset.max_eval_examples = int(max_examples)
    if split == config.dataset.train_split and split != config.dataset.eval_split:
        train, _ = training.make_sources(config)
        return train if not max_examples else _First(train, max_examples)
    config.dataset.eval_split = split
    return training.make_sources(config)[1]


def run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    checkpoint: str = "best",
    split: str | None = None,
    settings: inference.InferenceSettings | None = None,
    batch_size: int | None = None,
    max_examples: int = 0,
    print_classes: int = 40,
) -> dict[str, Any]:
    """Loads the checkpoint, evaluates the split, prints and writes the results.

    Returns:
      The :func:`results` dict (also written as JSON and CSV in ``workdir``).
    """
    settings = settings or inference.InferenceSettings.from_config(config)
    predictor = inference.Predictor.from_workdir(config, workdir, checkpoint, settings)
    split = split or config.dataset.eval_split
    source = _eval_source(config, split, max_examples)
    print(
        f"evaluating {workdir} checkpoint {checkpoint} (step {predictor.step}) on {split}: "
        f"{len(source)} images, {inference.describe(settings)}",
        flush=True,
    )
    t0 = time.perf_counter()
    counts, images = evaluate_source(
        predictor,
        source,
        batch_size=batch_size or int(config.dataset.eval_batch_size),
        log_every_seconds=30.0,
    )
    result = results(
        counts,
        predictor.class_names,
        split=split,
        checkpoint=str(checkpoint),
        step=predictor.step,
        images=images,
        inference=inference.describe(settings),
        seconds=round(time.perf_counter() - t0, 3),
    )
    paths = write_results(result, workdir, result_stem(split, checkpoint, settings))
    print(format_results(result, print_classes))
    print(f"wrote {paths[0]} and {paths[1]}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags and runs :func:`run`; returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    try:
        _FLAGS.unparse_flags()  # a second call (tests) starts from the defaults
        _FLAGS(argv)
        if _FLAGS.workdir is None or _FLAGS.config is None:
            raise ValueError("--config and --workdir are required")
        settings = inference_settings(_FLAGS.config, _FLAGS)
    except (flags.Error, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    from jaxscaleseg import training  # noqa: PLC0415 (after flag parsing: fast errors)

    try:
        run(
            _FLAGS.config,
            _FLAGS.workdir,
            checkpoint=_FLAGS.checkpoint,
            split=_FLAGS.split,
            settings=settings,
            batch_size=_FLAGS.batch_size,
            max_examples=_FLAGS.max_examples,
            print_classes=_FLAGS.print_classes,
        )
    except (
        inference.CheckpointNotFoundError,
        inference.ModelMismatchError,
        training.ConfigError,
        training.DatasetNotPreparedError,
    ) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
