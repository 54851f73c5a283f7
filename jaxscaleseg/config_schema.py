"""The training configuration: every field, its default and its meaning.

Every ``configs/*.py`` starts from :func:`base_config` and changes the fields its setup needs,
so a field exists in every config (``--config.key=value`` overrides work everywhere and a
misspelt key is refused). :func:`validate` checks a config before any work starts and raises
:class:`ConfigError` naming the offending field.

Sections:

* top level: ``seed``, ``batch_size`` (global, over all devices and hosts), ``num_train_steps``,
  ``log_every_steps``, ``eval_every_steps`` (0: only at the end), ``checkpoint_every_steps``,
  ``keep_checkpoints``, ``progress_bar``; several hosts: ``distributed`` (one process per host,
  joined by ``jax.distributed.initialize``), ``distributed_coordinator`` (``host:port`` of
  process 0; empty: the ``JAX_COORDINATOR_ADDRESS`` variable or a cluster JAX detects: Slurm,
  Open MPI, Cloud TPU), ``distributed_num_processes`` (0: detected),
  ``distributed_process_id`` (-1: detected), ``distributed_timeout_seconds`` (how long the
  other processes wait for one that stopped responding before they stop too); see
  :mod:`jaxscaleseg.multihost`.
* ``dataset``: ``name`` (``synthetic`` or a TFDS builder: ``seg_ade20k``...), ``config``
  (builder config), ``data_dir``, ``train_split``, ``eval_split`` (a builder config made for
  one training split, ``seg_pascal_voc/voc2012_aug``'s ``train_aug``, refuses another; a split
  the prepared dataset lacks is refused when training starts), ``num_classes``,
  augmentation (``crop_size``, ``scale_range``, ``flip``, ``color_jitter`` with
  ``color_jitter_factors``: empty for our photometric distortion, (b, c, s) for the original
  code's factor jitter), ``warp_size`` (empty, or the (H, W) every training and evaluation
  image and label is resized to first, aspect ratio not kept: the original code's COCO-Stuff),
  ``normalization`` (``imagenet`` or ``coco_stuff_original``),
  ``repeat_factor_threshold`` (0: off), ``worker_count`` (input processes: ``"auto"``, none
  on a CPU backend and up to 8 on an accelerator, or a count), evaluation sizes
  (``eval_crop_size``/``eval_pad_to``, empty: full resolution), ``eval_protocol`` (``fit``:
  shrink to fit ``eval_crop_size`` and pad, every pixel scored; ``crop_val``: the original
  code's ``--crop_val``, short side resized to the square ``eval_crop_size`` and only the
  centre crop scored), ``eval_batch_size``,
  ``max_eval_examples`` (0: all) and the ``synthetic`` source's ``image_size``,
  ``train_examples``, ``eval_examples``, ``seed``, ``zipf_exponent`` (0: every class equally
  frequent; s > 0: long-tailed, Zipf's law with exponent s) and ``family_size`` (1: no
  look-alikes; F > 1: families of F classes that differ only in the stripe angle), see
  :mod:`jaxscaleseg.data.synthetic`.
* ``model``: ``backbone``, ``output_stride``, ``embedding_dim`` (D), ``separable``,
  ``bn_momentum`` (flax decay, backbone), ``decoder_bn_momentum`` (ASPP and decoder),
  ``dtype``, ``pretrained`` (ImageNet backbone weights: ``torchvision:<arch>[:<weights>]``,
  fetched once into a cache, or the path of converted ``.npz`` variables; empty: random
  init; see :mod:`jaxscaleseg.models.weights_cache`),
  ``tiny_width`` (first-layer width of the ``tiny`` backbone; 8 is ``build_model``'s net,
  other widths scale its backbone, ASPP and decoder together), ``center_embedding``
  (standardise the embedding channels over the batch before the L2 normalisation; off in the
  paper, on for the from-scratch synthetic demo), ``class_embedding_init`` (``uniform``: the
  paper's uniform [-1, 1] rows; ``imprint``: before the first step, each class row points at
  the mean pixel embedding of that class in ``imprint_batches`` training batches under the
  freshly initialised network; classes not seen keep their uniform rows; ``"epoch"``: as many
  batches as one pass over the training set, which at many classes imprints far more of them,
  BENCHMARKS §7.5).
* ``loss``: ``name`` (``softmax`` or ``ess``), ``num_neighbors`` (k), ``temperature``,
  ``margin``, ``separation_weight``, ``max_block_bytes`` (memory budget of the nearest-class
  searches: the largest queries×classes block), ``pixels_per_chunk`` (pixels per chunk of the
  ESS loss), ``table_gradient`` (``auto``, ``scatter``, ``sorted``, ``matmul`` or
  ``segment``: how row gradients reach the class table, see ``losses.ess_objective``),
  ``selection`` (``auto``, ``pyramid``, ``top_k``, ``min_rounds`` or ``tiled_top_k``: how the
  exact nearest-class searches pick each block's k nearest, see ``knn.nearest_class_ids``;
  ``auto`` is the pyramid on CPU and ``top_k`` on GPU/TPU). The
  first two take an int or ``"auto"`` (the default), resolved by ``loss_plan.loss_plan`` from
  the backend: on CPU 8 MiB and 8 192 pixels (cache-sized; 8 MiB keeps the step's growth with
  C within the class table's own size plus a few MB), on GPU/TPU 1 GiB and 2¹⁸ pixels (few,
  large kernels). ``negatives`` (``nearest_other`` or ``original``),
  ``separation_refresh_every`` (n: the separation term's nearest-other-class ids are searched
  exactly on the steps ``step % n == 0`` and carried in the checkpointed train state between;
  1, the default, searches every step as before), ``search`` (``exact``, ``approximate``,
  ``union``, ``certified`` or ``auto``: the pixels' nearest-class search; ``auto`` is the
  certified search from ``knn_index.AUTO_CERTIFIED_MIN_CLASSES`` (10 000) classes on when
  ``normalize_pixels``, exact otherwise), ``search_probes`` (cells probed per
  pixel), ``index_refresh_every`` (steps between rebuilds of the checkpointed index),
  ``search_candidates`` (K', classes searched per stride-4 source by ``union`` and
  ``certified``) and ``search_quality_sample`` (pixels of a log step's batch on which an
  approximate search's recall and loss error are measured; 0: off), ``normalize_pixels``
  (the ESS loss reads the full-resolution pixel embeddings scaled to unit length; off, as in
  the paper, the loss reads the bilinear blends of unit stride-4 embeddings, which a network
  can shorten by making neighbouring stride-4 embeddings point apart, see
  ``jaxscaleseg.pixel_length``).
* ``optim``: see :func:`jaxscaleseg.optim.make_optimizer`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

from jaxscaleseg import knn, knn_index, loss_plan, negatives
from jaxscaleseg.data import augment, pipeline, splits, synthetic
from jaxscaleseg.errors import ConfigError
from jaxscaleseg.models import BACKBONES, OUTPUT_STRIDES

LOSSES = ("softmax", "ess")
DTYPES = ("float32", "bfloat16")
CLASS_EMBEDDING_INITS = ("uniform", "imprint")


def _dataset_defaults() -> ml_collections.ConfigDict:
    """The ``dataset`` section's defaults."""
    d = ml_collections.ConfigDict()
    d.name = "seg_ade20k"
    d.config = ""
    d.data_dir = "~/tensorflow_datasets"
    d.train_split = "train"
    d.eval_split = "validation"
    d.num_classes = 150
    d.crop_size = (512, 512)
    d.scale_range = (0.5, 2.0)
    d.flip = True
    d.color_jitter = False
    d.color_jitter_factors = ()
    d.warp_size = ()
    d.normalization = "imagenet"
    d.repeat_factor_threshold = 0.0
    d.worker_count = ml_collections.FieldReference("auto", field_type=object)
    d.eval_crop_size = ()
    d.eval_pad_to = ()
    d.eval_protocol = "fit"
    d.eval_batch_size = 1
    d.max_eval_examples = 0
    d.synthetic = ml_collections.ConfigDict()
    d.synthetic.image_size = (128, 128)
    d.synthetic.train_examples = 2000
    d.synthetic.eval_examples = 200
    d.synthetic.seed = 0
    d.synthetic.zipf_exponent = 0.0
    d.synthetic.family_size = 1
    return d


def _model_defaults() -> ml_collections.ConfigDict:
    """The ``model`` section's defaults."""
    m = ml_collections.ConfigDict()
    m.backbone = "mobilenet_v2"
    m.output_stride = 16
    m.embedding_dim = 12
    m.separable = False
    m.bn_momentum = 0.99
    m.decoder_bn_momentum = 0.99
    m.dtype = "float32"
    m.pretrained = ""
    m.tiny_width = 8
    m.center_embedding = False
    m.class_embedding_init = "uniform"
    # An int, or "epoch" (field_type=object: `--config.model.imprint_batches=250` stays an int).
    m.imprint_batches = ml_collections.FieldReference(25, field_type=object)
    return m


def _loss_defaults() -> ml_collections.ConfigDict:
    """The ``loss`` section's defaults."""
    loss = ml_collections.ConfigDict()
    loss.name = "ess"
    loss.num_neighbors = 7
    loss.temperature = 20.0
    loss.margin = 0.2
    loss.separation_weight = 1.0
    # "auto" or an int (field_type=object: `--config.loss.max_block_bytes=8388608` stays an int).
    loss.max_block_bytes = ml_collections.FieldReference("auto", field_type=object)
    loss.pixels_per_chunk = ml_collections.FieldReference("auto", field_type=object)
    loss.table_gradient = "auto"
    # How the exact searches select each block's k nearest (knn.SEARCH_METHODS).
    loss.selection = "auto"
    loss.negatives = "nearest_other"
    # The separation term's nearest-other-class ids searched every n steps (1: every step).
    loss.separation_refresh_every = 1
    # The pixels' nearest-class search: "exact", "approximate" (knn_index), "union"
    # (knn_union), "certified" (knn_certified: the union, exact by an exact pass where its
    # certificate fails) or "auto" (certified from knn_index.AUTO_CERTIFIED_MIN_CLASSES classes
    # on with loss.normalize_pixels, else exact).
    loss.search = "auto"
    loss.search_probes = 8
    loss.index_refresh_every = 10
    # K': classes searched per stride-4 source by loss.search = "union" or "certified".
    loss.search_candidates = 32
    # Approximate searches: recall@k and ESS relative error on this many pixels of the batch
    # at each log step (logged as search_recall, search_ess_rel_error); 0: not measured.
    loss.search_quality_sample = 4096
    # The ESS loss on unit-length full-resolution pixel embeddings (off: the paper's blends).
    loss.normalize_pixels = False
    return loss


def _optim_defaults() -> ml_collections.ConfigDict:
    """The ``optim`` section's defaults."""
    o = ml_collections.ConfigDict()
    o.name = "sgd"
    o.base_lr = 0.01
    o.momentum = 0.9
    o.nesterov = False
    o.weight_decay = 1e-4
    o.backbone_lr_mult = 0.1
    o.class_embedding_lr_mult = 1.0
    o.poly_powers = (0.9, 0.9, 0.95)
    o.end_lr = 1e-6
    o.freeze_backbone = False
    o.frozen_class_embedding_momentum = 0.95
    o.grad_clip_norm = 0.0
    return o


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults (the paper's ADE20K MobileNetV2 ESS setup, 200k steps).

    Returns:
      An unlocked ``ConfigDict``; config files change it and return it.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 10
    c.num_train_steps = 200_000
    c.log_every_steps = 50
    c.eval_every_steps = 10_000
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 2
    c.progress_bar = True
    c.distributed = False
    c.distributed_coordinator = ""
    c.distributed_num_processes = 0
    c.distributed_process_id = -1
    c.distributed_timeout_seconds = 100

    c.dataset = _dataset_defaults()
    c.model = _model_defaults()
    c.loss = _loss_defaults()
    c.optim = _optim_defaults()
    return c


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a few steps on tiny inputs (the ``:smoke`` variant of every config).

    The dataset, head, loss and optimiser settings stay; the model becomes the ``tiny``
    backbone, crops 64×64, batch 2, evaluation on 2 examples.
    """
    config.batch_size = 2
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 1
    config.progress_bar = False
    config.model.backbone = "tiny"
    config.model.tiny_width = 8
    config.model.pretrained = ""
    imprint_batches = config.model.imprint_batches
    config.model.imprint_batches = 2 if imprint_batches == "epoch" else min(imprint_batches, 2)
    config.dataset.crop_size = (64, 64)
    config.dataset.eval_crop_size = (64, 64)
    config.dataset.eval_pad_to = ()
    if config.dataset.warp_size:
        config.dataset.warp_size = (64, 64)
    config.dataset.eval_batch_size = 2
    config.dataset.max_eval_examples = 2
    config.dataset.repeat_factor_threshold = 0.0
    config.dataset.worker_count = 0
    config.dataset.synthetic.image_size = (64, 64)
    config.dataset.synthetic.train_examples = 8
    config.dataset.synthetic.eval_examples = 2
    return config


def original_model_and_loss(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``:original`` settings every paper config shares: the original code's negative-set
    rule (``loss.negatives="original"``) and BatchNorm momenta (PyTorch 0.01 = flax 0.99 on the
    backbone only, main.py line 390; the ASPP and decoder keep PyTorch's 0.1 = flax 0.9)."""
    config.loss.negatives = "original"
    config.model.bn_momentum = 0.99
    config.model.decoder_bn_momentum = 0.9
    return config


def sibling_config(config_file: str, name: str, variant: str = "") -> ml_collections.ConfigDict:
    """``get_config(variant)`` of the config file ``name`` in the directory of ``config_file``.

    Lets a config (e.g. a softmax variant) start from another one however it was loaded
    (``config_flags`` loads files by path, so ``configs`` need not be importable).
    """
    path = Path(config_file).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_jaxscaleseg_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def variants(arg: str | None) -> set[str]:
    """The comma-separated variant names of a ``--config file.py:variant`` argument."""
    names = {v.strip() for v in (arg or "").split(",") if v.strip()}
    unknown = names - {"smoke", "original"}
    if unknown:
        raise ConfigError(f"unknown config variant(s) {sorted(unknown)}; known: smoke, original")
    return names


def _check_pair(value, name: str, allow_empty: bool) -> None:
    if allow_empty and len(value) == 0:
        return
    if len(value) != 2 or any(int(v) < 1 for v in value):
        raise ConfigError(f"{name} must be two positive sizes (h, w), got {tuple(value)}")


def _auto_or_int(value, name: str, minimum: int) -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be 'auto' or an int >= {minimum}, got {value!r}")


def _validate_dataset(d: ml_collections.ConfigDict) -> None:
    """Checks the ``dataset`` section."""
    if d.num_classes < 2:
        raise ConfigError(f"dataset.num_classes must be >= 2, got {d.num_classes}")
    _check_pair(d.crop_size, "dataset.crop_size", allow_empty=False)
    _check_pair(d.eval_crop_size, "dataset.eval_crop_size", allow_empty=True)
    _check_pair(d.eval_pad_to, "dataset.eval_pad_to", allow_empty=True)
    _check_pair(d.warp_size, "dataset.warp_size", allow_empty=True)
    if d.name != "synthetic":
        message = splits.augmented_split_error(d.name, d.config, d.train_split)
        if message:
            raise ConfigError(message)
    if d.eval_protocol not in pipeline.EVAL_PROTOCOLS:
        raise ConfigError(
            f"dataset.eval_protocol must be one of {pipeline.EVAL_PROTOCOLS}, "
            f"got {d.eval_protocol!r}"
        )
    if d.eval_protocol == "crop_val" and (
        len(d.eval_crop_size) != 2 or d.eval_crop_size[0] != d.eval_crop_size[1]
    ):
        raise ConfigError(
            "dataset.eval_protocol='crop_val' needs a square dataset.eval_crop_size, got "
            f"{tuple(d.eval_crop_size)}"
        )
    if d.normalization not in augment.NORMALIZATIONS:
        raise ConfigError(
            f"dataset.normalization must be one of {sorted(augment.NORMALIZATIONS)}, "
            f"got {d.normalization!r}"
        )
    if len(d.color_jitter_factors) not in (0, 3) or any(f < 0 for f in d.color_jitter_factors):
        raise ConfigError(
            "dataset.color_jitter_factors must be empty or three strengths >= 0 "
            f"(brightness, contrast, saturation), got {tuple(d.color_jitter_factors)}"
        )
    _check_pair(d.synthetic.image_size, "dataset.synthetic.image_size", allow_empty=False)
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError(f"dataset.scale_range must be 0 < min <= max, got {d.scale_range}")
    if not d.synthetic.zipf_exponent >= 0:
        raise ConfigError(
            f"dataset.synthetic.zipf_exponent must be >= 0, got {d.synthetic.zipf_exponent}"
        )
    if not 1 <= d.synthetic.family_size <= synthetic.MAX_FAMILY_SIZE:
        raise ConfigError(
            f"dataset.synthetic.family_size must be in 1..{synthetic.MAX_FAMILY_SIZE}, "
            f"got {d.synthetic.family_size}"
        )
    if d.name == "synthetic" and d.num_classes > synthetic.max_classes(d.synthetic.family_size):
        raise ConfigError(
            f"dataset.num_classes must be <= {synthetic.max_classes(d.synthetic.family_size)} "
            f"for the synthetic set with family_size={d.synthetic.family_size}, "
            f"got {d.num_classes}"
        )
    if d.eval_batch_size < 1:
        raise ConfigError(f"dataset.eval_batch_size must be >= 1, got {d.eval_batch_size}")
    _auto_or_int(d.worker_count, "dataset.worker_count", 0)


def _validate_model(m: ml_collections.ConfigDict) -> None:
    """Checks the ``model`` section."""
    if m.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {BACKBONES}, got {m.backbone!r}")
    if m.output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"model.output_stride must be one of {OUTPUT_STRIDES}, got {m.output_stride}"
        )
    if m.embedding_dim < 1:
        raise ConfigError(f"model.embedding_dim must be >= 1, got {m.embedding_dim}")
    if m.tiny_width < 1:
        raise ConfigError(f"model.tiny_width must be >= 1, got {m.tiny_width}")
    if m.class_embedding_init not in CLASS_EMBEDDING_INITS:
        raise ConfigError(
            f"model.class_embedding_init must be one of {CLASS_EMBEDDING_INITS}, "
            f"got {m.class_embedding_init!r}"
        )
    batches = m.imprint_batches
    if batches != "epoch" and (
        isinstance(batches, bool) or not isinstance(batches, int) or batches < 1
    ):
        raise ConfigError(f"model.imprint_batches must be an int >= 1 or 'epoch', got {batches!r}")
    if m.dtype not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {DTYPES}, got {m.dtype!r}")


def _validate_loss(loss: ml_collections.ConfigDict, num_classes: int) -> None:
    """Checks the ``loss`` section for a dataset of ``num_classes`` classes."""
    if loss.name not in LOSSES:
        raise ConfigError(f"loss.name must be one of {LOSSES}, got {loss.name!r}")
    if loss.name == "ess" and not 1 <= loss.num_neighbors <= num_classes - 1:
        raise ConfigError(
            f"loss.num_neighbors must be in 1..num_classes-1={num_classes - 1}, "
            f"got {loss.num_neighbors}"
        )
    if loss.negatives not in negatives.NEGATIVE_RULES:
        raise ConfigError(
            f"loss.negatives must be one of {negatives.NEGATIVE_RULES}, got {loss.negatives!r}"
        )
    refresh = loss.separation_refresh_every
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ConfigError(f"loss.separation_refresh_every must be an int >= 1, got {refresh!r}")
    if loss.search not in knn_index.SEARCH_MODES:
        raise ConfigError(
            f"loss.search must be one of {knn_index.SEARCH_MODES}, got {loss.search!r}"
        )
    for key in ("search_probes", "index_refresh_every", "search_candidates"):
        value = loss[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"loss.{key} must be an int >= 1, got {value!r}")
    sample = loss.search_quality_sample
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ConfigError(f"loss.search_quality_sample must be an int >= 0, got {sample!r}")
    search = knn_index.resolve_search(loss.search, num_classes, loss.normalize_pixels)
    if search == "approximate":
        cells, _ = knn_index.index_shape(num_classes)
        if loss.search_probes > cells:
            raise ConfigError(
                f"loss.search_probes={loss.search_probes} exceeds the index's {cells} cells"
                f" at num_classes={num_classes}"
            )
    if (
        loss.name == "ess"
        and search in ("union", "certified")
        and not (
            loss.num_neighbors < loss.search_candidates <= num_classes
            and loss.negatives == "nearest_other"
        )
    ):
        chosen = (
            f"loss.search={loss.search!r}"
            if loss.search == search
            else f"loss.search='auto' (the certified search with loss.normalize_pixels from "
            f"{knn_index.AUTO_CERTIFIED_MIN_CLASSES} classes; set loss.search='exact' to keep the "
            f"exact search)"
        )
        raise ConfigError(
            f"{chosen} takes loss.num_neighbors < loss.search_candidates <= "
            f"num_classes and loss.negatives='nearest_other', got search_candidates="
            f"{loss.search_candidates}, num_neighbors={loss.num_neighbors}, num_classes="
            f"{num_classes}, negatives={loss.negatives!r}"
        )
    if loss.selection not in knn.SEARCH_METHODS:
        raise ConfigError(
            f"loss.selection must be one of {knn.SEARCH_METHODS}, got {loss.selection!r}"
        )
    if loss.table_gradient not in loss_plan.TABLE_GRADIENTS:
        raise ConfigError(
            f"loss.table_gradient must be one of {loss_plan.TABLE_GRADIENTS}, "
            f"got {loss.table_gradient!r}"
        )
    _auto_or_int(loss.max_block_bytes, "loss.max_block_bytes", 2**16)
    _auto_or_int(loss.pixels_per_chunk, "loss.pixels_per_chunk", 1)
    if loss.temperature <= 0:
        raise ConfigError(f"loss.temperature must be > 0, got {loss.temperature}")


def _validate_optim(o: ml_collections.ConfigDict) -> None:
    """Checks the ``optim`` section."""
    if o.name not in ("sgd", "adam"):
        raise ConfigError(f"optim.name must be 'sgd' or 'adam', got {o.name!r}")
    if o.base_lr <= 0:
        raise ConfigError(f"optim.base_lr must be > 0, got {o.base_lr}")
    if len(o.poly_powers) != 3:
        raise ConfigError(f"optim.poly_powers must have 3 values, got {tuple(o.poly_powers)}")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")


def validate_distributed(config: ml_collections.ConfigDict) -> None:
    """Checks the ``distributed*`` fields (before any process joins the others).

    Raises:
      ConfigError: naming the field.
    """
    coordinator = str(config.distributed_coordinator)
    n, k = config.distributed_num_processes, config.distributed_process_id
    if not config.distributed:
        given = [
            name
            for name, unset in (
                ("distributed_coordinator", coordinator == ""),
                ("distributed_num_processes", n == 0),
                ("distributed_process_id", k == -1),
            )
            if not unset
        ]
        if given:
            raise ConfigError(f"{given[0]} is set but distributed=False; add --config.distributed")
        return
    if coordinator:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"distributed_coordinator must be host:port (port 1-65535), got {coordinator!r}"
            )
    if n < 0:
        raise ConfigError(f"distributed_num_processes must be >= 1 (0: detected), got {n}")
    if k < -1 or (n and k >= n):
        raise ConfigError(
            f"distributed_process_id must be in 0..{n - 1 if n else 'N-1'} (-1: detected), got {k}"
        )
    if config.distributed_timeout_seconds < 1:
        raise ConfigError(
            f"distributed_timeout_seconds must be >= 1, got {config.distributed_timeout_seconds}"
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks a training config.

    Raises:
      ConfigError: naming the first invalid field.
    """
    for name in ("batch_size", "num_train_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] < 1:
            raise ConfigError(f"{name} must be >= 1, got {config[name]}")
    for name in ("log_every_steps",):
        if config[name] < 1:
            raise ConfigError(f"{name} must be >= 1, got {config[name]}")
    if config.eval_every_steps < 0:
        raise ConfigError(f"eval_every_steps must be >= 0, got {config.eval_every_steps}")
    validate_distributed(config)
    _validate_dataset(config.dataset)
    _validate_model(config.model)
    _validate_loss(config.loss, config.dataset.num_classes)
    _validate_optim(config.optim)
