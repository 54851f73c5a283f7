"""The optimiser of the original code: SGD with momentum over three parameter groups.

The groups are told apart by the top-level parameter key:

* ``backbone``: the ImageNet backbone, at ``backbone_lr_mult`` (0.1) times the base rate;
* ``class_embedding``: the class table of the embedding head, at ``class_embedding_lr_mult``;
* everything else (ASPP, decoder, head conv): the base rate.

Each group follows its own polynomial decay (the original's ``multi_poly``),
``lr(t) = (lr0 - end) * (1 - t / T) ** power + end`` with powers 0.9, 0.9 and 0.95 and
``end = 1e-6``. Weight decay is added to the gradient before momentum, as PyTorch's ``SGD`` does.
With a frozen backbone the backbone gets no update and the table's momentum may be raised (0.95
in the original).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import optax

GROUPS = ("backbone", "head", "class_embedding")


def poly_schedule(
    base_lr: float, num_steps: int, power: float, end_lr: float = 1e-6
) -> Callable[[Any], Any]:
    """``(base_lr - end_lr) * (1 - step / num_steps) ** power + end_lr``, held at ``end_lr``.

    Args:
      base_lr: rate at step 0.
      num_steps: T, the step at which the rate reaches ``end_lr``.
      power: the exponent.
      end_lr: the floor.

    Returns:
      An optax schedule (step -> rate), jittable.
    """
    return optax.polynomial_schedule(
        init_value=base_lr,
        end_value=end_lr,
        power=power,
        transition_steps=max(1, int(num_steps)),
    )


def param_groups(params: Mapping[str, Any]) -> dict[str, str]:
    """The group of every top-level parameter key (see the module docstring)."""
    return {key: key if key in ("backbone", "class_embedding") else "head" for key in params.keys()}


def schedules(config: ml_collections.ConfigDict, num_steps: int) -> dict[str, Callable]:
    """The learning-rate schedule of each group.

    Args:
      config: the ``optim`` section of a training config.
      num_steps: total training steps.

    Returns:
      ``{group: schedule}`` for ``GROUPS``.
    """
    rates = {
        "backbone": config.base_lr * config.backbone_lr_mult,
        "head": config.base_lr,
        "class_embedding": config.base_lr * config.class_embedding_lr_mult,
    }
    return {
        group: poly_schedule(rates[group], num_steps, power, config.end_lr)
        for group, power in zip(GROUPS, config.poly_powers, strict=True)
    }


def _group_optimizer(config: ml_collections.ConfigDict, schedule: Callable, momentum: float):
    """One group's update: weight decay added to the gradient, then SGD (or Adam)."""
    parts = []
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    if config.name == "sgd":
        parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=config.nesterov))
    elif config.name == "adam":
        parts.append(optax.adam(schedule, b1=momentum))
    else:
        raise ValueError(f"optim.name must be 'sgd' or 'adam', got {config.name!r}")
    return optax.chain(*parts)


def make_optimizer(
    config: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
    """SGD + momentum + weight decay with per-group poly schedules.

    Args:
      config: the ``optim`` section of a training config: ``name`` (``"sgd"``, the paper's, or
        ``"adam"`` with ``momentum`` as its ``b1``, for from-scratch demos), ``base_lr``,
        ``momentum``,
        ``weight_decay``, ``nesterov``, ``backbone_lr_mult``, ``class_embedding_lr_mult``,
        ``poly_powers`` (three, in ``GROUPS`` order), ``end_lr``, ``freeze_backbone``,
        ``frozen_class_embedding_momentum`` and ``grad_clip_norm`` (0: none).
      num_steps: total training steps (the schedules end there).

    Returns:
      An optax transformation over the model's ``params`` tree.
    """
    sched = schedules(config, num_steps)
    table_momentum = config.momentum
    if config.freeze_backbone and config.frozen_class_embedding_momentum:
        table_momentum = config.frozen_class_embedding_momentum
    transforms = {
        "backbone": optax.set_to_zero()
        if config.freeze_backbone
        else _group_optimizer(config, sched["backbone"], config.momentum),
        "head": _group_optimizer(config, sched["head"], config.momentum),
        "class_embedding": _group_optimizer(config, sched["class_embedding"], table_momentum),
    }
    tx = optax.multi_transform(transforms, param_groups)
    if config.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return tx
