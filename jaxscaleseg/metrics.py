"""Segmentation metrics from running per-class counts.

The state is three count vectors of length C — true positives, predicted pixels and labelled
pixels per class — never a C×C confusion matrix, so evaluation at 100 000 classes costs
megabytes. Counts are computed on device per batch (int32) and accumulated on the host in int64
(a whole validation set can exceed 2**31 pixels); the ratios are taken only at summary time.

Beside the mean IoU over all classes, :func:`binned_miou` gives the mean IoU over the rare,
common and frequent classes, LVIS's convention (Gupta et al., 2019): a class is rare when it is
in 1..10 training images, common in 11..100, frequent in more (:func:`frequency_bins`). A class
in no training image is counted as rare: it is the far end of the tail, and leaving it out would
hide that neither head can segment it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxscaleseg.labels import IGNORE_INDEX

FREQUENCY_BINS = ("rare", "common", "frequent")
RARE_MAX_IMAGES = 10  # LVIS: rare classes are in at most 10 training images ...
COMMON_MAX_IMAGES = 100  # ... common ones in 11..100, frequent ones in more


class ClassCounts(NamedTuple):
    """Per-class pixel counts, each ``[C]``.

    Attributes:
      true_positive: pixels labelled c and predicted c.
      predicted: pixels predicted c (among pixels that count).
      labelled: pixels labelled c.
    """

    true_positive: jax.Array | np.ndarray
    predicted: jax.Array | np.ndarray
    labelled: jax.Array | np.ndarray


def zeros(num_classes: int) -> ClassCounts:
    """Empty host-side counts (int64 ``[C]``)."""
    return ClassCounts(*(np.zeros(num_classes, np.int64) for _ in range(3)))


def batch_counts(
    predictions: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    valid: jax.Array | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> ClassCounts:
    """Counts of one batch, jittable.

    A pixel counts when its label is a class id (not ``ignore_index``, not out of range) and
    ``valid`` is true there (``valid`` marks padding added by the evaluation pipeline).

    Args:
      predictions: int ``[...]`` predicted class ids in ``[0, C)``.
      labels: int ``[...]`` class ids or ``ignore_index``.
      num_classes: C.
      valid: optional bool ``[...]`` per-pixel validity mask.
      ignore_index: label value of pixels that do not count.

    Returns:
      ``ClassCounts`` of int32 ``[C]`` arrays.
    """
    predictions = predictions.reshape(-1).astype(jnp.int32)
    labels = labels.reshape(-1).astype(jnp.int32)
    counts = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    if valid is not None:
        counts &= valid.reshape(-1).astype(bool)
    weight = counts.astype(jnp.int32)
    safe_labels = jnp.where(counts, labels, 0)
    safe_predictions = jnp.clip(predictions, 0, num_classes - 1)
    hit = weight * (predictions == labels).astype(jnp.int32)
    return ClassCounts(
        true_positive=jnp.bincount(safe_labels, weights=hit, length=num_classes),
        predicted=jnp.bincount(safe_predictions, weights=weight, length=num_classes),
        labelled=jnp.bincount(safe_labels, weights=weight, length=num_classes),
    )


def accumulate(total: ClassCounts, batch: ClassCounts) -> ClassCounts:
    """Adds one batch's counts (device int32) to host totals (int64)."""
    return ClassCounts(
        *(t + np.asarray(jax.device_get(b), np.int64) for t, b in zip(total, batch, strict=True))
    )


def summarize(counts: ClassCounts) -> dict[str, float | np.ndarray]:
    """Metrics from accumulated counts.

    Args:
      counts: ``ClassCounts`` of ``[C]`` integer arrays.

    Returns:
      A dict with
      - ``mIoU``: mean IoU over classes present in labels or predictions;
      - ``mAcc``: mean per-class accuracy (recall) over classes present in labels;
      - ``aAcc``: overall pixel accuracy;
      - ``fwIoU``: IoU weighted by each class's share of labelled pixels;
      - ``per_class_iou``: float64 ``[C]``, NaN for classes absent from labels and predictions;
      - ``per_class_acc``: float64 ``[C]``, NaN for classes absent from labels.
      Scalars are NaN when no pixel counted.
    """
    tp, predicted, labelled = (np.asarray(c, np.float64) for c in counts)
    union = predicted + labelled - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(labelled > 0, tp / labelled, np.nan)
    total = labelled.sum()
    present = union > 0
    return {
        "mIoU": float(np.nanmean(iou)) if present.any() else float("nan"),
        "mAcc": float(np.nanmean(acc)) if (labelled > 0).any() else float("nan"),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "fwIoU": float(np.nansum(labelled / total * np.nan_to_num(iou)))
        if total > 0
        else float("nan"),
        "per_class_iou": iou,
        "per_class_acc": acc,
    }


def frequency_bins(train_images: np.ndarray) -> np.ndarray:
    """LVIS frequency bins from the number of training images each class is in.

    Args:
      train_images: int ``[C]``, images of the training split that contain the class.

    Returns:
      str ``[C]``: ``"rare"`` (0..10 images; 0 included, see the module docstring),
      ``"common"`` (11..100) or ``"frequent"`` (more than 100).

    Raises:
      ValueError: on a negative count.
    """
    counts = np.asarray(train_images, np.int64)
    if np.any(counts < 0):
        raise ValueError(f"training-image counts must be >= 0, got min {counts.min()}")
    index = (counts > RARE_MAX_IMAGES).astype(np.int64) + (counts > COMMON_MAX_IMAGES)
    return np.asarray(FREQUENCY_BINS)[index]


def binned_miou(per_class_iou: np.ndarray, bins: np.ndarray) -> dict[str, float | int]:
    """The mean IoU over the classes of each frequency bin.

    Args:
      per_class_iou: float ``[C]`` from :func:`summarize`, NaN for classes absent from labels
        and predictions (these do not count, as in the overall mIoU).
      bins: str ``[C]``, each one of ``FREQUENCY_BINS``.

    Returns:
      ``{"mIoU_rare", "mIoU_common", "mIoU_frequent"}``: float, NaN when no class of the bin
      counts; and ``{"classes_rare", "classes_common", "classes_frequent"}``: how many
      classes each mean is over.

    Raises:
      ValueError: when the shapes differ or a bin name is unknown.
    """
    iou = np.asarray(per_class_iou, np.float64)
    bins = np.asarray(bins)
    if bins.shape != iou.shape:
        raise ValueError(f"bins has shape {bins.shape}, per-class IoU {iou.shape}")
    unknown = set(np.unique(bins).tolist()) - set(FREQUENCY_BINS)
    if unknown:
        raise ValueError(f"unknown frequency bins {sorted(unknown)}; known: {FREQUENCY_BINS}")
    out: dict[str, float | int] = {}
    for name in FREQUENCY_BINS:
        values = iou[(bins == name) & ~np.isnan(iou)]
        out[f"mIoU_{name}"] = float(values.mean()) if values.size else float("nan")
        out[f"classes_{name}"] = int(values.size)
    return out
