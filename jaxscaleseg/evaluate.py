"""Evaluates a checkpoint over a whole split at full resolution.

    python -m jaxscaleseg.evaluate --config configs/synthetic.py --workdir workdirs/demo \\
        [--checkpoint best|latest|STEP] [--split validation] \\
        [--mode slide --crop_size 512,512 --stride 341,341] [--flip] [--scales common] \\
        [--search auto|exact|approximate|certified]

Every labelled pixel of every image counts once, at the image's own size (the padding the
evaluation pipeline adds to form batches is cropped away before inference). Inference is
whole-image or sliding-window, optionally with horizontal-flip and multi-scale test-time
augmentation (``--scales common`` = 0.5, 0.75, ..., 1.75), merged in embedding space for the
embedding head (see :mod:`jaxscaleseg.inference`). Defaults come from the config's optional
``inference`` section (``mode``, ``crop_size``, ``stride``, ``flip``, ``scales``, ``search``),
flags override them. ``--search approximate`` assigns classes through the stride-4 union
search (``knn_union.approximate_assign``) instead of the exact nearest class;
``--search certified`` gives the exact nearest class through that search where a bound proves
it (``knn_certified.certified_assign``), faster than the plain exact search at 100 000 classes;
``--search auto``, the default, is the certified search from 10 000 classes on (on CPU) and the
exact one below (``inference.resolve_search``): the exact assignment either way.

Prints aAcc, mIoU, mAcc, fwIoU, the mIoU over the rare, common and frequent classes (LVIS's
bins: in 1-10, 11-100 or more training images; LVIS's own labels for COCO+LVIS; a class in no
training image is rare) and the per-class IoU table sorted by IoU, and writes
``eval_<split>_<checkpoint>[_<settings>].json`` and ``.csv`` (with each class's bin) in the
workdir (the work is :func:`jaxscaleseg.evaluation.run`). The bins are computed once per
workdir and kept in its ``class_frequency.json``. User errors (missing checkpoint, dataset not
prepared, bad flags) end with one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

from absl import flags

from jaxscaleseg import cli, evaluation

for _name in ("config", "workdir", *cli.INFERENCE_FLAGS):
    flags.declare_key_flag(_name)
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: dataset.eval_split).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Images per batch (default: dataset.eval_batch_size)."
)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", 0, "Evaluate only the first N images (0: the whole split)."
)
_PRINT_CLASSES = flags.DEFINE_integer(
    "print_classes", 40, "Classes printed (best and worst halves; -1: all)."
)


def main(argv: list[str]) -> int:
    """Runs :func:`jaxscaleseg.evaluation.run` with the parsed flags; returns the status."""
    cli.refuse_arguments(argv)
    cli.check_flags(
        used=("config", "workdir", *cli.INFERENCE_FLAGS), required=("config", "workdir")
    )
    evaluation.run(
        cli.CONFIG.value,
        cli.WORKDIR.value,
        checkpoint=cli.CHECKPOINT.value,
        split=_SPLIT.value,
        settings=cli.settings_from_text(cli.CONFIG.value, **cli.inference_flags()),
        batch_size=_BATCH_SIZE.value,
        max_examples=_MAX_EXAMPLES.value,
        print_classes=_PRINT_CLASSES.value,
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
