"""How often each class is in the training split, and its LVIS frequency bin.

A dataset's own labels come first: a prepared dataset whose metadata has ``class_frequency``
(one of ``"rare"``, ``"common"``, ``"frequent"`` or None per class; the COCO+LVIS builder
stores LVIS's ``r``/``c``/``f`` there) keeps them. Every other class is binned by counting the
training images it is in (``metrics.frequency_bins``): cheaply from ``source.image_classes``
(the synthetic set; a prepared split's sidecar, :mod:`jaxscaleseg.data.image_classes`), by
decoding every training label otherwise (minutes for a large dataset prepared before the
sidecar existed, which is why the result is stored in the workdir and read back).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from jaxscaleseg import metrics
from jaxscaleseg.data import pipeline
from jaxscaleseg.labels import IGNORE_INDEX

METADATA_KEY = "class_frequency"
LVIS_LETTERS = {"r": "rare", "c": "common", "f": "frequent"}


def train_image_counts(
    source: Any, num_classes: int, *, log_every_seconds: float = 0.0
) -> np.ndarray:
    """The number of examples of ``source`` each class is in.

    Args:
      source: random-access source (``len``, ``[i]``); ``source.image_classes(i)`` is used
        when it exists, otherwise every label is decoded.
      num_classes: C; labels outside ``0..C-1`` (void) do not count.
      log_every_seconds: print progress to stderr at most this often (0: never).

    Returns:
      int64 ``[C]``.
    """
    counts = np.zeros(num_classes, np.int64)
    last = t0 = time.perf_counter()
    for i in range(len(source)):
        if hasattr(source, "image_classes"):
            classes = np.asarray(source.image_classes(i), np.int64)
        else:
            label = pipeline.decode_example(source[i], num_classes)["label"]
            classes = np.unique(label[label != IGNORE_INDEX]).astype(np.int64)
        counts[classes[(classes >= 0) & (classes < num_classes)]] += 1
        now = time.perf_counter()
        if log_every_seconds and now - last >= log_every_seconds:
            print(f"counted classes in {i + 1}/{len(source)} training images, "
                  f"{now - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            last = now
    return counts


def dataset_bins(source: Any, num_classes: int) -> list[str | None] | None:
    """The dataset's own bins from its metadata (``class_frequency``), if it has them.

    Accepts LVIS's letters (``r``, ``c``, ``f``) or the bin names; None or ``""`` marks a class
    without a label.

    Returns:
      C entries (a bin name or None), or None when the metadata has no such list.

    Raises:
      ValueError: when the list has the wrong length or an unknown entry.
    """
    info = getattr(source, "dataset_info", None)
    labels = (getattr(info, "metadata", None) or {}).get(METADATA_KEY)
    if labels is None:
        return None
    if len(labels) != num_classes:
        raise ValueError(
            f"metadata {METADATA_KEY} has {len(labels)} entries for {num_classes} classes"
        )
    out = []
    for label in labels:
        name = LVIS_LETTERS.get(label, label) if label else None
        if name is not None and name not in metrics.FREQUENCY_BINS:
            raise ValueError(f"metadata {METADATA_KEY} has an unknown bin {label!r}")
        out.append(name)
    return out


def class_frequency(
    train_source: Any,
    num_classes: int,
    *,
    given: list[str | None] | None = None,
    log_every_seconds: float = 0.0,
) -> dict[str, Any]:
    """The frequency bin of every class, from the dataset's labels or by counting.

    Args:
      train_source: the training split.
      num_classes: C.
      given: per-class bins to keep (None entries are counted); default: the source's
        metadata (:func:`dataset_bins`).
      log_every_seconds: progress printing while counting (0: never).

    Returns:
      A JSON-ready dict: ``bins`` (C bin names), ``train_images`` (C counts; all None when every
      bin came from the dataset and nothing was counted), ``source`` (``"dataset"``,
      ``"training split"`` or ``"dataset + training split"``) and ``num_classes``.
    """
    given = dataset_bins(train_source, num_classes) if given is None else list(given)
    missing = given is None or any(b is None for b in given)
    counts = None
    if missing:
        counts = train_image_counts(train_source, num_classes, log_every_seconds=log_every_seconds)
        counted = metrics.frequency_bins(counts).tolist()
    if given is None:
        bins, source = counted, "training split"
    else:
        bins = [b if b is not None else counted[c] for c, b in enumerate(given)]
        source = "dataset + training split" if missing else "dataset"
    images = counts.tolist() if counts is not None else [None] * num_classes
    return {"num_classes": int(num_classes), "source": source, "bins": bins, "train_images": images}
