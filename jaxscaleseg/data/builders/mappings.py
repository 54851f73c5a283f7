"""Pure numpy mappings from each dataset's raw label values to stored train ids.

Every function returns a ``uint16`` array of the input's shape holding train ids ``0..C-1``, with
void pixels set to :data:`jaxscaleseg.labels.STORED_VOID` (the input pipeline maps it to -1).
Raw values that a dataset never uses become void too, so a stray value cannot turn into a class.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from importlib import resources

import numpy as np

from jaxscaleseg.data.builders import class_info
from jaxscaleseg.labels import STORED_VOID

ADE20K_NUM_CLASSES = 150
CITYSCAPES_NUM_CLASSES = 19
PASCAL_VOC_NUM_CLASSES = 21
COCO_LVIS_NUM_CLASSES = 1284
COCO_LVIS_TABLE = "coco_stuff_to_coco_lvis_1284.json"


def map_with_table(raw: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Looks every raw value up in ``table``; values past its end become void.

    Args:
      raw: integer array of any shape with non-negative values.
      table: uint16 array ``[K]``; ``table[v]`` is the stored value of raw value ``v``.

    Returns:
      uint16 array of ``raw``'s shape.
    """
    raw = np.asarray(raw)
    if raw.size and raw.min() < 0:
        raise ValueError(f"raw label values must be non-negative, found {raw.min()}")
    table = np.asarray(table, dtype=np.uint16)
    safe = np.minimum(raw.astype(np.int64), len(table))
    padded = np.concatenate([table, np.array([STORED_VOID], np.uint16)])
    return padded[safe]


def _table(size: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    table = np.full(size, STORED_VOID, dtype=np.uint16)
    for raw, train_id in pairs:
        table[raw] = train_id
    return table


def ade20k_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """ADE20K (SceneParsing 150) annotation values to train ids.

    Raw 0 ("other objects") is void and 1..150 become 0..149.

    Args:
      raw: uint8 annotation ``[H, W]``.

    Returns:
      uint16 ``[H, W]``.
    """
    return map_with_table(raw, _table(256, ((v, v - 1) for v in range(1, 151))))


def cityscapes_label_ids_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """Cityscapes ``*_gtFine_labelIds.png`` values to the 19 train ids.

    E.g. label id 7 (road) -> 0, 26 (car) -> 13, 33 (bicycle) -> 18; every other id (unlabeled,
    ego vehicle, ..., license plate) is void.

    Args:
      raw: uint8 label ids ``[H, W]``.

    Returns:
      uint16 ``[H, W]``.
    """
    return map_with_table(raw, _table(256, class_info.CITYSCAPES_LABEL_TO_TRAIN_ID.items()))


def pascal_voc_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """PASCAL VOC / SBD class indices to train ids: 0..20 stay (0 = background), 255 is void.

    Args:
      raw: palette indices ``[H, W]``.

    Returns:
      uint16 ``[H, W]``.
    """
    return map_with_table(raw, _table(256, ((v, v) for v in range(21))))


def coco_stuff_id_table(num_classes: int) -> np.ndarray:
    """Lookup table from COCO-Stuff ids (0 = unlabeled, 1..182) to train ids.

    Args:
      num_classes: 182 (train id = id - 1) or 171 (the 11 never-annotated thing ids dropped and
        mapped to void; the remaining ids keep their order).

    Returns:
      uint16 ``[183]``.
    """
    if num_classes == 182:
        ids = range(1, 183)
    elif num_classes == 171:
        ids = class_info.COCO_STUFF_171_IDS
    else:
        raise ValueError(f"COCO-Stuff has a 171- or 182-class space, not {num_classes}")
    return _table(183, ((cid, i) for i, cid in enumerate(ids)))


def coco_stuff_ids_to_train_ids(ids: np.ndarray, num_classes: int) -> np.ndarray:
    """COCO-Stuff ids (as in the 10k ``.mat`` files: 0 = unlabeled, 1..182) to train ids.

    Args:
      ids: integer ``[H, W]``.
      num_classes: 171 or 182, see :func:`coco_stuff_id_table`.

    Returns:
      uint16 ``[H, W]``.
    """
    return map_with_table(ids, coco_stuff_id_table(num_classes))


def coco_stuff_164k_to_train_ids(png: np.ndarray, num_classes: int = 171) -> np.ndarray:
    """COCO-Stuff 164k ``stuffthingmaps`` PNG values to train ids.

    The PNGs hold ``id - 1`` (0..181) and 255 for unlabeled.

    Args:
      png: uint8 ``[H, W]``.
      num_classes: 171 or 182.

    Returns:
      uint16 ``[H, W]``.
    """
    png = np.asarray(png).astype(np.int64)
    ids = np.where(png <= 181, png + 1, 0)
    return coco_stuff_ids_to_train_ids(ids, num_classes)


@functools.cache
def stuff_to_coco_lvis() -> Mapping[int, int]:
    """The packaged COCO-Stuff stuff id -> COCO+LVIS id table (0 = void).

    Returns:
      dict from stuff ids 92..183 to COCO+LVIS ids 0..1284.
    """
    text = resources.files("jaxscaleseg.data").joinpath(COCO_LVIS_TABLE).read_text()
    table = json.loads(text)["stuff_to_coco_lvis"]
    return {int(k): int(v) for k, v in table.items()}


def remap_in_table_order(table: Mapping[int, int]) -> dict[int, int]:
    """Where each key ends up when a mask is remapped in place one ``table`` entry at a time.

    The original ESSNet mask script (``LVIS_COCO/generateMasks.py``) maps its stuff mask with
    ``cmask[cmask == k] = v`` for every ``(k, v)`` of its table in turn, so a pixel whose new
    value is a key met later is mapped again. With the packaged table in its (ascending) order
    that happens to two stuff ids: 93 -> 110 -> 1217 and 98 -> 181 -> 1283; every other id ends
    where ``table`` sends it.

    Args:
      table: stuff id -> COCO+LVIS id, in the order the script applies it.

    Returns:
      stuff id -> final COCO+LVIS id, same keys and order.
    """
    items = list(table.items())
    out = {}
    for start, _ in items:
        value = start
        for key, new in items:
            if value == key:
                value = new
        out[start] = value
    return out


def coco_lvis_ids_to_train_ids(ids: np.ndarray) -> np.ndarray:
    """COCO+LVIS ids (0 = void, 1..1284) to train ids 0..1283.

    Args:
      ids: integer ``[H, W]``.

    Returns:
      uint16 ``[H, W]``.
    """
    table = _table(COCO_LVIS_NUM_CLASSES + 1, ((v, v - 1) for v in range(1, 1285)))
    return map_with_table(ids, table)


def paint_unclaimed(canvas: np.ndarray, mask: np.ndarray, class_id: int) -> np.ndarray:
    """Writes ``class_id`` where ``mask`` is set and ``canvas`` is still 0 (unclaimed).

    Painting masks in order with this function makes the first mask that covers a pixel own
    it. Painting 0 leaves the canvas as it was.

    Args:
      canvas: uint16 ``[H, W]`` ids, 0 = unclaimed.
      mask: bool/uint8 ``[H, W]``.
      class_id: the id to write.

    Returns:
      a new uint16 ``[H, W]`` canvas.
    """
    canvas = np.asarray(canvas, dtype=np.uint16)
    claim = (canvas == 0) & np.asarray(mask, dtype=bool)
    return np.where(claim, np.uint16(class_id), canvas)


def compose_coco_lvis_label(
    shape: tuple[int, int],
    lvis: Iterable[tuple[np.ndarray, int]],
    stuff: Iterable[tuple[np.ndarray, int]],
    stuff_table: Mapping[int, int],
) -> np.ndarray:
    """Builds one COCO+LVIS label map from instance and stuff masks.

    LVIS masks are painted in annotation order, the first annotation owning an overlapped
    pixel; stuff masks then fill the pixels left, mapped to the 1284-class space by
    ``stuff_table`` (a stuff id missing from the table, or mapped to 0, stays void).

    Args:
      shape: ``(H, W)``.
      lvis: ``(mask [H, W], LVIS category id 1..1203)`` pairs in annotation order.
      stuff: ``(mask [H, W], COCO-Stuff category id 92..183)`` pairs.
      stuff_table: stuff id -> COCO+LVIS id (0 = void).

    Returns:
      uint16 ``[H, W]`` train ids with void = STORED_VOID.
    """
    canvas = np.zeros(shape, dtype=np.uint16)
    for mask, category_id in lvis:
        if not 1 <= category_id <= 1203:
            raise ValueError(f"LVIS category id {category_id} is outside 1..1203")
        canvas = paint_unclaimed(canvas, mask, category_id)
    for mask, category_id in stuff:
        canvas = paint_unclaimed(canvas, mask, stuff_table.get(int(category_id), 0))
    return coco_lvis_ids_to_train_ids(canvas)
