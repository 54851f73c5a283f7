"""Which splits a config trains and evaluates on, checked before any work starts.

A builder config that exists to add a training split (``seg_pascal_voc/voc2012_aug`` adds
SBD's 10 582-image ``train_aug``) is useless, and silently so, with any other training split:
:func:`augmented_split_error` refuses that from the config alone, and
:func:`missing_split_error` refuses a split that the prepared dataset lacks. Both return one
line naming the dataset and the splits, or None. No TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Mapping

# (TFDS name, builder config) -> the training split the config was made for.
AUGMENTED_TRAIN_SPLITS: dict[tuple[str, str], str] = {
    ("seg_pascal_voc", "voc2012_aug"): "train_aug",
}


def augmented_split_error(name: str, builder_config: str, train_split: str) -> str | None:
    """A one-line error when ``name/builder_config`` adds a training split that is not used.

    Args:
      name: TFDS builder name, e.g. ``"seg_pascal_voc"``.
      builder_config: its builder config, e.g. ``"voc2012_aug"`` (``""``: the default).
      train_split: ``dataset.train_split`` of the config.

    Returns:
      The message, or None when the split is the one the builder config exists for (or the
      builder config adds none).
    """
    wanted = AUGMENTED_TRAIN_SPLITS.get((name, builder_config))
    if wanted is None or train_split == wanted:
        return None
    return (
        f"dataset.config={builder_config!r} exists for its training split {wanted!r} but "
        f"dataset.train_split={train_split!r}; set --config.dataset.train_split={wanted} "
        f"(or use another dataset.config to train on {train_split!r})"
    )


def missing_split_error(
    dataset: str, available: Mapping[str, int], train_split: str, eval_split: str
) -> str | None:
    """A one-line error when the prepared dataset lacks the training or evaluation split.

    Args:
      dataset: ``name/config`` as prepared, for the message.
      available: split name -> number of examples of the prepared dataset.
      train_split: ``dataset.train_split``.
      eval_split: ``dataset.eval_split``.

    Returns:
      The message, or None when both splits exist.
    """
    for field, split in (("train_split", train_split), ("eval_split", eval_split)):
        if split not in available:
            have = ", ".join(f"{k} ({n})" for k, n in sorted(available.items())) or "none"
            return (
                f"dataset.{field}={split!r} but the prepared {dataset} has no such split "
                f"(it has: {have})"
            )
    return None


def describe_splits(dataset: str, sizes: Mapping[str, tuple[str, int]]) -> str:
    """The log line of the splits a run uses.

    Args:
      dataset: ``name/config``.
      sizes: role (``"train"``, ``"eval"``) -> (split name, number of examples).

    Returns:
      e.g. ``"data seg_pascal_voc/voc2012_aug: train = train_aug (10582 examples), eval =
      validation (1449 examples)"``.
    """
    parts = [f"{role} = {split} ({count} examples)" for role, (split, count) in sizes.items()]
    return f"data {dataset}: " + ", ".join(parts)
