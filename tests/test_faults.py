"""Kills and their aftermath: a few seeded SIGKILLs of the training CLI, each resumed to the
uninterrupted run's state, and the workdirs a kill can leave behind.

The long run, with kills in random phases, is ``python -m tests.faults --kills 30`` (see
``tests/faults.py``).
"""

import shutil

import faults
import pytest
from test_training import tiny_config

from jaxscaleseg import training, workdir


@pytest.mark.slow
def test_sigkilled_runs_resume_bit_identically(tmp_path):
    """Kills inside a checkpoint save, inside an evaluation and at a metrics append (torn)."""
    phases = ("save", "eval", "append")
    report = faults.run(kills=3, seed=0, root=tmp_path, phases=phases)
    assert report.failures == [], "\n".join(report.failures)
    assert (report.kills, report.identical) == (3, 3), report.summary()
    assert report.phases == list(phases)


def test_best_checkpoint_before_any_latest_one_does_not_wedge_the_workdir(tmp_path):
    """A kill after ``best/2`` is final but before any latest checkpoint is: the rerun starts
    from scratch, reaches step 2's evaluation again and must not save onto ``best/2``."""
    config = tiny_config(num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
    first = training.train_and_evaluate(config, tmp_path)
    shutil.rmtree(tmp_path / workdir.LATEST_DIR)  # what the kill left: best/2 only
    again = training.train_and_evaluate(config, tmp_path)
    assert again["step"] == 2 and again["best_mIoU"] == first["best_mIoU"]
    assert workdir.checkpoint_steps(tmp_path / workdir.BEST_DIR) == [2]
