"""A prepared dataset with labels beyond the class count: one line naming the dataset, the
split and the example, from ``train`` and ``evaluate`` (issue 18).

The fixture prepares the ADE20K fixture archives with the real builder, its id mapping changed
so that one training example keeps the raw id 200 and the validation example gets 249: ids no
150-class model has (a dataset prepared by other code, or for more classes).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import fixtures_archives as fx
import numpy as np
import pytest

from jaxscaleseg import cli, evaluate, train
from jaxscaleseg.data import image_classes, prepare
from jaxscaleseg.data.builders import mappings

REPO = Path(__file__).resolve().parent.parent
ADE_CONFIG = REPO / "configs" / "ade20k_mobilenetv2_ess.py"
REAL_MAPPING = mappings.ade20k_to_train_ids


def _beyond_150(raw: np.ndarray) -> np.ndarray:
    ids = REAL_MAPPING(raw)
    ids[raw == 200] = 200  # ADE_train_00000002
    ids[raw == 149] = 249  # ADE_val_00000001
    return ids


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_labels")
    (root / "manual").mkdir()
    fx.make_ade20k(root / "manual")
    with mock.patch.object(mappings, "ade20k_to_train_ids", _beyond_150):
        builder = prepare.prepare(
            "ade20k", manual_dir=str(root / "manual"), data_dir=str(root / "data")
        )
    return root / "data", builder.data_dir


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# cli.call parses no --config.key=value overrides: a config file sets them.
CONFIG_FILE = """
import importlib.util

spec = importlib.util.spec_from_file_location("ade", {path!r})
ade = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ade)


def get_config():
    c = ade.get_config("smoke")
    c.dataset.data_dir = {data_dir!r}
    c.dataset.scale_range = (1.0, 1.0)
    return c
"""


def _argv(command, data_dir, tmp_path):
    config = tmp_path / "ade.py"
    config.write_text(CONFIG_FILE.format(path=str(ADE_CONFIG), data_dir=str(data_dir)))
    return [command, f"--config={config}", f"--workdir={tmp_path / 'w'}"]


def test_train_refuses_before_training_and_names_the_example(data_dir, tmp_path, capsys):
    """The class lists written at preparation show the bad ids before anything compiles."""
    status = cli.call(train.main, _argv("train", data_dir[0], tmp_path))
    line = _one_line(capsys)
    assert status == 1
    assert line.startswith("error: dataset seg_ade20k, split train, example "), line
    assert "ADE_train_00000002.jpg" in line and "label ids 200 " in line, line
    assert "1 of the split's 2 examples" in line, line
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing trained


def test_evaluate_names_the_validation_example(data_dir, tmp_path, capsys):
    status = cli.call(evaluate.main, _argv("evaluate", data_dir[0], tmp_path))
    line = _one_line(capsys)
    assert status == 1
    assert line.startswith("error: dataset seg_ade20k, split validation, example 0 "), line
    assert "ADE_val_00000001.jpg" in line and "label ids 249 " in line, line


@pytest.mark.slow
def test_without_class_lists_the_first_batch_names_the_example(data_dir, tmp_path, capsys):
    """A dataset prepared before the class lists existed: the pipeline finds the bad label
    when it decodes it, and the command still ends in one line."""
    sidecars = [image_classes.sidecar_path(data_dir[1], s) for s in ("train", "validation")]
    for path in sidecars:
        path.rename(tmp_path / path.name)
    try:
        status = cli.call(train.main, _argv("train", data_dir[0], tmp_path))
    finally:
        for path in sidecars:
            (tmp_path / path.name).rename(path)
    line = _one_line(capsys)
    assert status == 1
    assert line.startswith("error: dataset seg_ade20k, split train: labels in "), line
    assert "ADE_train_00000002.jpg out of range" in line and "found 200 " in line, line
