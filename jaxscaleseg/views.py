"""Features of an image's views: whole, by sliding windows, flipped and rescaled, merged.

The functions take an ``apply_fn(images float32 [B, h, w, 3]) -> dict`` — the model's eval-mode
apply with its variables bound — so they run with any model, or with a fake one in tests. They
return ``(features, class_embedding)``:

* embedding head: ``features`` float32 ``[B, H, W, D]``, L2-normalised per pixel, and the class
  table ``[C, D]``. Windows, flips and scales are merged in embedding space: the normalised
  embeddings are summed and the sum re-normalised (the direction of their mean). Nothing has C
  entries per pixel.
* softmax head: ``features`` are the mean logits ``[B, H, W, C]`` and ``class_embedding`` is
  None.

Every resize (image to a test scale, features back to the image size) is bilinear with
half-pixel centres, like the model's own upsampling. ``jaxscaleseg.inference`` chooses the
views from its settings and turns the features into labels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxscaleseg.models import l2_normalize
from jaxscaleseg.models.layers import resize_bilinear

ApplyFn = Callable[[jax.Array], Mapping[str, jax.Array]]
Features = tuple[jax.Array, jax.Array | None]


def _split_outputs(outputs: Mapping[str, jax.Array]) -> Features:
    """``(features, class_embedding)`` of one model output; embeddings L2-normalised."""
    if "pixel_embedding" in outputs:
        return l2_normalize(outputs["pixel_embedding"]), outputs["class_embedding"]
    return outputs["logits"].astype(jnp.float32), None


def whole_image_features(apply_fn: ApplyFn, images: jax.Array) -> Features:
    """Features of whole images in one forward pass.

    Args:
      apply_fn: eval-mode model apply, images ``[B, h, w, 3]`` to the model's output dict.
      images: float32 ``[B, H, W, 3]`` normalised images.

    Returns:
      ``(features [B, H, W, K], class_embedding [C, D] or None)``: normalised embeddings
      (K = D) or logits (K = C).
    """
    return _split_outputs(apply_fn(images))


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, length)``; the last one ends at the far edge.

    Args:
      length: image size along the axis.
      crop: window size.
      stride: step between consecutive windows.

    Returns:
      Ascending distinct offsets; ``[0]`` when the image is no larger than the window.
    """
    if length <= crop:
        return [0]
    count = -(-(length - crop) // stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def sliding_window_features(
    apply_fn: ApplyFn,
    images: jax.Array,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
) -> Features:
    """Features from overlapping windows, merged per pixel.

    Windows of ``crop_size`` are placed every ``stride`` pixels, the last one aligned with the
    bottom/right edge, so every pixel is covered. An image smaller than a window is padded at
    the bottom/right with 0 (the mean colour in normalised space) and the features are cropped
    back. Overlaps are merged in embedding space (sum of normalised embeddings, re-normalised)
    or as the mean of the logits. Every window has the same shape: one compilation.

    Args:
      apply_fn: eval-mode model apply.
      images: float32 ``[B, H, W, 3]`` normalised images.
      crop_size: ``(h, w)`` of the windows.
      stride: ``(h, w)`` step between windows.

    Returns:
      ``(features [B, H, W, K], class_embedding or None)`` as in
      :func:`whole_image_features`.
    """
    _, height, width, _ = images.shape
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        images = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    total = count = class_embedding = None
    for top in window_starts(height + pad_h, crop_h, int(stride[0])):
        for left in window_starts(width + pad_w, crop_w, int(stride[1])):
            window = _crop(images, top, left, crop_h, crop_w)
            features, class_embedding = whole_image_features(apply_fn, window)
            if total is None:
                total = jnp.zeros((*images.shape[:3], features.shape[-1]), jnp.float32)
                count = jnp.zeros((1, *images.shape[1:3], 1), jnp.float32)
            total, count = _add_window(total, count, features, top, left)
    return _finish_windows(
        total, count, height, width, class_embedding is not None
    ), class_embedding


# Small jitted pieces: one compilation per shape instead of one per eager operation.
@functools.partial(jax.jit, static_argnames=("height", "width"))
def _crop(images: jax.Array, top, left, height: int, width: int) -> jax.Array:
    return lax.dynamic_slice(images, (0, top, left, 0), (images.shape[0], height, width, 3))


@jax.jit
def _add_window(total, count, features, top, left):
    shape = features.shape
    start = (0, top, left, 0)
    window = lax.dynamic_slice(total, start, shape) + features
    ones = lax.dynamic_slice(count, start, (1, *shape[1:3], 1)) + 1.0
    return lax.dynamic_update_slice(total, window, start), lax.dynamic_update_slice(
        count, ones, start
    )


@functools.partial(jax.jit, static_argnames=("height", "width", "embedding"))
def _finish_windows(total, count, height: int, width: int, embedding: bool) -> jax.Array:
    total = total[:, :height, :width]
    return l2_normalize(total) if embedding else total / count[:, :height, :width]


@functools.partial(jax.jit, static_argnames=("height", "width", "flipped"))
def _make_view(images: jax.Array, height: int, width: int, flipped: bool) -> jax.Array:
    view = resize_bilinear(images, height, width)
    return view[:, :, ::-1] if flipped else view


@functools.partial(jax.jit, static_argnames=("height", "width", "flipped", "embedding"))
def _restore_view(features, height: int, width: int, flipped: bool, embedding: bool):
    if flipped:
        features = features[:, :, ::-1]
    features = resize_bilinear(features, height, width)
    return l2_normalize(features) if embedding else features


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(H, W)`` scaled and rounded, at least 1 pixel each."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def tta_features(
    apply_fn: ApplyFn,
    images: jax.Array,
    *,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
) -> Features:
    """Features merged over test-time scales and horizontal flips.

    Each scaled (and possibly flipped) image is predicted whole, or by sliding windows when
    ``crop_size`` is given; its features are flipped back, resized bilinearly to the image
    size and merged like overlapping windows (normalised embeddings summed then re-normalised,
    or logits averaged).

    Args:
      apply_fn: eval-mode model apply.
      images: float32 ``[B, H, W, 3]`` normalised images.
      flip: add the horizontally flipped image.
      scales: scale factors, e.g. ``(1.0,)`` or ``inference.COMMON_SCALES``.
      crop_size: sliding-window size, or None for whole images.
      stride: sliding-window stride (required with ``crop_size``).

    Returns:
      ``(features [B, H, W, K], class_embedding or None)``.
    """
    _, height, width, _ = images.shape
    total = class_embedding = None
    views = 0
    for scale in scales:
        size = scaled_size((height, width), float(scale))
        for flipped in (False, True) if flip else (False,):
            view = _make_view(images, *size, flipped)
            if crop_size is None:
                features, class_embedding = whole_image_features(apply_fn, view)
            else:
                features, class_embedding = sliding_window_features(
                    apply_fn, view, crop_size, stride
                )
            embedding = class_embedding is not None
            features = _restore_view(features, height, width, flipped, embedding)
            total = features if total is None else total + features
            views += 1
    if class_embedding is not None:
        return (l2_normalize(total) if views > 1 else total), class_embedding
    return total / views, None
