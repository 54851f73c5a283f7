"""Label conventions shared by every module.

Labels are int32 class ids ``0..C-1``; ``IGNORE_INDEX`` (-1) marks pixels that carry no class
(void, padding). 255 is a real class id once C > 255, so it is never used as "ignore".
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -1


class LabelRangeError(ValueError):
    """A label is neither a class id ``0..C-1`` nor the ignore value (see :func:`check_labels`)."""


def check_labels(
    labels: np.ndarray,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    source: str | None = None,
) -> None:
    """Raises a clear error when any label is neither a class id nor the ignore value.

    Meant to be called eagerly (on host arrays, e.g. once per decoded example in the data
    pipeline); inside ``jax.jit`` the losses turn invalid labels into a NaN loss instead.

    Args:
      labels: integer array of any shape.
      num_classes: C; valid ids are ``0..C-1``.
      ignore_index: the value that marks ignored pixels.
      source: where the labels came from (a file name, a dataset key); named in the error.

    Raises:
      LabelRangeError: naming ``source``, the offending values and how many pixels carry them.
      ValueError: the labels are not integers.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        where = f" in {source}" if source else ""
        raise ValueError(f"labels{where} must be integers, got dtype {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values, counts = np.unique(labels[bad], return_counts=True)
        shown = ", ".join(f"{v} ({c} px)" for v, c in zip(values[:10], counts[:10], strict=True))
        more = f" and {len(values) - 10} more values" if len(values) > 10 else ""
        where = f" in {source}" if source else ""
        raise LabelRangeError(
            f"labels{where} out of range: expected class ids 0..{num_classes - 1} or "
            f"{ignore_index} (ignore), found {shown}{more}"
        )


# How prepared datasets (the TFDS builders) store a void pixel in their uint16 label images;
# the input pipeline maps it to IGNORE_INDEX.
STORED_VOID = 65535
