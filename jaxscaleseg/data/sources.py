"""The data of a config: its sources, its training and evaluation iterators, its class names.

* :func:`make_sources`: the training and evaluation random-access sources (the built-in
  synthetic set, or a prepared TFDS dataset; a missing one names the ``prepare`` command).
* :func:`train_iterator`, :func:`eval_iterator`: the grain pipelines of
  :mod:`jaxscaleseg.data.pipeline` with the config's settings, for this host's share.
* :func:`class_info`: class names and palette for pictures and tables.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging as absl_logging

from jaxscaleseg.data import image_classes, pipeline, splits, synthetic
from jaxscaleseg.errors import ConfigError, DatasetError, DatasetNotPreparedError
from jaxscaleseg.labels import LabelRangeError


class Prefix:
    """The first ``n`` examples of a random-access source (all of them if it has fewer)."""

    def __init__(self, source: Any, n: int):
        self._source, self._n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]


def tfds_full_name(dataset: ml_collections.ConfigDict) -> tuple[str, str]:
    """``(registered short name, "tfds_name[/builder_config]")`` of a config's dataset section.

    Raises:
      ConfigError: the name is not one of the registered builders.
    """
    from jaxscaleseg.data import builders  # noqa: PLC0415 (tensorflow: only for real datasets)

    try:
        name = builders.tfds_name(dataset.name)
    except ValueError as e:
        raise ConfigError(f"dataset.name: {e}") from e
    short = next(k for k, b in builders.BUILDERS.items() if b.name == name)
    return short, f"{name}/{dataset.config}" if dataset.config else name


def _tfds_builder(dataset: ml_collections.ConfigDict):
    """The prepared TFDS builder of a dataset section, or a one-line error naming the fix."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy: only for real datasets)

    short, full = tfds_full_name(dataset)
    cmd = (
        f"python -m jaxscaleseg.data.prepare {short}"
        + (f" --builder_config {dataset.config}" if dataset.config else "")
        + f" --manual_dir ARCHIVES --data_dir {dataset.data_dir}"
    )
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds warns about missing folders
    try:
        builder = tfds.builder(full, data_dir=os.path.expanduser(dataset.data_dir))
        prepared = builder.is_prepared()
    except Exception as e:  # noqa: BLE001 (tfds raises many kinds here)
        raise DatasetNotPreparedError(
            f"dataset {full} is not prepared in {dataset.data_dir} ({e}); run: {cmd}"
        ) from e
    finally:
        absl_logging.set_verbosity(verbosity)
    if not prepared:
        raise DatasetNotPreparedError(
            f"dataset {full} is not prepared in {dataset.data_dir}; run: {cmd}"
        )
    return builder


def make_sources(
    config: ml_collections.ConfigDict, *, check: tuple[str, ...] | None = None
) -> tuple[Any, Any]:
    """The training and evaluation sources of a config.

    ``check``: the splits whose class lists are checked against ``dataset.num_classes``
    (None: the training and evaluation splits).

    Raises:
      DatasetNotPreparedError: the TFDS dataset is not prepared in ``data_dir``; the message
        names the ``prepare`` command to run.
      ConfigError: the prepared dataset's class count differs from ``dataset.num_classes``, or
        it lacks ``dataset.train_split`` or ``dataset.eval_split`` (one line naming both).
      DatasetError: a split's class lists (written at preparation) hold an id
        ``>= dataset.num_classes``; a split without them fails at its first bad batch instead
        (:func:`naming_bad_labels`).
    """
    d = config.dataset
    if d.name == "synthetic":
        s = d.synthetic

        def make(n: int, split: str) -> synthetic.SyntheticSegmentation:
            return synthetic.SyntheticSegmentation(
                d.num_classes,
                tuple(s.image_size),
                seed=s.seed,
                num_examples=n,
                split=split,
                zipf_exponent=s.zipf_exponent,
                family_size=s.family_size,
            )

        train, evaluation = make(s.train_examples, "train"), make(s.eval_examples, "validation")
    else:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy: only for real datasets)

        builder = _tfds_builder(d)
        full = tfds_full_name(d)[1]
        meta_classes = (builder.info.metadata or {}).get("num_classes")
        if meta_classes is not None and int(meta_classes) != d.num_classes:
            raise ConfigError(
                f"dataset.num_classes={d.num_classes} but {full} has {meta_classes} classes"
            )
        available = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
        message = splits.missing_split_error(full, available, d.train_split, d.eval_split)
        if message:
            raise ConfigError(message)
        data_dir = os.path.expanduser(d.data_dir)
        train = tfds.data_source(full, split=d.train_split, data_dir=data_dir)
        evaluation = tfds.data_source(full, split=d.eval_split, data_dir=data_dir)
        for split, source in ((d.train_split, train), (d.eval_split, evaluation)):
            if check is not None and split not in check:
                continue
            image_classes.check_class_range(
                source, builder.data_dir, split, d.num_classes, dataset=full
            )
        # Each example's classes from the sidecar written at preparation (repeat factors and
        # frequency bins then read no record).
        train = image_classes.with_image_classes(train, builder.data_dir, d.train_split)
    if d.max_eval_examples and len(evaluation) > d.max_eval_examples:
        evaluation = Prefix(evaluation, d.max_eval_examples)
    return train, evaluation


def dataset_label(config: ml_collections.ConfigDict) -> str:
    """The dataset's name in messages: ``synthetic`` or ``tfds_name[/builder_config]``."""
    d = config.dataset
    return d.name + (f"/{d.config}" if d.config else "")


def _label_range_error(error: BaseException | None) -> BaseException | None:
    """The :class:`LabelRangeError` an exception is, or was raised from (grain wraps errors of
    its workers), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LabelRangeError) or "out of range: expected class ids" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def naming_bad_labels(config: ml_collections.ConfigDict, split: str) -> Iterator[None]:
    """Turns a bad label met while reading ``split``'s batches into one line naming the
    dataset, the split and the example (its file name).

    Raises:
      DatasetError: from the pipeline's :class:`LabelRangeError`.
    """
    try:
        yield
    except Exception as e:
        bad = _label_range_error(e)
        if bad is None:
            raise
        message = str(bad).strip().splitlines()[0]
        raise DatasetError(
            f"dataset {dataset_label(config)}, split {split}: {message}; prepare the dataset "
            "again, or set dataset.num_classes to its class count"
        ) from e


def resolve_worker_count(value: str | int) -> int:
    """Input worker processes for ``dataset.worker_count``.

    ``"auto"``: none on a CPU backend (the step uses every core) and half the cores (at most
    8) on an accelerator, so the host prepares batches while the device computes.
    """
    if str(value) != "auto":
        return int(value)
    if jax.default_backend() == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def train_iterator(
    config: ml_collections.ConfigDict,
    source: Any,
    batch_size: int,
    *,
    seed: int,
    worker_count: int | None = None,
    resample: bool = True,
) -> Any:
    """This host's shuffled, augmented, repeated training batches (a grain iterator).

    Args:
      config: the training config (``dataset`` section: crops, scales, flips, jitter).
      source: the training source.
      batch_size: this host's batch size.
      seed: shuffling and augmentation seed.
      worker_count: input processes; None: ``dataset.worker_count``.
      resample: apply ``dataset.repeat_factor_threshold`` (repeat-factor sampling).

    Returns:
      An iterator of ``{"image": float32 [B, h, w, 3], "label": int32 [B, h, w]}`` with
      ``get_state``/``set_state`` (checkpointed with the run).
    """
    d = config.dataset
    if worker_count is None:
        worker_count = resolve_worker_count(d.worker_count)
    return pipeline.make_train_iterator(
        source,
        batch_size=batch_size,
        crop_size=tuple(int(v) for v in d.crop_size),
        seed=seed,
        num_classes=d.num_classes,
        scale_range=tuple(d.scale_range),
        flip=d.flip,
        color_jitter=d.color_jitter,
        worker_count=worker_count,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        repeat_factor_threshold=(d.repeat_factor_threshold or None) if resample else None,
        warp_size=tuple(d.warp_size) or None,
        color_jitter_factors=tuple(d.color_jitter_factors) or None,
        normalization=d.normalization,
    )


def eval_iterator(config: ml_collections.ConfigDict, source: Any, batch_size: int) -> Any:
    """This host's padded evaluation batches (every example once; see ``pipeline``)."""
    d = config.dataset
    return pipeline.make_eval_iterator(
        source,
        batch_size=batch_size,
        num_classes=d.num_classes,
        crop_size=tuple(d.eval_crop_size) or None,
        pad_to=tuple(d.eval_pad_to) or None,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        **eval_view(config),
    )


def eval_view(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The evaluation view options of ``dataset`` (``pipeline.make_eval_iterator`` keywords):
    ``protocol`` (``crop_val``: the original code's centre crop), ``warp_size`` (the original
    code's COCO-Stuff warp) and ``normalization``."""
    d = config.dataset
    return {
        "protocol": d.eval_protocol,
        "warp_size": tuple(d.warp_size) or None,
        "normalization": d.normalization,
    }


def describe_splits(config: ml_collections.ConfigDict, train: Any, evaluation: Any) -> str:
    """The log line naming the dataset, its training and evaluation splits and their sizes."""
    d = config.dataset
    dataset = d.name + (f"/{d.config}" if d.config else "")
    sizes = {"train": (d.train_split, len(train)), "eval": (d.eval_split, len(evaluation))}
    return splits.describe_splits(dataset, sizes)


def class_info(
    config: ml_collections.ConfigDict, num_classes: int | None = None
) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and palette of the config's dataset.

    The synthetic set's names and hash palette; a TFDS builder's ``class_names`` and
    ``palette`` metadata when the dataset is prepared; otherwise ``class_<id>`` names and the
    hash palette.

    Returns:
      ``(names, palette uint8 [C, 3])``.
    """
    num_classes = int(num_classes or config.dataset.num_classes)
    names, palette = synthetic.class_names(num_classes), synthetic.make_palette(num_classes)
    if config.dataset.name == "synthetic":
        return names, palette
    try:
        metadata = _tfds_builder(config.dataset).info.metadata or {}
    except Exception:  # noqa: BLE001 (names are cosmetic: fall back to the generic ones)
        return names, palette
    if len(metadata.get("class_names", ())) == num_classes:
        names = tuple(str(n) for n in metadata["class_names"])
    if len(metadata.get("palette", ())) == num_classes:
        palette = np.asarray(metadata["palette"], np.uint8).reshape(num_classes, 3)
    return names, palette


__all__ = [
    "Prefix",
    "class_info",
    "dataset_label",
    "describe_splits",
    "eval_iterator",
    "eval_view",
    "make_sources",
    "naming_bad_labels",
    "resolve_worker_count",
    "tfds_full_name",
    "train_iterator",
]
