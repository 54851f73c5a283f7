"""Prepares one of the paper's datasets as TFDS array_record files.

Usage::

    python -m jaxscaleseg.data.prepare ade20k --manual_dir ~/archives --data_dir ~/tfds
    python -m jaxscaleseg.data.prepare coco_stuff --config stuff10k_182 \\
        --manual_dir ~/archives --data_dir ~/tfds

Names: ade20k, cityscapes, pascal_voc (configs voc2012, voc2012_aug), coco_stuff (configs
stuff164k, stuff10k_171, stuff10k_182), coco_lvis; the TFDS names (``seg_ade20k``...) work
too. The archives stay as downloaded (nothing is extracted). Missing or unreadable archives and
too many corrupt images end with a one-line error and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from jaxscaleseg.data import builders
from jaxscaleseg.data.builders import common


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


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxscaleseg.data.prepare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", help=f"one of {', '.join(builders.BUILDERS)}")
    parser.add_argument("--config", default=None, help="builder config name")
    parser.add_argument("--manual_dir", required=True, help="directory with the archives")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write")
    parser.add_argument(
        "--max_corrupt_fraction",
        type=float,
        default=common.DEFAULT_MAX_CORRUPT_FRACTION,
        help="largest share of a split's examples that may be skipped as corrupt",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        builder = prepare(
            args.name,
            manual_dir=args.manual_dir,
            data_dir=args.data_dir,
            config=args.config,
            max_corrupt_fraction=args.max_corrupt_fraction,
        )
    except (
        FileNotFoundError,
        ValueError,  # unknown name/config, CorruptArchiveError, CorruptDataError
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = builder.info
    print(f"{info.full_name} prepared in {builder.data_dir}")
    for split, split_info in sorted(info.splits.items()):
        print(f"  {split}: {split_info.num_examples} examples")
    print(f"  {len(info.metadata['class_names'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
