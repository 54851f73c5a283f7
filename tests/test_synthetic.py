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
