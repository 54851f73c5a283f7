"""Tests for the built-in synthetic dataset."""

import numpy as np
import pytest

from jaxscaleseg.data import synthetic
from jaxscaleseg.data.synthetic import SyntheticSegmentation
from jaxscaleseg.labels import STORED_VOID, check_labels


def test_examples_are_deterministic_and_depend_on_seed_split_and_index():
    a = SyntheticSegmentation(19, (40, 48), 5, seed=3)
    b = SyntheticSegmentation(19, (40, 48), 5, seed=3)
    for i in range(5):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        np.testing.assert_array_equal(a[i]["label"], b[i]["label"])
    # Reading in another order gives the same examples (no hidden sequential state).
    np.testing.assert_array_equal(
        a[4]["label"], SyntheticSegmentation(19, (40, 48), 5, 3)[4]["label"]
    )
    others = [
        SyntheticSegmentation(19, (40, 48), 5, seed=4)[0],
        SyntheticSegmentation(19, (40, 48), 5, seed=3, split="validation")[0],
        a[1],
    ]
    for other in others:
        assert not np.array_equal(a[0]["image"], other["image"])


def test_record_format_matches_prepared_datasets():
    source = SyntheticSegmentation(150, (64, 80), 20, seed=0, split="validation")
    assert len(source) == 20
    void_fractions = []
    for i in range(20):
        record = source[i]
        assert record["image"].dtype == np.uint8 and record["image"].shape == (64, 80, 3)
        label = record["label"]
        assert label.dtype == np.uint16 and label.shape == (64, 80)
        real = label[label != STORED_VOID]
        assert real.size and real.max() < 150
        void_fractions.append(np.mean(label == STORED_VOID))
        assert record["file_name"] == f"synthetic/validation/{i:08d}"
        assert 2 <= len(np.unique(real)) <= 7
    assert 0.005 < np.mean(void_fractions) < 0.1
    with pytest.raises(IndexError):
        source[20]


def test_more_than_65535_classes_use_int32_labels_with_minus_one_void():
    source = SyntheticSegmentation(100_000, (32, 32), 3, seed=1)
    label = source[0]["label"]
    assert label.dtype == np.int32
    check_labels(label, 100_000)
    assert source.palette.shape == (100_000, 3) and source.palette.dtype == np.uint8
    assert source.class_names[17] == "class_00017" and len(source.class_names) == 100_000


def test_class_appearances_are_distinct_and_two_coloured():
    app = synthetic.class_appearance(100_000)
    a, b = app["color_a"].astype(np.int64), app["color_b"].astype(np.int64)
    assert np.all(np.any(a != b, axis=1))
    # Colour pair + texture identifies the class.
    signature = np.concatenate([a, b, app["angle"][:, None] * 100, app["period"][:, None]], 1)
    assert len(np.unique(signature, axis=0)) == 100_000
    # Stored with the lower colour first, so swapping the pair never gives another class.
    index_a = (a // 51) @ np.asarray([36, 6, 1])
    index_b = (b // 51) @ np.asarray([36, 6, 1])
    assert np.all(index_a < index_b)
    # A prefix of the class set keeps its appearance.
    np.testing.assert_array_equal(synthetic.class_appearance(19)["color_a"], app["color_a"][:19])
    with pytest.raises(ValueError):
        synthetic.class_appearance(synthetic.MAX_CLASSES + 1)


def test_every_class_appears_often_enough():
    source = SyntheticSegmentation(1284, (24, 24), 2000, seed=0)
    counts = np.bincount(
        np.concatenate([source.image_classes(i) for i in range(len(source))]), minlength=1284
    )
    assert counts.min() >= 2
    assert 6 < counts.mean() < 10


def test_image_classes_matches_label():
    source = SyntheticSegmentation(50, (48, 48), 4, seed=2)
    for i in range(4):
        label = source[i]["label"]
        np.testing.assert_array_equal(source.image_classes(i), np.unique(label[label != 65535]))


def test_regions_carry_their_class_appearance():
    source = SyntheticSegmentation(30, (96, 96), 3, seed=5, noise_std=0.0)
    app = synthetic.class_appearance(30)
    for i in range(3):
        record = source[i]
        image, label = record["image"], record["label"]
        for c in np.unique(label[label != STORED_VOID]):
            pixels = image[label == c]
            is_a = np.all(pixels == app["color_a"][c], axis=1)
            is_b = np.all(pixels == app["color_b"][c], axis=1)
            assert np.all(is_a | is_b)
            if len(pixels) > 200:  # large regions show both stripe colours
                assert 0.2 < is_a.mean() < 0.8


def test_palette_is_deterministic():
    np.testing.assert_array_equal(synthetic.make_palette(100)[:19], synthetic.make_palette(19))
    assert len(np.unique(synthetic.make_palette(19), axis=0)) == 19


# --------------------------------------------------------------------------- long tail, families


def test_region_quota_is_whole_proportional_and_covers_every_class():
    p = synthetic.zipf_probabilities(np.arange(1, 101), 1.0)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    # Rounding moves a class by less than one region; raising the tail to one region takes at
    # most one more from each of the largest classes (when n is well above C).
    for n, slack in ((100, None), (101, None), (357, 2), (5000, 1)):
        quota = synthetic.region_quota(p, n)
        assert quota.sum() == n and quota.min() >= 1
        if slack is not None:
            assert np.all(np.abs(quota - np.maximum(n * p, 1)) < slack)
    # Fewer regions than classes: no raise, the largest shares get them.
    quota = synthetic.region_quota(p, 30)
    assert quota.sum() == 30 and quota[0] == np.floor(30 * p[0]) + (quota[0] > 30 * p[0])
    assert np.all(np.diff(quota) <= 0)  # ranks are in order here, so the quota never grows


def test_long_tailed_split_follows_zipf_law():
    num_classes, exponent = 200, 1.0
    source = SyntheticSegmentation(
        num_classes, (24, 24), 800, seed=3, zipf_exponent=exponent, regions_range=(2, 4)
    )
    # Every region of the split, counted from the generated examples, is the quota exactly.
    regions = np.concatenate([source.region_classes(i) for i in range(len(source))])
    np.testing.assert_array_equal(np.bincount(regions, minlength=num_classes), source.region_quota)
    share = source.region_quota / len(regions)
    expected = source.class_probabilities
    np.testing.assert_allclose(expected, source.class_ranks**-exponent / np.sum(
        np.arange(1, num_classes + 1.0) ** -exponent), rtol=1e-12)  # fmt: skip
    assert np.all(np.abs(share - expected) <= 1.0 / len(regions) + 1e-12)
    # Images per class (from the labels' classes): the rarest are in a handful of images, the
    # most frequent in hundreds; log(images) against log(rank) falls with slope -s where a
    # class rarely repeats within an image (ranks 10..200).
    images = np.bincount(
        np.concatenate([source.image_classes(i) for i in range(len(source))]),
        minlength=num_classes,
    )
    ranks = source.class_ranks
    assert images[ranks == num_classes][0] <= 5 and images[ranks == 1][0] > 200
    tail = ranks >= 10
    slope = np.polyfit(np.log(ranks[tail]), np.log(np.maximum(images[tail], 1)), 1)[0]
    assert -1.15 < slope < -0.85, slope


def test_long_tail_is_deterministic_per_seed_and_shared_by_splits():
    def make(seed, split="train"):
        return SyntheticSegmentation(60, (24, 24), 40, seed=seed, split=split, zipf_exponent=0.8)

    a, b = make(1), make(1)
    np.testing.assert_array_equal(a.class_ranks, b.class_ranks)
    np.testing.assert_array_equal(a[5]["label"], b[5]["label"])
    np.testing.assert_array_equal(a.class_ranks, make(1, "validation").class_ranks)
    assert not np.array_equal(a.class_ranks, make(2).class_ranks)
    np.testing.assert_array_equal(np.sort(a.class_ranks), np.arange(1, 61))
    assert "zipf_exponent=0.8" in repr(a) and "zipf" not in repr(SyntheticSegmentation(5))
    with pytest.raises(ValueError, match="region_quota"):
        _ = SyntheticSegmentation(5).region_quota
    with pytest.raises(ValueError, match="zipf_exponent"):
        SyntheticSegmentation(5, zipf_exponent=-1.0)


def test_family_members_differ_only_in_the_stripe_angle():
    family_size = 4
    app = synthetic.class_appearance(1284, family_size)
    signature = np.concatenate(
        [app["color_a"], app["color_b"], app["period"][:, None]], axis=1
    ).astype(np.float64)
    family = np.arange(1284) // family_size
    same = family[:, None] == family[None, :]
    equal_signature = np.all(signature[:, None] == signature[None, :], axis=-1)
    # Members share colours and period; members of other families differ in one of them.
    assert np.all(equal_signature[same]) and not np.any(equal_signature[~same])
    angles = np.rad2deg(app["angle"]).reshape(-1, family_size)
    np.testing.assert_allclose(angles, np.broadcast_to([0, 45, 90, 135], angles.shape), atol=1e-4)
    # All classes remain distinct; without families the appearance is unchanged.
    full = np.concatenate([signature, app["angle"][:, None]], axis=1)
    assert len(np.unique(full, axis=0)) == 1284
    np.testing.assert_array_equal(
        synthetic.class_appearance(50, 1)["color_a"], synthetic.class_appearance(50)["color_a"]
    )
    with pytest.raises(ValueError, match="family_size"):
        synthetic.class_appearance(10, synthetic.MAX_FAMILY_SIZE + 1)


def test_rendered_family_members_look_closer_to_each_other_than_to_other_classes():
    # Colour histograms of each class's pixels (noise off, so pixels are exactly the two stripe
    # colours): L1 distance ~0 between family members, 2 between classes of distinct colours.
    num_classes, family_size = 24, 4
    source = SyntheticSegmentation(num_classes, (48, 48), 40, seed=0, noise_std=0.0,
                                   family_size=family_size)  # fmt: skip
    histograms = np.zeros((num_classes, 256**3 // 4096), np.float64)
    for i in range(len(source)):
        record = source[i]
        label, image = record["label"], record["image"].astype(np.int64)
        code = (image // 16) @ np.asarray([256, 16, 1])
        keep = label != STORED_VOID
        np.add.at(histograms, (label[keep], code[keep]), 1.0)
    assert np.all(histograms.sum(1) > 0)
    histograms /= histograms.sum(1, keepdims=True)
    distance = np.abs(histograms[:, None] - histograms[None, :]).sum(-1)
    family = np.arange(num_classes) // family_size
    same = (family[:, None] == family[None, :]) & ~np.eye(num_classes, dtype=bool)
    other = family[:, None] != family[None, :]
    for c in range(num_classes):
        assert distance[c][same[c]].max() < distance[c][other[c]].min()


def test_config_options_reach_the_synthetic_sources():
    from jaxscaleseg import config_schema
    from jaxscaleseg.data import sources

    config = config_schema.sibling_config("configs/synthetic.py", "synthetic", "smoke")
    assert config.dataset.synthetic.zipf_exponent == 0.0
    assert config.dataset.synthetic.family_size == 1
    config.dataset.synthetic.zipf_exponent = 1.0
    config.dataset.synthetic.family_size = 4
    config_schema.validate(config)
    train, evaluation = sources.make_sources(config)
    for source in (train, evaluation):
        assert source.zipf_exponent == 1.0 and source.family_size == 4
    config.dataset.synthetic.family_size = 9
    with pytest.raises(config_schema.ConfigError, match="family_size"):
        config_schema.validate(config)
