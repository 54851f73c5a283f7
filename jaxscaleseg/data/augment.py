"""Joint image/label augmentation and normalisation, as pure numpy functions.

Every random function takes a ``np.random.Generator`` and draws its parameters once per example;
the same draw moves the image and the label. Images are uint8 or float32 in 0..255 until
``normalize``; labels are int32 with ``IGNORE_INDEX`` (-1) for void. Image resampling is
bilinear with half-pixel centres, label resampling nearest-neighbour; no TensorFlow, PIL or
OpenCV is needed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxscaleseg.labels import IGNORE_INDEX

# ImageNet statistics in 0..255 units (RGB).
MEAN_RGB = np.asarray([123.675, 116.28, 103.53], np.float32)
STD_RGB = np.asarray([58.395, 57.12, 57.375], np.float32)
# Named (mean, std) pairs in 0..255 units: ``imagenet`` (every config), ``coco_stuff_original``
# (the statistics the original code's COCO-Stuff loader normalises with, its
# datasets/cocostuff.py line 19, there in 0..1 units).
NORMALIZATIONS = {
    "imagenet": (MEAN_RGB, STD_RGB),
    "coco_stuff_original": (
        np.asarray([0.43931922, 0.41310471, 0.37480941], np.float32) * 255,
        np.asarray([0.24272706, 0.23649098, 0.23429529], np.float32) * 255,
    ),
}


def normalization(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(mean, std)`` float32 [3] pair (0..255 units) named ``name``."""
    if name not in NORMALIZATIONS:
        known = sorted(NORMALIZATIONS)
        raise ValueError(f"unknown normalization {name!r}; expected one of {known}")
    return NORMALIZATIONS[name]


def normalize(image: np.ndarray, mean: np.ndarray = MEAN_RGB, std: np.ndarray = STD_RGB):
    """Normalises an RGB image (ImageNet statistics unless given).

    Args:
      image: uint8 or float [..., 3] in 0..255.
      mean, std: float32 [3] in 0..255 units.

    Returns:
      float32 [..., 3], ``(image - mean) / std``.
    """
    out = np.array(image, np.float32)  # a copy, normalised in place
    out -= mean
    out *= 1.0 / np.asarray(std, np.float32)
    return out


def denormalize(image: np.ndarray) -> np.ndarray:
    """Inverts ``normalize`` for visualisation.

    Args:
      image: float [..., 3], normalised (numpy or jax array).

    Returns:
      uint8 [..., 3] in 0..255 (rounded and clipped).
    """
    pixels = np.asarray(image, np.float32) * STD_RGB + MEAN_RGB
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class GeometricParams:
    """One draw of the geometric augmentation of an example.

    The image is scaled to ``scaled_size``, padded at the bottom/right up to the crop size if
    smaller, cropped at ``(top, left)`` and then, if ``flip``, mirrored left-right.

    Attributes:
      scaled_size: (Hs, Ws), the image size after scaling.
      top: first row of the crop in the scaled (padded) image.
      left: first column of the crop in the scaled (padded) image.
      flip: whether the crop is mirrored horizontally.
    """

    scaled_size: tuple[int, int]
    top: int
    left: int
    flip: bool


def draw_geometric_params(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
) -> GeometricParams:
    """Draws scale (uniform in ``scale_range``), crop position and flip for one example.

    Args:
      rng: the example's generator.
      image_size: (H, W) of the source image.
      crop_size: (h, w) of the output.
      scale_range: (min, max) scale factor; (1, 1) disables scaling.
      flip: whether a horizontal flip may be drawn (probability 1/2).

    Returns:
      The drawn ``GeometricParams``.
    """
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    hs = max(1, int(round(image_size[0] * scale)))
    ws = max(1, int(round(image_size[1] * scale)))
    top = int(rng.integers(0, max(hs - crop_size[0], 0) + 1))
    left = int(rng.integers(0, max(ws - crop_size[1], 0) + 1))
    mirrored = bool(rng.random() < 0.5) if flip else False
    return GeometricParams(scaled_size=(hs, ws), top=top, left=left, flip=mirrored)


def _source_coords(out: np.ndarray, size: int, scaled: int) -> tuple[np.ndarray, ...]:
    """Bilinear taps and nearest index in the source for positions ``out`` of the scaled axis."""
    ratio = size / scaled
    src = np.clip((out + 0.5) * ratio - 0.5, 0.0, size - 1.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    frac = (src - lo).astype(np.float32)
    nearest = np.minimum(np.floor((out + 0.5) * ratio).astype(np.int64), size - 1)
    return lo, hi, frac, nearest


def apply_geometric(
    image: np.ndarray,
    label: np.ndarray,
    params: GeometricParams,
    crop_size: tuple[int, int],
    fill: np.ndarray = MEAN_RGB,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scales, pads, crops and flips an image and its label with one set of parameters.

    Equivalent to ``resize_image``/``resize_label`` to ``params.scaled_size``, padding the
    bottom/right to at least ``crop_size`` (image with ``fill``, label with -1), cropping
    ``crop_size`` at ``(top, left)`` and mirroring if ``params.flip``, but only the output pixels
    are computed, so the cost does not grow with the scale.

    Args:
      image: uint8 or float [H, W, 3].
      label: int [H, W] (-1 = void).
      params: from ``draw_geometric_params``.
      crop_size: (h, w).
      fill: image value of padded pixels (default the ImageNet mean, 0 after ``normalize``).

    Returns:
      ``(image float32 [h, w, 3], label int32 [h, w], inside bool [h, w])`` where ``inside`` is
      False on padding (whose label is always -1).
    """
    h_in, w_in = label.shape
    hs, ws = params.scaled_size
    h, w = crop_size
    channels = image.shape[-1]
    # Rows/cols of the output that fall on the scaled image (the rest is padding): a prefix of
    # the rows, and a prefix of the columns (a suffix once flipped).
    n_rows = min(h, max(hs - params.top, 0))
    n_cols = min(w, max(ws - params.left, 0))
    col_slice = slice(w - n_cols, w) if params.flip else slice(0, n_cols)
    inside = np.zeros((h, w), bool)
    inside[:n_rows, col_slice] = True
    out_image = np.empty((h, w, channels), np.float32)
    out_label = np.empty((h, w), np.int32)
    if n_rows < h or n_cols < w:
        out_image[~inside] = fill
        out_label[~inside] = IGNORE_INDEX
    if n_rows and n_cols:
        rows = params.top + np.arange(n_rows)
        cols = params.left + np.arange(n_cols)
        if params.flip:
            cols = cols[::-1]
        y0, y1, fy, yn = _source_coords(rows, h_in, hs)
        x0, x1, fx, xn = _source_coords(cols, w_in, ws)
        c_lo, c_hi = int(min(x0.min(), x1.min())), int(max(x0.max(), x1.max())) + 1
        band = image[:, c_lo:c_hi]
        # Vertical pass on the needed band of columns, then a horizontal pass done as a flat
        # take over (column, channel) pairs, which numpy gathers much faster than [:, x0].
        vertical = band[y0].astype(np.float32)
        lower = band[y1].astype(np.float32)
        lower -= vertical
        lower *= fy[:, None, None]
        vertical += lower
        vertical = vertical.reshape(n_rows, -1)
        channel = np.arange(channels)
        left = np.take(vertical, ((x0 - c_lo)[:, None] * channels + channel).ravel(), axis=1)
        right = np.take(vertical, ((x1 - c_lo)[:, None] * channels + channel).ravel(), axis=1)
        right -= left
        right *= np.repeat(fx, channels)[None, :]
        left += right
        out_image[:n_rows, col_slice] = left.reshape(n_rows, n_cols, channels)
        out_label[:n_rows, col_slice] = label[np.ix_(yn, xn)]
    return out_image, out_label, inside


def random_scale_crop_flip(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    fill: np.ndarray = MEAN_RGB,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random scale, random crop with padding and random horizontal flip, image and label together.

    Args:
      image: uint8 or float [H, W, 3].
      label: int [H, W] (-1 = void).
      rng: the example's generator; one draw serves image and label.
      crop_size: (h, w) of the output.
      scale_range: (min, max) scale factor.
      flip: whether to flip with probability 1/2.
      fill: image value of padded pixels.

    Returns:
      ``(image float32 [h, w, 3], label int32 [h, w], inside bool [h, w])``, see
      ``apply_geometric``.
    """
    params = draw_geometric_params(rng, label.shape, crop_size, scale_range, flip)
    return apply_geometric(image, label, params, crop_size, fill)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float = 32.0,
    contrast: tuple[float, float] = (0.5, 1.5),
    saturation: tuple[float, float] = (0.5, 1.5),
) -> np.ndarray:
    """Photometric distortion: random brightness, contrast and saturation, each with p = 1/2.

    Args:
      image: float32 [H, W, 3] in 0..255.
      rng: the example's generator.
      brightness: maximum absolute brightness shift (0..255 units).
      contrast: (min, max) contrast factor around the image mean.
      saturation: (min, max) factor blending between grey and colour.

    Returns:
      float32 [H, W, 3] clipped to 0..255.
    """
    delta, c, s = (
        rng.uniform(-brightness, brightness),
        rng.uniform(*contrast),
        rng.uniform(*saturation),
    )
    use = rng.random(3) < 0.5
    out = np.asarray(image, np.float32)
    if use[0]:
        out = out + np.float32(delta)
    if use[1]:
        out = (out - out.mean()) * np.float32(c) + out.mean()
    if use[2]:
        grey = out @ np.asarray([0.299, 0.587, 0.114], np.float32)
        out = grey[..., None] + (out - grey[..., None]) * np.float32(s)
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def factor_color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float = 0.5,
    contrast: float = 0.5,
    saturation: float = 0.5,
) -> np.ndarray:
    """Colour jitter by factors, always applied, in a random order (torchvision's rule).

    The original code's Cityscapes augmentation (``ColorJitter(0.5, 0.5, 0.5)``): each factor
    is uniform in ``[max(0, 1 - x), 1 + x]``; brightness scales the image, contrast blends it
    with the mean of its grey image, saturation with its grey image (weights 0.299, 0.587,
    0.114); the result is clipped to 0..255 after each step.

    Args:
      image: float32 [H, W, 3] in 0..255.
      rng: the example's generator.
      brightness, contrast, saturation: the jitter strengths x.

    Returns:
      float32 [H, W, 3] in 0..255.
    """
    strengths = (brightness, contrast, saturation)
    factors = [rng.uniform(max(0.0, 1.0 - x), 1.0 + x) for x in strengths]
    weights = np.asarray([0.299, 0.587, 0.114], np.float32)
    out = np.asarray(image, np.float32)
    for op in rng.permutation(3):
        factor = np.float32(factors[op])
        if op == 0:
            out = out * factor
        else:
            grey = out @ weights
            base = grey.mean() if op == 1 else grey[..., None]
            out = base + (out - base) * factor
        out = np.clip(out, 0.0, 255.0)
    return out.astype(np.float32)


def short_side_center_crop(
    image: np.ndarray, label: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The original code's ``--crop_val`` evaluation view: short side to ``size``, centre crop.

    The short side is resized to ``size`` and the long side to ``int(size * long / short)``
    (image bilinear, label nearest), then the centre ``size``×``size`` is cut out (first
    row/column ``round((length - size) / 2)``). Pixels outside the crop are not scored.

    Args:
      image: uint8 or float [H, W, 3].
      label: int [H, W].
      size: the side of the square output.

    Returns:
      ``(image float32 [size, size, 3], label int32 [size, size])``.
    """
    h, w = label.shape
    if h <= w:
        resized = (size, int(size * w / h))
    else:
        resized = (int(size * h / w), size)
    image = resize_image(image, resized)
    label = resize_label(label, resized)
    top = int(round((resized[0] - size) / 2.0))
    left = int(round((resized[1] - size) / 2.0))
    return image[top : top + size, left : left + size], label[top : top + size, left : left + size]


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialiasing).

    Args:
      image: uint8 or float [H, W, C].
      size: (H', W').

    Returns:
      float32 [H', W', C].
    """
    label = np.zeros(image.shape[:2], np.int32)
    params = GeometricParams(scaled_size=tuple(size), top=0, left=0, flip=False)
    return apply_geometric(image, label, params, tuple(size))[0]


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map.

    Args:
      label: int [H, W].
      size: (H', W').

    Returns:
      int32 [H', W'].
    """
    h, w = label.shape
    rows = np.minimum(np.floor((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(np.floor((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return np.asarray(label, np.int32)[np.ix_(rows, cols)]
