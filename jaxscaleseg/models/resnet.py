"""ResNet-50/101 backbones (torchvision's bottleneck v1.5) with dilation for output stride 8/16.

Module and parameter names follow torchvision's state dict (``layer3.5.conv2.weight`` is
``params/layer3_5/conv2/kernel`` here), which keeps the weight importer in
:mod:`jaxscaleseg.models.pretrained` a plain renaming. The stride of a bottleneck sits in its 3×3
convolution (v1.5). Dilation follows torchvision's ``replace_stride_with_dilation``: a dilated
stage keeps stride 1, its first block uses the previous dilation and the others the doubled one.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscaleseg.models.layers import Dtype, batch_norm, conv, max_pool_3x3_s2

RESNET_STAGE_SIZES = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}


def dilation_for_output_stride(output_stride: int) -> tuple[bool, bool, bool]:
    """torchvision's ``replace_stride_with_dilation`` for layers 2–4.

    Args:
      output_stride: 8, 16 or 32.

    Returns:
      ``(False, True, True)`` for 8, ``(False, False, True)`` for 16, all False for 32.
    """
    table = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}
    if output_stride not in table:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    return table[output_stride]


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride, dilation) → 1×1 (4× channels) with a residual connection.

    Attributes:
      planes: width of the inner convolutions; the output has ``4 * planes`` channels.
      stride: stride of the 3×3 convolution and of the projection shortcut.
      dilation: dilation of the 3×3 convolution.
      downsample: whether the shortcut is a 1×1 conv + BatchNorm projection.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the block to ``[B, H, W, C_in]`` → ``[B, H/stride, W/stride, 4 * planes]``."""
        bn = lambda name: batch_norm(train, momentum=self.bn_momentum, dtype=self.dtype, name=name)  # noqa: E731
        y = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = conv(
            self.planes,
            3,
            stride=self.stride,
            dilation=self.dilation,
            dtype=self.dtype,
            name="conv2",
        )(y)
        y = nn.relu(bn("bn2")(y))
        y = conv(4 * self.planes, 1, dtype=self.dtype, name="conv3")(y)
        y = bn("bn3")(y)
        if self.downsample:
            x = conv(
                4 * self.planes, 1, stride=self.stride, dtype=self.dtype, name="downsample_conv"
            )(x)
            x = bn("downsample_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet trunk without the classifier, returning low- and high-level features.

    Attributes:
      stage_sizes: bottleneck blocks per stage, ``(3, 4, 6, 3)`` for ResNet-50 and
        ``(3, 4, 23, 3)`` for ResNet-101.
      replace_stride_with_dilation: for layers 2, 3 and 4, as in torchvision.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    stage_sizes: Sequence[int]
    replace_stride_with_dilation: Sequence[bool] = (False, False, True)
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Computes the features.

        Args:
          x: images ``[B, H, W, 3]``.
          train: training mode (batch statistics).

        Returns:
          ``(low_level, high_level)``: layer1's output ``[B, ⌈H/4⌉, ⌈W/4⌉, 256]`` (stride 4) and
          layer4's output ``[B, H/os, W/os, 2048]`` (spatial sizes as torchvision computes them),
          both in ``dtype``.
        """
        x = x.astype(self.dtype)
        x = conv(64, 7, stride=2, dtype=self.dtype, name="conv1")(x)
        x = batch_norm(train, momentum=self.bn_momentum, dtype=self.dtype, name="bn1")(x)
        x = max_pool_3x3_s2(nn.relu(x))
        dilation = 1
        dilate = (False, *self.replace_stride_with_dilation)
        low_level = x
        for stage, num_blocks in enumerate(self.stage_sizes):
            previous_dilation = dilation
            stride = 1 if stage == 0 else 2
            if dilate[stage]:
                dilation *= stride
                stride = 1
            for block in range(num_blocks):
                x = Bottleneck(
                    planes=64 * 2**stage,
                    stride=stride if block == 0 else 1,
                    dilation=previous_dilation if block == 0 else dilation,
                    downsample=block == 0,
                    bn_momentum=self.bn_momentum,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
            if stage == 0:
                low_level = x
        return low_level, x


def resnet(
    name: str, *, output_stride: int = 16, bn_momentum: float = 0.99, dtype: Dtype = jnp.float32
) -> ResNet:
    """Builds ``"resnet50"`` or ``"resnet101"`` at the given output stride (8, 16 or 32)."""
    if name not in RESNET_STAGE_SIZES:
        raise ValueError(f"unknown ResNet {name!r}; expected one of {sorted(RESNET_STAGE_SIZES)}")
    return ResNet(
        stage_sizes=RESNET_STAGE_SIZES[name],
        replace_stride_with_dilation=dilation_for_output_stride(output_stride),
        bn_momentum=bn_momentum,
        dtype=dtype,
    )
