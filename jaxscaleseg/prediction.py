"""Segmenting image files and writing pictures of the result (the library of
``python -m jaxscaleseg.predict``).

Images are read with Pillow and converted to RGB (:func:`read_image`); for each one
:func:`write_prediction` writes ``<stem>_labels.png`` (class ids, 8-bit when C <= 256, else
16-bit grey), ``<stem>_color.png`` (the ids coloured with the dataset palette),
``<stem>_overlay.png`` (the mask blended over the image) and optionally ``<stem>_legend.png``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from jaxscaleseg import inference, visualize
from jaxscaleseg.errors import one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as RGB.

    Grey, palette and CMYK images are converted; 16-bit/32-bit grey is scaled to 8 bits by its
    maximum; an alpha channel is composited onto black; EXIF orientation is applied.

    Args:
      path: an image file Pillow can read.

    Returns:
      uint8 ``[H, W, 3]``.

    Raises:
      OSError, ValueError, SyntaxError, Image.DecompressionBombError: the file is not a
        readable image.
    """
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            values = np.asarray(image, np.float64)
            peak = values.max() if values.size else 0.0
            scale = 255.0 / peak if peak > 255 else 1.0
            values = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
            image = Image.fromarray(values)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(black, rgba)
        return np.asarray(image.convert("RGB"), np.uint8)


def collect_inputs(arguments: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Image files named, or found directly inside named directories (sorted).

    Returns:
      ``(files, problems)``: problems are one-line messages for arguments that do not exist or
      directories without images.
    """
    files, problems = [], []
    for argument in arguments:
        path = Path(argument).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                problems.append(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in directory")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return files, problems


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}_{n}", n + 1
    used.add(stem)
    return stem


def write_prediction(
    image: np.ndarray,
    labels: np.ndarray,
    output: str | os.PathLike,
    stem: str,
    *,
    class_names: Sequence[str],
    palette: np.ndarray,
    legend: bool = False,
    alpha: float = 0.5,
) -> list[Path]:
    """Writes the label PNG, the colour mask, the overlay and optionally the legend.

    Args:
      image: uint8 ``[H, W, 3]``.
      labels: int ``[H, W]`` class ids.
      output: directory (created if needed).
      stem: file name prefix.
      class_names: C names.
      palette: uint8 ``[C, 3]``.
      legend: also write ``<stem>_legend.png``.
      alpha: weight of the mask in the overlay.

    Returns:
      The paths written.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    color = visualize.colorize(labels, palette)
    pictures = {
        "labels": visualize.label_png_array(labels, len(class_names)),
        "color": color,
        "overlay": visualize.overlay(image, color, alpha),
    }
    if legend:
        pictures["legend"] = visualize.legend_image(labels, class_names, palette)
    paths = []
    for kind, array in pictures.items():
        path = output / f"{stem}_{kind}.png"
        visualize.save_png(array, path)
        paths.append(path)
    return paths


def predict_files(
    predictor: inference.Predictor,
    files: Iterable[str | os.PathLike],
    output: str | os.PathLike,
    *,
    legend: bool = False,
    alpha: float = 0.5,
    log=print,
) -> tuple[dict[str, list[Path]], list[str]]:
    """Predicts each image file and writes its pictures; unreadable files are skipped.

    Args:
      predictor: the loaded model.
      files: image paths.
      output: output directory.
      legend: also write legends.
      alpha: overlay weight.
      log: called with one line per image written.

    Returns:
      ``(written, failures)``: the paths written per input file, and one message per file that
      could not be read (naming it).
    """
    written, failures, used = {}, [], set()
    for file in files:
        path = Path(file)
        try:
            image = read_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            failures.append(f"cannot read image {path}: {one_line(e)}")
            continue
        labels = predictor(image)
        stem = _unique_stem(path, used)
        written[str(path)] = write_prediction(
            image,
            labels,
            output,
            stem,
            class_names=predictor.class_names,
            palette=predictor.palette,
            legend=legend,
            alpha=alpha,
        )
        present = len(visualize.class_shares(labels, predictor.num_classes))
        log(
            f"{path}: {image.shape[1]}x{image.shape[0]}, {present} classes -> {output}/{stem}_*.png"
        )
    return written, failures


__all__ = ["IMAGE_SUFFIXES", "collect_inputs", "predict_files", "read_image", "write_prediction"]
