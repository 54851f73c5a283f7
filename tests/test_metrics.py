"""Running per-class counts against a NumPy confusion-matrix computation."""

import numpy as np
import pytest
import reference

from jaxscaleseg import metrics


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_metrics_match_confusion_matrix(maybe_jit, seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(5, 40))
    total = metrics.zeros(num_classes)
    preds, labels, valids = [], [], []
    update = maybe_jit(lambda p, y, v: metrics.batch_counts(p, y, num_classes, valid=v))
    for _ in range(3):
        # Classes num_classes-3.. never occur in labels nor predictions.
        label = rng.integers(-1, num_classes - 3, (2, 9, 7)).astype(np.int32)
        pred = np.where(
            rng.random(label.shape) < 0.6, label, rng.integers(0, num_classes - 3, label.shape)
        )
        pred = np.maximum(pred, 0).astype(np.int32)
        valid = rng.random(label.shape) < 0.9
        total = metrics.accumulate(total, update(pred, label, valid))
        preds.append(pred)
        labels.append(label)
        valids.append(valid)
    summary = metrics.summarize(total)
    ref = reference.confusion_metrics(
        np.concatenate(preds), np.concatenate(labels), num_classes, valid=np.concatenate(valids)
    )
    for key in ["mIoU", "mAcc", "aAcc", "fwIoU"]:
        np.testing.assert_allclose(summary[key], ref[key], rtol=1e-12)
    np.testing.assert_allclose(summary["per_class_iou"], ref["per_class_iou"], rtol=1e-12)
    assert np.isnan(summary["per_class_iou"][-3:]).all()
    assert total.labelled.sum() == sum(
        ((la >= 0) & v).sum() for la, v in zip(labels, valids, strict=True)
    )


def test_ignored_and_invalid_pixels_do_not_count(maybe_jit):
    label = np.array([[0, 1, -1, 2]], np.int32)
    pred = np.array([[0, 2, 1, 2]], np.int32)
    valid = np.array([[True, True, True, False]])
    counts = maybe_jit(lambda p, y, v: metrics.batch_counts(p, y, 3, valid=v))(pred, label, valid)
    np.testing.assert_array_equal(np.asarray(counts.true_positive), [1, 0, 0])
    np.testing.assert_array_equal(np.asarray(counts.labelled), [1, 1, 0])
    np.testing.assert_array_equal(np.asarray(counts.predicted), [1, 0, 1])
    summary = metrics.summarize(metrics.accumulate(metrics.zeros(3), counts))
    # Class 0: IoU 1; class 1: 0/1; class 2: predicted once, never labelled: 0/1.
    assert summary["mIoU"] == pytest.approx(1 / 3)
    assert summary["aAcc"] == pytest.approx(0.5)
    assert summary["mAcc"] == pytest.approx(0.5)


def test_empty_counts_give_nan_not_errors():
    summary = metrics.summarize(metrics.zeros(4))
    assert all(np.isnan(summary[k]) for k in ["mIoU", "mAcc", "aAcc", "fwIoU"])


def test_frequency_bins_follow_lvis_edges():
    counts = np.array([0, 1, 10, 11, 100, 101, 5000])
    bins = metrics.frequency_bins(counts)
    assert bins.tolist() == ["rare", "rare", "rare", "common", "common", "frequent", "frequent"]
    with pytest.raises(ValueError, match="counts"):
        metrics.frequency_bins(np.array([3, -1]))


def test_binned_miou_averages_present_classes_of_each_bin():
    iou = np.array([0.5, np.nan, 0.1, 0.7, 0.9, np.nan])
    bins = np.array(["rare", "rare", "rare", "common", "frequent", "frequent"])
    out = metrics.binned_miou(iou, bins)
    # Absent classes (NaN) do not count, as in the overall mIoU.
    assert out["mIoU_rare"] == pytest.approx(0.3) and out["classes_rare"] == 2
    assert out["mIoU_common"] == pytest.approx(0.7) and out["classes_common"] == 1
    assert out["mIoU_frequent"] == pytest.approx(0.9) and out["classes_frequent"] == 1
    none = metrics.binned_miou(iou, np.array(["rare"] * 6))
    assert np.isnan(none["mIoU_common"]) and none["classes_common"] == 0
    with pytest.raises(ValueError, match="unknown frequency bins"):
        metrics.binned_miou(iou, np.array(["r"] * 6))
    with pytest.raises(ValueError, match="shape"):
        metrics.binned_miou(iou, bins[:3])
