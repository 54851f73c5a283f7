"""Reproducing the paper: split checks, the original code's evaluation protocols, augmentation
and BatchNorm momenta (the ``:original`` variants), on fixture archives where data is needed.

References here follow the original code's own operations (PIL nearest resizes of the label,
torchvision's centre-crop offset), written independently of ``jaxscaleseg.data.augment``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import fixtures_archives as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxscaleseg import config_schema
from jaxscaleseg.data import augment, pipeline, splits
from jaxscaleseg.labels import STORED_VOID
from jaxscaleseg.models import build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _mapped(stored: np.ndarray) -> np.ndarray:
    """A stored uint16 label as int32 train ids with -1 for void."""
    stored = stored.astype(np.int64)
    return np.where(stored == STORED_VOID, -1, stored).astype(np.int32)


def _pil_nearest(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """PIL's nearest-neighbour resize (what the original code uses on labels)."""
    image = Image.fromarray(label.astype(np.int32), mode="I")
    return np.asarray(image.resize((size_hw[1], size_hw[0]), resample=Image.NEAREST))


def _prepared_source(tmp_path, name, config, make, split):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (heavy; the data tests only)

    from jaxscaleseg.data import builders, prepare  # noqa: PLC0415

    manual = tmp_path / "manual"
    manual.mkdir()
    expected = make(manual)
    prepare.prepare(name, manual_dir=str(manual), data_dir=str(tmp_path / "data"), config=config)
    full = builders.tfds_name(name) + (f"/{config}" if config else "")
    source = tfds.data_source(full, split=split, data_dir=str(tmp_path / "data"))
    return source, expected


# ---------------------------------------------------------------------------------------------
# Split checks.


def test_augmented_builder_config_refuses_another_training_split():
    message = splits.augmented_split_error("seg_pascal_voc", "voc2012_aug", "train")
    assert "\n" not in message
    assert "'voc2012_aug'" in message and "'train_aug'" in message and "'train'" in message
    assert splits.augmented_split_error("seg_pascal_voc", "voc2012_aug", "train_aug") is None
    assert splits.augmented_split_error("seg_pascal_voc", "voc2012", "train") is None


def test_config_validation_refuses_voc2012_aug_without_train_aug():
    config = config_schema.base_config()
    config.dataset.name = "seg_pascal_voc"
    config.dataset.config = "voc2012_aug"
    config.dataset.num_classes = 21
    with pytest.raises(config_schema.ConfigError, match="train_split='train'"):
        config_schema.validate(config)
    config.dataset.train_split = "train_aug"
    config_schema.validate(config)


def test_missing_split_names_the_split_and_what_the_dataset_has():
    message = splits.missing_split_error(
        "seg_pascal_voc/voc2012", {"train": 1464, "validation": 1449}, "train_aug", "validation"
    )
    assert "\n" not in message
    assert "train_split='train_aug'" in message and "seg_pascal_voc/voc2012" in message
    assert "train (1464)" in message and "validation (1449)" in message
    message = splits.missing_split_error("x", {"train": 1}, "train", "test")
    assert "eval_split='test'" in message
    assert splits.missing_split_error("x", {"train": 1, "test": 2}, "train", "test") is None


# ---------------------------------------------------------------------------------------------
# Evaluation protocols of the original code, on prepared fixtures.


@pytest.mark.slow
def test_crop_val_evaluation_on_the_ade20k_fixture(tmp_path):
    """``--crop_val``: short side to the crop size, only the centre crop is scored."""
    source, expected = _prepared_source(tmp_path, "ade20k", None, fx.make_ade20k, "validation")
    (stored,) = expected["validation"].values()
    size = 24  # fixture images are 32x48: the short side 32 -> 24, the long side 48 -> 36
    batches = list(
        pipeline.make_eval_iterator(
            source, batch_size=1, num_classes=150, crop_size=(size, size), protocol="crop_val"
        )
    )
    assert len(batches) == 1
    batch = batches[0]
    assert batch["label"].shape == (1, size, size) and batch["valid"].all()
    resized = _pil_nearest(_mapped(stored), (size, int(size * fx.W / fx.H)))
    left = int(round((resized.shape[1] - size) / 2.0))  # torchvision's centre-crop offset
    np.testing.assert_array_equal(batch["label"][0], resized[:, left : left + size])
    # The stripes at the two sides are cut off: the left one (void) and the right one (148).
    assert -1 not in batch["label"][0, :, :2] or left == 0
    assert batch["image"].shape == (1, size, size, 3)


@pytest.mark.slow
def test_warped_coco_stuff_evaluation_on_the_182_class_fixture(tmp_path):
    """The original COCO-Stuff evaluation: image and label warped to 512x512, 182 classes,
    COCO mean/std; the warped label is what is scored."""
    source, expected = _prepared_source(
        tmp_path,
        "coco_stuff",
        "stuff10k_182",
        lambda d: fx.make_coco_stuff_10k(d)[182],
        "test",
    )
    (stored,) = expected["test"].values()
    batches = list(
        pipeline.make_eval_iterator(
            source,
            batch_size=1,
            num_classes=182,
            crop_size=(512, 512),
            warp_size=(512, 512),
            normalization="coco_stuff_original",
        )
    )
    batch = batches[0]
    assert batch["label"].shape == (1, 512, 512) and batch["valid"].all()
    np.testing.assert_array_equal(batch["label"][0], _pil_nearest(_mapped(stored), (512, 512)))
    assert set(np.unique(batch["label"])) == {90, 1}  # ids 91 and 2 of the 1..182 space
    mean, std = augment.NORMALIZATIONS["coco_stuff_original"]
    np.testing.assert_allclose(mean / 255, [0.43931922, 0.41310471, 0.37480941], rtol=1e-6)
    image = np.asarray(source[0]["image"])
    want = (augment.resize_image(image, (512, 512)) - mean) / std
    # float32 normalisation of 0..255 values: a few ulps of numbers of size ~2.
    np.testing.assert_allclose(batch["image"][0], want, rtol=1e-5, atol=1e-5)


def test_crop_val_needs_a_square_crop():
    with pytest.raises(ValueError, match="square crop_size"):
        pipeline.make_eval_iterator([None], batch_size=1, num_classes=2, protocol="crop_val")


def test_short_side_center_crop_on_a_portrait_image():
    label = np.arange(30 * 20, dtype=np.int32).reshape(30, 20)  # H 30 > W 20
    image = np.zeros((30, 20, 3), np.uint8)
    out_image, out_label = augment.short_side_center_crop(image, label, 10)
    assert out_image.shape == (10, 10, 3)
    resized = _pil_nearest(label, (15, 10))  # long side int(10 * 30 / 20) = 15
    top = int(round((15 - 10) / 2.0))
    np.testing.assert_array_equal(out_label, resized[top : top + 10])


# ---------------------------------------------------------------------------------------------
# Augmentation of the original code's Cityscapes and COCO-Stuff.


def test_factor_color_jitter_rule():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (4, 5, 3)).astype(np.float32)
    same = augment.factor_color_jitter(
        image, np.random.default_rng(1), brightness=0, contrast=0, saturation=0
    )
    # Blending with a grey value ~100 and back rounds to float32 ulps of ~100 (~1e-5).
    np.testing.assert_allclose(same, image, rtol=1e-6, atol=1e-4)
    # Brightness alone: one factor in [0.5, 1.5] scales every value (then clipped).
    bright = augment.factor_color_jitter(
        image, np.random.default_rng(2), brightness=0.5, contrast=0, saturation=0
    )
    factor = bright[image > 1] / image[image > 1]
    unclipped = bright[image > 1] < 255
    assert np.ptp(factor[unclipped]) < 1e-4 and 0.5 <= factor[unclipped][0] <= 1.5
    # Saturation 0 blend target is the grey image: with factor draws in [0.5, 1.5] the grey
    # value of every pixel is kept.
    saturated = augment.factor_color_jitter(
        image, np.random.default_rng(3), brightness=0, contrast=0, saturation=0.5
    )
    weights = np.asarray([0.299, 0.587, 0.114], np.float32)
    inside = (saturated > 0).all(-1) & (saturated < 255).all(-1)
    np.testing.assert_allclose((saturated @ weights)[inside], (image @ weights)[inside], rtol=1e-4)


def test_warped_training_crops_come_from_the_warped_label():
    """``warp_size``: every training example is resized to it before the random scale."""
    label = np.zeros((8, 40), np.int32)
    label[:, 20:] = 1
    source = [{"image": np.zeros((8, 40, 3), np.uint8), "label": label, "file_name": "a"}]
    iterator = pipeline.make_train_iterator(
        source,
        batch_size=1,
        crop_size=(16, 16),
        seed=0,
        num_classes=2,
        scale_range=(1.0, 1.0),
        flip=False,
        warp_size=(16, 16),
        normalization="coco_stuff_original",
    )
    batch = next(iterator)
    # Warped to 16x16 and cropped at 16x16: the whole warped label, no padding.
    np.testing.assert_array_equal(batch["label"][0], _pil_nearest(label, (16, 16)))
    mean, std = augment.NORMALIZATIONS["coco_stuff_original"]
    np.testing.assert_allclose(batch["image"][0], np.broadcast_to(-mean / std, (16, 16, 3)))


# ---------------------------------------------------------------------------------------------
# BatchNorm momenta.


def test_decoder_bn_momentum_applies_to_aspp_and_decoder_only():
    """Backbone at 0.99 and decoder at 0.9 (the original code's): with the same parameters and
    input, the backbone's running means equal those of an all-0.99 net and the ASPP/decoder
    ones are 10x as far from their start (0), since each step moves them by (1 - momentum)."""
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    ours = build_model("tiny", head="embedding", num_classes=5, bn_momentum=0.99)
    original = build_model(
        "tiny", head="embedding", num_classes=5, bn_momentum=0.99, decoder_bn_momentum=0.9
    )
    variables = jax.jit(ours.init)(jax.random.key(1), images)

    def stats(model):
        apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
        _, updates = jax.jit(apply)(variables, images, rngs={"dropout": jax.random.key(2)})
        return updates["batch_stats"]

    a, b = stats(ours), stats(original)
    for x, y in zip(jax.tree.leaves(a["backbone"]), jax.tree.leaves(b["backbone"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for part in ("aspp", "decoder"):
        mean_a = [m for p, m in jax.tree_util.tree_leaves_with_path(a[part]) if "mean" in str(p)]
        mean_b = [m for p, m in jax.tree_util.tree_leaves_with_path(b[part]) if "mean" in str(p)]
        for x, y in zip(mean_a, mean_b, strict=True):
            # 0.1 / 0.01 up to float32 rounding of the running-average update.
            np.testing.assert_allclose(np.asarray(y), 10 * np.asarray(x), rtol=1e-4, atol=1e-7)
    assert jnp.abs(jax.tree.leaves(b["decoder"])[0]).max() > 0


# ---------------------------------------------------------------------------------------------
# The VOC paper config on the SBD-augmented fixture.


@pytest.mark.slow
def test_voc_paper_config_trains_on_train_aug_and_a_missing_split_is_refused(tmp_path, capsys):
    """Prepared with SBD, the paper config's smoke variant trains on ``train_aug`` (3 fixture
    images: VOC train has 1) and logs the sizes; asking ``voc2012`` for ``train_aug`` fails in
    one line naming the split and the dataset."""
    from jaxscaleseg import training  # noqa: PLC0415 (the end-to-end tests only)
    from jaxscaleseg.data import prepare  # noqa: PLC0415

    manual = tmp_path / "manual"
    manual.mkdir()
    expected = fx.make_pascal_voc(manual, sbd=True)
    data_dir = str(tmp_path / "data")
    for builder_config in ("voc2012_aug", "voc2012"):
        prepare.prepare(
            "pascal_voc", manual_dir=str(manual), data_dir=data_dir, config=builder_config
        )
    config = config_schema.sibling_config(str(CONFIGS / "x.py"), "pascal_voc_resnet50_ess", "smoke")
    config.dataset.data_dir = data_dir
    config.dataset.crop_size = (32, 32)
    config.dataset.eval_crop_size = (32, 48)
    config.num_train_steps = 1
    result = training.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 1
    counts = {split: len(files) for split, files in expected.items()}
    assert counts["train_aug"] == 3 and counts["train"] == 1
    out = capsys.readouterr().out
    assert f"train = train_aug ({counts['train_aug']} examples)" in out
    assert f"eval = validation ({counts['validation']} examples)" in out

    config.dataset.config = "voc2012"
    with pytest.raises(config_schema.ConfigError) as error:
        training.train_and_evaluate(config, tmp_path / "run2")
    message = str(error.value)
    assert "\n" not in message
    assert "train_split='train_aug'" in message and "seg_pascal_voc/voc2012" in message


def test_evaluate_cli_view_follows_the_config():
    """``evaluate`` scores at full resolution, except the original code's views."""
    from jaxscaleseg import evaluation  # noqa: PLC0415

    ade = config_schema.sibling_config(str(CONFIGS / "x.py"), "ade20k_mobilenetv2_ess", "original")
    view = evaluation._config_view(ade)  # noqa: SLF001 (the CLI's choice, tested directly)
    assert view == {
        "protocol": "crop_val",
        "warp_size": None,
        "normalization": "imagenet",
        "crop_size": (512, 512),
    }
    stuff = config_schema.sibling_config(
        str(CONFIGS / "x.py"), "coco_stuff10k_resnet50_ess", "original"
    )
    view = evaluation._config_view(stuff)  # noqa: SLF001
    assert view["warp_size"] == (512, 512) and view["normalization"] == "coco_stuff_original"
    assert view["protocol"] == "fit" and "crop_size" not in view
