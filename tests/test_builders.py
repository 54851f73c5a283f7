"""Tests of the TFDS builders: mapping functions, and tiny official-layout archives prepared by
the real builders and read back through ``tfds.data_source``."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import fixtures_archives as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxscaleseg import cli, evaluation, metrics
from jaxscaleseg.data import builders, frequency, prepare
from jaxscaleseg.data.builders import class_info, common, mappings
from jaxscaleseg.labels import STORED_VOID

V = STORED_VOID


# ---------------------------------------------------------------------------------------------
# Pure mapping functions.


def test_ade20k_zero_is_void_and_ids_shift_down():
    raw = np.array([[0, 1, 2, 150, 151, 255]], np.uint8)
    np.testing.assert_array_equal(mappings.ade20k_to_train_ids(raw), [[V, 0, 1, 149, V, V]])


def test_cityscapes_label_ids_to_train_ids():
    raw = np.arange(256, dtype=np.uint8)
    got = mappings.cityscapes_label_ids_to_train_ids(raw)
    assert got.dtype == np.uint16
    assert got[26] == 13 and got[7] == 0 and got[33] == 18 and got[24] == 11
    assert sorted(got[got != V].tolist()) == list(range(19))
    for void_id in (0, 1, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255):
        assert got[void_id] == V


def test_pascal_voc_keeps_background_and_voids_255():
    raw = np.array([0, 1, 20, 21, 254, 255], np.uint8)
    np.testing.assert_array_equal(mappings.pascal_voc_to_train_ids(raw), [0, 1, 20, V, V, V])


def test_coco_stuff_171_drops_the_eleven_unused_ids():
    table = mappings.coco_stuff_id_table(171)
    assert table[0] == V
    for unused in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91):
        assert table[unused] == V
    valid = table[table != V]
    np.testing.assert_array_equal(valid, np.arange(171))
    assert table[92] == 80 and table[182] == 170 and table[13] == 11
    assert class_info.COCO_STUFF_171_NAMES[80] == "banner"
    assert "street sign" not in class_info.COCO_STUFF_171_NAMES


def test_coco_stuff_182_and_164k_png():
    np.testing.assert_array_equal(
        mappings.coco_stuff_ids_to_train_ids(np.array([0, 1, 12, 182, 183]), 182),
        [V, 0, 11, 181, V],
    )
    np.testing.assert_array_equal(
        mappings.coco_stuff_164k_to_train_ids(np.array([0, 11, 91, 181, 182, 255], np.uint8)),
        [0, V, 80, 170, V, V],
    )
    with pytest.raises(ValueError, match="171- or 182"):
        mappings.coco_stuff_id_table(180)


def test_coco_lvis_table_and_ids():
    table = mappings.stuff_to_coco_lvis()
    assert table[92] == 50 and table[183] == 0
    assert set(table) == set(range(92, 184)) | {255}  # 255 = unlabeled -> void
    assert table[255] == 0
    np.testing.assert_array_equal(
        mappings.coco_lvis_ids_to_train_ids(np.array([0, 1, 50, 1284, 1285])),
        [V, 0, 49, 1283, V],
    )


def test_compose_coco_lvis_label_first_annotation_wins_then_stuff_fills():
    a = np.zeros((2, 3), bool)
    a[0, :2] = True
    b = np.zeros((2, 3), bool)
    b[0, 1:] = True
    everything = np.ones((2, 3), bool)
    got = mappings.compose_coco_lvis_label(
        (2, 3), [(a, 7), (b, 9)], [(everything, 92), (everything, 93)], {92: 50, 93: 110}
    )
    np.testing.assert_array_equal(got, [[6, 6, 8], [49, 49, 49]])
    other = mappings.compose_coco_lvis_label((2, 3), [], [(everything, 183)], {183: 0})
    assert (other == V).all()
    with pytest.raises(ValueError, match="1204"):
        mappings.compose_coco_lvis_label((2, 3), [(a, 1204)], [], {})


def test_map_with_table_rejects_negative_values():
    with pytest.raises(ValueError, match="non-negative"):
        mappings.map_with_table(np.array([-1]), np.zeros(3, np.uint16))


def test_class_info_sizes_and_palettes():
    assert len(class_info.ADE20K_CLASS_NAMES) == len(class_info.ADE20K_PALETTE) == 150
    assert len(class_info.CITYSCAPES_CLASS_NAMES) == len(class_info.CITYSCAPES_PALETTE) == 19
    assert len(class_info.COCO_STUFF_182_NAMES) == 182
    assert class_info.COCO_STUFF_182_NAMES[91] == "banner"
    assert class_info.COCO_STUFF_182_NAMES[181] == "wood"
    np.testing.assert_array_equal(class_info.label_colormap(21), fx.voc_palette()[:21])
    big = class_info.label_colormap(1284)
    assert len({tuple(c) for c in big}) == 1284


# ---------------------------------------------------------------------------------------------
# Builders on fixture archives.


def _prepare(tmp_path, name, config=None, **kwargs):
    return prepare.prepare(
        name,
        manual_dir=str(tmp_path / "manual"),
        data_dir=str(tmp_path / "data"),
        config=config,
        **kwargs,
    )


def _read(tmp_path, name, split, config=None):
    full = builders.tfds_name(name) + (f"/{config}" if config else "")
    source = tfds.data_source(full, split=split, data_dir=str(tmp_path / "data"))
    out = {}
    for i in range(len(source)):
        example = source[i]
        file_name = example["file_name"]
        file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        out[file_name] = example
    return out


def _check_split(tmp_path, name, split, expected, config=None):
    got = _read(tmp_path, name, split, config)
    assert sorted(got) == sorted(expected)
    for file_name, want in expected.items():
        example = got[file_name]
        assert example["label"].dtype == np.uint16, file_name
        np.testing.assert_array_equal(example["label"], want, err_msg=file_name)
        assert example["image"].shape == (fx.H, fx.W, 3), file_name
        assert example["image"].dtype == np.uint8


def _pil_decode(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def manual(tmp_path):
    path = tmp_path / "manual"
    path.mkdir()
    return path


def test_ade20k_builder(tmp_path, manual):
    expected = fx.make_ade20k(manual)
    builder = _prepare(tmp_path, "ade20k")
    for split, want in expected.items():
        _check_split(tmp_path, "ade20k", split, want)
    meta = builder.info.metadata
    assert meta["class_names"][:3] == ["wall", "building", "sky"]
    assert len(meta["palette"]) == 150 and meta["palette"][0] == [120, 120, 120]
    # The metadata also comes back from the prepared files.
    reread = tfds.builder("seg_ade20k", data_dir=str(tmp_path / "data"))
    assert reread.info.metadata["class_names"][-1] == "flag"
    assert reread.info.splits["train"].num_examples == 2


def test_grey_jpeg_is_stored_as_rgb(tmp_path, manual):
    fx.make_ade20k(manual)
    _prepare(tmp_path, "ade20k")
    got = _read(tmp_path, "ade20k", "train")
    grey = got["ADEChallengeData2016/images/training/ADE_train_00000002.jpg"]["image"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    colour = got["ADEChallengeData2016/images/training/ADE_train_00000001.jpg"]["image"]
    np.testing.assert_array_equal(colour, _pil_decode(fx.jpeg(0)))  # the JPEG kept as stored


def test_cityscapes_builder(tmp_path, manual):
    expected = fx.make_cityscapes(manual)
    builder = _prepare(tmp_path, "cityscapes")
    assert set(builder.info.splits) == {"train", "validation"}
    for split, want in expected.items():
        _check_split(tmp_path, "cityscapes", split, want)
    got = _read(tmp_path, "cityscapes", "validation")
    (example,) = got.values()
    np.testing.assert_array_equal(example["image"], fx.image_array(12))  # PNG is lossless
    assert builder.info.metadata["class_names"][13] == "car"
    assert builder.info.metadata["palette"][0] == [128, 64, 128]


def test_pascal_voc_builder(tmp_path, manual):
    expected = fx.make_pascal_voc(manual)
    builder = _prepare(tmp_path, "pascal_voc", config="voc2012")
    assert set(builder.info.splits) == {"train", "validation"}
    for split, want in expected.items():
        _check_split(tmp_path, "pascal_voc", split, want, config="voc2012")
    assert builder.info.metadata["class_names"][0] == "background"
    assert builder.info.metadata["palette"][1] == [128, 0, 0]


def test_pascal_voc_aug_builder_with_sbd(tmp_path, manual):
    expected = fx.make_pascal_voc(manual, sbd=True)
    builder = _prepare(tmp_path, "pascal_voc", config="voc2012_aug")
    assert set(builder.info.splits) == {"train", "validation", "train_aug"}
    for split, want in expected.items():
        _check_split(tmp_path, "pascal_voc", split, want, config="voc2012_aug")


def test_pascal_voc_aug_without_sbd_names_it(tmp_path, manual):
    fx.make_pascal_voc(manual)
    with pytest.raises(FileNotFoundError, match=r"benchmark\.tgz.*looked in .*manual"):
        _prepare(tmp_path, "pascal_voc", config="voc2012_aug")


def test_coco_stuff_164k_builder(tmp_path, manual):
    expected = fx.make_coco_stuff_164k(manual)
    builder = _prepare(tmp_path, "coco_stuff", config="stuff164k")
    for split, want in expected.items():
        _check_split(tmp_path, "coco_stuff", split, want, config="stuff164k")
    names = builder.info.metadata["class_names"]
    assert len(names) == 171 and names[80] == "banner"


@pytest.mark.parametrize("num_classes", [171, 182])
def test_coco_stuff_10k_builders(tmp_path, manual, num_classes):
    expected = fx.make_coco_stuff_10k(manual)[num_classes]
    config = f"stuff10k_{num_classes}"
    builder = _prepare(tmp_path, "coco_stuff", config=config)
    assert set(builder.info.splits) == {"train", "test"}
    for split, want in expected.items():
        _check_split(tmp_path, "coco_stuff", split, want, config=config)
    assert len(builder.info.metadata["class_names"]) == num_classes
    # The pipeline's way of naming a config works too.
    source = tfds.data_source(
        "seg_coco_stuff",
        split="test",
        data_dir=str(tmp_path / "data"),
        builder_kwargs={"config": config},
    )
    assert len(source) == 1


def test_coco_lvis_builder(tmp_path, manual):
    expected = fx.make_coco_lvis(manual)
    builder = _prepare(tmp_path, "coco_lvis")
    for split, want in expected.items():
        _check_split(tmp_path, "coco_lvis", split, want)
    names = builder.info.metadata["class_names"]
    assert len(names) == 1284 and len(builder.info.metadata["palette"]) == 1284
    assert names[0] == "aerosol_can" and names[1202] == "zucchini"  # from the LVIS JSON
    assert names[1] == "lvis_2"  # absent from the fixture's categories
    assert names[1203] == "branch"  # stuff 94 -> 1204
    reread = tfds.builder("seg_coco_lvis", data_dir=str(tmp_path / "data"))
    assert reread.info.metadata["class_names"][49] == "banner"
    # LVIS's r/c/f labels from the JSON; None for stuff and for ids the JSON does not list.
    letters = reread.info.metadata["class_frequency"]
    assert len(letters) == 1284
    assert (letters[0], letters[4], letters[49], letters[1202]) == ("c", "r", "f", "c")
    assert letters[1] is None and letters[1253] is None
    # Evaluation's bins: LVIS's where given, the rest counted in the one training image.
    train = tfds.data_source("seg_coco_lvis", split="train", data_dir=str(tmp_path / "data"))
    result = frequency.class_frequency(train, 1284)
    assert result["source"] == "dataset + training split"
    bins = result["bins"]
    assert (bins[0], bins[4], bins[49], bins[1202]) == ("common", "rare", "frequent", "common")
    assert bins[1] == bins[1253] == "rare"  # in no training image
    assert result["train_images"][0] == 1 and result["train_images"][1253] == 0
    # Evaluation reports the mIoU per LVIS bin: classes 0 (c), 4 (r) and 49 (f) labelled,
    # IoU 1, 1/2 and 1/4; class 1253 (counted: rare) labelled, never predicted.
    counts = metrics.ClassCounts(*(np.zeros(1284, np.int64) for _ in range(3)))
    for c, (tp, predicted, labelled) in {0: (4, 4, 4), 4: (2, 4, 2), 49: (1, 1, 4),
                                         1253: (0, 0, 3)}.items():  # fmt: skip
        counts.true_positive[c], counts.predicted[c], counts.labelled[c] = tp, predicted, labelled
    scores = evaluation.results(counts, names, class_frequency=result)
    assert scores["mIoU_common"] == 1.0 and scores["mIoU_frequent"] == 0.25
    assert scores["mIoU_rare"] == pytest.approx((0.5 + 0.0) / 2)
    assert scores["classes_rare"] == 2


# ---------------------------------------------------------------------------------------------
# Failures: missing or corrupt archives, corrupt images.


@pytest.mark.parametrize(
    ("name", "config", "archive"),
    [
        ("ade20k", None, "ADEChallengeData2016.zip"),
        ("cityscapes", None, "leftImg8bit_trainvaltest.zip"),
        ("pascal_voc", "voc2012", "VOCtrainval_11-May-2012.tar"),
        ("coco_stuff", "stuff164k", "stuffthingmaps_trainval2017.zip"),
        ("coco_stuff", "stuff10k_182", "cocostuff-10k-v1.1.zip"),
        ("coco_lvis", None, "lvis_v1_train.json"),
    ],
)
def test_missing_archive_names_file_and_directory(tmp_path, manual, name, config, archive):
    (manual / "unrelated.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as info:
        _prepare(tmp_path, name, config=config)
    message = str(info.value)
    assert archive in message and str(manual) in message and "download" in message


def test_missing_second_archive_is_named(tmp_path, manual):
    fx.make_cityscapes(manual)
    (manual / "gtFine_trainvaltest.zip").unlink()
    with pytest.raises(FileNotFoundError, match="gtFine_trainvaltest.zip"):
        _prepare(tmp_path, "cityscapes")


def test_missing_manual_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016.zip"):
        _prepare(tmp_path, "ade20k")


def test_corrupt_archive_names_file(tmp_path, manual):
    (manual / "ADEChallengeData2016.zip").write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(builders.CorruptArchiveError, match="ADEChallengeData2016.zip"):
        _prepare(tmp_path, "ade20k")


def test_corrupt_image_stops_the_build_above_the_threshold(tmp_path, manual):
    fx.make_ade20k(manual, corrupt=True)
    with pytest.raises(builders.CorruptDataError, match="ADE_train_00000003.jpg") as info:
        _prepare(tmp_path, "ade20k")
    assert "1 of 3" in str(info.value)


def test_corrupt_image_is_skipped_counted_and_logged(tmp_path, manual, caplog):
    expected = fx.make_ade20k(manual, corrupt=True)
    with caplog.at_level(logging.WARNING, logger=common.__name__):
        builder = _prepare(tmp_path, "ade20k", max_corrupt_fraction=0.5)
    assert builder.info.splits["train"].num_examples == 2
    _check_split(tmp_path, "ade20k", "train", expected["train"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipping" in m and "ADE_train_00000003.jpg" in m for m in messages)
    assert any("skipped 1 corrupt of 3" in m for m in messages)


def test_label_size_mismatch_is_a_corrupt_example():
    image = fx.jpeg(0)
    with pytest.raises(common.CorruptExampleError, match="img.jpg is 32x48 but label lab.png"):
        common.make_example(image, "img.jpg", np.zeros((3, 3), np.uint16), "lab.png")


# ---------------------------------------------------------------------------------------------
# The command line, and reading without TensorFlow.


def test_cli_prepares_and_reports(tmp_path, manual, capsys):
    fx.make_ade20k(manual)
    argv = ["prepare", "ade20k", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "data")]
    assert cli.call(prepare.main, argv) == 0
    out = capsys.readouterr().out
    assert "train: 2 examples" in out and "validation: 1 examples" in out


def test_cli_missing_archive_is_one_line(tmp_path, manual, capsys):
    (manual / "unrelated.txt").write_text("x")
    argv = ["prepare", "ade20k", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "data")]
    assert cli.call(prepare.main, argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: seg_ade20k needs ADEChallengeData2016.zip; looked in")
    assert "\n" not in err


def test_unknown_dataset_name_or_config(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        builders.tfds_name("imagenet")
    with pytest.raises(ValueError, match="configs: stuff164k, stuff10k_171, stuff10k_182"):
        _prepare(tmp_path, "coco_stuff", config="stuff10k")


def test_reading_back_needs_no_tensorflow(tmp_path, manual):
    fx.make_ade20k(manual)
    _prepare(tmp_path, "ade20k")
    script = textwrap.dedent(
        """
        import sys

        import tensorflow_datasets as tfds
        source = tfds.data_source("seg_ade20k", split="validation", data_dir=sys.argv[1])
        example = source[0]
        assert example["label"].dtype.name == "uint16", example["label"].dtype
        assert example["image"].shape == (32, 48, 3)
        assert "tensorflow" not in sys.modules
        print("ok", int(example["label"][0, 0]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["ok", "2"]


# ---------------------------------------------------------------------------------------------
# Prepared sets read through the input pipeline.


@pytest.mark.parametrize(
    ("name", "config", "make", "num_classes"),
    [
        ("ade20k", None, fx.make_ade20k, 150),
        ("cityscapes", None, fx.make_cityscapes, 19),
        ("pascal_voc", "voc2012", fx.make_pascal_voc, 21),
        ("coco_stuff", "stuff164k", fx.make_coco_stuff_164k, 171),
        ("coco_stuff", "stuff10k_182", lambda d: fx.make_coco_stuff_10k(d)[182], 182),
        ("coco_lvis", None, fx.make_coco_lvis, 1284),
    ],
)
def test_prepared_sets_through_the_eval_pipeline(tmp_path, manual, name, config, make, num_classes):
    """Void becomes -1, ids stay, and every pixel of every image comes out exactly once."""
    from jaxscaleseg.data import pipeline

    expected = make(manual)
    _prepare(tmp_path, name, config=config)
    split, want = next(iter(expected.items()))
    full = builders.tfds_name(name) + (f"/{config}" if config else "")
    source = tfds.data_source(full, split=split, data_dir=str(tmp_path / "data"))
    order = []
    for i in range(len(source)):
        file_name = source[i]["file_name"]
        order.append(file_name.decode() if isinstance(file_name, bytes) else str(file_name))
    batches = list(pipeline.make_eval_iterator(source, batch_size=2, num_classes=num_classes))
    labels = np.concatenate([b["label"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == sum(w.size for w in want.values())
    for index, file_name in enumerate(order):
        stored = want[file_name].astype(np.int64)
        mapped = np.where(stored == V, -1, stored)
        height, width = mapped.shape
        assert valid[index, :height, :width].all() and valid[index].sum() == mapped.size
        np.testing.assert_array_equal(labels[index, :height, :width], mapped, err_msg=file_name)
