"""Tests for the joint augmentation and the grain input pipelines."""

import numpy as np
import pytest

from jaxscaleseg.data import augment, pipeline
from jaxscaleseg.data.synthetic import SyntheticSegmentation
from jaxscaleseg.labels import IGNORE_INDEX, STORED_VOID

NUM_CLASSES = 19


def _synthetic(n=12, size=(40, 56), seed=0):
    return SyntheticSegmentation(NUM_CLASSES, size, n, seed=seed)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# --- augmentation -------------------------------------------------------------------------------


def _position_pattern(h, w):
    """An image whose channels are linear ramps of (row, col) and a label of unique pixel ids."""
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1)
    label = (np.arange(h * w).reshape(h, w)).astype(np.int32)
    return image, label


@pytest.mark.parametrize("seed", range(6))
def test_scale_crop_flip_moves_image_and_label_together(seed):
    h, w = 37, 53
    image, label = _position_pattern(h, w)
    rng = np.random.default_rng(seed)
    out_image, out_label, inside = augment.random_scale_crop_flip(
        image, label, rng, crop_size=(32, 40), scale_range=(0.5, 2.0), flip=True, fill=-100.0
    )
    assert out_image.shape == (32, 40, 3) and out_label.shape == (32, 40)
    # The position an image pixel came from (bilinear of a ramp) matches the one its label came
    # from (nearest) to within one source pixel; a flip or shift applied to one only would not.
    from_image = out_image[inside][:, :2]
    from_label = np.stack(np.divmod(out_label[inside], w), axis=-1)
    assert np.abs(from_image - from_label).max() <= 1.0
    assert np.all(out_label[~inside] == IGNORE_INDEX)
    assert np.all(out_image[~inside] == -100.0)


def test_flip_mirrors_image_and_label():
    image, label = _position_pattern(8, 10)
    params = augment.GeometricParams(scaled_size=(8, 10), top=0, left=0, flip=True)
    out_image, out_label, inside = augment.apply_geometric(image, label, params, (8, 10))
    assert inside.all()
    np.testing.assert_array_equal(out_label, label[:, ::-1])
    np.testing.assert_allclose(out_image, image[:, ::-1])


@pytest.mark.parametrize("seed", range(4))
def test_fused_transform_equals_resize_pad_crop_flip(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (23, 31, 3)).astype(np.uint8)
    label = rng.integers(-1, 5, (23, 31)).astype(np.int32)
    crop = (20, 26)
    params = augment.draw_geometric_params(rng, (23, 31), crop, (0.5, 2.0), flip=True)
    got_image, got_label, _ = augment.apply_geometric(image, label, params, crop)

    hs, ws = params.scaled_size
    big_image = augment.resize_image(image, (hs, ws))
    big_label = augment.resize_label(label, (hs, ws))
    ph, pw = max(hs, crop[0]), max(ws, crop[1])
    padded_image = np.broadcast_to(augment.MEAN_RGB, (ph, pw, 3)).copy()
    padded_image[:hs, :ws] = big_image
    padded_label = np.full((ph, pw), -1, np.int32)
    padded_label[:hs, :ws] = big_label
    window = np.s_[params.top : params.top + crop[0], params.left : params.left + crop[1]]
    want_image, want_label = padded_image[window], padded_label[window]
    if params.flip:
        want_image, want_label = want_image[:, ::-1], want_label[:, ::-1]
    np.testing.assert_allclose(got_image, want_image, atol=1e-3)
    np.testing.assert_array_equal(got_label, want_label)


def test_padding_never_lands_on_a_real_class():
    rng = np.random.default_rng(0)
    label = rng.integers(0, NUM_CLASSES, (30, 30)).astype(np.int32)  # no void at all
    image = rng.integers(0, 256, (30, 30, 3)).astype(np.uint8)
    padded_seen = 0
    for _ in range(20):
        out_image, out_label, inside = augment.random_scale_crop_flip(
            image, label, rng, crop_size=(48, 48), scale_range=(0.5, 2.0)
        )
        np.testing.assert_array_equal(out_label == IGNORE_INDEX, ~inside)
        np.testing.assert_array_equal(
            out_image[~inside], np.broadcast_to(augment.MEAN_RGB, (np.sum(~inside), 3))
        )
        padded_seen += np.sum(~inside)
    assert padded_seen > 0


def test_resize():
    label = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(
        augment.resize_label(label, (6, 8)), label.repeat(2, 0).repeat(2, 1)
    )
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[None, :, None], (4, 8, 3))
    half = augment.resize_image(ramp, (2, 4))
    np.testing.assert_allclose(half[0, :, 0], [0.5, 2.5, 4.5, 6.5])


def test_normalize_roundtrip_and_color_jitter_range():
    image = np.random.default_rng(0).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    normalized = augment.normalize(image)
    assert normalized.dtype == np.float32
    np.testing.assert_array_equal(augment.denormalize(normalized), image)
    np.testing.assert_allclose(augment.normalize(augment.MEAN_RGB), 0.0, atol=1e-6)
    jittered = augment.color_jitter(image.astype(np.float32), np.random.default_rng(1))
    assert jittered.dtype == np.float32 and jittered.min() >= 0 and jittered.max() <= 255


# --- decoding -----------------------------------------------------------------------------------


def test_decode_maps_stored_void_and_names_the_file_on_bad_labels():
    label = np.array([[0, 18], [STORED_VOID, 3]], np.uint16)[..., None]
    record = {"image": np.zeros((2, 2, 3), np.uint8), "label": label, "file_name": b"a.png"}
    decoded = pipeline.decode_example(record, NUM_CLASSES)
    np.testing.assert_array_equal(decoded["label"], [[0, 18], [-1, 3]])
    assert decoded["label"].dtype == np.int32
    bad = dict(record, label=np.array([[0, 19], [1, 2]], np.uint16), file_name=b"bad_001.png")
    with pytest.raises(ValueError, match="bad_001.png"):
        pipeline.decode_example(bad, NUM_CLASSES)


def test_train_pipeline_reports_the_file_with_an_invalid_label():
    records = [
        {
            "image": np.zeros((8, 8, 3), np.uint8),
            "label": np.full((8, 8), 20 if i == 2 else 1, np.uint16),
            "file_name": f"img_{i}.png",
        }
        for i in range(3)
    ]
    iterator = pipeline.make_train_iterator(
        records, batch_size=3, crop_size=(8, 8), seed=0, num_classes=NUM_CLASSES
    )
    with pytest.raises(ValueError, match="img_2.png"):
        next(iterator)


# --- training pipeline --------------------------------------------------------------------------


def _train(source, seed=0, **kwargs):
    options = dict(batch_size=3, crop_size=(32, 32), num_classes=NUM_CLASSES, color_jitter=True)
    options.update(kwargs)
    return pipeline.make_train_iterator(source, seed=seed, **options)


def test_train_batches_have_the_promised_format():
    (batch,) = _take(_train(_synthetic()), 1)
    assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (3, 32, 32) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= -1 and batch["label"].max() < NUM_CLASSES
    assert np.abs(batch["image"]).max() < 5  # normalised


def test_padding_is_the_mean_and_void_even_with_color_jitter():
    rng = np.random.default_rng(0)
    records = [
        {
            "image": rng.integers(0, 256, (20, 24, 3)).astype(np.uint8),
            "label": np.full((20, 24), 5, np.uint16),  # no void: -1 can only be padding
            "file_name": "x",
        }
    ] * 4
    iterator = _train(records, crop_size=(40, 40), scale_range=(0.8, 1.2))
    for batch in _take(iterator, 3):
        padded = batch["label"] == IGNORE_INDEX
        assert padded.any() and np.all(batch["label"][~padded] == 5)
        assert np.all(batch["image"][padded] == 0.0)


def test_same_seed_same_batches_and_other_seed_other_batches():
    source = _synthetic()
    first = _take(_train(source, seed=7), 6)  # 18 examples: more than one epoch of 12
    _assert_batches_equal(first, _take(_train(source, seed=7), 6))
    other = _take(_train(source, seed=8), 1)
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def test_restored_iterator_continues_like_an_uninterrupted_one():
    source = _synthetic()
    uninterrupted = _take(_train(source, seed=3), 7)
    iterator = _train(source, seed=3)
    _take(iterator, 3)
    state = iterator.get_state()
    _take(iterator, 2)  # moves on; the saved state must not
    restored = _train(source, seed=3)  # a fresh pipeline, as after a restart
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 4), uninterrupted[3:])


def test_iterator_state_round_trips_through_orbax(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    source = _synthetic()
    uninterrupted = _take(_train(source, seed=5), 4)
    iterator = _train(source, seed=5)
    _take(iterator, 2)
    with ocp.CheckpointManager(
        tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}
    ) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        restored = _train(source, seed=5)
        manager.restore(
            2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    _assert_batches_equal(_take(restored, 2), uninterrupted[2:])


def test_batches_do_not_depend_on_worker_count():
    source = _synthetic(n=6)
    _assert_batches_equal(
        _take(_train(source, seed=1, worker_count=0), 3),
        _take(_train(source, seed=1, worker_count=1), 3),
    )


def _index_source(n, size=(4, 4)):
    """Records whose image is the constant value of their index (so a crop reveals it)."""
    return [
        {
            "image": np.full((*size, 3), i, np.uint8),
            "label": np.zeros(size, np.uint16),
            "file_name": f"{i}",
        }
        for i in range(n)
    ]


def _indices(batch):
    return [int(v) for v in np.rint(augment.denormalize(batch["image"])[:, 0, 0, 0])]


def test_hosts_read_disjoint_parts_of_each_epoch():
    source = _index_source(8)
    per_host = []
    for shard in range(2):
        iterator = pipeline.make_train_iterator(
            source,
            batch_size=2,
            crop_size=(4, 4),
            seed=0,
            num_classes=1,
            scale_range=(1.0, 1.0),
            shard_index=shard,
            shard_count=2,
        )
        per_host.append(_indices(next(iterator)) + _indices(next(iterator)))
    assert sorted(per_host[0] + per_host[1]) == list(range(8))


def test_repeat_factors_follow_lvis():
    classes = [np.array([0]), np.array([0]), np.array([0, 2]), np.array([1]), np.array([], int)]
    factors = pipeline.repeat_factors(classes, 3, threshold=0.5)
    # f = (3/5, 1/5, 1/5): r_c = (1, sqrt(2.5), sqrt(2.5)); empty image: 1.
    np.testing.assert_allclose(factors, [1, 1, np.sqrt(2.5), np.sqrt(2.5), 1])


def test_repeat_factor_sampling_oversamples_rare_classes():
    records = _index_source(10)
    for i, record in enumerate(records):
        record["label"] = np.full((4, 4), 1 if i == 9 else 0, np.uint16)
    iterator = pipeline.make_train_iterator(
        records,
        batch_size=2,
        crop_size=(4, 4),
        seed=0,
        num_classes=2,
        scale_range=(1.0, 1.0),
        repeat_factor_threshold=1.0,
    )
    seen = sum((_indices(b) for b in _take(iterator, 40)), [])
    # Class 1 is in 1/10 of the images: factor sqrt(10) ~ 3.16, so image 9 is ~3.2 / 12.2 of
    # an epoch instead of 1/10.
    assert seen.count(9) > 3 * np.mean([seen.count(i) for i in range(9)]) * 0.8
    assert set(seen) == set(range(10))


# --- evaluation pipeline ------------------------------------------------------------------------


def _sized_source(sizes):
    """Records of the given sizes whose labels number every pixel of the set once."""
    records, start = [], 0
    for i, (h, w) in enumerate(sizes):
        label = np.arange(start, start + h * w).reshape(h, w)
        start += h * w
        image = np.random.default_rng(i).integers(0, 256, (h, w, 3)).astype(np.uint8)
        records.append({"image": image, "label": label.astype(np.int32), "file_name": f"{i}"})
    return records, start


SIZES = [(9, 12), (14, 7), (5, 5), (11, 16), (8, 8), (16, 10), (7, 13)]


@pytest.mark.parametrize("shard_count", [1, 2, 3])
def test_eval_sees_every_pixel_exactly_once(shard_count):
    records, total = _sized_source(SIZES)
    seen, batches_per_host = [], []
    for shard in range(shard_count):
        batches = list(
            pipeline.make_eval_iterator(
                records,
                batch_size=2,
                num_classes=total,
                shard_index=shard,
                shard_count=shard_count,
            )
        )
        batches_per_host.append(len(batches))
        for batch in batches:
            assert batch["image"].shape[0] == 2
            assert batch["valid"].dtype == bool
            assert np.all(batch["label"][~batch["valid"]] == IGNORE_INDEX)
            assert np.all(batch["image"][~batch["valid"]] == 0.0)
            seen.append(batch["label"][batch["valid"]])
    assert len(set(batches_per_host)) == 1
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(total))


def test_eval_keeps_full_size_images_and_pixels():
    records, total = _sized_source(SIZES)
    batches = list(pipeline.make_eval_iterator(records, batch_size=3, num_classes=total))
    first = batches[0]
    assert first["image"].shape == (3, 14, 12, 3)
    np.testing.assert_array_equal(
        augment.denormalize(first["image"][1, :14, :7]), records[1]["image"]
    )
    fixed = list(
        pipeline.make_eval_iterator(records, batch_size=3, num_classes=total, pad_to=(16, 16))
    )
    assert all(b["image"].shape == (3, 16, 16, 3) for b in fixed)
    assert sum(int(b["valid"].sum()) for b in fixed) == total


def test_eval_with_crop_size_shrinks_large_images_to_fit_and_pads():
    records, total = _sized_source(SIZES)
    batches = list(
        pipeline.make_eval_iterator(records, batch_size=4, num_classes=total, crop_size=(10, 10))
    )
    assert all(b["label"].shape == (4, 10, 10) for b in batches)
    valid = [b["valid"][i] for b in batches for i in range(4)][: len(SIZES)]
    # (14, 7) fits as (10, 5); (5, 5) keeps its size; (16, 10) becomes (10, 6).
    assert valid[1].sum() == 50 and valid[2].sum() == 25 and valid[5].sum() == 60
    assert not np.any([b["valid"][i] for b in batches for i in range(4)][len(SIZES) :])


def test_eval_on_synthetic_source_validates_and_maps_void():
    source = _synthetic(n=5)
    (batch, *rest) = list(pipeline.make_eval_iterator(source, batch_size=8, num_classes=19))
    assert not rest and batch["valid"][:5].all() and not batch["valid"][5:].any()
    expected = pipeline.decode_label(source[4]["label"])
    np.testing.assert_array_equal(batch["label"][4], expected)
    assert (expected == IGNORE_INDEX).any()
