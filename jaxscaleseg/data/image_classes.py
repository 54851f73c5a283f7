"""The classes in each example of a prepared split, kept beside the dataset (a sidecar file).

Repeat-factor sampling and the frequency bins need, for every training example, the set of
classes its label contains. Decoding every record for that at each training start reads every
image of the split (about 100 000 for COCO+LVIS). Preparing a dataset therefore writes, next to
its TFDS files, one ``<split>.image_classes.npz`` per split, in the records' index order:

* ``offsets``: int64 ``[N + 1]``; example ``i``'s classes are ``classes[offsets[i]:offsets[i+1]]``;
* ``classes``: int32 ``[sum of counts]``, sorted within each example, void excluded.

:func:`with_image_classes` wraps a split's source so that ``source.image_classes(i)`` reads the
sidecar (no record is read); the pipeline's repeat-factor sampling and
:mod:`jaxscaleseg.data.frequency` use ``image_classes`` whenever a source has it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jaxscaleseg.errors import DatasetError
from jaxscaleseg.labels import STORED_VOID

SUFFIX = ".image_classes.npz"

log = logging.getLogger(__name__)


def sidecar_path(dataset_dir: str | os.PathLike, split: str) -> Path:
    """``<dataset_dir>/<split>.image_classes.npz`` (``dataset_dir``: ``builder.data_dir``)."""
    return Path(os.fspath(dataset_dir)) / f"{split}{SUFFIX}"


def classes_of_label(label: np.ndarray) -> np.ndarray:
    """Sorted class ids in a stored label (uint16 train ids, void = STORED_VOID), int32."""
    values = np.unique(np.asarray(label))
    return values[values != STORED_VOID].astype(np.int32)


def write(path: str | os.PathLike, per_example: Iterable[np.ndarray]) -> int:
    """Writes the sidecar from each example's class ids, in index order.

    Args:
      path: the ``.npz`` to write (written to a temporary name, then renamed).
      per_example: int arrays, one per example.

    Returns:
      The number of examples written.
    """
    offsets, chunks, total = [0], [], 0
    for classes in per_example:
        classes = np.asarray(classes, np.int32).ravel()
        chunks.append(classes)
        total += classes.size
        offsets.append(total)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            offsets=np.asarray(offsets, np.int64),
            classes=np.concatenate(chunks) if chunks else np.zeros(0, np.int32),
        )
    os.replace(tmp, path)
    return len(offsets) - 1


def read(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """``(offsets int64 [N + 1], classes int32 [M])``, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return npz["offsets"], npz["classes"]


class WithImageClasses:
    """A random-access source plus ``image_classes(i)`` from a sidecar; everything else is the
    wrapped source's (``len``, ``[i]``, ``dataset_info``...). Picklable when the source is."""

    def __init__(self, source: Any, offsets: np.ndarray, classes: np.ndarray):
        if len(offsets) != len(source) + 1:
            raise ValueError(
                f"image classes for {len(offsets) - 1} examples, the source has {len(source)}"
            )
        self._source, self._offsets, self._classes = source, offsets, classes

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        return self._source[index]

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_source", "_offsets", "_classes"):
            raise AttributeError(name)
        return getattr(self._source, name)

    def image_classes(self, index: int) -> np.ndarray:
        """Sorted int32 class ids of example ``index`` (void excluded); reads no record."""
        index = int(index)
        return self._classes[self._offsets[index] : self._offsets[index + 1]]


def check_class_range(
    source: Any, dataset_dir: str | os.PathLike, split: str, num_classes: int, dataset: str
) -> None:
    """Refuses a split whose sidecar lists a class id ``>= num_classes``, before training.

    Reads the sidecar and one record (the first bad example's, for its file name); does
    nothing when the split has no sidecar or one of another length (the pipeline then finds a
    bad label when it decodes it).

    Raises:
      DatasetError: naming the dataset, the split, the first bad example (index and file name),
        its out-of-range ids and how many examples hold some.
    """
    found = read(sidecar_path(dataset_dir, split))
    if found is None or len(found[0]) != len(source) + 1:
        return
    offsets, classes = found
    bad = np.flatnonzero(classes >= num_classes)
    if not bad.size:
        return
    examples = np.unique(np.searchsorted(offsets, bad, side="right") - 1)
    index = int(examples[0])
    ids = classes[offsets[index] : offsets[index + 1]]
    ids = ", ".join(str(int(v)) for v in ids[ids >= num_classes][:10])
    name = source[index].get("file_name", b"")
    name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    raise DatasetError(
        f"dataset {dataset}, split {split}, example {index} ({name}): label ids {ids} are out "
        f"of range for dataset.num_classes={num_classes} (ids 0..{num_classes - 1}, or void); "
        f"{len(examples)} of the split's {len(source)} examples hold such ids: prepare the "
        "dataset again, or set dataset.num_classes to its class count"
    )


def with_image_classes(source: Any, dataset_dir: str | os.PathLike, split: str) -> Any:
    """``source`` with ``image_classes`` from its split's sidecar, or ``source`` unchanged
    (logged) when the dataset has none or one of another length (prepared by older code)."""
    found = read(sidecar_path(dataset_dir, split))
    if found is None:
        log.warning("%s has no %s%s: class lists come from decoding labels", dataset_dir, split,
                    SUFFIX)  # fmt: skip
        return source
    offsets, classes = found
    if len(offsets) != len(source) + 1:
        log.warning("%s: %s%s lists %d examples, the split has %d; ignoring it", dataset_dir,
                    split, SUFFIX, len(offsets) - 1, len(source))  # fmt: skip
        return source
    return WithImageClasses(source, offsets, classes)
