"""Pictures of predictions and of training runs.

* :func:`colorize`, :func:`overlay`: label maps as colour masks with a dataset palette.
* :func:`class_shares`, :func:`legend_image`: the classes present in a label map with their
  colours and pixel share (drawn with Pillow only).
* :func:`plot_training_curves`: loss, mIoU and learning-rate curves from the records of a
  workdir's ``metrics.jsonl`` (``workdir.read_metrics``; needs matplotlib, imported only there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOR = (0, 0, 0)


def colorize(
    labels: np.ndarray, palette: np.ndarray, ignore_color: Sequence[int] = IGNORE_COLOR
) -> np.ndarray:
    """Colours a label map with a palette.

    Args:
      labels: int ``[H, W]`` class ids; ids outside ``[0, C)`` (e.g. -1 = ignore) get
        ``ignore_color``.
      palette: uint8 ``[C, 3]``.
      ignore_color: RGB of ignored/out-of-range pixels.

    Returns:
      uint8 ``[H, W, 3]``.
    """
    labels = np.asarray(labels)
    palette = np.asarray(palette, np.uint8)
    inside = (labels >= 0) & (labels < len(palette))
    out = palette[np.where(inside, labels, 0)]
    out[~inside] = np.asarray(ignore_color, np.uint8)
    return out


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends a colour mask over an image: ``(1 - alpha) * image + alpha * color``.

    Args:
      image: uint8 ``[H, W, 3]``.
      color: uint8 ``[H, W, 3]`` (e.g. from :func:`colorize`).
      alpha: weight of the mask, in ``[0, 1]``.

    Returns:
      uint8 ``[H, W, 3]``.
    """
    if np.shape(image) != np.shape(color):
        raise ValueError(f"image {np.shape(image)} and mask {np.shape(color)} differ in shape")
    blend = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * np.asarray(color, np.float32)
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def class_shares(labels: np.ndarray, num_classes: int) -> list[tuple[int, float]]:
    """The classes present in a label map and their share of its pixels, largest first.

    Args:
      labels: int ``[H, W]`` class ids; ids outside ``[0, C)`` are not counted.
      num_classes: C.

    Returns:
      ``[(class_id, fraction of all pixels), ...]`` sorted by decreasing share (then id).
    """
    labels = np.asarray(labels).reshape(-1)
    total = labels.size
    labels = labels[(labels >= 0) & (labels < num_classes)]
    ids, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, -counts))
    return [(int(ids[i]), float(counts[i]) / max(total, 1)) for i in order]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def legend_image(
    labels: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray,
    *,
    max_entries: int = 30,
    font_size: int = 14,
) -> np.ndarray:
    """A picture listing the classes present with their colour and pixel share.

    Args:
      labels: int ``[H, W]`` class ids.
      class_names: C names.
      palette: uint8 ``[C, 3]``.
      max_entries: at most this many classes (the largest); a last line counts the others.
      font_size: text size in pixels.

    Returns:
      uint8 ``[h, w, 3]``, white background.
    """
    shares = class_shares(labels, len(class_names))
    shown, rest = shares[:max_entries], shares[max_entries:]
    lines = [f"{class_names[c]}  {100.0 * s:.1f}%" for c, s in shown]
    if rest:
        lines.append(f"... {len(rest)} more classes, {100.0 * sum(s for _, s in rest):.1f}%")
    if not lines:
        lines = ["(no class)"]
    font = _font(font_size)
    row = font_size + 8
    swatch = font_size + 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(probe.textlength(line, font=font)) for line in lines)
    width = 8 + swatch + 8 + text_width + 8
    height = 8 + row * len(lines) + 4
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    for i, line in enumerate(lines):
        top = 8 + i * row
        if i < len(shown):
            color = tuple(int(v) for v in palette[shown[i][0]])
            draw.rectangle([8, top, 8 + swatch, top + swatch], fill=color, outline=(0, 0, 0))
        draw.text((8 + swatch + 8, top), line, fill=(0, 0, 0), font=font)
    return np.asarray(picture)


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Writes uint8 ``[H, W]``/``[H, W, 3]`` or uint16 ``[H, W]`` (16-bit grey) as a PNG."""
    Image.fromarray(np.asarray(array)).save(path, format="PNG")


def label_png_array(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A label map in the PNG dtype: uint8 when C <= 256, else uint16.

    Args:
      labels: int ``[H, W]`` class ids in ``[0, C)``.
      num_classes: C (at most 65 536).

    Returns:
      uint8 or uint16 ``[H, W]``.
    """
    if num_classes > 65536:
        raise ValueError(f"a 16-bit PNG holds at most 65536 classes, got C={num_classes}")
    dtype = np.uint8 if num_classes <= 256 else np.uint16
    return np.asarray(labels).astype(dtype)


# --------------------------------------------------------------------------- training curves


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        if key in record and record[key] is not None:
            steps.append(float(record["step"]))
            values.append(float(record[key]))
    return steps, values


def plot_training_curves(
    records: Sequence[Mapping[str, Any]], output: str | os.PathLike, *, title: str = ""
) -> list[str]:
    """Draws loss, validation metrics and learning rates against the step into one PNG.

    Panels (each drawn when its keys are present): training loss and its parts
    (``train_*`` except norms), validation ``eval_mIoU``/``eval_mAcc``/``eval_aAcc``, and the
    learning rates ``lr_*`` (log scale).

    Args:
      records: metric records ``{"step": int, key: value, ...}`` (``metrics.jsonl``).
      output: path of the PNG to write.
      title: figure title.

    Returns:
      The metric keys plotted.
    """
    import matplotlib  # noqa: PLC0415 (optional dependency, only for plots)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    keys = sorted({k for r in records for k in r if k != "step"})
    loss_keys = [
        k for k in keys if k.startswith("train_") and not k.endswith("_norm") and k != "train_loss"
    ]
    loss_keys = (["train_loss"] if "train_loss" in keys else []) + loss_keys
    panels = [
        ("loss", loss_keys, False),
        ("validation", [k for k in ("eval_mIoU", "eval_mAcc", "eval_aAcc") if k in keys], False),
        ("learning rate", [k for k in keys if k.startswith("lr_")], True),
    ]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise ValueError("no loss, eval_* or lr_* metrics to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3 * len(panels)), squeeze=False)
    plotted = []
    for ax, (name, panel_keys, log) in zip(axes[:, 0], panels, strict=True):
        for key in panel_keys:
            steps, values = _series(records, key)
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key)
            plotted.append(key)
        ax.set_ylabel(name)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return plotted


__all__ = [
    "class_shares",
    "colorize",
    "label_png_array",
    "legend_image",
    "overlay",
    "plot_training_curves",
    "save_png",
]
