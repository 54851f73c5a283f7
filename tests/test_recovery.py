"""Recovery: a workdir left by a kill, a full disk, a second process or a damaged checkpoint.

(A best checkpoint with no latest one beside it: ``tests/test_faults.py``.)

Each test reproduces one defect found by trying the CLI as a user would (issue 18) and fails
without its fix. They share the tiny synthetic config of ``test_training`` (a few steps, a
checkpoint every step) so the compiled programs come from the persistent cache.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_training import tiny_config

from jaxscaleseg import cli, evaluate, training, workdir
from jaxscaleseg.errors import ModelMismatchError, WorkdirError

REPO = Path(__file__).resolve().parent.parent


def _params(path: Path, checkpoint="latest"):
    return jax.tree.leaves(workdir.load_checkpoint(path, checkpoint)["params"])


def _steps(path: Path, name: str) -> list[int]:
    return workdir.checkpoint_steps(path / name)


def test_finished_run_rerun_adds_no_record_and_trims_extra_checkpoints(tmp_path):
    """Rerunning a finished run used to append its final evaluation again; a kill between a
    save and the deletion of the oldest checkpoint left more than ``keep_checkpoints``."""
    training.train_and_evaluate(tiny_config(num_train_steps=3, keep_checkpoints=3), tmp_path)
    assert _steps(tmp_path, "checkpoints") == [1, 2, 3]
    records = workdir.read_metrics(tmp_path)
    result = training.train_and_evaluate(
        tiny_config(num_train_steps=3, keep_checkpoints=2), tmp_path
    )
    assert workdir.read_metrics(tmp_path) == records
    assert result["eval"]["mIoU"] == [r for r in records if "eval_mIoU" in r][-1]["eval_mIoU"]
    assert _steps(tmp_path, "checkpoints") == [2, 3]


def _damage(step_dir: Path) -> None:
    """Truncates every data file of a checkpoint's state (what a dying disk or copy leaves)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[:3])


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, capsys):
    config = tiny_config(num_train_steps=3, keep_checkpoints=3)
    training.train_and_evaluate(config, tmp_path / "straight")
    run = tmp_path / "run"
    training.train_and_evaluate(config, run)
    _damage(run / "checkpoints" / "3")
    with pytest.raises(WorkdirError, match="unreadable"):  # evaluate: one line, no traceback
        workdir.load_checkpoint(run, "latest")
    capsys.readouterr()
    training.train_and_evaluate(config, run)
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "checkpoints/3" in err[0] and "damaged" in err[0], err
    assert (run / "damaged" / "checkpoints_3").is_dir()  # kept, not deleted
    assert _steps(run, "checkpoints") == [1, 2, 3]
    # Resumed from step 2: the same parameters as the run that was never damaged.
    for a, b in zip(_params(tmp_path / "straight"), _params(run), strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_class_count_without_model_json_is_one_error(tmp_path):
    training.train_and_evaluate(tiny_config(num_train_steps=1), tmp_path)
    (tmp_path / "model.json").unlink()
    config = tiny_config(num_train_steps=2, **{"dataset.num_classes": 31})
    with pytest.raises(ModelMismatchError, match="another model"):
        training.train_and_evaluate(config, tmp_path)
    assert _steps(tmp_path, "checkpoints") == [1]  # not mistaken for a damaged checkpoint
    assert not (tmp_path / "damaged").exists()


def test_a_second_training_process_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    held = workdir.RunLock(workdir.prepare(tmp_path))
    try:
        with pytest.raises(WorkdirError, match="in use by another training run"):
            training.train_and_evaluate(tiny_config(num_train_steps=1), tmp_path)
    finally:
        held.release()
    # A process killed while holding the lock leaves the workdir usable.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from jaxscaleseg import workdir\n"
        "lock = workdir.RunLock(Path(sys.argv[1]))\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError, match="in use"):
            workdir.RunLock(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    workdir.RunLock(tmp_path).release()


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch
):
    save = ocp.CheckpointManager.save

    def save_or_fill(self, step, *args, **kwargs):
        if step == 2:  # what tensorstore raises when the device is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_or_fill)
    with pytest.raises(WorkdirError) as info:
        training.train_and_evaluate(tiny_config(num_train_steps=3), tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "no space left" in message
    assert int(workdir.load_checkpoint(tmp_path)["step"]) == 1


def test_evaluate_on_a_missing_workdir_says_it_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["evaluate", "--config=configs/synthetic.py:smoke", f"--workdir={tmp_path / 'none'}"]
    assert cli.call(evaluate.main, argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "none" in err, err


def test_run_files_are_replaced_atomically_with_plain_permissions(tmp_path, monkeypatch):
    """``model.json`` and ``config.json``, rewritten at every start: a write cut short before
    its rename (a kill, a full disk) leaves the previous files whole and no stray file; a
    finished write has the permissions a plain one would (readable by others, not 0600)."""
    workdir.write_run_files(tmp_path, {"backbone": "tiny"}, '{"old": 1}')
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    (tmp_path / "plain").write_text("x")  # the permissions a plain write gives here
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    (tmp_path / "plain").unlink()

    def cut_short(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", cut_short)
        with pytest.raises(OSError, match="No space"):
            workdir.write_run_files(tmp_path, {"backbone": "resnet50"}, '{"new": 2}')
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before
    workdir.write_run_files(tmp_path, {"backbone": "resnet50"}, '{"new": 2}')
    assert workdir.read_model_args(tmp_path) == {"backbone": "resnet50"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.json"]
    for name in ("config.json", "model.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain, name
