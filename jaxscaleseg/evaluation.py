"""Evaluation of a checkpoint over a whole split at full resolution (the library of
``python -m jaxscaleseg.evaluate``).

Every labelled pixel of every image counts once, at the image's own size (the padding the
evaluation pipeline adds to form batches is cropped away before inference). Inference is
whole-image or sliding-window, optionally with horizontal-flip and multi-scale test-time
augmentation, merged in embedding space for the embedding head (see
:mod:`jaxscaleseg.inference`). :func:`run` prints aAcc, mIoU, mAcc, fwIoU, the mIoU over the
rare, common and frequent classes (LVIS's bins, :func:`dataset_class_frequency`) and the
per-class IoU table sorted by IoU, and writes ``eval_<split>_<checkpoint>[_<settings>].json``
and ``.csv`` in the workdir.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxscaleseg import inference, metrics
from jaxscaleseg import workdir as workdir_lib
from jaxscaleseg.data import frequency, pipeline, sources

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
    predictor: inference.Predictor,
    source: Any,
    *,
    batch_size: int = 1,
    view: Mapping[str, Any] | None = None,
    **kwargs,
) -> tuple[metrics.ClassCounts, int]:
    """:func:`evaluate_batches` over a random-access source at full resolution.

    ``view``: extra ``pipeline.make_eval_iterator`` keywords: the original code's evaluation
    views (``protocol="crop_val"`` with a square ``crop_size``, ``warp_size``) and the images'
    ``normalization``; see ``sources.eval_view``.
    """
    batches = pipeline.make_eval_iterator(
        source, batch_size=batch_size, num_classes=predictor.num_classes, **(view or {})
    )
    return evaluate_batches(predictor, batches, predictor.num_classes, **kwargs)


def _number(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def results(
    counts: metrics.ClassCounts,
    class_names: Sequence[str],
    *,
    class_frequency: dict[str, Any] | None = None,
    **info: Any,
) -> dict[str, Any]:
    """The summary and the per-class table of accumulated counts.

    Args:
      counts: accumulated ``ClassCounts``.
      class_names: C names.
      class_frequency: optional :func:`jaxscaleseg.data.frequency.class_frequency` result
        (``bins`` and ``train_images`` per class, ``source``): adds the rare/common/frequent
        mIoU and each class's bin.
      **info: extra entries stored as they are (split, checkpoint, step, ...).

    Returns:
      ``{**info, "aAcc", "mIoU", "mAcc", "fwIoU" (from ``metrics.summarize``; None when
      undefined), "labelled_pixels", "per_class": [...]}``; ``per_class`` holds one entry per
      class present in the labels or the predictions, ``{"class_id", "name", "iou", "acc",
      "labelled", "predicted", "true_positive"}``, sorted by decreasing IoU (then id). With
      ``class_frequency``, also ``mIoU_rare``/``mIoU_common``/``mIoU_frequent`` (None for a
      bin with no class present), ``classes_rare``/... (how many classes each is over),
      ``frequency_source``, and ``bin`` and ``train_images`` in every ``per_class`` entry.
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
    binned = {}
    if class_frequency is not None:
        bins = np.asarray(class_frequency["bins"])
        for row in table:
            row["bin"] = str(bins[row["class_id"]])
            row["train_images"] = class_frequency["train_images"][row["class_id"]]
        binned = {
            k: _number(v) if k.startswith("mIoU") else v
            for k, v in metrics.binned_miou(iou, bins).items()
        }
        binned["frequency_source"] = class_frequency["source"]
    return {
        **info,
        **{k: _number(summary[k]) for k in ("aAcc", "mIoU", "mAcc", "fwIoU")},
        **binned,
        "labelled_pixels": int(labelled.sum()),
        "per_class": table,
    }


def result_stem(split: str, checkpoint: str | int, settings: inference.InferenceSettings) -> str:
    """``eval_<split>_<checkpoint>`` plus ``_slide``/``_flip``/``_ms``/``_approx``/``_certified``
    for non-default settings."""
    stem = f"eval_{split}_{checkpoint}"
    if settings.mode == "slide":
        stem += "_slide"
    if settings.flip:
        stem += "_flip"
    if tuple(settings.scales) != (1.0,):
        stem += "_ms"
    if settings.search == "approximate":
        stem += "_approx"
    elif settings.search == "certified":
        stem += "_certified"
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
    if any("bin" in row for row in result["per_class"]):
        fields += ["bin", "train_images"]
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
    ]
    if "mIoU_rare" in result:
        lines.append(
            "  ".join(
                f"mIoU_{b} {_fmt(result[f'mIoU_{b}']).strip()} ({result[f'classes_{b}']} classes)"
                for b in metrics.FREQUENCY_BINS
            )
            + f"  [bins from the {result['frequency_source']}]"
        )
    lines += [
        f"{len(result['per_class'])} classes present, {result['labelled_pixels']} labelled pixels",
        "",
    ]
    table = result["per_class"]
    width = max([len(r["name"]) for r in table] + [5])
    binned = any("bin" in r for r in table)
    lines.append(
        f"{'rank':>5}  {'id':>6}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}  pixels"
        + ("  bin" if binned else "")
    )
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
            f"{_fmt(r['acc'])}  {r['labelled']}" + (f"  {r['bin']}" if binned else "")
        )
    return "\n".join(lines)


def split_source(config: ml_collections.ConfigDict, split: str, max_examples: int):
    """The source of ``split`` (every example unless ``max_examples``)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.dataset.max_eval_examples = int(max_examples)
    if split == config.dataset.train_split and split != config.dataset.eval_split:
        train, _ = sources.make_sources(config, check=(split,))
        return train if not max_examples else sources.Prefix(train, max_examples)
    config.dataset.eval_split = split
    return sources.make_sources(config, check=(split,))[1]


def _dataset_key(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What decides a dataset's training split (the workdir's bins are reused while it holds)."""
    d = config.dataset
    key = {"name": d.name, "config": d.config, "train_split": d.train_split,
           "num_classes": int(d.num_classes)}  # fmt: skip
    if d.name == "synthetic":
        key["synthetic"] = d.synthetic.to_dict()
    return json.loads(json.dumps(key, default=list))


def dataset_class_frequency(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """The rare/common/frequent bin of every class of the config's dataset.

    Read from the workdir's ``class_frequency.json`` while it was computed for the same
    dataset; otherwise computed (:func:`jaxscaleseg.data.frequency.class_frequency`: the
    dataset's own labels, e.g. LVIS's r/c/f, else the training images each class is in) and
    stored there.

    Returns:
      The ``class_frequency`` dict plus ``dataset`` (what it was computed for).
    """
    key = _dataset_key(config)
    stored = workdir_lib.read_class_frequency(workdir)
    if stored is not None and stored.get("dataset") == key:
        return stored
    train, _ = sources.make_sources(config)
    print(f"binning the {config.dataset.num_classes} classes by their training images "
          f"({len(train)} images; stored in the workdir)", flush=True)  # fmt: skip
    record = {
        "dataset": key,
        **frequency.class_frequency(train, int(config.dataset.num_classes), log_every_seconds=30),
    }
    workdir_lib.write_class_frequency(workdir, record)
    return record


def _config_view(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config's evaluation view for the CLI: full resolution, except the original code's
    ``crop_val`` protocol (at ``dataset.eval_crop_size``) and warp, and its normalisation."""
    view = sources.eval_view(config)
    if view["protocol"] == "crop_val":
        view["crop_size"] = tuple(config.dataset.eval_crop_size)
    return view


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
    split = split or config.dataset.eval_split
    source = split_source(config, split, max_examples)  # a bad dataset: before the model loads
    predictor = inference.Predictor.from_workdir(config, workdir, checkpoint, settings)
    table = len(predictor.class_names) if config.loss.name == "ess" else None
    search = inference.resolve_search(settings.search, table)
    auto = f", search auto: {search}" if settings.search == "auto" and search != "exact" else ""
    print(
        f"evaluating {workdir} checkpoint {checkpoint} (step {predictor.step}) on {split}: "
        f"{len(source)} images, {inference.describe(settings)}{auto}",
        flush=True,
    )
    class_frequency = dataset_class_frequency(config, workdir)
    t0 = time.perf_counter()
    with sources.naming_bad_labels(config, split):
        counts, images = evaluate_source(
            predictor,
            source,
            batch_size=batch_size or int(config.dataset.eval_batch_size),
            view=_config_view(config),
            log_every_seconds=30.0,
        )
    result = results(
        counts,
        predictor.class_names,
        class_frequency=class_frequency,
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


__all__ = [
    "evaluate_batches",
    "evaluate_source",
    "format_results",
    "predict_batch",
    "result_stem",
    "results",
    "run",
    "split_source",
    "write_results",
]
