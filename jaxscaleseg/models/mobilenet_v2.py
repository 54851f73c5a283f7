"""MobileNetV2 backbone (inverted residuals, ReLU6) with output stride 8/16 by dilation.

Layout and channel counts are torchvision's ``mobilenet_v2`` (width 1.0): a stride-2 stem
(``features.0``), seventeen inverted residual blocks (``features.1``–``features.17``) and a final
1×1 conv to 1280 channels (``features.18``), which DeepLabV3+ drops (``last_conv=False``).
Parameter names: ``stem_conv``/``stem_bn`` (features.0), ``block{i}`` with ``expand_*``,
``dw_*``, ``project_*`` (features.i), ``last_conv``/``last_bn`` (features.18).

Output stride: once the running stride reaches ``output_stride``, later stride-2 blocks use
stride 1 and double the dilation instead; as in torchvision's ResNet, the first block of such a
stage keeps the previous dilation (the scheme of common DeepLabV3+ MobileNetV2 ports).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscaleseg.models.layers import Dtype, batch_norm, conv

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# Index (torchvision ``features.i``) of the last block at stride 4: low-level features.
LOW_LEVEL_BLOCK = 3


class InvertedResidual(nn.Module):
    """Optional 1×1 expansion → 3×3 depthwise (stride, dilation) → 1×1 linear projection.

    Attributes:
      in_channels: input channels.
      out_channels: output channels.
      stride: depthwise stride (1 or 2).
      dilation: depthwise dilation.
      expand_ratio: hidden width = ``in_channels * expand_ratio``; no expansion conv when 1.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype.
    """

    in_channels: int
    out_channels: int
    stride: int = 1
    dilation: int = 1
    expand_ratio: int = 6
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the block to ``[B, H, W, in]`` → ``[B, H/stride, W/stride, out]``."""
        bn = lambda name: batch_norm(train, momentum=self.bn_momentum, dtype=self.dtype, name=name)  # noqa: E731
        hidden = self.in_channels * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = conv(hidden, 1, dtype=self.dtype, name="expand_conv")(y)
            y = jnp.clip(bn("expand_bn")(y), 0, 6)
        y = conv(
            hidden,
            3,
            stride=self.stride,
            dilation=self.dilation,
            groups=hidden,
            dtype=self.dtype,
            name="dw_conv",
        )(y)
        y = jnp.clip(bn("dw_bn")(y), 0, 6)
        y = conv(self.out_channels, 1, dtype=self.dtype, name="project_conv")(y)
        y = bn("project_bn")(y)
        if self.stride == 1 and self.in_channels == self.out_channels:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 feature extractor returning low- and high-level features.

    Attributes:
      output_stride: 8, 16 or 32 (32: torchvision's network unchanged).
      last_conv: keep the final 1×1 conv to 1280 channels (torchvision's ``features.18``);
        DeepLabV3+ drops it, so the high-level features have 320 channels.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype; parameters and BatchNorm statistics stay float32.
    """

    output_stride: int = 16
    last_conv: bool = False
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Computes the features.

        Args:
          x: images ``[B, H, W, 3]``.
          train: training mode (batch statistics).

        Returns:
          ``(low_level, high_level)``: the output of ``features.3`` (stride 4, 24 channels) and
          the last features (stride ``output_stride``, 320 channels, or 1280 with
          ``last_conv``), both in ``dtype``.
        """
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        bn = lambda name: batch_norm(train, momentum=self.bn_momentum, dtype=self.dtype, name=name)  # noqa: E731
        x = x.astype(self.dtype)
        x = conv(STEM_CHANNELS, 3, stride=2, dtype=self.dtype, name="stem_conv")(x)
        x = jnp.clip(bn("stem_bn")(x), 0, 6)
        current_stride, dilation, in_channels, index = 2, 1, STEM_CHANNELS, 1
        low_level = x
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            previous_dilation = dilation
            if current_stride == self.output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current_stride = s, current_stride * s
            for i in range(n):
                x = InvertedResidual(
                    in_channels=in_channels,
                    out_channels=c,
                    stride=stride if i == 0 else 1,
                    dilation=previous_dilation if i == 0 else dilation,
                    expand_ratio=t,
                    bn_momentum=self.bn_momentum,
                    dtype=self.dtype,
                    name=f"block{index}",
                )(x, train)
                if index == LOW_LEVEL_BLOCK:
                    low_level = x
                in_channels, index = c, index + 1
        if self.last_conv:
            x = conv(LAST_CHANNELS, 1, dtype=self.dtype, name="last_conv")(x)
            x = jnp.clip(bn("last_bn")(x), 0, 6)
        return low_level, x
