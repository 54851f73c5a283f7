"""Imprinting: each class row of the embedding table starts at its class's mean pixel embedding.

Used before the first step when ``model.class_embedding_init == "imprint"`` (see
:mod:`jaxscaleseg.config_schema`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxscaleseg import steps
from jaxscaleseg.data import sources
from jaxscaleseg.steps import TrainState


def class_embedding_sums(
    state: TrainState, batch: Mapping[str, jax.Array], num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Per-class sums of the pixel embeddings of one batch (for imprinting the class table).

    The network runs in training mode (batch statistics, as in a training step) and its
    BatchNorm updates are dropped. Memory is O(C·D + pixels·D): a segment sum, no pixels×C array.

    Args:
      state: the train state (embedding head).
      batch: ``{"image": float32 [B, H, W, 3], "label": int32 [B, H, W]}``, -1 ignored.
      num_classes: C (static).

    Returns:
      ``(sums, counts)``: float32 ``[C, D]`` and int32 ``[C]``.
    """
    outputs, _ = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(0)},
    )
    pixel = outputs["pixel_embedding"].reshape(-1, outputs["pixel_embedding"].shape[-1])
    labels = batch["label"].reshape(-1)
    segment = jnp.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    sums = jax.ops.segment_sum(pixel, segment, num_segments=num_classes + 1)[:num_classes]
    counts = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_segments=num_classes + 1)[
        :num_classes
    ]
    return sums, counts


def imprint_class_embeddings(
    params: Mapping[str, Any], sums: jax.Array, counts: jax.Array
) -> dict[str, Any]:
    """Points each seen class's row of the table at its mean pixel embedding.

    Row lengths are kept (the forward pass normalises the rows, and a row's length sets its
    effective learning rate), so only directions change; rows with ``counts == 0`` are kept.

    Args:
      params: model parameters with a top-level ``class_embedding`` float32 ``[C, D]``.
      sums: float32 ``[C, D]`` per-class sums of pixel embeddings.
      counts: int ``[C]`` pixels per class.

    Returns:
      A copy of ``params`` with the new table.
    """
    table = params["class_embedding"]
    length = jnp.linalg.norm(table, axis=-1, keepdims=True)
    direction = sums / jnp.maximum(jnp.linalg.norm(sums, axis=-1, keepdims=True), 1e-12)
    imprinted = jnp.where((counts > 0)[:, None], direction * length, table)
    return {**params, "class_embedding": imprinted}


def imprint_batch_count(setting: int | str, num_examples: int, batch_size: int) -> int:
    """Batches to imprint from: ``setting`` itself, or with ``"epoch"`` one pass over
    ``num_examples`` training examples in global batches of ``batch_size`` (at least 1)."""
    if setting == "epoch":
        return max(1, -(-int(num_examples) // int(batch_size)))
    return int(setting)


def imprint(
    state: TrainState,
    config: ml_collections.ConfigDict,
    train_source: Any,
    host_batch: int,
    data_sharding: jax.sharding.NamedSharding,
    is_main: bool,
) -> TrainState:
    """``state`` with the class table imprinted from ``config.model.imprint_batches`` batches.

    The batches come from a separate iterator (seed ``config.seed + 1``, no input workers), so
    the training data order is the same with and without imprinting.

    Args:
      state: a fresh train state (embedding head).
      config: the training config.
      train_source: the training source.
      host_batch: this host's batch size.
      data_sharding: the batch sharding (over the ``data`` axis).
      is_main: print the summary line (process 0).
    """
    num_classes = config.dataset.num_classes
    batches = imprint_batch_count(
        config.model.imprint_batches, len(train_source), config.batch_size
    )
    iterator = sources.train_iterator(
        config, train_source, host_batch, seed=config.seed + 1, worker_count=0, resample=False
    )
    sums_fn = jax.jit(functools.partial(class_embedding_sums, num_classes=num_classes))
    sums = counts = None
    for _ in range(batches):
        with sources.naming_bad_labels(config, config.dataset.train_split):
            batch = steps.to_global(next(iterator), data_sharding)
        s, c = sums_fn(state, {"image": batch["image"], "label": batch["label"]})
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    if is_main:
        seen = int(jnp.sum(counts > 0))
        epoch = " (one epoch)" if config.model.imprint_batches == "epoch" else ""
        print(
            f"imprinted {seen} of {num_classes} class embeddings from {batches} batches{epoch}",
            flush=True,
        )
    return state.replace(params=imprint_class_embeddings(state.params, sums, counts))


__all__ = ["class_embedding_sums", "imprint", "imprint_batch_count", "imprint_class_embeddings"]
