"""TFDS builders for the paper's five datasets (ADE20K, Cityscapes, PASCAL VOC, COCO-Stuff,
COCO+LVIS).

Importing this package registers the builders with TFDS under the names in :data:`BUILDERS`
(prefixed ``seg_`` so they never clash with TFDS's own ``cityscapes``, ``voc``, ``lvis``...).
Prepare one with ``python -m jaxscaleseg.data.prepare <name> --manual_dir DIR --data_dir DIR``;
read it back with ``tfds.data_source("seg_ade20k", split="train", data_dir=DIR)`` (no TensorFlow
needed). The record format is described in :mod:`jaxscaleseg.data.builders.common`.
"""

from jaxscaleseg.data.builders.ade20k import SegAde20k
from jaxscaleseg.data.builders.cityscapes import SegCityscapes
from jaxscaleseg.data.builders.coco_lvis import SegCocoLvis
from jaxscaleseg.data.builders.coco_stuff import SegCocoStuff
from jaxscaleseg.data.builders.common import (
    CorruptArchiveError,
    CorruptDataError,
    CorruptExampleError,
)
from jaxscaleseg.data.builders.pascal_voc import SegPascalVoc

# Short dataset name -> builder class; ``BUILDERS[name].name`` is the registered TFDS name.
BUILDERS = {
    "ade20k": SegAde20k,
    "cityscapes": SegCityscapes,
    "pascal_voc": SegPascalVoc,
    "coco_stuff": SegCocoStuff,
    "coco_lvis": SegCocoLvis,
}


def tfds_name(name: str) -> str:
    """The registered TFDS name for a short name (``ade20k``) or a TFDS name (``seg_ade20k``)."""
    for short, builder in BUILDERS.items():
        if name in (short, builder.name):
            return builder.name
    known = ", ".join(BUILDERS)
    raise ValueError(f"unknown dataset {name!r}; known: {known}")


__all__ = [
    "BUILDERS",
    "CorruptArchiveError",
    "CorruptDataError",
    "CorruptExampleError",
    "SegAde20k",
    "SegCityscapes",
    "SegCocoLvis",
    "SegCocoStuff",
    "SegPascalVoc",
    "tfds_name",
]
