"""Simple float64 NumPy references for the ESS search, losses and metrics."""

from __future__ import annotations

import numpy as np


def distances(queries: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """All Euclidean distances, float64 ``[N, C]``."""
    q = np.asarray(queries, np.float64)
    e = np.asarray(classes, np.float64)
    return np.sqrt(np.maximum(((q[:, None, :] - e[None, :, :]) ** 2).sum(-1), 0.0))


def nearest(queries, classes, k, exclude=None):
    """(distances [N, k], ids [N, k]) ascending, excluding ``exclude[i]`` for row i."""
    d = distances(queries, classes)
    if exclude is not None:
        d[np.arange(len(d)), exclude] = np.inf
    ids = np.argsort(d, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, axis=-1), ids


def ess_loss_and_grads(
    pixels, labels, classes, k, temperature, ignore_index=-1, negatives="nearest_other"
):
    """ESS loss over pixels [N, D] with labels [N]; returns (loss, d/dpixels, d/dclasses).

    ``negatives="nearest_other"``: the k nearest classes other than the target;
    ``"original"``: the k nearest classes, where one equal to the target y is replaced by
    y - 1 (by 0 when y = 0, so that the target enters the softmax twice), written out pixel by
    pixel as the original code's rule reads.
    """
    p = np.asarray(pixels, np.float64)
    e = np.asarray(classes, np.float64)
    labels = np.asarray(labels)
    valid = labels != ignore_index
    count = max(int(valid.sum()), 1)
    grad_p = np.zeros_like(p)
    grad_e = np.zeros_like(e)
    if not valid.any():
        return 0.0, grad_p, grad_e
    idx = np.flatnonzero(valid)
    y = labels[idx]
    if negatives == "original":
        _, neighbors = nearest(p[idx], e, k)
        for row, target in enumerate(y):
            for col in range(k):
                if neighbors[row, col] == target:
                    neighbors[row, col] = max(target - 1, 0)
    else:
        _, neighbors = nearest(p[idx], e, k, exclude=y)
    candidates = np.concatenate([y[:, None], neighbors], axis=1)  # [M, k+1]
    diff = p[idx][:, None, :] - e[candidates]  # [M, k+1, D]
    d = np.sqrt((diff**2).sum(-1))
    logits = -temperature * d
    shift = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - shift).sum(-1)) + shift[:, 0]
    loss = (lse - logits[:, 0]).sum() / count
    prob = np.exp(logits - lse[:, None])
    dlogits = prob.copy()
    dlogits[:, 0] -= 1.0
    dlogits /= count
    unit = diff / d[..., None]
    # logits = -T d; dd/dp = unit; dd/de = -unit.
    grad_p[idx] = (dlogits[..., None] * -temperature * unit).sum(1)
    np.add.at(grad_e, candidates, dlogits[..., None] * temperature * unit)
    return loss, grad_p, grad_e


def separation_loss_and_grad(classes, margin, nearest_id=None):
    """Separation regulariser and its gradient, float64.

    ``nearest_id``: int ``[C]``, each class's partner in the hinge; None: its nearest other
    class now.
    """
    e = np.asarray(classes, np.float64)
    num = len(e)
    if nearest_id is None:
        d = distances(e, e)
        np.fill_diagonal(d, np.inf)
        nearest_id = d.argmin(-1)
    nearest_id = np.asarray(nearest_id)
    nd = np.sqrt(((e - e[nearest_id]) ** 2).sum(-1))
    loss = np.maximum(margin - nd, 0.0).sum() / num
    grad = np.zeros_like(e)
    active = nd < margin
    unit = (e - e[nearest_id]) / nd[:, None]
    g = np.where(active[:, None], -unit / num, 0.0)
    grad += g
    np.add.at(grad, nearest_id, -g)
    return loss, grad


def confusion_metrics(pred, label, num_classes, ignore_index=-1, valid=None):
    """mIoU, mAcc, aAcc, fwIoU and per-class IoU from a full confusion matrix."""
    pred = np.asarray(pred).reshape(-1)
    label = np.asarray(label).reshape(-1)
    keep = label != ignore_index
    if valid is not None:
        keep &= np.asarray(valid).reshape(-1)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (label[keep], pred[keep]), 1)
    tp = np.diag(cm).astype(np.float64)
    labelled = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    union = labelled + predicted - tp
    present = union > 0
    iou = np.full(num_classes, np.nan)
    iou[present] = tp[present] / union[present]
    acc = np.full(num_classes, np.nan)
    has = labelled > 0
    acc[has] = tp[has] / labelled[has]
    freq = labelled / labelled.sum()
    return {
        "mIoU": iou[present].mean(),
        "mAcc": acc[has].mean(),
        "aAcc": tp.sum() / labelled.sum(),
        "fwIoU": (freq[present] * iou[present]).sum(),
        "per_class_iou": iou,
    }
