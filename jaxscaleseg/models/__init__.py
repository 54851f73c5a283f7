"""DeepLabV3+ models: ResNet-50/101 and MobileNetV2 backbones, softmax and embedding heads.

The entry point is :func:`build_model`::

    model = build_model("resnet101", head="embedding", num_classes=3688, embedding_dim=12)
    variables = model.init({"params": key}, images, train=False)
    out, updates = model.apply(
        variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": key}
    )
    out["pixel_embedding"]  # [B, H, W, D] float32
    out["class_embedding"]  # [C, D] float32, rows of unit length

Variables have the collections ``params`` and ``batch_stats``; the backbone lives under the
top-level key ``backbone`` and the class table is the top-level param ``class_embedding``.
ImageNet weights for the backbone: :mod:`jaxscaleseg.models.pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscaleseg.models.deeplabv3plus import HEADS, DeepLabV3Plus, l2_normalize
from jaxscaleseg.models.layers import Dtype
from jaxscaleseg.models.mobilenet_v2 import MobileNetV2
from jaxscaleseg.models.resnet import ResNet, resnet
from jaxscaleseg.models.tiny import TinyBackbone

BACKBONES = ("resnet50", "resnet101", "mobilenet_v2", "tiny")
OUTPUT_STRIDES = (8, 16)
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

__all__ = [
    "ATROUS_RATES",
    "BACKBONES",
    "HEADS",
    "OUTPUT_STRIDES",
    "DeepLabV3Plus",
    "MobileNetV2",
    "ResNet",
    "TinyBackbone",
    "build_backbone",
    "build_model",
    "first_shape_difference",
    "l2_normalize",
]


def build_backbone(
    name: str,
    *,
    output_stride: int = 16,
    dtype: Dtype = jnp.float32,
    bn_momentum: float = 0.99,
    center_embedding: bool = False,
) -> nn.Module:
    """Builds a backbone returning ``(low_level, high_level)`` features.

    Args:
      name: one of :data:`BACKBONES`.
      output_stride: stride of the high-level features (8, 16, or 32 for the undilated net).
      dtype: computation dtype (parameters stay float32).
      bn_momentum: BatchNorm running-average decay (flax convention; PyTorch's 0.1 is 0.9).

    Returns:
      An unbound flax module.
    """
    if name in ("resnet50", "resnet101"):
        return resnet(name, output_stride=output_stride, bn_momentum=bn_momentum, dtype=dtype)
    if name == "mobilenet_v2":
        return MobileNetV2(output_stride=output_stride, bn_momentum=bn_momentum, dtype=dtype)
    if name == "tiny":
        return TinyBackbone(output_stride=output_stride, bn_momentum=bn_momentum, dtype=dtype)
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def build_model(
    backbone: str,
    *,
    head: str,
    num_classes: int,
    embedding_dim: int = 12,
    output_stride: int = 16,
    dtype: Dtype = jnp.float32,
    separable: bool = False,
    bn_momentum: float = 0.99,
    center_embedding: bool = False,
    decoder_bn_momentum: float | None = None,
    tiny_width: int = 8,
) -> nn.Module:
    """Builds DeepLabV3+ with the named backbone and head.

    A workdir's ``model.json`` holds these arguments (``dtype`` as its name), so a trained
    model is rebuilt with ``build_model(**json.load(...))``.

    Args:
      backbone: ``"resnet50"``, ``"resnet101"``, ``"mobilenet_v2"`` or ``"tiny"`` (a
        few-thousand parameter net for tests and smoke runs).
      head: ``"softmax"`` (logits ``[B, H, W, C]``) or ``"embedding"`` (pixel embeddings
        ``[B, H, W, D]`` and the class table ``[C, D]``).
      num_classes: C.
      embedding_dim: D, embedding head only.
      output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36).
      dtype: computation dtype, e.g. ``jnp.bfloat16``; parameters, BatchNorm statistics, the
        embedding normalisation and the class table stay float32.
      separable: depthwise-separable 3×3 convs in ASPP and decoder.
      bn_momentum: BatchNorm running-average decay (flax convention) of the backbone, and of
        the ASPP and decoder unless ``decoder_bn_momentum`` is given.
      center_embedding: standardise the embedding channels over the batch before the L2
        normalisation (see :class:`DeepLabV3Plus`).
      decoder_bn_momentum: the decay of the ASPP, decoder and embedding-centring BatchNorms;
        None: ``bn_momentum``. (The original code sets PyTorch momentum 0.01, flax 0.99, on
        its backbone only; its decoder keeps PyTorch's 0.1, flax 0.9.)
      tiny_width: ``tiny`` only: backbone widths w/2w/4w, ASPP 2w, low-level w, decoder 2w
        (8 gives the 16/8/16-channel decoder).

    Returns:
      An unbound :class:`DeepLabV3Plus`.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if num_classes < 1 or embedding_dim < 1:
        raise ValueError(
            f"need num_classes >= 1 and embedding_dim >= 1, got {num_classes}, {embedding_dim}"
        )
    dtype = jnp.dtype(dtype)
    if backbone == "tiny":
        if tiny_width < 1:
            raise ValueError(f"tiny_width must be >= 1, got {tiny_width}")
        net = TinyBackbone(
            output_stride=output_stride, width=tiny_width, bn_momentum=bn_momentum, dtype=dtype
        )
        widths = (2 * tiny_width, tiny_width, 2 * tiny_width)
    else:
        net = build_backbone(
            backbone, output_stride=output_stride, dtype=dtype, bn_momentum=bn_momentum
        )
        widths = (256, 48, 256)
    return DeepLabV3Plus(
        backbone=net,
        head=head,
        num_classes=num_classes,
        embedding_dim=embedding_dim,
        atrous_rates=ATROUS_RATES[output_stride],
        aspp_features=widths[0],
        low_level_features=widths[1],
        decoder_features=widths[2],
        separable=separable,
        bn_momentum=bn_momentum if decoder_bn_momentum is None else decoder_bn_momentum,
        dtype=dtype,
        center_embedding=center_embedding,
    )


def first_shape_difference(
    stored: Mapping[str, tuple[int, ...]], expected: Any
) -> tuple[str, tuple[int, ...], tuple[int, ...]] | None:
    """The first variable whose stored shape differs from the model's.

    Args:
      stored: ``jax.tree_util.keystr`` path -> shape of the saved arrays.
      expected: the model's variables (arrays or ``ShapeDtypeStruct`` leaves), same nesting.

    Returns:
      ``(path, stored shape, expected shape)``, or None when every shared path agrees.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
        key = jax.tree_util.keystr(path)
        if key in stored and tuple(stored[key]) != tuple(leaf.shape):
            return key, tuple(stored[key]), tuple(leaf.shape)
    return None
