"""Whole-image, sliding-window and test-time-augmented inference, and the ``Predictor`` API.

:func:`infer_features` takes the views that :class:`InferenceSettings` name (whole images or
sliding windows, flips, scales) through ``jaxscaleseg.views``, whose functions take the
model's eval-mode ``apply_fn`` and return ``(features, class_embedding)``: L2-normalised pixel
embeddings ``[B, H, W, D]`` and the class table ``[C, D]``, or mean logits ``[B, H, W, C]``
and None. :func:`features_to_labels` assigns each pixel its nearest class with the
memory-bounded searches (:func:`resolve_search`: exact, approximate or certified; nothing holds
C entries per pixel), or the logits' argmax.

Typical use::

    predictor = Predictor.from_workdir(config, "workdirs/demo", checkpoint="best")
    labels = predictor(image_uint8)  # int32 [H, W]

:meth:`Predictor.from_workdir` reads a training workdir through :mod:`jaxscaleseg.workdir`:
the model is rebuilt from its ``model.json`` and the variables come from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxscaleseg import initial_state, knn, knn_certified, knn_union, views
from jaxscaleseg import workdir as workdir_lib
from jaxscaleseg.data import augment, sources, synthetic
from jaxscaleseg.models import build_model

ApplyFn = views.ApplyFn
Features = views.Features

MODES = ("whole", "slide")
SEARCHES = ("exact", "approximate", "certified", "auto")
# search="auto": the certified search from this many classes on, on CPU; the exact one otherwise.
# Both return the exact assignment; only the time differs. BENCHMARKS.md §7.3 (CPU, one
# 1024x2048 image): on the demo checkpoint's embeddings certified took 4.0 s against the exact
# 8.4 s at 10 000 classes (64 s against 226 s at 100 000), and 2.5 s against 1.4 s at
# 1 284; on features with no spatial structure it is 1.3-1.4x slower than the exact search.
# Not measured on a GPU yet, so there "auto" stays exact.
AUTO_CERTIFIED_MIN_CLASSES = 10_000
_SECTION = ("mode", "crop_size", "stride", "flip", "scales", "search", "search_candidates")
# Multi-scale test scales in common use (mmsegmentation, DeepLab): 0.5 to 1.75 in steps of 0.25.
COMMON_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """How predictions are computed.

    Attributes:
      mode: ``"whole"`` (the full image at once) or ``"slide"`` (windows of ``crop_size``).
      crop_size: ``(h, w)`` of the sliding windows (``"slide"`` only).
      stride: ``(h, w)`` step between windows; None: two thirds of ``crop_size``.
      flip: also predict the horizontally flipped image and merge.
      scales: image scales to predict at and merge (1.0: the original size).
      max_block_bytes: memory budget of the nearest-class search.
      search: ``"exact"``, ``"approximate"`` (embedding head: ``knn_union.approximate_assign``,
        agreement with the exact assignment in BENCHMARKS.md §7), ``"certified"``
        (``knn_certified.certified_assign``: the exact assignment, the approximate one where a
        bound proves it exact and an exact search elsewhere) or ``"auto"`` (the default:
        :func:`resolve_search`, certified from ``AUTO_CERTIFIED_MIN_CLASSES`` classes on on
        CPU, else exact; the exact assignment either way).
      search_candidates: K', classes searched per point of its ×4 coarser grid.
    """

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    max_block_bytes: int = knn.DEFAULT_MAX_BLOCK_BYTES
    search: str = "auto"
    search_candidates: int = knn_union.DEFAULT_CANDIDATES

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if int(self.search_candidates) < 1:
            raise ValueError(f"search_candidates must be >= 1, got {self.search_candidates}")
        if self.mode == "slide":
            if self.crop_size is None or len(self.crop_size) != 2 or min(self.crop_size) < 1:
                raise ValueError(f"sliding windows need a crop_size (h, w), got {self.crop_size}")
            if self.stride is not None and (len(self.stride) != 2 or min(self.stride) < 1):
                raise ValueError(f"stride must be two positive sizes (h, w), got {self.stride}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {self.scales}")

    @property
    def window(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """``(crop_size, stride)`` in sliding-window mode, else None."""
        if self.mode != "slide":
            return None
        crop = (int(self.crop_size[0]), int(self.crop_size[1]))
        stride = self.stride or (max(1, 2 * crop[0] // 3), max(1, 2 * crop[1] // 3))
        return crop, (int(stride[0]), int(stride[1]))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> InferenceSettings:
        """Settings from a config's optional ``inference`` section, then ``overrides``.

        The section may hold ``mode``, ``crop_size``, ``stride``, ``flip``, ``scales``,
        ``search`` and ``search_candidates``;
        a missing section or field keeps the default (sliding windows default to the training
        ``dataset.crop_size``). Overrides whose value is None are ignored.
        """
        section = config.get("inference", None) or {}
        values: dict[str, Any] = {}
        for name in _SECTION:
            if name in section and section[name] not in (None, ()):
                values[name] = section[name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("mode") == "slide" and not values.get("crop_size"):
            values["crop_size"] = tuple(config.dataset.crop_size)
        for name in ("crop_size", "stride"):
            if values.get(name):
                values[name] = tuple(int(v) for v in values[name])
            else:
                values.pop(name, None)
        if "scales" in values:
            values["scales"] = tuple(float(s) for s in values["scales"])
        return cls(**values)


def infer_features(apply_fn: ApplyFn, images: jax.Array, settings: InferenceSettings) -> Features:
    """Features of ``images`` float32 ``[B, H, W, 3]`` as ``settings`` prescribe."""
    window = settings.window
    crop, stride = window if window else (None, None)
    return views.tta_features(
        apply_fn, images, flip=settings.flip, scales=settings.scales, crop_size=crop, stride=stride
    )


def resolve_search(search: str, num_classes: int | None, backend: str | None = None) -> str:
    """The search that ``search`` stands for: ``"auto"`` is ``"certified"`` from
    ``AUTO_CERTIFIED_MIN_CLASSES`` classes on when ``backend`` (default: JAX's) is the CPU, and
    ``"exact"`` otherwise or when there is no class table (``num_classes`` None); any other
    value is itself.
    """
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if search != "auto":
        return search
    on_cpu = (backend or jax.default_backend()) == "cpu"
    many = num_classes is not None and num_classes >= AUTO_CERTIFIED_MIN_CLASSES
    return "certified" if on_cpu and many else "exact"


@functools.partial(jax.jit, static_argnames="max_block_bytes")
def _assign(features: jax.Array, class_embedding: jax.Array, max_block_bytes: int) -> jax.Array:
    return knn.assign(features, class_embedding, max_block_bytes=max_block_bytes)


@jax.jit
def _argmax(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def features_to_labels(
    features: jax.Array,
    class_embedding: jax.Array | None = None,
    *,
    max_block_bytes: int = knn.DEFAULT_MAX_BLOCK_BYTES,
    search: str = "auto",
    search_candidates: int = knn_union.DEFAULT_CANDIDATES,
) -> jax.Array:
    """Class ids from features.

    Args:
      features: float ``[..., D]`` pixel embeddings (with ``class_embedding``) or ``[..., C]``
        logits (without).
      class_embedding: float ``[C, D]`` class table, or None for logits.
      max_block_bytes: memory budget of the nearest-class search.
      search, search_candidates: as in :class:`InferenceSettings` (the approximate search
        takes features ``[B, H, W, D]``).

    Returns:
      int32 ``[...]``: the nearest class (Euclidean) or the argmax of the logits.
    """
    # The certified search takes [B, H, W, D] features; "auto" keeps the exact one otherwise.
    gridded = class_embedding is not None and features.ndim == 4
    search = resolve_search(search, class_embedding.shape[0] if gridded else None)
    if search == "certified" and class_embedding is not None:
        ids, _ = knn_certified.certified_assign(
            features,
            class_embedding,
            candidates=int(search_candidates),
            max_block_bytes=max_block_bytes,
        )
        return ids
    if search == "approximate" and class_embedding is not None:
        return knn_union.approximate_assign(
            features,
            class_embedding,
            candidates=int(search_candidates),
            max_block_bytes=max_block_bytes,
        )
    lead_shape = features.shape[:-1]
    flat = jnp.reshape(features, (-1, features.shape[-1]))
    num = flat.shape[0]
    # Pad the pixel count to a bucket: images of many sizes share a few compiled searches.
    flat = jnp.pad(flat, ((0, _bucket(num) - num), (0, 0)))
    if class_embedding is None:
        ids = _argmax(flat)
    else:
        ids = _assign(flat, class_embedding, max_block_bytes)
    return ids[:num].reshape(lead_shape)


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of 1/8 of its power of two (at least 1024): < 12.5% more."""
    if n <= 1024:
        return 1024
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


# --------------------------------------------------------------------------- predictor


def _as_rgb_batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """uint8/float images ``[H, W, 3]`` or ``[B, H, W, 3]`` (grey ``[H, W]`` accepted)."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[..., None]
    single = images.ndim == 3
    if single:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected an image [H, W, 3] or a batch [B, H, W, 3], got {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[-1] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {images.shape[-1]}")
    return images, single


class Predictor:
    """A model loaded once and called on images.

    ``predictor(image)`` maps a uint8 RGB image ``[H, W, 3]`` (or a batch ``[B, H, W, 3]`` of
    equal-size images) to int32 class ids ``[H, W]`` (``[B, H, W]``) at the image's resolution,
    with the inference settings (sliding window, flip, scales) it was built with.

    Attributes:
      model: the flax module.
      variables: its variables (``params``, ``batch_stats``).
      num_classes: C.
      class_names: C names.
      palette: uint8 ``[C, 3]`` colours.
      settings: the :class:`InferenceSettings`.
      step: the training step of the checkpoint (None if unknown).
      normalization: ``(mean, std)`` float32 [3] of the training images (the config's
        ``dataset.normalization``, ImageNet's unless the original code's COCO-Stuff), applied
        to the uint8 images given to ``__call__``.
    """

    def __init__(
        self,
        model: nn.Module,
        variables: Mapping[str, Any],
        *,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | None = None,
        settings: InferenceSettings | None = None,
        step: int | None = None,
        normalization: str = "imagenet",
    ):
        self.model = model
        self.normalization = augment.normalization(normalization)
        self.variables = jax.device_put(dict(variables))
        self.num_classes = int(model.num_classes)
        self.class_names = tuple(class_names or synthetic.class_names(self.num_classes))
        if palette is None:
            palette = synthetic.make_palette(self.num_classes)
        self.palette = np.asarray(palette, np.uint8).reshape(self.num_classes, 3)
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for a model of {self.num_classes} classes"
            )
        self.settings = settings or InferenceSettings()
        self.step = step
        # Variables are an argument, not a closure constant: one compilation per input shape.
        self._apply = jax.jit(functools.partial(model.apply, train=False))

    @classmethod
    def from_workdir(
        cls,
        config: ml_collections.ConfigDict,
        workdir: str | os.PathLike,
        checkpoint: str | int = "best",
        settings: InferenceSettings | None = None,
    ) -> Predictor:
        """Loads a training workdir's checkpoint (see the module docstring for the layout).

        Args:
          config: the run's config: checked against the workdir's ``model.json`` (the model is
            rebuilt from that file, or from the config when the workdir has none); its dataset
            gives the class names and palette, its optional ``inference`` section the default
            settings.
          workdir: the training workdir.
          checkpoint: ``"best"``, ``"latest"`` or a step.
          settings: inference settings; None: :meth:`InferenceSettings.from_config`.

        Raises:
          CheckpointNotFoundError: naming the workdir and the checkpoint looked for.
          ModelMismatchError: the workdir's ``model.json`` differs from the config.
        """
        variables, step = workdir_lib.load_variables(workdir, checkpoint)
        expected = initial_state.model_args(config)
        workdir_lib.check_model(workdir, expected)
        stored = workdir_lib.read_model_args(workdir)
        model = build_model(**(stored or expected))
        if stored is None:  # no model.json: the checkpoint's shapes are the only witness
            initial_state.check_variable_shapes(model, variables, workdir)
        names, palette = sources.class_info(config, model.num_classes)
        return cls(
            model,
            variables,
            class_names=names,
            palette=palette,
            settings=settings or InferenceSettings.from_config(config),
            step=step,
            normalization=config.dataset.normalization,
        )

    def apply_fn(self, images: jax.Array) -> Mapping[str, jax.Array]:
        """The eval-mode model on normalised images ``[B, h, w, 3]`` (jitted per shape)."""
        return self._apply(self.variables, images)

    def features(self, images: jax.Array) -> Features:
        """``infer_features`` of normalised images float32 ``[B, H, W, 3]``."""
        return infer_features(self.apply_fn, jnp.asarray(images, jnp.float32), self.settings)

    def predict_normalized(self, images: jax.Array) -> jax.Array:
        """int32 ``[B, H, W]`` class ids of normalised images float32 ``[B, H, W, 3]``."""
        features, class_embedding = self.features(images)
        return features_to_labels(
            features,
            class_embedding,
            max_block_bytes=self.settings.max_block_bytes,
            search=self.settings.search,
            search_candidates=self.settings.search_candidates,
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Class ids of uint8 RGB images.

        Args:
          images: uint8 ``[H, W, 3]`` or ``[B, H, W, 3]`` (grey ``[H, W]``/``[..., 1]`` and RGBA
            are accepted; alpha is dropped).

        Returns:
          int32 numpy ``[H, W]`` or ``[B, H, W]``.
        """
        batch, single = _as_rgb_batch(images)
        labels = np.asarray(self.predict_normalized(augment.normalize(batch, *self.normalization)))
        return labels[0] if single else labels


def describe(settings: InferenceSettings) -> str:
    """A short human-readable summary of the settings, e.g. ``slide 512x512/341x341 flip``."""
    parts = ["whole"]
    if settings.window:
        (ch, cw), (sh, sw) = settings.window
        parts = [f"slide {ch}x{cw}/{sh}x{sw}"]
    if settings.flip:
        parts.append("flip")
    if tuple(settings.scales) != (1.0,):
        parts.append("scales " + ",".join(f"{s:g}" for s in settings.scales))
    if settings.search not in ("exact", "auto"):
        parts.append(f"{settings.search} search K'={settings.search_candidates}")
    return " ".join(parts)


__all__ = [
    "COMMON_SCALES",
    "InferenceSettings",
    "Predictor",
    "describe",
    "features_to_labels",
    "infer_features",
    "resolve_search",
]
