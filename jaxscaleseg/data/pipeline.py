"""Input pipelines on grain, over any random-access source (``tfds.data_source`` or synthetic).

Training: decode → random scale → random crop with padding (image padded with the mean, label
with -1) → horizontal flip → optional colour jitter → normalise → batch, repeated forever. Each
example's randomness comes from one generator that grain derives from (seed, position in the
sampled stream), so the batches are the same for any worker count and after a restore.

Evaluation: no augmentation, every example exactly once, the last batch padded with examples
whose ``valid`` mask is all False; images keep their full size (padded bottom/right to a common
size) unless a ``crop_size``/``pad_to`` is given.

Source records are dicts ``{"image": uint8 [H, W, 3], "label": uint16 or int [H, W] or
[H, W, 1], "file_name": str or bytes}``; uint16 labels store void as ``STORED_VOID`` (65535),
signed integer labels as -1. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from jaxscaleseg.data import augment
from jaxscaleseg.data.augment import MEAN_RGB, STD_RGB, denormalize, normalize
from jaxscaleseg.labels import IGNORE_INDEX, STORED_VOID, check_labels

__all__ = [
    "EVAL_PROTOCOLS",
    "MEAN_RGB",
    "STD_RGB",
    "decode_example",
    "denormalize",
    "make_eval_iterator",
    "make_train_iterator",
    "normalize",
    "repeat_factors",
]


def _file_name(record: dict[str, Any]) -> str:
    name = record.get("file_name", "<unnamed record>")
    if isinstance(name, np.ndarray):
        name = name.item()
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def decode_label(label: np.ndarray) -> np.ndarray:
    """Converts a stored label map to int32 class ids with -1 for void.

    Args:
      label: [H, W] or [H, W, 1]; uint16 with void ``STORED_VOID``, or a signed integer type
        with void -1 (other unsigned types are taken as class ids as they are).

    Returns:
      int32 [H, W].
    """
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.dtype == np.uint16:
        return np.where(label == STORED_VOID, IGNORE_INDEX, label.astype(np.int32))
    if label.dtype == np.int32:
        return label
    return label.astype(np.int32)


def decode_example(record: dict[str, Any], num_classes: int) -> dict[str, np.ndarray]:
    """Decodes and validates one source record.

    Args:
      record: a source record (see the module docstring).
      num_classes: C; every label must be in ``0..C-1`` or void.

    Returns:
      ``{"image": uint8 [H, W, 3], "label": int32 [H, W]}``.

    Raises:
      ValueError: naming the record's file name, if a label is out of range or the image and
        label sizes differ.
    """
    name = _file_name(record)
    image = np.asarray(record["image"])
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]
    label = decode_label(record["label"])
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape} and label {label.shape} differ in size in {name}")
    check_labels(label, num_classes, source=name)
    return {"image": image, "label": label}


class _Source:
    """A random-access view of a source with a stable ``repr`` and an optional index map.

    grain validates a restored iterator state against ``repr(data_source)``; a default
    ``object.__repr__`` holds a memory address and would never match in a new process.
    """

    def __init__(self, source: Any, indices: np.ndarray | None = None, tag: str = ""):
        self._source = source
        self._indices = indices
        if isinstance(source, (list, tuple, np.ndarray)):
            inner = f"{type(source).__name__}(len={len(source)})"  # never print the data
        else:
            inner = repr(source)
            if " at 0x" in inner:
                inner = f"{type(source).__name__}(len={len(source)})"
        self._repr = f"_Source({inner}, len={len(self)}{tag})"  # computed once: grain asks often

    def __len__(self) -> int:
        return len(self._source) if self._indices is None else len(self._indices)

    def __getitem__(self, index: int) -> Any:
        if self._indices is not None:
            index = int(self._indices[index])
        return self._source[int(index)]

    def __repr__(self) -> str:
        return self._repr


class _TrainTransform(grain.transforms.RandomMap):
    """decode → (warp) → scale/crop/pad/flip → optional jitter → normalise, one draw per example."""

    def __init__(
        self,
        num_classes: int,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float],
        flip: bool,
        color_jitter: bool,
        warp_size: tuple[int, int] | None = None,
        jitter_factors: tuple[float, float, float] | None = None,
        normalization: str = "imagenet",
    ):
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.flip = flip
        self.color_jitter = color_jitter
        self.warp_size = warp_size
        self.jitter_factors = jitter_factors
        self.mean, self.std = augment.normalization(normalization)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator):
        example = decode_example(element, self.num_classes)
        image, label = example["image"], example["label"]
        if self.warp_size is not None:
            image = augment.resize_image(image, self.warp_size)
            label = augment.resize_label(label, self.warp_size)
        image, label, inside = augment.random_scale_crop_flip(
            image,
            label,
            rng,
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            flip=self.flip,
            fill=self.mean,
        )
        if self.color_jitter:
            if self.jitter_factors is None:
                image = augment.color_jitter(image, rng)
            else:
                b, c, s = self.jitter_factors
                image = augment.factor_color_jitter(
                    image, rng, brightness=b, contrast=c, saturation=s
                )
            image[~inside] = self.mean
        image -= self.mean  # normalise in place: ``image`` is a fresh float32 array
        image *= 1.0 / self.std
        return {"image": image, "label": label}


def _ensure_flags_parsed() -> None:
    """Lets grain worker processes start outside an absl app (tests, notebooks, scripts).

    grain reads some of its absl flags when it starts workers, which fails while the flags are
    unparsed; inside ``absl.app.run`` (our CLIs) they are parsed already and this does nothing.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _mix_seed(seed: int) -> int:
    """Spreads a user seed over 31 bits.

    grain seeds record ``i`` with ``Philox(seed + i)``; spreading the seed keeps runs with
    nearby seeds (0, 1, 2, ...) from sharing shifted copies of the same random streams.
    """
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0] >> 1)


def repeat_factors(
    image_classes: Sequence[np.ndarray], num_classes: int, threshold: float
) -> np.ndarray:
    """LVIS repeat factors (Gupta et al., 2019) for long-tailed datasets.

    With ``f_c`` the fraction of images that contain class ``c``, class ``c`` gets
    ``r_c = max(1, sqrt(threshold / f_c))`` and image ``i`` the largest ``r_c`` over its classes
    (1 if it has none).

    Args:
      image_classes: per image, an int array of the class ids it contains.
      num_classes: C.
      threshold: t; classes in fewer than a fraction t of the images are repeated.

    Returns:
      float64 [N] repeat factor per image, each >= 1.
    """
    n = len(image_classes)
    counts = np.zeros(num_classes, np.int64)
    for classes in image_classes:
        counts[np.unique(np.asarray(classes, np.int64))] += 1
    freq = counts / max(n, 1)
    with np.errstate(divide="ignore"):
        class_factor = np.maximum(1.0, np.sqrt(threshold / freq))
    return np.asarray(
        [class_factor[np.asarray(c, np.int64)].max() if len(c) else 1.0 for c in image_classes],
        np.float64,
    )


def _image_classes(source: Any, num_classes: int) -> list[np.ndarray]:
    """The classes present in every example (``source.image_classes(i)`` if it exists)."""
    if hasattr(source, "image_classes"):
        return [np.asarray(source.image_classes(i)) for i in range(len(source))]
    out = []
    for i in range(len(source)):
        label = decode_example(source[i], num_classes)["label"]
        out.append(np.unique(label[label != IGNORE_INDEX]))
    return out


def _repeat_indices(factors: np.ndarray, seed: int) -> np.ndarray:
    """Expands factors into an index list by stochastic rounding, drawn once from ``seed``."""
    rng = np.random.default_rng([seed, 0x5EED])
    whole = np.floor(factors)
    repeats = (whole + (rng.random(len(factors)) < factors - whole)).astype(np.int64)
    return np.repeat(np.arange(len(factors)), repeats)


def make_train_iterator(
    source: Any,
    *,
    batch_size: int,
    crop_size: tuple[int, int],
    seed: int,
    num_classes: int,
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    color_jitter: bool = False,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 2,
    shard_index: int = 0,
    shard_count: int = 1,
    repeat_factor_threshold: float | None = None,
    warp_size: tuple[int, int] | None = None,
    color_jitter_factors: tuple[float, float, float] | None = None,
    normalization: str = "imagenet",
) -> grain.DataLoaderIterator:
    """The training input pipeline, repeated forever, with checkpointable state.

    Each example is shuffled per epoch (seeded), decoded and validated, then augmented with one
    random draw applied to image and label together. The per-example generator depends only on
    ``seed`` and the example's position in the sampled stream, so batches do not depend on
    ``worker_count`` and a restored iterator continues exactly where it stopped.

    Args:
      source: random-access source (``len`` and ``[i]``), e.g. ``tfds.data_source(...)`` or
        ``SyntheticSegmentation``; must be picklable when ``worker_count > 0``.
      batch_size: examples per batch on this host (the global batch is
        ``batch_size * shard_count``).
      crop_size: (h, w) of the training crops.
      seed: shuffle and augmentation seed.
      num_classes: C, for label validation.
      scale_range: (min, max) random scale factor.
      flip: random horizontal flips.
      color_jitter: random brightness/contrast/saturation (``augment.color_jitter``).
      worker_count: grain worker processes (0: in the calling process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads reading ``source[i]`` in each process (grain's ``ReadOptions``);
        they read ahead up to two batches. More help when reading waits on files; the
        synthetic source is CPU-bound, so more threads than cores only add contention.
      shard_index: this host's index (``jax.process_index()``).
      shard_count: number of hosts (``jax.process_count()``); each host reads and augments only
        its ``batch_size`` rows of every global batch, so the global batches are the same for
        any number of hosts (one host's iterator state is unchanged by this).
      repeat_factor_threshold: if set, LVIS repeat-factor sampling with this threshold (e.g.
        0.001); the class content of every example is read once, from
        ``source.image_classes(i)`` if the source has it, otherwise by decoding every label.
        Fractional factors are rounded stochastically once, from ``seed``.
      warp_size: if set, (H, W) every image and label is resized to first, aspect ratio not
        kept (the original code's COCO-Stuff loader).
      color_jitter_factors: with ``color_jitter``, None for ``augment.color_jitter`` or
        (brightness, contrast, saturation) strengths for ``augment.factor_color_jitter``.
      normalization: a name in ``augment.NORMALIZATIONS``.

    Returns:
      A grain ``DataLoaderIterator`` yielding ``{"image": float32 [B, h, w, 3], "label": int32
      [B, h, w]}``; ``get_state()``/``set_state(state)`` (bytes) save and restore its position,
      and ``grain.checkpoint.CheckpointSave``/``CheckpointRestore`` do the same within orbax.
    """
    crop_size = (int(crop_size[0]), int(crop_size[1]))
    tag = ""
    indices = None
    if repeat_factor_threshold is not None:
        factors = repeat_factors(
            _image_classes(source, num_classes), num_classes, repeat_factor_threshold
        )
        indices = _repeat_indices(factors, seed)
        tag = f", repeat_factor_threshold={repeat_factor_threshold}, seed={seed}"
    data = _Source(source, indices, tag)
    # One host's sampler: the same stream of examples (and per-example generators) for any
    # number of hosts; each host takes its rows of every global batch (_HostRows).
    sampler = grain.samplers.IndexSampler(
        num_records=len(data),
        shard_options=grain.sharding.ShardOptions(
            shard_index=0, shard_count=1, drop_remainder=True
        ),
        shuffle=True,
        num_epochs=None,
        seed=_mix_seed(seed),
    )
    shard_options = grain.sharding.NoSharding()
    if shard_count > 1:
        sampler = _HostRows(sampler, batch_size, shard_index, shard_count)
    transform = _TrainTransform(
        num_classes,
        crop_size,
        tuple(scale_range),
        bool(flip),
        bool(color_jitter),
        warp_size=None if warp_size is None else (int(warp_size[0]), int(warp_size[1])),
        jitter_factors=None if color_jitter_factors is None else tuple(color_jitter_factors),
        normalization=normalization,
    )
    if worker_count:
        _ensure_flags_parsed()
    loader = grain.DataLoader(
        data_source=data,
        sampler=sampler,
        operations=[transform, grain.transforms.Batch(batch_size, drop_remainder=True)],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        read_options=grain.ReadOptions(
            num_threads=read_threads, prefetch_buffer_size=2 * batch_size
        ),
    )
    return iter(loader)


class _HostRows:
    """Host ``k`` of ``n``'s share of a sampled stream cut into global batches of ``n * b``.

    Local position ``i`` (batch ``i // b``, row ``i % b``) is position
    ``(i // b) * n * b + k * b + i % b`` of the stream: each host reads and augments only its
    ``b`` rows of every global batch, and the global batch (rows of host 0, then host 1, ...:
    the order of ``jax.make_array_from_process_local_data`` over a mesh of the processes'
    devices in order) is the one a single host of ``n * b`` would build, with the same
    per-example generators (grain draws them from the stream position).
    """

    def __init__(self, sampler: Any, batch_size: int, shard_index: int, shard_count: int):
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
        self._sampler = sampler
        self._b, self._k, self._n = int(batch_size), int(shard_index), int(shard_count)

    def __len__(self) -> int:
        return len(self._sampler) // self._n

    def __getitem__(self, index: int) -> Any:
        batch, row = divmod(int(index), self._b)
        return self._sampler[(batch * self._n + self._k) * self._b + row]

    def __repr__(self) -> str:  # grain checks a restored state against it
        return f"_HostRows({self._sampler!r}, batch_size={self._b}, host={self._k} of {self._n})"


class _EvalSource:
    """This host's part of an evaluation set, padded with ``None`` to whole, equal batches."""

    def __init__(self, source: Any, batch_size: int, shard_index: int, shard_count: int):
        n = len(source)
        per_host = math.ceil(n / shard_count)
        self._length = max(1, math.ceil(per_host / batch_size)) * batch_size
        self._start = shard_index * per_host
        self._stop = min(n, (shard_index + 1) * per_host)
        self._source = source

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        position = self._start + int(index)
        return self._source[position] if position < self._stop else None

    def __repr__(self) -> str:
        return f"_EvalSource(start={self._start}, stop={self._stop}, len={self._length})"


def _fit_size(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    """The largest size with the aspect ratio of ``size`` that fits in ``bound`` (never up)."""
    factor = min(1.0, bound[0] / size[0], bound[1] / size[1])
    if factor == 1.0:
        return size
    return (
        min(bound[0], max(1, round(size[0] * factor))),
        min(bound[1], max(1, round(size[1] * factor))),
    )


EVAL_PROTOCOLS = ("fit", "crop_val")


class _EvalTransform(grain.transforms.Map):
    """decode → (warp) → fit or centre-crop to ``crop_size`` → normalise; ``None`` pads."""

    def __init__(
        self,
        num_classes: int,
        crop_size: tuple[int, int] | None,
        protocol: str = "fit",
        warp_size: tuple[int, int] | None = None,
        normalization: str = "imagenet",
    ):
        self.num_classes = num_classes
        self.crop_size = crop_size
        self.protocol = protocol
        self.warp_size = warp_size
        self.mean, self.std = augment.normalization(normalization)

    def map(self, element: dict[str, Any] | None):
        if element is None:
            return {
                "image": np.zeros((1, 1, 3), np.float32),
                "label": np.full((1, 1), IGNORE_INDEX, np.int32),
                "valid": np.zeros((1, 1), bool),
            }
        example = decode_example(element, self.num_classes)
        image, label = example["image"], example["label"]
        if self.warp_size is not None:
            image = augment.resize_image(image, self.warp_size)
            label = augment.resize_label(label, self.warp_size)
        if self.protocol == "crop_val":
            image, label = augment.short_side_center_crop(image, label, self.crop_size[0])
        elif self.crop_size is not None:
            size = _fit_size(label.shape, self.crop_size)
            if size != label.shape:
                image = augment.resize_image(image, size)
                label = augment.resize_label(label, size)
        image = normalize(image, self.mean, self.std)
        return {"image": image, "label": label, "valid": np.ones(label.shape, bool)}


class _PadBatch:
    """Stacks eval examples, padding each bottom/right to a common size."""

    def __init__(self, pad_to: tuple[int, int] | None):
        self.pad_to = pad_to

    def __call__(self, examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self.pad_to is None:
            h = max(e["label"].shape[0] for e in examples)
            w = max(e["label"].shape[1] for e in examples)
        else:
            h, w = self.pad_to
        batch = {
            "image": np.zeros((len(examples), h, w, 3), np.float32),
            "label": np.full((len(examples), h, w), IGNORE_INDEX, np.int32),
            "valid": np.zeros((len(examples), h, w), bool),
        }
        for i, example in enumerate(examples):
            eh, ew = example["label"].shape
            if eh > h or ew > w:
                raise ValueError(f"eval image of size {(eh, ew)} does not fit pad_to={(h, w)}")
            for key, value in example.items():
                batch[key][i, :eh, :ew] = value
        return batch


def make_eval_iterator(
    source: Any,
    *,
    batch_size: int,
    num_classes: int,
    crop_size: tuple[int, int] | None = None,
    pad_to: tuple[int, int] | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    worker_count: int = 0,
    protocol: str = "fit",
    warp_size: tuple[int, int] | None = None,
    normalization: str = "imagenet",
) -> grain.DataLoader:
    """The evaluation input pipeline: every pixel of every example exactly once, no augmentation.

    Examples are read in order. Host ``k`` of ``shard_count`` takes the ``k``-th contiguous
    part of the set; every host gets the same number of batches (the last ones padded with
    examples whose ``valid`` mask is all False), so collective evaluation steps stay in step.

    Image sizes: with ``crop_size=None`` images keep their full resolution and are padded at the
    bottom/right (image 0 = the mean after normalisation, label -1, ``valid`` False) to the
    largest size in the batch, or to ``pad_to`` if given (fixed shapes avoid recompiling; an
    image larger than ``pad_to`` raises). With ``crop_size=(h, w)`` an image larger than it is
    first shrunk, keeping its aspect ratio, to fit (image bilinear, label nearest; metrics are
    then measured at that resolution), and every batch is padded to exactly (h, w). Pixels are
    never cropped away.

    Two protocols of the original code: ``protocol="crop_val"`` (its ``--crop_val``, with a
    square ``crop_size``) resizes the short side to ``crop_size`` and scores only the centre
    square (``augment.short_side_center_crop``); ``warp_size`` resizes every image and label
    to that size first, aspect ratio not kept (its COCO-Stuff loader, which scores the warped
    512×512 labels).

    Args:
      source: random-access source (see ``make_train_iterator``).
      batch_size: examples per batch on this host.
      num_classes: C, for label validation.
      crop_size: None (full resolution) or (h, w), see above.
      pad_to: with ``crop_size=None``, a fixed (H, W) to pad every batch to.
      shard_index: this host's index.
      shard_count: number of hosts.
      worker_count: grain worker processes.
      protocol: ``"fit"`` or ``"crop_val"``, see above.
      warp_size: None, or the (H, W) every example is resized to first.
      normalization: a name in ``augment.NORMALIZATIONS``.

    Returns:
      A re-iterable grain ``DataLoader``; each pass yields ``{"image": float32 [B, H, W, 3],
      "label": int32 [B, H, W], "valid": bool [B, H, W]}``, where ``valid`` is True exactly on
      the pixels of real examples (void pixels inside them have label -1 and valid True).
    """
    if len(source) == 0:
        raise ValueError("the evaluation source is empty")
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; expected one of {EVAL_PROTOCOLS}")
    if protocol == "crop_val" and (crop_size is None or crop_size[0] != crop_size[1]):
        raise ValueError(f"protocol='crop_val' needs a square crop_size, got {crop_size}")
    if crop_size is not None:
        crop_size = (int(crop_size[0]), int(crop_size[1]))
        pad_to = crop_size
    data = _EvalSource(source, batch_size, shard_index, shard_count)
    no_sharding = grain.sharding.NoSharding()
    batch_fn: Callable[[Sequence[dict[str, np.ndarray]]], dict[str, np.ndarray]]
    batch_fn = _PadBatch(None if pad_to is None else (int(pad_to[0]), int(pad_to[1])))
    if worker_count:
        _ensure_flags_parsed()
    return grain.DataLoader(
        data_source=data,
        sampler=grain.samplers.IndexSampler(
            num_records=len(data), shard_options=no_sharding, shuffle=False, num_epochs=1
        ),
        operations=[
            _EvalTransform(
                num_classes,
                crop_size,
                protocol,
                None if warp_size is None else (int(warp_size[0]), int(warp_size[1])),
                normalization,
            ),
            grain.transforms.Batch(batch_size, drop_remainder=False, batch_fn=batch_fn),
        ],
        worker_count=worker_count,
        shard_options=no_sharding,
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch_size),
    )
