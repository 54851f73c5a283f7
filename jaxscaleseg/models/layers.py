"""Small building blocks shared by the backbones and the decoder (NHWC throughout).

Convolutions use explicit symmetric padding (``dilation * (kernel - 1) // 2`` on each side), as
PyTorch does, so feature maps have the same sizes as torchvision's for any input size (odd sizes
included) and imported weights reproduce torchvision's outputs exactly. BatchNorm keeps its
parameters and running statistics in float32 and computes its reductions in float32 whatever the
compute ``dtype``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def same_padding(kernel_size: int, dilation: int = 1) -> list[tuple[int, int]]:
    """Symmetric padding that PyTorch's ``padding=dilation * (k - 1) // 2`` would use.

    Args:
      kernel_size: odd square kernel size k.
      dilation: kernel dilation.

    Returns:
      ``[(p, p), (p, p)]`` for the H and W axes.
    """
    p = dilation * (kernel_size - 1) // 2
    return [(p, p), (p, p)]


def conv(
    features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = False,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A square ``nn.Conv`` with PyTorch-style padding and float32 parameters.

    Args:
      features: output channels.
      kernel_size: odd square kernel size.
      stride: spatial stride.
      dilation: kernel dilation (atrous rate).
      groups: feature groups (``groups == in_channels`` for a depthwise conv).
      use_bias: whether to add a bias (False before a BatchNorm).
      dtype: computation dtype; parameters stay float32.
      name: module name.

    Returns:
      The (unbound) module.
    """
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=stride,
        padding=same_padding(kernel_size, dilation),
        kernel_dilation=dilation,
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_kernel_init,
        name=name,
    )


def batch_norm(
    train: bool, *, momentum: float, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.BatchNorm:
    """BatchNorm with PyTorch's epsilon, float32 parameters/statistics and float32 reductions.

    Args:
      train: use batch statistics (and update the running ones) when True.
      momentum: running-average decay (flax convention: 0.99 keeps 99% of the old value;
        PyTorch's ``momentum=0.1`` is flax's 0.9).
      dtype: output dtype.
      name: module name.

    Returns:
      The (unbound) module.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        force_float32_reductions=True,
        name=name,
    )


class ConvBN(nn.Module):
    """Conv (no bias) → BatchNorm → optional activation.

    Attributes:
      features: output channels.
      kernel_size: odd square kernel size.
      stride: spatial stride.
      dilation: kernel dilation.
      groups: feature groups.
      activation: ``"relu"``, ``"relu6"`` or ``None``.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    activation: str | None = "relu"
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, H, W, C_in]``.
          train: training mode (batch statistics).

        Returns:
          ``[B, H', W', features]`` in ``dtype``.
        """
        x = conv(
            self.features,
            self.kernel_size,
            stride=self.stride,
            dilation=self.dilation,
            groups=self.groups,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = batch_norm(train, momentum=self.bn_momentum, dtype=self.dtype, name="bn")(x)
        return activate(x, self.activation)


def activate(x: jax.Array, activation: str | None) -> jax.Array:
    """Applies ``"relu"``, ``"relu6"`` or nothing (``None``)."""
    if activation is None:
        return x
    if activation == "relu":
        return nn.relu(x)
    if activation == "relu6":
        return jnp.clip(x, 0, 6)
    raise ValueError(f"unknown activation {activation!r}; expected 'relu', 'relu6' or None")


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear resize of NHWC maps with half-pixel centres (PyTorch ``align_corners=False``).

    Args:
      x: ``[B, h, w, C]``.
      height: output height H.
      width: output width W.

    Returns:
      ``[B, H, W, C]`` in ``x.dtype``.
    """
    if x.shape[1:3] == (height, width):
        return x
    out_shape = (x.shape[0], height, width, x.shape[-1])
    return jax.image.resize(x, out_shape, "bilinear", antialias=False).astype(x.dtype)


max_pool_3x3_s2 = functools.partial(
    nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))
)
