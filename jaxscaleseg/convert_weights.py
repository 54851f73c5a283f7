"""Converts a torchvision ImageNet checkpoint into backbone variables for ``model.pretrained``.

    python -m jaxscaleseg.convert_weights --arch resnet101 --input resnet101.pth \\
        --output resnet101_imagenet.npz

The input is a whole torchvision model's state dict (``.pth`` read without torch, ``.npz`` or
``.safetensors``; see :mod:`jaxscaleseg.models.pretrained`); the output an ``.npz`` of the
backbone's variables. A bad file ends with one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import jax
from absl import flags

from jaxscaleseg import cli
from jaxscaleseg.errors import UserError
from jaxscaleseg.models import pretrained

flags.declare_key_flag("output")
_ARCH = flags.DEFINE_enum("arch", None, list(pretrained.ARCHS), "The torchvision model.")
_INPUT = flags.DEFINE_string(
    "input", None, "The torchvision state dict (.pth, .npz, .safetensors)."
)


def main(argv: list[str]) -> int:
    """Converts ``--input`` into ``--output``; returns the exit status."""
    cli.refuse_arguments(argv)
    cli.check_flags(used=("output",), required=("output",))
    if _ARCH.value is None or _INPUT.value is None:
        raise UserError("--arch and --input required (see --help)")
    try:
        variables = pretrained.import_torchvision_backbone(_INPUT.value, _ARCH.value)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from e
    pretrained.save_backbone_variables(variables, cli.OUTPUT.value)
    counts = {
        c: sum(v.size for v in jax.tree.leaves(variables[c])) for c in ("params", "batch_stats")
    }
    print(
        f"wrote {cli.OUTPUT.value}: {_ARCH.value} backbone, {counts['params']:,} parameters, "
        f"{counts['batch_stats']:,} batch statistics"
    )
    return 0


if __name__ == "__main__":
    cli.run(main)
