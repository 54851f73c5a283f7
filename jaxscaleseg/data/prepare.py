"""Prepares one of the paper's datasets as TFDS array_record files.

Usage::

    python -m jaxscaleseg.data.prepare ade20k --manual_dir ~/archives --data_dir ~/tfds
    python -m jaxscaleseg.data.prepare coco_stuff --builder_config stuff10k_182 \\
        --manual_dir ~/archives --data_dir ~/tfds

Names: ade20k, cityscapes, pascal_voc (builder configs voc2012, voc2012_aug), coco_stuff
(stuff164k, stuff10k_171, stuff10k_182), coco_lvis; the TFDS names (``seg_ade20k``...) work
too. The archives stay as downloaded (nothing is extracted). Missing or unreadable archives and
too many corrupt images end with a one-line error and exit status 1.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from absl import flags

from jaxscaleseg import cli
from jaxscaleseg.data import builders
from jaxscaleseg.data.builders import common
from jaxscaleseg.errors import UserError

_BUILDER_CONFIG = flags.DEFINE_string(
    "builder_config", None, "Builder config name, for the datasets that have several."
)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Directory holding the archives.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory to write.")
_MAX_CORRUPT = flags.DEFINE_float(
    "max_corrupt_fraction",
    common.DEFAULT_MAX_CORRUPT_FRACTION,
    "Largest share of a split's examples that may be skipped as corrupt.",
)


def prepare(
    name: str,
    *,
    manual_dir: str,
    data_dir: str,
    config: str | None = None,
    max_corrupt_fraction: float = common.DEFAULT_MAX_CORRUPT_FRACTION,
) -> tfds.core.DatasetBuilder:
    """Builds the dataset ``name`` from the archives in ``manual_dir`` into ``data_dir``.

    Args:
      name: short name (``ade20k``) or TFDS name (``seg_ade20k``).
      manual_dir: directory holding the downloaded archives.
      data_dir: TFDS data directory the array_record files are written to.
      config: builder config name, for the datasets that have several (default: the first).
      max_corrupt_fraction: share of a split's examples that may be skipped as corrupt.

    Returns:
      the prepared builder (``builder.info.splits`` holds the counts).

    Raises:
      FileNotFoundError, CorruptArchiveError, CorruptDataError: see
        :mod:`jaxscaleseg.data.builders.common`.
    """
    registered = builders.tfds_name(name)
    builder_cls = next(b for b in builders.BUILDERS.values() if b.name == registered)
    configs = [c.name for c in builder_cls.BUILDER_CONFIGS]
    if config and config not in configs:
        offered = ", ".join(configs) if configs else "none"
        raise ValueError(f"{builder_cls.name} has no config {config!r}; configs: {offered}")
    kwargs = {"config": config} if config else {}
    builder = builder_cls(
        data_dir=data_dir,
        file_format="array_record",
        max_corrupt_fraction=max_corrupt_fraction,
        **kwargs,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def main(argv: list[str]) -> int:
    """Prepares the dataset named in ``argv`` with the parsed flags; returns the status."""
    cli.check_flags(used=())
    if len(argv) != 2:
        raise UserError(f"name one dataset: {', '.join(builders.BUILDERS)} (see --help)")
    if _MANUAL_DIR.value is None or _DATA_DIR.value is None:
        raise UserError("--manual_dir and --data_dir required (see --help)")
    try:
        builder = prepare(
            argv[1],
            manual_dir=_MANUAL_DIR.value,
            data_dir=_DATA_DIR.value,
            config=_BUILDER_CONFIG.value,
            max_corrupt_fraction=_MAX_CORRUPT.value,
        )
    except (FileNotFoundError, ValueError) as e:  # unknown name/config, corrupt archives
        raise UserError(str(e)) from e
    info = builder.info
    print(f"{info.full_name} prepared in {builder.data_dir}")
    for split, split_info in sorted(info.splits.items()):
        print(f"  {split}: {split_info.num_examples} examples")
    print(f"  {len(info.metadata['class_names'])} classes")
    return 0


if __name__ == "__main__":
    cli.run(main)
