"""The model and the fresh train state a config describes.

``model_args`` is what a workdir's ``model.json`` stores; :func:`create_train_state` builds the
state :mod:`jaxscaleseg.steps` trains (model variables, optimiser, the loss's carried ids and
index), with imported backbone weights where ``model.pretrained`` names them;
:func:`abstract_train_state` gives its shapes without materialising it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxscaleseg import knn_index, optim
from jaxscaleseg.errors import ConfigError, ModelMismatchError
from jaxscaleseg.models import build_model, first_shape_difference
from jaxscaleseg.steps import LossSpec, TrainState


def model_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keyword arguments of ``models.build_model`` that a config describes.

    This dict is what a workdir's ``model.json`` stores: ``build_model(**model_args(config))``
    builds the model, and the same call on the stored dict rebuilds it.

    Returns:
      JSON-ready ``{"backbone", "head", "num_classes", "embedding_dim", "output_stride",
      "separable", "tiny_width", "center_embedding", "bn_momentum", "decoder_bn_momentum",
      "dtype"}``.
    """
    m = config.model
    return {
        "backbone": m.backbone,
        "head": "softmax" if config.loss.name == "softmax" else "embedding",
        "num_classes": int(config.dataset.num_classes),
        "embedding_dim": int(m.embedding_dim),
        "output_stride": int(m.output_stride),
        "separable": bool(m.separable),
        "tiny_width": int(m.tiny_width),
        "center_embedding": bool(m.center_embedding),
        "bn_momentum": float(m.bn_momentum),
        "decoder_bn_momentum": float(m.decoder_bn_momentum),
        "dtype": str(m.dtype),
    }


def make_model(config: ml_collections.ConfigDict):
    """The DeepLabV3+ model a config describes (``build_model(**model_args(config))``)."""
    return build_model(**model_args(config))


def check_variable_shapes(model: Any, variables: Mapping[str, Any], workdir: Any) -> None:
    """Refuses a checkpoint's variables whose shapes are not the flax ``model``'s (another class
    count, in a workdir without ``model.json``).

    Raises:
      ModelMismatchError: naming the first differing variable and both shapes.
    """
    expected = jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3), jnp.float32), train=False
        )
    )
    got = {
        jax.tree_util.keystr(p): tuple(np.shape(v))
        for p, v in jax.tree_util.tree_flatten_with_path(dict(variables))[0]
    }
    difference = first_shape_difference(got, dict(expected))
    if difference is not None:
        key, there, here = difference
        raise ModelMismatchError(
            f"workdir {workdir} holds a checkpoint of another model: {key} is {there} there "
            f"but {here} in the config's model (the workdir has no model.json to say which); "
            "use the run's config"
        )


def create_train_state(
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    backbone: Any = None,
) -> TrainState:
    """Initialises the model, with imported backbone weights when given (jit-able).

    Args:
      config: a training config.
      rng: init key.
      image_shape: ``(B, H, W, 3)`` of an input batch.
      backbone: ``{"params": ..., "batch_stats": ...}`` replacing the model's ``backbone``
        subtrees (see :func:`pretrained_backbone`), or None to keep the random init.

    Returns:
      A fresh ``TrainState`` at step 0.
    """
    model = make_model(config)
    variables = model.init({"params": rng}, jnp.zeros(image_shape, jnp.float32), train=False)
    if backbone is not None:
        # Imported here: the weight readers need safetensors, which a step alone does not.
        from jaxscaleseg.models import pretrained  # noqa: PLC0415 (only when configured)

        variables = pretrained.merge_backbone(variables, backbone)
    tx = optim.make_optimizer(config.optim, config.num_train_steps)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        **carried_state(config, variables["params"]),
    )


def carried_state(config: ml_collections.ConfigDict, params: Any) -> dict[str, Any]:
    """The loss's state a fresh ``TrainState`` carries besides the model and optimiser.

    Returns:
      ``{"separation_ids": ..., "class_index": ...}``: int32 ``[C]`` zeros (searched on step
      0) when ``loss.separation_refresh_every > 1``, and the approximate search's index of the
      initial table when the loss searches approximately; None otherwise.
    """
    spec = LossSpec.from_config(config.loss)
    separation_ids = None
    if spec.carries_separation_ids:
        # Searched on step 0 (0 % n == 0) before any use.
        separation_ids = jnp.zeros((config.dataset.num_classes,), jnp.int32)
    class_index = None
    if spec.approximate(config.dataset.num_classes):
        if config.loss.negatives != "nearest_other":
            raise ConfigError("loss.search='approximate' takes loss.negatives='nearest_other'")
        class_index = knn_index.build_index(
            params["class_embedding"], normalize_classes=True
        )._asdict()
    return {"separation_ids": separation_ids, "class_index": class_index}


def pretrained_backbone(config: ml_collections.ConfigDict, *, fetch_only: bool = False):
    """The backbone variables ``model.pretrained`` names, or a one-line ``ConfigError``.

    The value is a ``torchvision:`` name (the official checkpoint, downloaded into the cache
    once, hash-checked and converted) or the path of converted ``.npz`` variables; see
    :mod:`jaxscaleseg.models.weights_cache`. With ``fetch_only`` the weights are only made
    available (downloaded, checked) and None is returned: training does this before any other
    work so that a missing file fails at once.
    """
    from jaxscaleseg.models import weights_cache  # noqa: PLC0415 (only when configured)

    value, arch = config.model.pretrained, config.model.backbone
    try:
        if fetch_only:
            weights_cache.prefetch(value, arch=arch)
            return None
        return weights_cache.load_backbone(value, arch=arch)
    except weights_cache.WeightsError as e:
        raise ConfigError(f"model.pretrained: {e}") from e


def abstract_train_state(
    config: ml_collections.ConfigDict, image_shape: tuple[int, ...]
) -> TrainState:
    """The shapes and dtypes of the train state, without materialising it."""
    return jax.eval_shape(lambda: create_train_state(config, jax.random.key(0), image_shape))


__all__ = [
    "abstract_train_state",
    "carried_state",
    "check_variable_shapes",
    "create_train_state",
    "make_model",
    "model_args",
    "pretrained_backbone",
]
