"""Every config documents its command, validates, and builds its model and train step; one
representative of each training path trains end to end.

Every config's full variant is built abstractly (``jax.eval_shape`` of the train-state init and
of the train step at the config's own batch and crop, with its real backbone): that checks the
model, the head, the class count, the embedding size and the loss settings fit together, with no
compile and no data. The smoke variants all use the tiny backbone on synthetic data and differ
only in the head and loss, the class count, D, k, the optimiser and (``:original``) the original
code's loss and data settings, so one smoke run per distinct path trains end to end
(``TRAINED_SMOKES``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags

from jaxscaleseg import config_schema, initial_state, steps, training, workdir

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
CONFIG_NAMES = [p.stem for p in CONFIG_FILES]
# Smoke runs trained, as (config, variant): one per training path. The smoke variants differ
# only as described above; the ESS configs' ``:original`` variants (the original code's
# negatives, BatchNorm momenta, augmentation and evaluation protocol) every one of them, as
# issue 16 asks (ADE20K ResNet-50, COCO+LVIS and VOC repeat the ADE20K one with another k, D or
# C on the synthetic data here, so they cost little once the others have compiled).
# test_trained_smokes_cover_every_head_and_optimiser keeps this list covering every path.
TRAINED_SMOKES = (
    ("ade20k_mobilenetv2_ess", "smoke,original"),  # original negatives, crop_val evaluation
    ("cityscapes_mobilenetv2_ess", "smoke,original"),  # colour-jitter factors, no scaling
    ("coco_stuff10k_resnet50_ess", "smoke,original"),  # COCO-Stuff normalisation, warp
    ("ade20k_resnet50_ess", "smoke,original"),  # every :original variant runs its smoke test
    ("pascal_voc_resnet50_ess", "smoke,original"),
    ("coco_lvis_resnet50_ess", "smoke,original"),
    ("coco_lvis_resnet50_softmax", "smoke"),  # softmax head
    ("synthetic", "smoke"),  # Adam, imprinted and centred table, nearest-other negatives
)
# Every config's full variant, and every ESS config's ``:original`` one, is built abstractly.
BUILT = [(p, "") for p in CONFIG_FILES] + [
    (p, "original") for p in CONFIG_FILES if p.stem.endswith("_ess") and p.stem != "synthetic"
]


def _load(path: Path, variant: str = ""):
    return config_flags.config_flags._LoadConfigModule(  # noqa: SLF001 (how the flag loads it)
        path.stem, str(path)
    ).get_config(variant)


def test_every_paper_setup_has_both_heads():
    # One way to the softmax baseline: a sibling file X_softmax.py beside X_ess.py (or X.py).
    ess = {n[: -len("_ess")] for n in CONFIG_NAMES if n.endswith("_ess")}
    softmax = {n[: -len("_softmax")] for n in CONFIG_NAMES if n.endswith("_softmax")}
    assert ess | {"synthetic"} == softmax
    assert len(ess) >= 6
    assert "synthetic" in CONFIG_NAMES
    with pytest.raises(config_schema.ConfigError, match="unknown config variant"):
        _load(CONFIG_DIR / "synthetic.py", "softmax")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG_NAMES)
def test_config_builds_and_documents_its_command(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring is not None
    first_line = docstring.strip().splitlines()[0].strip()
    command = f"python -m jaxscaleseg.train --config configs/{path.name} --workdir"
    assert first_line.startswith(command), docstring
    variants = ("", "smoke") if path.stem.startswith("synthetic") else ("", "smoke", "original")
    for variant in variants:
        config = _load(path, variant)
        config_schema.validate(config)
    config = _load(path)
    if path.stem.endswith("_softmax"):
        assert config.loss.name == "softmax"
    elif path.stem.endswith("_ess"):
        assert config.loss.name == "ess"
        assert config.loss.temperature == 20.0
        assert config.loss.margin == 0.2
        assert config.loss.separation_weight == 1.0


def test_every_paper_config_names_a_source_for_its_settings():
    """Each ESS paper config's docstring says where settings come from, in the five kinds."""
    for path in CONFIG_FILES:
        if not path.stem.endswith("_ess"):
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert "Where each setting comes from" in docstring, path.name
        assert "chosen here" in docstring, path.name
        assert "``:original``" in docstring, path.name


def test_original_variants_restore_the_original_code():
    for path in CONFIG_FILES:
        if path.stem.startswith("synthetic"):
            continue
        ours, original = _load(path), _load(path, "original")
        assert (ours.loss.negatives, original.loss.negatives) == ("nearest_other", "original")
        assert (original.model.bn_momentum, original.model.decoder_bn_momentum) == (0.99, 0.9)
        assert ours.model.decoder_bn_momentum == 0.99
    city = _load(CONFIG_DIR / "cityscapes_mobilenetv2_ess.py", "original")
    assert tuple(city.dataset.scale_range) == (1.0, 1.0)
    assert tuple(city.dataset.crop_size) == (513, 513)
    assert city.dataset.color_jitter and tuple(city.dataset.color_jitter_factors) == (0.5,) * 3
    stuff = _load(CONFIG_DIR / "coco_stuff10k_resnet50_ess.py", "original")
    assert (stuff.dataset.config, stuff.dataset.num_classes) == ("stuff10k_182", 182)
    assert tuple(stuff.dataset.warp_size) == (512, 512)
    assert stuff.dataset.normalization == "coco_stuff_original"
    for name in ("ade20k_mobilenetv2_ess", "ade20k_resnet50_ess"):
        ade = _load(CONFIG_DIR / f"{name}.py", "original")
        assert ade.dataset.eval_protocol == "crop_val"
        assert tuple(ade.dataset.eval_crop_size) == (512, 512)
    lvis = _load(CONFIG_DIR / "coco_lvis_resnet50_ess.py", "original")
    assert lvis.dataset.config == "original_masks"
    voc = _load(CONFIG_DIR / "pascal_voc_resnet50_ess.py")
    assert (voc.dataset.config, voc.dataset.train_split) == ("voc2012_aug", "train_aug")


def test_known_paper_settings():
    ade = _load(CONFIG_DIR / "ade20k_mobilenetv2_ess.py")
    assert (ade.model.backbone, ade.model.embedding_dim, ade.loss.num_neighbors) == (
        "mobilenet_v2",
        12,
        7,
    )
    assert (ade.batch_size, tuple(ade.dataset.crop_size), ade.optim.base_lr) == (
        10,
        (512, 512),
        0.01,
    )
    assert ade.num_train_steps == 200_000
    r50 = _load(CONFIG_DIR / "ade20k_resnet50_ess.py")
    assert (r50.model.backbone, r50.loss.num_neighbors) == ("resnet50", 8)
    city = _load(CONFIG_DIR / "cityscapes_mobilenetv2_ess.py")
    assert (city.model.embedding_dim, city.batch_size, city.optim.base_lr) == (6, 12, 0.1)
    stuff = _load(CONFIG_DIR / "coco_stuff10k_resnet50_ess.py")
    assert stuff.num_train_steps >= 100_000
    for config in (ade, r50, city, stuff):
        o = config.optim
        assert (o.momentum, o.weight_decay, o.backbone_lr_mult) == (0.9, 1e-4, 0.1)
        assert tuple(o.poly_powers) == (0.9, 0.9, 0.95) and o.end_lr == 1e-6
        assert config.model.bn_momentum == 0.99


@pytest.mark.parametrize(
    ("path", "variant"), BUILT, ids=[f"{p.stem}:{v}" if v else p.stem for p, v in BUILT]
)
def test_full_config_builds_its_model_and_train_step(path, variant):
    """Every config's paper-size model (traced: no compile, no weights), and its loss and
    optimiser in a train step on the smoke variant's tiny backbone (traced too)."""
    config = _load(path, variant)
    config.model.pretrained = ""  # the converted ImageNet weights are not here; shapes suffice
    shape = (config.batch_size, *config.dataset.crop_size, 3)
    state = initial_state.abstract_train_state(config, shape)
    num_classes, dim = config.dataset.num_classes, config.model.embedding_dim
    if config.loss.name == "ess":
        assert state.params["class_embedding"].shape == (num_classes, dim), path.name
        assert state.params["head_conv"]["kernel"].shape[-1] == dim, path.name
    else:
        assert "class_embedding" not in state.params, path.name
        assert state.params["head_conv"]["kernel"].shape[-1] == num_classes, path.name
    # The step's loss, head and optimiser settings are the full config's; tracing it on the
    # paper backbone would only trace that backbone again (seconds per config).
    smoke = _load(path, ",".join(["smoke", variant]) if variant else "smoke")
    assert (smoke.loss, smoke.optim) == (config.loss, config.optim), path.name
    shape = (smoke.batch_size, *smoke.dataset.crop_size, 3)
    state = initial_state.abstract_train_state(smoke, shape)
    batch = {
        "image": jax.ShapeDtypeStruct(shape, jnp.float32),
        "label": jax.ShapeDtypeStruct(shape[:3], jnp.int32),
    }
    spec = steps.LossSpec.from_config(smoke.loss)
    step = functools.partial(steps.train_step, spec=spec)
    new_state, metrics = jax.eval_shape(step, state, batch, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, new_state.params) == jax.tree.map(
        lambda a: a.shape, state.params
    ), path.name
    assert all(m.shape == () for m in jax.tree.leaves(metrics)), path.name


def test_trained_smokes_cover_every_head_and_optimiser():
    """The trained representatives still span what the smoke variants differ in."""
    smokes = [_load(CONFIG_DIR / f"{name}.py", "smoke") for name in CONFIG_NAMES]
    smokes += [
        _load(CONFIG_DIR / f"{name}.py", "smoke,original")
        for name in CONFIG_NAMES
        if name.endswith("_ess")
    ]
    trained = [_load(CONFIG_DIR / f"{name}.py", variant) for name, variant in TRAINED_SMOKES]
    keys = ("loss.name", "optim.name", "model.class_embedding_init", "model.backbone")
    keys += ("loss.negatives", "model.decoder_bn_momentum", "dataset.eval_protocol")
    keys += ("dataset.color_jitter_factors", "dataset.normalization", "dataset.scale_range")
    for key in keys:
        every = {_hashable(_get(c, key)) for c in smokes}
        assert every <= {_hashable(_get(c, key)) for c in trained}, key
    assert any(c.dataset.warp_size for c in trained)


def _hashable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "variant"), TRAINED_SMOKES, ids=[f"{n}:{v}" for n, v in TRAINED_SMOKES]
)
def test_smoke_variant_trains_two_steps(tmp_path, name, variant):
    """A representative smoke variant, 2 steps end to end (synthetic data for absent archives).

    One test per config, so that parallel workers share them.
    """
    config = _load(CONFIG_DIR / f"{name}.py", variant)
    if config.dataset.name != "synthetic":
        config.dataset.name = "synthetic"  # the archives are not available here
    config.dataset.synthetic.image_size = (48, 48)
    config.dataset.crop_size = (32, 32)
    config.dataset.eval_crop_size = (48, 48)
    config.num_train_steps = 2
    result = training.train_and_evaluate(config, tmp_path / name)
    assert result["step"] == 2, name
    assert 0.0 <= result["eval"]["mIoU"] <= 1.0, name
    records = workdir.read_metrics(tmp_path / name)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2], name
