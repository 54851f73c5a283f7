"""ADE20K SceneParsing (150 classes) from ``ADEChallengeData2016.zip``."""

from __future__ import annotations

import posixpath

from jaxscaleseg.data.builders import class_info, common, mappings

ARCHIVE = "ADEChallengeData2016.zip"
SOURCE = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
_SPLITS = {"train": "training", "validation": "validation"}


def ade20k_sources(archive: common.Archive, folder: str) -> list[common.Source]:
    """The examples of one ADE20K folder (``training`` or ``validation``), sorted by name.

    Images are ``<root>/images/<folder>/ADE_*.jpg``, annotations the same path under
    ``annotations`` with ``.png``; an image without its annotation is a corrupt example.
    """
    marker = f"images/{folder}/"
    names = sorted(n for n in archive.names if marker in n and n.lower().endswith(".jpg"))
    sources = []
    for name in names:
        root, rest = name.split(marker, 1)
        label_name = f"{root}annotations/{folder}/{posixpath.splitext(rest)[0]}.png"

        def load(name=name, label_name=label_name):
            raw = common.label_png(archive.read(label_name), label_name)
            label = mappings.ade20k_to_train_ids(raw)
            return common.make_example(archive.read(name), name, label, label_name)

        sources.append(common.Source(key=name, name=name, load=load))
    return sources


class SegAde20k(common.SegmentationBuilder):
    """ADE20K SceneParsing: 150 classes, annotation 0 stored as void; 20 210 / 2 000 images."""

    name = "seg_ade20k"
    DESCRIPTION = __doc__
    HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {ARCHIVE} (from {SOURCE}) in the manual directory."

    def _class_info(self):
        return class_info.ADE20K_CLASS_NAMES, class_info.ADE20K_PALETTE

    def _split_sources(self, dl_manager):
        manual_dir = common.manual_dir_of(dl_manager, self.name, ARCHIVE)
        path = common.find_archive(manual_dir, [ARCHIVE], dataset=self.name, source=SOURCE)
        archive = common.Archive(path)
        splits = {split: ade20k_sources(archive, folder) for split, folder in _SPLITS.items()}
        for split, sources in splits.items():
            if not sources:
                raise common.CorruptArchiveError(
                    f"{path} has no images/{_SPLITS[split]}/*.jpg: is it {ARCHIVE}?"
                )
        return splits
