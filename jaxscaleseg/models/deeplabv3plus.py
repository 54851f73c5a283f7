"""DeepLabV3+ (Chen et al., ECCV 2018) with a softmax head or the ESS embedding head.

``backbone → ASPP (stride os) → upsample to stride 4 ⊕ low-level projection (48 ch) → 3×3 fusion
conv (256 ch) → 1×1 head conv``, then:

* ``head="softmax"``: logits ``[B, H, W, C]``, bilinearly upsampled to the input size.
* ``head="embedding"``: pixel embeddings L2-normalised at stride 4 then bilinearly upsampled
  (so full-resolution vectors can be shorter than 1, as in the paper) ``[B, H, W, D]`` float32,
  and the L2-normalised learnable class table ``[C, D]`` float32 (initialised uniform in
  ``[-1, 1]`` before normalisation). Nothing here is proportional to C per pixel.

Parameter tree: ``backbone`` (the backbone), ``aspp``, ``decoder``, ``head_conv`` and, for the
embedding head, the top-level array ``class_embedding``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxscaleseg.models.layers import ConvBN, Dtype, batch_norm, conv, resize_bilinear

HEADS = ("softmax", "embedding")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(‖x‖, eps)`` along ``axis``, computed in float32.

    The gradient is hand-written so that the backward pass keeps only ``x`` and one inverse norm
    per vector (no second copy of ``x``-sized intermediates): for the ``[C, D]`` class table this
    keeps the extra memory at large C to a few floats per class.

    Args:
      x: any shape.
      axis: the vector axis.
      eps: lower bound on the norm (zero vectors stay zero).

    Returns:
      float32 array of ``x``'s shape.
    """
    return _l2_normalize(x.astype(jnp.float32), axis, eps)


def _inverse_norm(x: jax.Array, axis: int, eps: float) -> jax.Array:
    """``1 / max(‖x‖, eps)`` with ``axis`` kept (size 1)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


# Reverse-mode only (jax.grad/vjp); forward-mode (jax.jvp) through it is not supported.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _l2_normalize(x: jax.Array, axis: int, eps: float) -> jax.Array:
    return x * _inverse_norm(x, axis, eps)


def _l2_normalize_fwd(x: jax.Array, axis: int, eps: float):
    inv = _inverse_norm(x, axis, eps)
    return x * inv, (x, inv)


def _l2_normalize_bwd(axis: int, eps: float, residuals, g: jax.Array):
    # The barrier keeps XLA from sharing 1/‖x‖ broadcast to x's shape with the forward pass:
    # shared, it is materialised (a second [C, D] array for the class table) and kept alive
    # from the forward pass to this one.
    x, inv = jax.lax.optimization_barrier(residuals)
    # d(x/‖x‖)ᵀg = g/‖x‖ - x <x, g>/‖x‖³ where the norm is not clamped, g/eps where it is.
    # Written without x/‖x‖ so that no second [.., D] array is materialised.
    radial = jnp.sum(g * x, axis=axis, keepdims=True) * jnp.where(inv < 1.0 / eps, inv**3, 0.0)
    return (g * inv - x * radial,)


_l2_normalize.defvjp(_l2_normalize_fwd, _l2_normalize_bwd)


class SeparableConvBN(nn.Module):
    """Depthwise 3×3 (dilated) → pointwise 1×1 → BatchNorm → ReLU.

    Attributes:
      features: output channels.
      dilation: depthwise dilation.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype.
    """

    features: int
    dilation: int = 1
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``[B, H, W, C_in]`` → ``[B, H, W, features]``."""
        x = conv(
            x.shape[-1],
            3,
            dilation=self.dilation,
            groups=x.shape[-1],
            dtype=self.dtype,
            name="depthwise",
        )(x)
        x = conv(self.features, 1, dtype=self.dtype, name="pointwise")(x)
        x = batch_norm(train, momentum=self.bn_momentum, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _conv3x3_bn_relu(
    features: int, dilation: int, separable: bool, bn_momentum: float, dtype: Dtype, name: str
) -> nn.Module:
    if separable:
        return SeparableConvBN(features, dilation, bn_momentum, dtype, name=name)
    return ConvBN(features, 3, dilation=dilation, bn_momentum=bn_momentum, dtype=dtype, name=name)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, three atrous 3×3, image pooling, then projection.

    Attributes:
      atrous_rates: the three rates ((6, 12, 18) at output stride 16, (12, 24, 36) at 8).
      features: channels of every branch and of the output (256).
      dropout_rate: dropout after the projection (0.1).
      separable: depthwise-separable atrous convs.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype.
    """

    atrous_rates: Sequence[int] = (6, 12, 18)
    features: int = 256
    dropout_rate: float = 0.1
    separable: bool = False
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``[B, h, w, C_in]`` → ``[B, h, w, features]``; dropout needs the "dropout" rng."""
        kw = dict(bn_momentum=self.bn_momentum, dtype=self.dtype)
        branches = [ConvBN(self.features, 1, name="conv1x1", **kw)(x, train)]
        for i, rate in enumerate(self.atrous_rates):
            branches.append(
                _conv3x3_bn_relu(self.features, rate, self.separable, name=f"atrous{i}", **kw)(
                    x, train
                )
            )
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(self.dtype)
        pooled = ConvBN(self.features, 1, name="pooling", **kw)(pooled, train)
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        y = jnp.concatenate(branches, axis=-1)
        y = ConvBN(self.features, 1, name="project", **kw)(y, train)
        return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class Decoder(nn.Module):
    """DeepLabV3+ decoder: upsample ASPP output to stride 4, concat the projected low-level
    features, fuse with a 3×3 conv.

    Attributes:
      low_level_features: channels of the low-level projection (48).
      features: channels of the fusion conv (256).
      separable: depthwise-separable fusion conv.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype.
    """

    low_level_features: int = 48
    features: int = 256
    separable: bool = False
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, high: jax.Array, low: jax.Array, train: bool) -> jax.Array:
        """Fuses ``high [B, h, w, A]`` and ``low [B, H4, W4, L]`` into ``[B, H4, W4, features]``."""
        kw = dict(bn_momentum=self.bn_momentum, dtype=self.dtype)
        low = ConvBN(self.low_level_features, 1, name="low_level", **kw)(low, train)
        high = resize_bilinear(high, low.shape[1], low.shape[2])
        y = jnp.concatenate([high, low], axis=-1)
        return _conv3x3_bn_relu(self.features, 1, self.separable, name="fuse", **kw)(y, train)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ with a softmax or an embedding head.

    Attributes:
      backbone: a module mapping ``(images, train)`` to ``(low_level, high_level)`` features.
      head: ``"softmax"`` or ``"embedding"``.
      num_classes: C.
      embedding_dim: D (embedding head only).
      atrous_rates: ASPP rates.
      aspp_features: ASPP channels (256).
      low_level_features: low-level projection channels (48).
      decoder_features: fusion conv channels (256).
      dropout_rate: ASPP dropout (0.1).
      separable: depthwise-separable 3×3 convs in ASPP and decoder.
      bn_momentum: BatchNorm running-average decay (flax convention).
      dtype: computation dtype; parameters, BatchNorm statistics, the embedding normalisation
        and the class table are float32.
      center_embedding: standardise each embedding channel over the batch (a BatchNorm with
        no scale or offset, running statistics at evaluation) before the L2 normalisation.
        Off in the paper. A network trained from scratch (no ImageNet backbone) can otherwise
        settle on one constant embedding for every pixel, whose pulls towards many random
        targets cancel; centred embeddings cannot all coincide.
    """

    backbone: nn.Module
    head: str = "softmax"
    num_classes: int = 19
    embedding_dim: int = 12
    atrous_rates: Sequence[int] = (6, 12, 18)
    aspp_features: int = 256
    low_level_features: int = 48
    decoder_features: int = 256
    dropout_rate: float = 0.1
    separable: bool = False
    bn_momentum: float = 0.99
    dtype: Dtype = jnp.float32
    center_embedding: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Runs the network.

        Args:
          images: ``[B, H, W, 3]`` normalised images (any H, W).
          train: training mode: batch statistics (pass ``mutable=["batch_stats"]``) and dropout
            (pass ``rngs={"dropout": key}``).

        Returns:
          ``{"logits": [B, H, W, C] dtype}`` for the softmax head;
          ``{"pixel_embedding": [B, H, W, D] float32, "coarse_pixel_embedding": [B, h, w, D]
          float32, "class_embedding": [C, D] float32}`` for the embedding head, where the
          coarse map is the unit-length embedding at the decoder's resolution (stride 4) that
          ``pixel_embedding`` upsamples bilinearly (``knn_union`` searches it).
        """
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; expected one of {HEADS}")
        height, width = images.shape[1:3]
        low, high = self.backbone(images, train)
        kw = dict(separable=self.separable, bn_momentum=self.bn_momentum, dtype=self.dtype)
        x = ASPP(self.atrous_rates, self.aspp_features, self.dropout_rate, name="aspp", **kw)(
            high, train
        )
        x = Decoder(self.low_level_features, self.decoder_features, name="decoder", **kw)(
            x, low, train
        )
        if self.head == "softmax":
            logits = conv(self.num_classes, 1, use_bias=True, dtype=self.dtype, name="head_conv")(x)
            return {"logits": resize_bilinear(logits, height, width)}
        pixel = conv(self.embedding_dim, 1, use_bias=True, dtype=jnp.float32, name="head_conv")(
            x.astype(jnp.float32)
        )
        if self.center_embedding:
            pixel = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                use_bias=False,
                use_scale=False,
                dtype=jnp.float32,
                name="embedding_center",
            )(pixel)
        coarse = l2_normalize(pixel)
        pixel = resize_bilinear(coarse, height, width)
        table = self.param(
            "class_embedding",
            uniform_symmetric,
            (self.num_classes, self.embedding_dim),
            jnp.float32,
        )
        return {
            "pixel_embedding": pixel,
            "coarse_pixel_embedding": coarse,
            "class_embedding": l2_normalize(table),
        }


def uniform_symmetric(
    key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32
) -> jax.Array:
    """Initialiser: uniform in ``[-1, 1)`` (the paper's class-embedding initialisation)."""
    return jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
