"""Segments images with a trained model and writes pictures of the result.

    python -m jaxscaleseg.predict --config configs/synthetic.py --workdir workdirs/demo \\
        photo.jpg more_photos/ --output predictions [--legend] [--checkpoint latest] \\
        [--mode slide --crop_size 512,512] [--flip] [--scales common] \\
        [--search auto|exact|approximate|certified]

For each input image (files, or the images directly inside a directory) it writes into
``--output``:

* ``<stem>_labels.png``: the class ids (8-bit when C <= 256, else 16-bit grey);
* ``<stem>_color.png``: the ids coloured with the dataset palette;
* ``<stem>_overlay.png``: that mask blended over the image (``--alpha``);
* with ``--legend``, ``<stem>_legend.png``: the classes present, their colours and pixel share.

Images are read with Pillow and converted to RGB: grey and palette images are expanded,
16-bit grey is scaled to 8 bits, and an alpha channel is composited onto black (transparent
pixels become black, as a model never sees transparency), EXIF orientation is applied. An
unreadable image is reported on one line naming it and the others are still processed; the
exit status is then 1. A missing checkpoint ends with one ``error: ...`` line naming the
workdir and what was looked for. The work is :mod:`jaxscaleseg.prediction`.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxscaleseg import cli, inference, prediction
from jaxscaleseg.errors import UserError

for _name in ("config", "workdir", "output", *cli.INFERENCE_FLAGS):
    flags.declare_key_flag(_name)
_LEGEND = flags.DEFINE_boolean("legend", False, "Also write <stem>_legend.png.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "Weight of the colour mask in the overlay.")


def main(argv: list[str]) -> int:
    """Loads the model once and predicts every input named in ``argv``; returns the status."""
    cli.check_flags(
        used=("config", "workdir", "output", *cli.INFERENCE_FLAGS),
        required=("config", "workdir", "output"),
    )
    if len(argv) < 2:
        raise UserError("name at least one image or directory")
    settings = cli.settings_from_text(cli.CONFIG.value, **cli.inference_flags())
    files, failures = prediction.collect_inputs(argv[1:])
    predictor = inference.Predictor.from_workdir(
        cli.CONFIG.value, cli.WORKDIR.value, cli.CHECKPOINT.value, settings
    )
    _, unreadable = prediction.predict_files(
        predictor, files, cli.OUTPUT.value, legend=_LEGEND.value, alpha=_ALPHA.value
    )
    for message in failures + unreadable:
        print(f"error: {message}", file=sys.stderr)
    return 1 if failures or unreadable else 0


if __name__ == "__main__":
    cli.run(main)
