"""A tiny backbone for tests and smoke runs (a few thousand parameters, not for real training).

It has the same interface as the real backbones: stride-4 low-level features and high-level
features at ``output_stride`` (8 or 16, reached by dilation like the ResNets), so the decoder,
the heads and the training loop run end to end on CPU in seconds.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscaleseg.models.layers import ConvBN, Dtype


class TinyBackbone(nn.Module):
    """Four ConvBN-ReLU layers: stride 2, 4 (low-level), 8, then 16 or dilated stride 8.

    Attributes:
      output_stride: 8, 16 or 32.
      width: channels of the first layer; later layers use 2× and 4×.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype.
    """

    output_stride: int = 16
    width: int = 8
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Computes ``(low_level [B, H/4, W/4, 2w], high_level [B, H/os, W/os, 4w])``."""
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        block = lambda f, s, d, name: ConvBN(  # noqa: E731
            f,
            3,
            stride=s,
            dilation=d,
            bn_momentum=self.bn_momentum,
            dtype=self.dtype,
            name=name,
        )
        x = x.astype(self.dtype)
        x = block(self.width, 2, 1, "stem")(x, train)
        low_level = block(2 * self.width, 2, 1, "stage1")(x, train)
        x = low_level
        stride, dilation = 4, 1
        for i in (2, 3, 4):
            if stride < self.output_stride:
                stride *= 2
                x = block(4 * self.width, 2, dilation, f"stage{i}")(x, train)
            else:
                dilation *= 2
                x = block(4 * self.width, 1, dilation, f"stage{i}")(x, train)
        return low_level, x
