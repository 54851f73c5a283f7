"""COCO-Stuff: 164k (2017 images, 171 classes) and 10k (v1.1, 171- or 182-class space)."""

from __future__ import annotations

import dataclasses
import posixpath

import numpy as np
import tensorflow_datasets as tfds

from jaxscaleseg.data.builders import class_info, common, mappings

MAPS_164K = "stuffthingmaps_trainval2017.zip"
IMAGES_2017 = {"train": "train2017.zip", "validation": "val2017.zip"}
ARCHIVE_10K = "cocostuff-10k-v1.1.zip"
SOURCE_164K = "https://github.com/nightrome/cocostuff (stuffthingmaps_trainval2017.zip)"
SOURCE_COCO = "http://images.cocodataset.org/zips/"
SOURCE_10K = "https://github.com/nightrome/cocostuff10k (cocostuff-10k-v1.1.zip)"


@dataclasses.dataclass(eq=False)
class CocoStuffConfig(tfds.core.BuilderConfig):
    """``variant``: "164k" or "10k"; ``num_classes``: 171 or 182."""

    variant: str = "164k"
    num_classes: int = 171


def coco_stuff_164k_sources(
    maps: common.Archive, images: common.Archive, folder: str, num_classes: int
) -> list[common.Source]:
    """Examples of ``folder`` (``train2017``/``val2017``): ``<folder>/<id>.png`` label maps
    paired with ``<folder>/<id>.jpg`` in the COCO image zip."""
    image_names = {posixpath.basename(n): n for n in images.names if n.endswith(".jpg")}
    labels = sorted(n for n in maps.names if f"{folder}/" in n and n.endswith(".png"))
    sources = []
    for label_name in labels:
        stem = posixpath.splitext(posixpath.basename(label_name))[0]
        name = image_names.get(f"{stem}.jpg", f"{folder}/{stem}.jpg")

        def load(name=name, label_name=label_name):
            raw = common.label_png(maps.read(label_name), label_name)
            label = mappings.coco_stuff_164k_to_train_ids(raw, num_classes)
            return common.make_example(images.read(name), name, label, label_name)

        sources.append(common.Source(key=name, name=name, load=load))
    return sources


def coco_stuff_10k_label(mat_bytes: bytes, name: str, num_classes: int) -> np.ndarray:
    """The ``S`` map of a COCO-Stuff 10k ``.mat`` (0 = unlabeled, 1..182) as train ids."""
    mat = common.load_mat(mat_bytes, name)
    if "S" not in mat:
        raise common.CorruptExampleError(f"{name} has no variable S")
    return mappings.coco_stuff_ids_to_train_ids(np.asarray(mat["S"]), num_classes)


def coco_stuff_10k_sources(
    archive: common.Archive, list_name: str, num_classes: int
) -> list[common.Source]:
    """Examples listed in ``imageLists/<list_name>.txt``: ``images/<id>.jpg`` with
    ``annotations/<id>.mat``."""
    list_member = archive.find(f"imageLists/{list_name}.txt")
    root = list_member.rsplit("imageLists/", 1)[0]
    ids = [s.strip() for s in archive.read(list_member).decode().splitlines() if s.strip()]
    sources = []
    for image_id in ids:
        name = f"{root}images/{image_id}.jpg"
        label_name = f"{root}annotations/{image_id}.mat"

        def load(name=name, label_name=label_name):
            label = coco_stuff_10k_label(archive.read(label_name), label_name, num_classes)
            return common.make_example(archive.read(name), name, label, label_name)

        sources.append(common.Source(key=name, name=name, load=load))
    return sources


class SegCocoStuff(common.SegmentationBuilder):
    """COCO-Stuff semantic segmentation; unlabeled pixels stored as void.

    Configs: ``stuff164k`` (118k train / 5k validation, 171 classes: the 11 never-annotated COCO
    thing ids dropped), ``stuff10k_171`` and ``stuff10k_182`` (9k train / 1k test in the
    171-class space, or in the original code's 182-class space).
    """

    name = "seg_coco_stuff"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://github.com/nightrome/cocostuff"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"stuff164k: put {MAPS_164K} ({SOURCE_164K}) and the COCO 2017 images train2017.zip "
        f"and val2017.zip ({SOURCE_COCO}) in the manual directory. stuff10k_*: put "
        f"{ARCHIVE_10K} ({SOURCE_10K}) there."
    )
    BUILDER_CONFIGS = [
        CocoStuffConfig(name="stuff164k", description="COCO-Stuff 164k, 171 classes."),
        CocoStuffConfig(
            name="stuff10k_171", variant="10k", num_classes=171,
            description="COCO-Stuff 10k v1.1, 171 classes.",
        ),
        CocoStuffConfig(
            name="stuff10k_182", variant="10k", num_classes=182,
            description="COCO-Stuff 10k v1.1, 182 classes (ids 1..182, as the original code).",
        ),
    ]  # fmt: skip

    def _class_info(self):
        if self.builder_config.num_classes == 182:
            names = class_info.COCO_STUFF_182_NAMES
        else:
            names = class_info.COCO_STUFF_171_NAMES
        return names, class_info.label_colormap(len(names))

    def _split_sources(self, dl_manager):
        config = self.builder_config
        if config.variant == "10k":
            manual_dir = common.manual_dir_of(dl_manager, self.name, ARCHIVE_10K)
            path = common.find_archive(
                manual_dir, [ARCHIVE_10K], dataset=self.name, source=SOURCE_10K
            )
            archive = common.Archive(path)
            return {
                split: coco_stuff_10k_sources(archive, split, config.num_classes)
                for split in ("train", "test")
            }
        needed = f"{MAPS_164K}, train2017.zip and val2017.zip"
        manual_dir = common.manual_dir_of(dl_manager, self.name, needed)
        maps = common.Archive(
            common.find_archive(manual_dir, [MAPS_164K], dataset=self.name, source=SOURCE_164K)
        )
        splits = {}
        for split, zip_name in IMAGES_2017.items():
            images = common.Archive(
                common.find_archive(manual_dir, [zip_name], dataset=self.name, source=SOURCE_COCO)
            )
            folder = zip_name[: -len(".zip")]
            splits[split] = coco_stuff_164k_sources(maps, images, folder, config.num_classes)
        return splits
