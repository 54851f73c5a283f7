"""Inference (whole image, sliding windows, TTA) and the evaluation it drives.

Most tests use fake models whose outputs are exact functions of the pixels, so the merged
results have exact expectations: a per-pixel (position-independent) model gives the same
features whatever the windows, and a symmetric horizontal blur commutes with flipping.
"""

from __future__ import annotations

import csv
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscaleseg import evaluation, inference, metrics, views
from jaxscaleseg.models import build_model, l2_normalize

C, D = 7, 4


def _projection(channels: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (3, channels), jnp.float32)


def _class_table() -> jax.Array:
    return l2_normalize(jax.random.normal(jax.random.key(1), (C, D), jnp.float32))


def pixel_model(head: str):
    """A position-independent model: each output pixel is a function of its input pixel."""
    w = _projection(D if head == "embedding" else C)
    table = _class_table()

    def apply_fn(images):
        y = jnp.tanh(images @ w)
        if head == "embedding":
            # Deliberately not unit length, like upsampled embeddings.
            return {"pixel_embedding": 0.5 * y, "class_embedding": table}
        return {"logits": 3.0 * y}

    return apply_fn


def blur_model(weights=(1.0, 1.0, 1.0)):
    """A horizontal 3-tap filter (edge-replicated) then a projection; symmetric taps commute
    with a horizontal flip."""
    w = _projection(D)
    table = _class_table()
    taps = jnp.asarray(weights, jnp.float32)

    def apply_fn(images):
        padded = jnp.pad(images, ((0, 0), (0, 0), (1, 1), (0, 0)), mode="edge")
        width = images.shape[2]
        x = sum(taps[i] * padded[:, :, i : i + width] for i in range(3))
        return {"pixel_embedding": jnp.tanh(x @ w), "class_embedding": table}

    return apply_fn


def _images(shape=(2, 21, 30), seed=0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (*shape, 3), jnp.float32)


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "length, crop, stride, expected",
    [
        (10, 4, 4, [0, 4, 6]),
        (12, 4, 4, [0, 4, 8]),
        (3, 4, 2, [0]),
        (4, 4, 3, [0]),
        (11, 5, 3, [0, 3, 6]),
    ],
)
def test_window_starts_cover_and_end_at_the_edge(length, crop, stride, expected):
    starts = views.window_starts(length, crop, stride)
    assert starts == expected
    covered = np.zeros(max(length, crop), bool)
    for s in starts:
        covered[s : s + crop] = True
    assert covered[:length].all()


@pytest.mark.parametrize("head", ["embedding", "logits"])
@pytest.mark.parametrize(
    "crop, stride",
    [((7, 10), (7, 10)), ((8, 12), (5, 7)), ((32, 40), (32, 40))],
    ids=["exact-tiling", "overlapping", "image-smaller-than-window"],
)
def test_sliding_window_equals_whole_image_for_position_independent_model(head, crop, stride):
    apply_fn = pixel_model(head)
    images = _images()  # 21 x 30: the exact tiling is 3 x 3 windows
    whole, table = views.whole_image_features(apply_fn, images)
    slide, slide_table = views.sliding_window_features(apply_fn, images, crop, stride)
    assert slide.shape == whole.shape
    np.testing.assert_allclose(slide, whole, rtol=1e-5, atol=1e-6)
    assert (table is None) == (slide_table is None)


def test_sliding_window_sees_fixed_size_windows_padded_with_the_mean():
    seen = []
    base = pixel_model("embedding")

    def apply_fn(images):
        seen.append(np.asarray(images))
        return base(images)

    images = _images((1, 5, 9))
    views.sliding_window_features(apply_fn, images, (8, 8), (4, 4))
    assert [s.shape for s in seen] == [(1, 8, 8, 3), (1, 8, 8, 3)]
    np.testing.assert_array_equal(seen[0][0, 5:], 0.0)  # padded rows: 0 = the mean colour
    np.testing.assert_array_equal(seen[1][0, :5], np.asarray(images)[0, :, 1:9])


def test_embedding_windows_are_merged_as_normalised_sum():
    """Overlaps average the normalised embeddings, then re-normalise (no C-sized scores)."""
    calls = iter([1.0, -2.0])
    table = _class_table()

    def apply_fn(images):  # window 1: all +1, window 2: all -2 * (1, 0, 0, 0)
        value = next(calls)
        emb = jnp.zeros((*images.shape[:3], D)).at[..., 0].set(value)
        emb = emb.at[..., 1].set(1.0)
        return {"pixel_embedding": emb, "class_embedding": table}

    features, _ = views.sliding_window_features(apply_fn, _images((1, 4, 6)), (4, 4), (4, 2))
    a = np.asarray(l2_normalize(jnp.asarray([1.0, 1.0, 0, 0])))
    b = np.asarray(l2_normalize(jnp.asarray([-2.0, 1.0, 0, 0])))
    merged = (a + b) / np.linalg.norm(a + b)
    np.testing.assert_allclose(features[0, 0, 0], a, rtol=1e-6)
    np.testing.assert_allclose(features[0, 0, 3], merged, rtol=1e-5)
    np.testing.assert_allclose(features[0, 0, 5], b, rtol=1e-6)


# --------------------------------------------------------------------------- TTA


def test_flip_tta_of_a_symmetric_input_equals_no_tta():
    apply_fn = blur_model()
    half = _images((2, 9, 8))
    images = jnp.concatenate([half, half[:, :, ::-1]], axis=2)  # mirror-symmetric
    plain, table = views.tta_features(apply_fn, images)
    flipped, _ = views.tta_features(apply_fn, images, flip=True)
    np.testing.assert_allclose(flipped, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        inference.features_to_labels(flipped, table), inference.features_to_labels(plain, table)
    )


def test_flip_tta_merges_the_flipped_prediction_flipped_back():
    apply_fn = blur_model((0.0, 0.3, 1.0))  # asymmetric: flipping changes the prediction
    images = _images((1, 6, 11))
    plain, _ = views.whole_image_features(apply_fn, images)
    mirrored, _ = views.whole_image_features(apply_fn, images[:, :, ::-1])
    expected = l2_normalize(plain + mirrored[:, :, ::-1])
    merged, _ = views.tta_features(apply_fn, images, flip=True)
    np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(merged, plain, atol=1e-3)


@pytest.mark.parametrize("head", ["embedding", "logits"])
def test_multi_scale_of_a_constant_image_equals_single_scale(head):
    apply_fn = pixel_model(head)
    images = jnp.broadcast_to(_images((1, 1, 1)), (1, 13, 17, 3))
    single, table = views.tta_features(apply_fn, images)
    multi, _ = views.tta_features(
        apply_fn, images, flip=True, scales=(0.5, 1.75), crop_size=(8, 8), stride=(5, 5)
    )
    assert multi.shape == single.shape
    np.testing.assert_allclose(multi, single, rtol=1e-5, atol=1e-6)


def test_features_to_labels_matches_brute_force():
    features = _images((2, 5, 6))[..., :1] * jnp.ones(D)
    features = features + jax.random.normal(jax.random.key(3), features.shape)
    table = _class_table()
    distances = jnp.linalg.norm(features[..., None, :] - table, axis=-1)
    np.testing.assert_array_equal(
        inference.features_to_labels(features, table),
        jnp.argmin(distances, -1),
    )
    logits = jax.random.normal(jax.random.key(4), (3, 4, C))
    np.testing.assert_array_equal(inference.features_to_labels(logits), jnp.argmax(logits, -1))


def test_settings_validation_and_config_defaults():
    with pytest.raises(ValueError, match="crop_size"):
        inference.InferenceSettings(mode="slide")
    with pytest.raises(ValueError, match="mode"):
        inference.InferenceSettings(mode="tiles")
    window = inference.InferenceSettings(mode="slide", crop_size=(512, 1024)).window
    assert window == ((512, 1024), (341, 682))
    from jaxscaleseg import config_schema

    config = config_schema.base_config()
    settings = inference.InferenceSettings.from_config(config, mode="slide", flip=True)
    assert settings.window[0] == tuple(config.dataset.crop_size) and settings.flip
    assert inference.InferenceSettings.from_config(config) == inference.InferenceSettings()


# --------------------------------------------------------------------------- Predictor


def random_variables(model, seed=0):
    """Variables of the right shapes without ``model.init`` (whose compile is slow on CPU)."""
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if "var" in jax.tree_util.keystr(path):  # BatchNorm variances: positive
            return (1.0 + np.abs(rng.normal(size=s.shape))).astype(s.dtype)
        return (0.3 * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny_predictor():
    model = build_model("tiny", head="embedding", num_classes=C, embedding_dim=D)
    return inference.Predictor(model, random_variables(model))


def test_predictor_on_uint8_images_of_odd_size(tiny_predictor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (19, 27, 3), dtype=np.uint8)
    labels = tiny_predictor(image)
    assert labels.shape == (19, 27) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < C
    batch = tiny_predictor(np.stack([image, image[::-1]]))
    np.testing.assert_array_equal(batch[0], labels)
    np.testing.assert_array_equal(tiny_predictor(image[..., 0]).shape, (19, 27))  # grey
    rgba = np.concatenate([image, np.full((19, 27, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(tiny_predictor(rgba), labels)


# --------------------------------------------------------------------------- evaluation


class FakePredictor:
    """``Predictor``'s evaluation interface over a fake model."""

    def __init__(self, apply_fn, settings=None, num_classes=C):
        self.apply_fn, self.num_classes = apply_fn, num_classes
        self.settings = settings or inference.InferenceSettings()
        self.calls = []

    def predict_normalized(self, images):
        self.calls.append(tuple(images.shape))
        features, table = inference.infer_features(
            self.apply_fn, jnp.asarray(images), self.settings
        )
        return inference.features_to_labels(features, table)


def _odd_source(sizes=((17, 23), (9, 31), (20, 20))):
    rng = np.random.default_rng(0)
    records = []
    for i, (h, w) in enumerate(sizes):
        label = rng.integers(-1, C, (h, w)).astype(np.int32)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        records.append({"image": image, "label": label, "file_name": f"img{i}.png"})
    return records


def test_every_pixel_of_odd_sized_images_counts_once():
    source = _odd_source()
    labelled = sum(int((r["label"] >= 0).sum()) for r in source)
    fake = FakePredictor(pixel_model("logits"))
    counts, images = evaluation.evaluate_source(fake, source, batch_size=2)
    assert images == len(source)
    assert int(counts.labelled.sum()) == labelled
    assert int(counts.predicted.sum()) == labelled
    per_class = np.bincount(
        np.concatenate([r["label"][r["label"] >= 0] for r in source]), minlength=C
    )
    np.testing.assert_array_equal(counts.labelled, per_class)
    # Each image was inferred at its own size, never with the batch padding.
    assert sorted(s[1:3] for s in fake.calls) == sorted(r["label"].shape for r in source)


def test_sliding_window_evaluation_equals_whole_image_evaluation():
    source = _odd_source()
    whole = FakePredictor(pixel_model("embedding"))
    slide = FakePredictor(
        pixel_model("embedding"), inference.InferenceSettings(mode="slide", crop_size=(6, 7))
    )
    a, _ = evaluation.evaluate_source(whole, source, batch_size=3)
    b, _ = evaluation.evaluate_source(slide, source, batch_size=3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_results_table_agrees_with_metrics_and_is_written(tmp_path):
    source = _odd_source()
    counts, _ = evaluation.evaluate_source(FakePredictor(pixel_model("logits")), source)
    names = [f"name{i}" for i in range(C)]
    result = evaluation.results(counts, names, split="validation", checkpoint="best")
    summary = metrics.summarize(counts)
    for key in ("aAcc", "mIoU", "mAcc", "fwIoU"):
        assert result[key] == pytest.approx(summary[key])
    ious = [row["iou"] for row in result["per_class"]]
    assert ious == sorted(ious, reverse=True)
    for row in result["per_class"]:
        assert row["name"] == names[row["class_id"]]
        assert row["iou"] == pytest.approx(summary["per_class_iou"][row["class_id"]])
    present = np.flatnonzero(~np.isnan(summary["per_class_iou"]))
    assert sorted(r["class_id"] for r in result["per_class"]) == present.tolist()

    stem = evaluation.result_stem("validation", "best", inference.InferenceSettings(flip=True))
    assert stem == "eval_validation_best_flip"
    json_path, csv_path = evaluation.write_results(result, tmp_path, stem)
    assert json.loads(json_path.read_text())["mIoU"] == pytest.approx(summary["mIoU"])
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["class_id"]) for r in rows] == [r["class_id"] for r in result["per_class"]]
    text = evaluation.format_results(result, max_classes=2)
    assert "mIoU" in text and result["per_class"][0]["name"] in text and "more classes" in text


def test_results_report_rare_common_frequent_miou(tmp_path):
    source = _odd_source()
    counts, _ = evaluation.evaluate_source(FakePredictor(pixel_model("logits")), source)
    iou = metrics.summarize(counts)["per_class_iou"]
    # Known training-image counts: classes 0.. cycle through the three LVIS bins.
    train_images = np.resize([3, 50, 400, 0], C)
    frequency = {
        "bins": metrics.frequency_bins(train_images).tolist(),
        "train_images": train_images.tolist(),
        "source": "training split",
    }
    result = evaluation.results(
        counts, [f"c{i}" for i in range(C)], class_frequency=frequency, split="validation"
    )
    for name, members in (("rare", (0, 3)), ("common", (1,)), ("frequent", (2,))):
        ids = [c for c in range(C) if c % 4 in members and not np.isnan(iou[c])]
        assert result[f"classes_{name}"] == len(ids)
        assert result[f"mIoU_{name}"] == pytest.approx(np.mean(iou[ids]), rel=1e-12)
    assert result["frequency_source"] == "training split"
    for row in result["per_class"]:
        assert row["bin"] == frequency["bins"][row["class_id"]]
        assert row["train_images"] == train_images[row["class_id"]]
    _, csv_path = evaluation.write_results(result, tmp_path, "eval")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["bin"] for r in rows] == [r["bin"] for r in result["per_class"]]
    text = evaluation.format_results(result, max_classes=-1)
    assert "mIoU_rare" in text and "[bins from the training split]" in text


# --------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_full_resolution_eval_memory_grows_only_by_the_class_table():
    """ESS eval step (MobileNetV2, 1x1024x2048) at C = 100 000 vs C = 19, exact search."""

    def compiled_bytes(num_classes: int) -> tuple[int, float]:
        model = build_model("mobilenet_v2", head="embedding", num_classes=num_classes)
        variables = jax.eval_shape(
            lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
        )
        images = jax.ShapeDtypeStruct((1, 1024, 2048, 3), jnp.float32)
        settings = inference.InferenceSettings(search="exact")

        def eval_step(variables, images):  # the evaluation path: features, then assignment
            apply_fn = functools.partial(model.apply, variables, train=False)
            features, table = inference.infer_features(apply_fn, images, settings)
            return inference.features_to_labels(features, table, search=settings.search)

        t0 = time.perf_counter()
        m = jax.jit(eval_step).lower(variables, images).compile().memory_analysis()
        seconds = time.perf_counter() - t0
        return m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes, seconds

    small, _ = compiled_bytes(19)
    large, _ = compiled_bytes(100_000)
    table_bytes = 100_000 * 12 * 4
    assert large - small < table_bytes + 16 * 2**20, (small, large)


def test_certified_assignment_memory_is_flat_in_classes_and_below_the_features():
    """The certified search (``search="auto"`` from 10 000 classes on, on CPU) of a 1024x2048
    image, D = 12: its peak grows from C = 1 284 to 100 000 by the table and the grid's
    longer lists only, and its working set beside the exact search's stays under the features'
    own size (measured at C = 100 000: 70 MB more than the exact search for 101 MB of features,
    once its full-resolution blend and per-pixel gather indices were taken out; 122 MB
    before)."""
    features = jax.ShapeDtypeStruct((1, 1024, 2048, 12), jnp.float32)

    def peak(fn, num_classes):
        table = jax.ShapeDtypeStruct((num_classes, 12), jnp.float32)
        m = jax.jit(fn).lower(features, table).compile().memory_analysis()
        return m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes

    def certified(x, c):
        return inference.features_to_labels(x, c, search="certified")

    def exact(x, c):
        return inference.features_to_labels(x, c, search="exact")

    feature_bytes = 1024 * 2048 * 12 * 4
    small, large = peak(certified, 1284), peak(certified, 100_000)
    # The table, and K' = 32 ids of 131 072 grid points in a few working copies (C = 1 284
    # already has 32 candidates: the lists are as long at both C).
    assert large - small < (100_000 - 1284) * 12 * 4 + 16 * 2**20, (small, large)
    assert large - peak(exact, 100_000) < feature_bytes, (large, feature_bytes)
