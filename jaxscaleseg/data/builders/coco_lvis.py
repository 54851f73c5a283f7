"""COCO+LVIS (1284 classes): LVIS v1 instances and COCO-Stuff 2017 stuff on COCO 2017 images.

Each label map paints the image's LVIS masks in annotation order (the first annotation owns an
overlapped pixel), then fills the pixels left with the COCO-Stuff stuff masks mapped by the
packaged ``coco_stuff_to_coco_lvis_1284.json``; what stays unpainted is void. COCO+LVIS ids
1..1284 are stored as train ids 0..1283 (LVIS ids keep their numbers, so stuff id 92 "banner" ->
LVIS id 50 -> train id 49).

Configs: ``lvis_ids`` (the default) maps every stuff id once through the table, so stuff
"blanket" (93) and "cabinet" (98) become LVIS's blanket (110) and cabinet (181).
``original_masks`` gives the labels of the original code's mask script (ESSNet
``LVIS_COCO/generateMasks.py``), which remaps a stuff mask in place one table entry at a time,
so a stuff id whose new value is a key met later is mapped again: 93 -> 110 -> 1217 and
98 -> 181 -> 1283 (:func:`jaxscaleseg.data.builders.mappings.remap_in_table_order`). The two
configs differ in nothing else.

Memory: the JSONs (about 1 GB for LVIS train, similar for the stuff JSON) are never loaded
whole. They are streamed (``ijson``), their annotations written to an SQLite file grouped by
image in a temporary directory (``$TMPDIR``; about the JSONs' size on disk), and each image's
annotations read back when its example is built. An annotation whose category id is not an
LVIS id (1..1203) or a COCO-Stuff stuff id (92..183) makes its image a corrupt example, skipped
and counted like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import marshal
import posixpath
import sqlite3
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxscaleseg.data.builders import class_info, common, mappings

LVIS = {"train": ("lvis_v1_train.json", "lvis_v1_train.json.zip"),
        "validation": ("lvis_v1_val.json", "lvis_v1_val.json.zip")}  # fmt: skip
STUFF_ZIP = "stuff_annotations_trainval2017.zip"
STUFF_JSON = {"train2017": "stuff_train2017.json", "val2017": "stuff_val2017.json"}
IMAGES = {"train2017": "train2017.zip", "val2017": "val2017.zip"}
SOURCE_LVIS = "https://www.lvisdataset.org/dataset"
SOURCE_STUFF = "http://images.cocodataset.org/annotations/stuff_annotations_trainval2017.zip"
SOURCE_COCO = "http://images.cocodataset.org/zips/"
LVIS_IDS = range(1, 1204)

log = logging.getLogger(__name__)


def annotation_mask(segmentation, height: int, width: int, name: str) -> np.ndarray | None:
    """Decodes a COCO/LVIS segmentation (polygons, compressed or uncompressed RLE).

    Returns:
      uint8 ``[H, W]`` mask, or None for an annotation without a usable polygon.
    """
    from pycocotools import mask as mask_utils

    try:
        if isinstance(segmentation, list):
            polygons = [p for p in segmentation if len(p) >= 6]
            if not polygons:
                return None
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        elif isinstance(segmentation.get("counts"), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            counts = counts.encode("ascii") if isinstance(counts, str) else counts
            rle = {"size": segmentation["size"], "counts": counts}
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = mask_utils.decode(rle)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise common.CorruptExampleError(f"bad segmentation in {name} ({e})") from e
    if mask.shape != (height, width):
        raise common.CorruptExampleError(
            f"segmentation of {name} is {mask.shape}, not {height}x{width}"
        )
    return mask


def coco_lvis_class_names(lvis_categories) -> list[str]:
    """The 1284 class names: LVIS names for ids 1..1203 (``lvis_<id>`` where the JSON has none),
    COCO-Stuff stuff names for 1204..1284."""
    names = {int(c["id"]): str(c["name"]) for c in lvis_categories}
    out = [names.get(i, f"lvis_{i}") for i in range(1, 1204)]
    by_id = {v: k for k, v in mappings.stuff_to_coco_lvis().items() if v > 1203}
    for i in range(1204, mappings.COCO_LVIS_NUM_CLASSES + 1):
        out.append(class_info.COCO_STUFF_182_NAMES[by_id[i] - 1] if i in by_id else f"stuff_{i}")
    return out


def lvis_frequency(lvis_categories) -> list[str | None]:
    """LVIS's own frequency bin (its ``frequency`` field: ``r``, ``c`` or ``f``, from the number
    of training images) for train ids 0..1283; None for the stuff classes and for LVIS ids the
    JSON does not label, which evaluation bins by counting the training split."""
    letters = {int(c["id"]): c.get("frequency") for c in lvis_categories}
    return [letters.get(i) or None for i in range(1, mappings.COCO_LVIS_NUM_CLASSES + 1)]


@contextlib.contextmanager
def _open_json(path: Path, member: str) -> Iterator[Any]:
    """A binary stream of a JSON file, or of ``member`` when ``path`` is a zip."""
    if path.suffix == ".zip":
        archive = common.Archive(path)
        try:
            stream = archive.open(archive.find(member))
        except common.CorruptExampleError as e:
            raise common.CorruptArchiveError(f"cannot read JSON from {path} ({e})") from e
        with stream:
            yield stream
    else:
        with open(path, "rb") as stream:
            yield stream


def iter_json_array(path: Path, member: str, key: str) -> Iterator[Any]:
    """Streams the items of the top-level array ``key`` of a JSON file (or zip member), one at a
    time (``ijson``): memory stays that of one item, whatever the file's size.

    Numbers come back as ``int`` or ``float``. A missing ``key`` yields nothing.

    Raises:
      CorruptArchiveError: the JSON is malformed or truncated, naming the file.
    """
    import ijson  # the ``prepare`` extra

    with _open_json(path, member) as stream:
        try:
            yield from ijson.items(stream, f"{key}.item", use_float=True)
        except ijson.JSONError as e:
            raise common.CorruptArchiveError(f"cannot read JSON from {path} ({e})") from e


def _scalar(value: Any) -> Any:
    """A JSON value as SQLite can store it (containers as their text, kept for messages)."""
    if value is None or isinstance(value, int | float | str):
        return value
    return repr(value)


class AnnotationIndex:
    """COCO-format annotations grouped by image in an SQLite file, read one image at a time.

    Holds nothing in memory but SQLite's page cache; the segmentations are stored as
    ``marshal`` bytes of the JSON values, in the JSON's order.
    """

    def __init__(self, path: str | Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
            "CREATE TABLE ann (kind TEXT, image_id INTEGER, seq INTEGER, ann_id, category_id,"
            " segmentation BLOB);"
        )
        self._indexed = False

    def add(
        self, kind: str, annotations: Iterable[dict], image_ids: set[int] | None = None
    ) -> tuple[int, int]:
        """Stores annotations under ``kind`` (``"lvis"`` or ``"stuff"``).

        Args:
          kind: which JSON they come from.
          annotations: COCO-format annotation dicts, in the JSON's order.
          image_ids: keep only these images' annotations (None: all).

        Returns:
          ``(stored, unattributed)``: the second counts annotations whose ``image_id`` is not an
          integer (they belong to no example, so they are logged and dropped).
        """
        counts = [0, 0]

        def rows():
            for seq, ann in enumerate(annotations):
                image_id = ann.get("image_id") if isinstance(ann, dict) else None
                if not isinstance(image_id, int) or isinstance(image_id, bool):
                    counts[1] += 1
                    continue
                if image_ids is not None and image_id not in image_ids:
                    continue
                counts[0] += 1
                category, segmentation = ann.get("category_id"), ann.get("segmentation")
                yield (kind, image_id, seq, _scalar(ann.get("id")), _scalar(category),
                       marshal.dumps(segmentation))  # fmt: skip

        self._db.executemany("INSERT INTO ann VALUES (?, ?, ?, ?, ?, ?)", rows())
        self._db.commit()
        return counts[0], counts[1]

    def get(self, kind: str, image_id: int) -> list[tuple[Any, Any, Any]]:
        """``[(annotation id, category id, segmentation)]`` of one image, in the JSON's order."""
        if not self._indexed:
            self._db.execute("CREATE INDEX IF NOT EXISTS by_image ON ann (kind, image_id, seq)")
            self._indexed = True
        cursor = self._db.execute(
            "SELECT ann_id, category_id, segmentation FROM ann WHERE kind = ? AND image_id = ? "
            "ORDER BY seq",
            (kind, int(image_id)),
        )
        return [(a, c, marshal.loads(seg)) for a, c, seg in cursor]

    def close(self) -> None:
        self._db.close()


def _category(value: Any, valid: Iterable[int] | Mapping, what: str) -> int:
    """An annotation's category id, or CorruptExampleError naming ``what`` and the value."""
    if isinstance(value, int) and not isinstance(value, bool) and value in valid:
        return value
    raise common.CorruptExampleError(f"{what} has category id {value!r}, not a known id")


def image_member(image: dict) -> tuple[str, str]:
    """``(folder, member name)`` of a COCO image from its ``coco_url`` (or ``file_name``)."""
    url = str(image.get("coco_url") or image.get("file_name") or "")
    parts = url.split("/")
    if len(parts) >= 2 and parts[-2] in IMAGES:
        return parts[-2], f"{parts[-2]}/{parts[-1]}"
    raise common.CorruptExampleError(f"image {image.get('id')} has no COCO 2017 url: {url!r}")


@dataclasses.dataclass(eq=False)
class CocoLvisConfig(tfds.core.BuilderConfig):
    """``stuff_remap``: ``"table"`` (each stuff id mapped once) or ``"in_table_order"`` (the
    original mask script's in-place remap, see the module docstring)."""

    stuff_remap: str = "table"


def stuff_table(config_remap: str) -> Mapping[int, int]:
    """The stuff id -> COCO+LVIS id table a config uses."""
    table = mappings.stuff_to_coco_lvis()
    if config_remap == "table":
        return table
    if config_remap == "in_table_order":
        return mappings.remap_in_table_order(table)
    raise ValueError(f"unknown stuff_remap {config_remap!r}")


class SegCocoLvis(common.SegmentationBuilder):
    """COCO+LVIS: 1284 classes from LVIS v1 + COCO-Stuff 2017 stuff; 0 stored as void."""

    name = "seg_coco_lvis"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.lvisdataset.org/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put lvis_v1_train.json(.zip) and lvis_v1_val.json(.zip) ({SOURCE_LVIS}), {STUFF_ZIP} "
        f"({SOURCE_STUFF}; or its stuff_train2017.json and stuff_val2017.json) and the COCO 2017 "
        f"images train2017.zip and val2017.zip ({SOURCE_COCO}) in the manual directory."
    )
    BUILDER_CONFIGS = [
        CocoLvisConfig(
            name="lvis_ids",
            description="Stuff ids mapped once by the packaged table (blanket, cabinet: LVIS).",
        ),
        CocoLvisConfig(
            name="original_masks",
            description="Labels of the original ESSNet mask script (stuff 93 -> 1217, 98 -> 1283).",
            stuff_remap="in_table_order",
        ),
    ]

    def _class_info(self):
        names = coco_lvis_class_names([])
        return names, class_info.label_colormap(len(names))

    def _split_sources(self, dl_manager):
        needed = "the LVIS v1 JSONs, the COCO-Stuff stuff JSONs and COCO 2017 images"
        manual_dir = common.manual_dir_of(dl_manager, self.name, needed)
        # Check every file up front so a missing one is reported before hours of work.
        found = {}
        for names, source in [*((n, SOURCE_LVIS) for n in LVIS.values())] + [
            ((STUFF_ZIP, "stuff_train2017.json"), SOURCE_STUFF),
            ((STUFF_ZIP, "stuff_val2017.json"), SOURCE_STUFF),
            ((IMAGES["train2017"],), SOURCE_COCO),
            ((IMAGES["val2017"],), SOURCE_COCO),
        ]:
            found[names] = common.find_archive(manual_dir, names, dataset=self.name, source=source)
        images = {folder: common.Archive(found[(zip_name,)]) for folder, zip_name in IMAGES.items()}
        lvis = {split: (found[names], names[0]) for split, names in LVIS.items()}
        stuff = {
            folder: (found[(STUFF_ZIP, json_name)], f"annotations/{json_name}")
            for folder, json_name in STUFF_JSON.items()
        }
        categories = []
        for path, member in lvis.values():  # the train JSON's, else the validation JSON's
            categories = categories or list(iter_json_array(path, member, "categories"))
        self.info.metadata["class_names"] = coco_lvis_class_names(categories)
        self.info.metadata["class_frequency"] = lvis_frequency(categories)
        table = stuff_table(self.builder_config.stuff_remap)
        return {
            split: self._split_examples(split, lvis[split], stuff, images, table) for split in LVIS
        }

    def _split_examples(self, split, lvis_json, stuff_jsons, images, table):
        """The split's sources, after streaming its annotations into a temporary index."""
        with tempfile.TemporaryDirectory(prefix=f"{self.name}_{split}_") as tmp:
            entries, index = index_annotations(
                lvis_json, stuff_jsons, Path(tmp) / "annotations.sqlite", f"{self.name}/{split}"
            )
            try:
                for entry in entries:
                    yield self._source(entry, index, images, table)
            finally:
                index.close()

    @staticmethod
    def _source(entry, index, images, table) -> common.Source:
        image_id = entry["id"]
        try:
            if image_id is None:
                raise common.CorruptExampleError(f"image entry {entry['raw_id']} has no integer id")
            height, width = int(entry["height"]), int(entry["width"])
            folder, name = image_member(entry)
        except (common.CorruptExampleError, TypeError, ValueError) as e:
            error = e if isinstance(e, common.CorruptExampleError) else common.CorruptExampleError(
                f"image {entry['raw_id']} has no usable height/width ({e})"
            )  # fmt: skip

            def fail():
                raise error

            key = str(entry["raw_id"])
            return common.Source(key=key, name=key, load=fail)

        def load():
            masks = {"lvis": [], "stuff": []}
            for kind, valid in (("lvis", LVIS_IDS), ("stuff", table)):
                annotations = index.get(kind, image_id)
                what = f"{'LVIS' if kind == 'lvis' else 'stuff'} annotation"
                ids = [_category(c, valid, f"{what} {a} of {name}") for a, c, _ in annotations]
                for (_, _, segmentation), category_id in zip(annotations, ids, strict=True):
                    mask = annotation_mask(segmentation, height, width, f"{what} of {name}")
                    if mask is not None:
                        masks[kind].append((mask, category_id))
            label = mappings.compose_coco_lvis_label(
                (height, width), masks["lvis"], masks["stuff"], table
            )
            archive = images[folder]
            member = name if name in archive else archive.find(posixpath.basename(name))
            return common.make_example(archive.read(member), name, label, f"annotations of {name}")

        return common.Source(key=name, name=name, load=load)


def index_annotations(
    lvis_json: tuple[Path, str],
    stuff_jsons: Mapping[str, tuple[Path, str]],
    path: Path,
    what: str = "seg_coco_lvis",
) -> tuple[list[dict], AnnotationIndex]:
    """Streams one split's JSONs into an :class:`AnnotationIndex` at ``path``.

    Args:
      lvis_json: ``(file, zip member)`` of the split's LVIS JSON.
      stuff_jsons: ``{"train2017" | "val2017": (file, zip member)}`` of the stuff JSONs; only
        those of folders the split's images come from are read, and only their annotations of
        the split's images are kept.
      path: the SQLite file to create.
      what: names the split in log messages.

    Returns:
      ``(image entries sorted by id, the index)``; each entry holds ``id`` (None when not an
      integer), ``raw_id``, ``height``, ``width``, ``coco_url``, ``file_name``.
    """
    index = AnnotationIndex(path)
    try:
        entries = [_image_entry(im) for im in iter_json_array(*lvis_json, "images")]
        entries.sort(key=lambda e: (e["id"] is None, e["id"] or 0))
        ids = {e["id"] for e in entries if e["id"] is not None}
        kept, dropped = index.add("lvis", iter_json_array(*lvis_json, "annotations"))
        for folder in sorted({_folder(e) for e in entries} - {None}):
            stuff_path, member = stuff_jsons[folder]
            more = index.add("stuff", iter_json_array(stuff_path, member, "annotations"), ids)
            kept, dropped = kept + more[0], dropped + more[1]
    except BaseException:
        index.close()
        raise
    if dropped:
        log.warning("%s: dropped %d annotations without an integer image_id", what, dropped)
    log.info("%s: %d images, %d annotations indexed in %s", what, len(entries), kept, path)
    return entries, index


def _image_entry(image: Any) -> dict:
    """The fields of an LVIS image entry the builder uses (small, whatever else it holds)."""
    image = image if isinstance(image, dict) else {}
    raw_id = image.get("id")
    good = isinstance(raw_id, int) and not isinstance(raw_id, bool)
    entry = {"id": raw_id if good else None, "raw_id": raw_id}
    for key in ("height", "width", "coco_url", "file_name"):
        entry[key] = image.get(key)
    return entry


def _folder(entry: dict) -> str | None:
    try:
        return image_member(entry)[0]
    except common.CorruptExampleError:
        return None
