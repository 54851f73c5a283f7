"""PASCAL VOC 2012 segmentation (21 classes), optionally with SBD's ``train_aug`` split."""

from __future__ import annotations

import tensorflow_datasets as tfds

from jaxscaleseg.data.builders import class_info, common, mappings

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
VOC_SOURCE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_ARCHIVES = ("benchmark.tgz", "benchmark.tar.gz", "benchmark.tar")
SBD_SOURCE = (
    "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz"
)


def _ids(text: bytes) -> list[str]:
    return [line.strip() for line in text.decode().splitlines() if line.strip()]


def train_aug_ids(voc_train, voc_val, sbd_train, sbd_val) -> list[str]:
    """The 10 582 ``train_aug`` ids: SBD train+val and VOC train, minus VOC val, sorted."""
    return sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))


def read_sbd(path) -> tuple[dict[str, bytes], list[str], list[str]]:
    """Reads SBD's class masks and id lists in one pass over the (compressed) archive.

    Returns:
      ``({id: .mat bytes}, train ids, val ids)`` from ``benchmark_RELEASE/dataset/``.
    """
    archive = common.Archive(path)
    mats, lists = {}, {}
    for name, data in archive.iter_members(
        lambda n: (
            "/dataset/cls/" in n
            and n.endswith(".mat")
            or n.endswith(("/dataset/train.txt", "/dataset/val.txt"))
        )
    ):
        base = name.rsplit("/", 1)[1]
        if base.endswith(".mat"):
            mats[base[: -len(".mat")]] = data
        else:
            lists[base] = _ids(data)
    if "train.txt" not in lists or "val.txt" not in lists or not mats:
        raise common.CorruptArchiveError(
            f"{path} lacks benchmark_RELEASE/dataset/{{cls/*.mat,train.txt,val.txt}}"
        )
    return mats, lists["train.txt"], lists["val.txt"]


def sbd_label(mat_bytes: bytes, name: str):
    """SBD ``GTcls.Segmentation`` (0..20) as uint16 train ids."""
    mat = common.load_mat(mat_bytes, name)
    try:
        raw = mat["GTcls"].Segmentation
    except (KeyError, AttributeError):
        raise common.CorruptExampleError(f"{name} has no GTcls.Segmentation") from None
    return mappings.pascal_voc_to_train_ids(raw)


class SegPascalVoc(common.SegmentationBuilder):
    """PASCAL VOC 2012: 21 classes (0 = background), 255 stored as void.

    Configs: ``voc2012`` (train 1 464 / validation 1 449) and ``voc2012_aug`` (adds the
    10 582-image ``train_aug`` split from SBD; a VOC label is used where VOC has one, else SBD's).
    """

    name = "seg_pascal_voc"
    DESCRIPTION = __doc__
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {VOC_ARCHIVE} (from {VOC_SOURCE}) in the manual directory; for the voc2012_aug "
        f"config also SBD's benchmark.tgz (from {SBD_SOURCE})."
    )
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="voc2012", description="VOC 2012 train / validation."),
        tfds.core.BuilderConfig(
            name="voc2012_aug", description="VOC 2012 plus SBD: train_aug / train / validation."
        ),
    ]

    def _class_info(self):
        names = class_info.PASCAL_VOC_CLASS_NAMES
        return names, class_info.label_colormap(len(names))

    def _split_sources(self, dl_manager):
        aug = self.builder_config.name == "voc2012_aug"
        needed = VOC_ARCHIVE + (" and benchmark.tgz (SBD)" if aug else "")
        manual_dir = common.manual_dir_of(dl_manager, self.name, needed)
        voc_path = common.find_archive(
            manual_dir, [VOC_ARCHIVE], dataset=self.name, source=VOC_SOURCE
        )
        sbd_path = None
        if aug:
            sbd_path = common.find_archive(
                manual_dir, SBD_ARCHIVES, dataset=f"{self.name}/voc2012_aug", source=SBD_SOURCE
            )
        voc = common.Archive(voc_path)
        root = voc.find("VOC2012/ImageSets/Segmentation/train.txt").rsplit("ImageSets/", 1)[0]
        members = set(voc.names)
        voc_lists = {
            s: _ids(voc.read(f"{root}ImageSets/Segmentation/{s}.txt")) for s in ("train", "val")
        }
        sbd_mats = {}
        if sbd_path is not None:
            sbd_mats, sbd_train, sbd_val = read_sbd(sbd_path)

        def source(image_id: str) -> common.Source:
            name = f"{root}JPEGImages/{image_id}.jpg"
            voc_label = f"{root}SegmentationClass/{image_id}.png"

            def load():
                if voc_label in members or image_id not in sbd_mats:
                    raw = common.label_png(voc.read(voc_label), voc_label)
                    label, label_name = mappings.pascal_voc_to_train_ids(raw), voc_label
                else:
                    label_name = f"{sbd_path.name}:cls/{image_id}.mat"
                    label = sbd_label(sbd_mats[image_id], label_name)
                return common.make_example(voc.read(name), name, label, label_name)

            return common.Source(key=image_id, name=name, load=load)

        splits = {
            "train": [source(i) for i in voc_lists["train"]],
            "validation": [source(i) for i in voc_lists["val"]],
        }
        if aug:
            ids = train_aug_ids(voc_lists["train"], voc_lists["val"], sbd_train, sbd_val)
            splits["train_aug"] = [source(i) for i in ids]
        return splits
