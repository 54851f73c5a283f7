"""Prints Markdown tables of the models' shapes and parameter counts (no compute, eval_shape only).

    python -m jaxscaleseg.models.summary [--size 512 512] [--classes 150 3688] [--dims 12] \\
        [--backbones resnet50 resnet101 mobilenet_v2]

Table 1: each backbone's feature shapes at output stride 16 and 8, and its parameter count.
Table 2: each (backbone, head, C, D): output shapes for one image and the parameter counts of
the whole model and of its parts.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxscaleseg.models import build_backbone, build_model

BACKBONES = ("resnet50", "resnet101", "mobilenet_v2")


def count(tree) -> int:
    """Number of scalars in a pytree of arrays or shape structs."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shape(s) -> str:
    return "[" + ",".join(str(d) for d in s.shape) + "]"


def backbone_rows(height: int, width: int, backbones: Sequence[str] = BACKBONES) -> list[str]:
    """Markdown rows: backbone | params | low-level / high-level shapes at OS 16 and 8."""
    rows = [
        f"Backbone features for an input [1,{height},{width},3]:",
        "",
        "| backbone | params | low-level (stride 4) | high-level OS 16 | high-level OS 8 |",
        "|---|---:|---|---|---|",
    ]
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    for name in backbones:
        shapes = {}
        for os_ in (16, 8):
            module = build_backbone(name, output_stride=os_)
            variables = jax.eval_shape(module.init, jax.random.key(0), images)
            shapes[os_] = jax.eval_shape(module.apply, variables, images)
        rows.append(
            f"| {name} | {count(variables['params']):,} | {_shape(shapes[16][0])} | "
            f"{_shape(shapes[16][1])} | {_shape(shapes[8][1])} |"
        )
    return rows


def model_rows(
    height: int,
    width: int,
    classes: Sequence[int],
    dims: Sequence[int],
    backbones: Sequence[str] = BACKBONES,
) -> list[str]:
    """Markdown rows: backbone | head | C | D | outputs | params (total, backbone, rest)."""
    rows = [
        f"DeepLabV3+ (output stride 16 or 8: same parameters) for an input [1,{height},{width},3]:",
        "",
        "| backbone | head | C | D | outputs | params | "
        "backbone | ASPP + decoder | head conv | class table |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    for name in backbones:
        for c in classes:
            for head, d in [("softmax", None)] + [("embedding", d) for d in dims]:
                model = build_model(name, head=head, num_classes=c, embedding_dim=d or 12)
                init = functools.partial(model.init, train=False)
                variables = jax.eval_shape(init, jax.random.key(0), images)
                out = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
                params = variables["params"]
                outputs = ", ".join(f"{k} {_shape(v)}" for k, v in sorted(out.items()))
                table = count(params.get("class_embedding", []))
                rows.append(
                    f"| {name} | {head} | {c:,} | {d or '–'} | {outputs} | {count(params):,} | "
                    f"{count(params['backbone']):,} | "
                    f"{count(params['aspp']) + count(params['decoder']):,} | "
                    f"{count(params['head_conv']):,} | {table:,} |"
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the two tables."""
    parser = argparse.ArgumentParser(prog="python -m jaxscaleseg.models.summary")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, nargs="+", default=(150, 3688))
    parser.add_argument("--dims", type=int, nargs="+", default=(12,))
    parser.add_argument("--backbones", nargs="+", default=BACKBONES, choices=BACKBONES)
    args = parser.parse_args(argv)
    h, w = args.size
    print("\n".join(backbone_rows(h, w, args.backbones)))
    print()
    print("\n".join(model_rows(h, w, args.classes, args.dims, args.backbones)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
