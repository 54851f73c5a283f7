"""Cityscapes fine annotations (19 train ids) from the official trainvaltest zips."""

from __future__ import annotations

from jaxscaleseg.data.builders import class_info, common, mappings

IMAGES = "leftImg8bit_trainvaltest.zip"
LABELS = "gtFine_trainvaltest.zip"
SOURCE = "https://www.cityscapes-dataset.com/downloads/ (login needed)"
_SPLITS = {"train": "train", "validation": "val"}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def cityscapes_sources(
    images: common.Archive, labels: common.Archive, folder: str
) -> list[common.Source]:
    """The examples of one split folder (``train``/``val``), sorted by name.

    Images are ``leftImg8bit/<folder>/<city>/<stem>_leftImg8bit.png``, labels
    ``gtFine/<folder>/<city>/<stem>_gtFine_labelIds.png``.
    """
    label_names = {}
    marker = f"gtFine/{folder}/"
    for name in labels.names:
        if marker in name and name.endswith(_LABEL_SUFFIX):
            label_names[name.split(marker, 1)[1][: -len(_LABEL_SUFFIX)]] = name
    marker = f"leftImg8bit/{folder}/"
    names = sorted(n for n in images.names if marker in n and n.endswith(_IMAGE_SUFFIX))
    sources = []
    for name in names:
        stem = name.split(marker, 1)[1][: -len(_IMAGE_SUFFIX)]
        label_name = label_names.get(stem, f"gtFine/{folder}/{stem}{_LABEL_SUFFIX}")

        def load(name=name, label_name=label_name):
            raw = common.label_png(labels.read(label_name), label_name)
            label = mappings.cityscapes_label_ids_to_train_ids(raw)
            return common.make_example(images.read(name), name, label, label_name)

        sources.append(common.Source(key=name, name=name, load=load))
    return sources


class SegCityscapes(common.SegmentationBuilder):
    """Cityscapes fine: label ids mapped to the 19 train ids, the rest void; 2 975 / 500."""

    name = "seg_cityscapes"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.cityscapes-dataset.com/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {IMAGES} and {LABELS} (from {SOURCE}) in the manual directory."
    )

    def _class_info(self):
        return class_info.CITYSCAPES_CLASS_NAMES, class_info.CITYSCAPES_PALETTE

    def _split_sources(self, dl_manager):
        needed = f"{IMAGES} and {LABELS}"
        manual_dir = common.manual_dir_of(dl_manager, self.name, needed)
        paths = [
            common.find_archive(manual_dir, [f], dataset=self.name, source=SOURCE)
            for f in (IMAGES, LABELS)
        ]
        images, labels = (common.Archive(p) for p in paths)
        splits = {s: cityscapes_sources(images, labels, f) for s, f in _SPLITS.items()}
        for split, sources in splits.items():
            if not sources:
                raise common.CorruptArchiveError(
                    f"{paths[0]} has no leftImg8bit/{_SPLITS[split]}/*{_IMAGE_SUFFIX}"
                )
        return splits
