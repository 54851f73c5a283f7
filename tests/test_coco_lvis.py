"""COCO+LVIS preparation (issue 16): streamed JSONs, bad category ids counted as corrupt
examples, the original mask script's labels (``original_masks``), and the image-classes sidecar
every prepared split gets."""

from __future__ import annotations

import logging

import fixtures_archives as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxscaleseg.data import builders, image_classes, prepare
from jaxscaleseg.data.builders import coco_lvis, mappings
from jaxscaleseg.data.sources import make_sources

V = fx.V


def _prepare(tmp_path, config=None, **kwargs):
    return prepare.prepare(
        "coco_lvis",
        manual_dir=str(tmp_path / "manual"),
        data_dir=str(tmp_path / "data"),
        config=config,
        **kwargs,
    )


def _labels(tmp_path, split, config=None):
    name = "seg_coco_lvis" + (f"/{config}" if config else "")
    source = tfds.data_source(name, split=split, data_dir=str(tmp_path / "data"))
    out = {}
    for i in range(len(source)):
        example = source[i]
        file_name = example["file_name"]
        file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        out[file_name] = example["label"]
    return out


@pytest.fixture
def manual(tmp_path):
    path = tmp_path / "manual"
    path.mkdir()
    return path


def test_remap_in_table_order_equals_the_scripts_in_place_loop():
    table = mappings.stuff_to_coco_lvis()
    # The script's own loop on a mask holding every stuff id once (numpy, in the table's order).
    cmask = np.array(list(table), np.int64)
    for k, v in table.items():
        cmask[cmask == k] = v
    got = mappings.remap_in_table_order(table)
    assert list(got) == list(table)
    np.testing.assert_array_equal(np.array(list(got.values())), cmask)
    changed = {k: (table[k], got[k]) for k in table if got[k] != table[k]}
    assert changed == {93: (110, 1217), 98: (181, 1283)}  # blanket, cabinet
    assert mappings.remap_in_table_order({1: 2, 2: 3, 3: 1}) == {1: 1, 2: 1, 3: 1}


@pytest.mark.parametrize("config", ["lvis_ids", "original_masks"])
def test_original_masks_config_remaps_blanket_and_cabinet(tmp_path, manual, config):
    expected = fx.make_coco_lvis(manual, blanket_cabinet=True)
    _prepare(tmp_path, config=config)
    want = expected["validation"]["train2017/000000000003.jpg"].copy()
    assert (want == 109).sum() == 16 * 24 and (want == 180).sum() == 16 * 24
    if config == "original_masks":  # 93 -> 110 -> 1217 and 98 -> 181 -> 1283, as train ids
        want[want == 109], want[want == 180] = 1216, 1282
    got = _labels(tmp_path, "validation", config)
    np.testing.assert_array_equal(got["train2017/000000000003.jpg"], want)
    # Nothing else differs between the configs.
    np.testing.assert_array_equal(
        got["val2017/000000000002.jpg"], expected["validation"]["val2017/000000000002.jpg"]
    )
    train = _labels(tmp_path, "train", config)
    np.testing.assert_array_equal(
        train["train2017/000000000001.jpg"], expected["train"]["train2017/000000000001.jpg"]
    )


def test_default_config_is_lvis_ids(tmp_path, manual):
    fx.make_coco_lvis(manual)
    builder = _prepare(tmp_path)
    assert builder.builder_config.name == "lvis_ids"
    assert [c.name for c in coco_lvis.SegCocoLvis.BUILDER_CONFIGS] == [
        "lvis_ids",
        "original_masks",
    ]


def test_bad_category_id_is_a_counted_corrupt_example(tmp_path, manual, caplog):
    expected = fx.make_coco_lvis(manual, bad_category=True)
    # Above the threshold (1 of 2 train images): the corrupt-example guard stops the build
    # and names the image and the id (not a plain ValueError escaping it).
    with pytest.raises(builders.CorruptDataError) as info:
        _prepare(tmp_path)
    message = str(info.value)
    assert "1 of 2 examples" in message and "000000000004.jpg" in message
    assert "annotation 15" in message and "category id 1300" in message
    # Within the threshold: skipped, logged, the rest prepared.
    with caplog.at_level(logging.WARNING):
        builder = _prepare(tmp_path, max_corrupt_fraction=0.6)
    assert builder.info.splits["train"].num_examples == 1
    assert "skipped 1 corrupt of 2 examples" in caplog.text
    got = _labels(tmp_path, "train")
    assert list(got) == ["train2017/000000000001.jpg"]
    np.testing.assert_array_equal(
        got["train2017/000000000001.jpg"], expected["train"]["train2017/000000000001.jpg"]
    )


def test_malformed_json_names_the_file(tmp_path, manual):
    fx.make_coco_lvis(manual)
    (manual / "lvis_v1_val.json").write_text('{"images": [{"id": 2, "height": 32,')
    with pytest.raises(builders.CorruptArchiveError, match=r"lvis_v1_val\.json"):
        _prepare(tmp_path)


def test_annotation_index_streams_and_groups(tmp_path):
    (tmp_path / "a.json").write_text(
        '{"info": {"x": [1, 2]}, "annotations": ['
        '{"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[0, 0, 1.5, 0, 1, 1]]},'
        '{"id": 2, "image_id": 5, "category_id": "x", "segmentation": {"counts": "ab"}},'
        '{"id": 3, "image_id": 7, "category_id": 4, "segmentation": [[2, 2, 3, 3, 4, 4]]},'
        '{"id": 4, "image_id": "7", "category_id": 4, "segmentation": []}]}'
    )
    items = list(coco_lvis.iter_json_array(tmp_path / "a.json", "a.json", "annotations"))
    assert [a["id"] for a in items] == [1, 2, 3, 4]
    assert list(coco_lvis.iter_json_array(tmp_path / "a.json", "a.json", "images")) == []
    index = coco_lvis.AnnotationIndex(tmp_path / "index.sqlite")
    assert index.add("lvis", iter(items)) == (3, 1)  # the string image id is not attributed
    assert index.add("stuff", iter(items), image_ids={5}) == (1, 1)
    assert index.get("lvis", 7) == [(1, 3, [[0, 0, 1.5, 0, 1, 1]]), (3, 4, [[2, 2, 3, 3, 4, 4]])]
    assert index.get("lvis", 5) == [(2, "x", {"counts": "ab"})]
    assert index.get("stuff", 7) == [] and len(index.get("stuff", 5)) == 1
    index.close()


def test_every_prepared_split_has_its_image_classes(tmp_path, manual):
    fx.make_coco_lvis(manual)
    builder = _prepare(tmp_path)
    for split in ("train", "validation"):
        source = tfds.data_source("seg_coco_lvis", split=split, data_dir=str(tmp_path / "data"))
        wrapped = image_classes.with_image_classes(source, builder.data_dir, split)
        assert isinstance(wrapped, image_classes.WithImageClasses) and len(wrapped) == len(source)
        for i in range(len(source)):
            label = source[i]["label"]
            want = np.unique(label[label != V])
            np.testing.assert_array_equal(wrapped.image_classes(i), want)
            assert wrapped.image_classes(i).dtype == np.int32
        assert wrapped.dataset_info is source.dataset_info
    first = image_classes.with_image_classes(
        tfds.data_source("seg_coco_lvis", split="train", data_dir=str(tmp_path / "data")),
        builder.data_dir,
        "train",
    )
    np.testing.assert_array_equal(first.image_classes(0), [0, 4, 49, 1202])
    # A sidecar of another length (a dataset re-prepared by older code) is not used.
    image_classes.write(image_classes.sidecar_path(builder.data_dir, "train"), [[1], [2]])
    source = tfds.data_source("seg_coco_lvis", split="train", data_dir=str(tmp_path / "data"))
    assert image_classes.with_image_classes(source, builder.data_dir, "train") is source


def test_training_start_with_repeat_factors_reads_no_record(tmp_path, manual, monkeypatch):
    """The training source carries the sidecar: building the repeat-factor iterator (what
    training does before its first step) deserialises no record, image or label."""
    from tensorflow_datasets.core.data_sources import base

    from jaxscaleseg import config_schema
    from jaxscaleseg.data import pipeline

    fx.make_coco_lvis(manual, blanket_cabinet=True)
    _prepare(tmp_path)
    config = config_schema.base_config()
    config.dataset.name = "seg_coco_lvis"
    config.dataset.data_dir = str(tmp_path / "data")
    config.dataset.num_classes = 1284
    config.dataset.train_split = "validation"  # two images, classes on both
    config.dataset.repeat_factor_threshold = 0.9

    reads = []
    deserialize = base.BaseDataSource._deserialize
    monkeypatch.setattr(
        base.BaseDataSource,
        "_deserialize",
        lambda self, record: reads.append(1) or deserialize(self, record),
    )
    train, _ = make_sources(config)
    assert reads == []
    np.testing.assert_array_equal(train.image_classes(0), [49, 1202])  # val2017/...2 (id 2)
    np.testing.assert_array_equal(train.image_classes(1), [109, 180, 1253])  # train2017/...3
    iterator = pipeline.make_train_iterator(
        train,
        batch_size=2,
        crop_size=(16, 16),
        seed=0,
        num_classes=1284,
        repeat_factor_threshold=config.dataset.repeat_factor_threshold,
    )
    assert reads == []  # the repeat factors came from the sidecar
    batch = next(iterator)
    assert batch["label"].shape == (2, 16, 16) and len(reads) >= 2  # the spy does see reads
