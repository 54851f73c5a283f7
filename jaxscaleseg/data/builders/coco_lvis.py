"""COCO+LVIS (1284 classes): LVIS v1 instances and COCO-Stuff 2017 stuff on COCO 2017 images.

Each label map paints the image's LVIS masks in annotation order (the first annotation owns an
overlapped pixel), then fills the pixels left with the COCO-Stuff stuff masks mapped by the
packaged ``coco_stuff_to_coco_lvis_1284.json``; what stays unpainted is void. COCO+LVIS ids
1..1284 are stored as train ids 0..1283 (LVIS ids keep their numbers, so stuff id 92 "banner" ->
LVIS id 50 -> train id 49). Preparing the train split loads the LVIS and stuff JSONs whole
(several GB of memory).
"""

from __future__ import annotations

import collections
import json
import posixpath
import warnings

import numpy as np

from jaxscaleseg.data.builders import class_info, common, mappings

LVIS = {"train": ("lvis_v1_train.json", "lvis_v1_train.json.zip"),
        "validation": ("lvis_v1_val.json", "lvis_v1_val.json.zip")}  # fmt: skip
STUFF_ZIP = "stuff_annotations_trainval2017.zip"
STUFF_JSON = {"train2017": "stuff_train2017.json", "val2017": "stuff_val2017.json"}
IMAGES = {"train2017": "train2017.zip", "val2017": "val2017.zip"}
SOURCE_LVIS = "https://www.lvisdataset.org/dataset"
SOURCE_STUFF = "http://images.cocodataset.org/annotations/stuff_annotations_trainval2017.zip"
SOURCE_COCO = "http://images.cocodataset.org/zips/"


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


def _load_json(manual_dir, names, *, dataset, source, member=None):
    path = common.find_archive(manual_dir, names, dataset=dataset, source=source)
    try:
        if path.suffix == ".zip":
            archive = common.Archive(path)
            return json.loads(archive.read(archive.find(member or names[0])))
        return json.loads(path.read_bytes())
    except (ValueError, common.CorruptExampleError) as e:
        raise common.CorruptArchiveError(f"cannot read JSON from {path} ({e})") from e


def group_by_image(annotations) -> dict[int, list]:
    """Annotations per image id, each list in the JSON's order."""
    grouped = collections.defaultdict(list)
    for ann in annotations:
        grouped[int(ann["image_id"])].append(ann)
    return grouped


def image_member(image: dict) -> tuple[str, str]:
    """``(folder, member name)`` of a COCO image from its ``coco_url`` (or ``file_name``)."""
    url = image.get("coco_url") or image.get("file_name", "")
    parts = url.split("/")
    if len(parts) >= 2 and parts[-2] in IMAGES:
        return parts[-2], f"{parts[-2]}/{parts[-1]}"
    raise common.CorruptExampleError(f"image {image.get('id')} has no COCO 2017 url: {url!r}")


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

    def _class_info(self):
        names = coco_lvis_class_names([])
        return names, class_info.label_colormap(len(names))

    def _split_sources(self, dl_manager):
        needed = "the LVIS v1 JSONs, the COCO-Stuff stuff JSONs and COCO 2017 images"
        manual_dir = common.manual_dir_of(dl_manager, self.name, needed)
        # Check every file up front so a missing one is reported before hours of work.
        for names, source in [*((n, SOURCE_LVIS) for n in LVIS.values())] + [
            ((STUFF_ZIP, "stuff_train2017.json"), SOURCE_STUFF),
            ((STUFF_ZIP, "stuff_val2017.json"), SOURCE_STUFF),
            ((IMAGES["train2017"],), SOURCE_COCO),
            ((IMAGES["val2017"],), SOURCE_COCO),
        ]:
            common.find_archive(manual_dir, names, dataset=self.name, source=source)
        images = {
            folder: common.Archive(common.find_archive(
                manual_dir, [zip_name], dataset=self.name, source=SOURCE_COCO
            ))
            for folder, zip_name in IMAGES.items()
        }  # fmt: skip
        stuff_cache: dict[str, dict[int, list]] = {}

        def stuff_annotations(folder: str, image_id: int) -> list:
            if folder not in stuff_cache:
                member = f"annotations/{STUFF_JSON[folder]}"
                data = _load_json(
                    manual_dir, (STUFF_ZIP, STUFF_JSON[folder]), dataset=self.name,
                    source=SOURCE_STUFF, member=member,
                )  # fmt: skip
                stuff_cache[folder] = group_by_image(data["annotations"])
            return stuff_cache[folder].get(image_id, [])

        table = mappings.stuff_to_coco_lvis()
        splits = {}
        categories = None
        for split, names in LVIS.items():
            lvis = _load_json(
                manual_dir, names, dataset=self.name, source=SOURCE_LVIS, member=names[0]
            )
            categories = categories or lvis.get("categories", [])
            per_image = group_by_image(lvis["annotations"])
            sources = []
            for image in sorted(lvis["images"], key=lambda im: int(im["id"])):
                sources.append(self._source(image, per_image, images, stuff_annotations, table))
            splits[split] = sources
        names = coco_lvis_class_names(categories or [])
        self.info.metadata["class_names"] = names
        self.info.metadata["class_frequency"] = lvis_frequency(categories or [])
        return splits

    @staticmethod
    def _source(image, per_image, images, stuff_annotations, table) -> common.Source:
        image_id = int(image["id"])
        height, width = int(image["height"]), int(image["width"])
        try:
            folder, name = image_member(image)
        except common.CorruptExampleError as e:
            error = e

            def fail():
                raise error

            return common.Source(key=str(image_id), name=str(image_id), load=fail)

        def load():
            lvis = []
            for ann in per_image.get(image_id, []):
                mask = annotation_mask(ann["segmentation"], height, width, f"LVIS {name}")
                if mask is not None:
                    lvis.append((mask, int(ann["category_id"])))
            stuff = []
            for ann in stuff_annotations(folder, image_id):
                mask = annotation_mask(ann["segmentation"], height, width, f"stuff {name}")
                if mask is not None:
                    stuff.append((mask, int(ann["category_id"])))
            label = mappings.compose_coco_lvis_label((height, width), lvis, stuff, table)
            archive = images[folder]
            member = name if name in archive else archive.find(posixpath.basename(name))
            return common.make_example(archive.read(member), name, label, f"annotations of {name}")

        return common.Source(key=name, name=name, load=load)
