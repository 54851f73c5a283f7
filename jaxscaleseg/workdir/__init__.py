"""The one home of a run's folder: its layout, its model description, checkpoints and metrics.

A workdir holds::

    checkpoints/<step>/   latest states: ``state`` {step, params, batch_stats, opt_state} and
                          ``data`` (the training iterator's position)
    best/<step>/          the state with the best validation mIoU so far, and its ``metrics``
    model.json            the keyword arguments of ``models.build_model`` (the model is rebuilt
                          from it: ``build_model(**read_model_args(workdir))``)
    config.json           the config of the run
    metrics.jsonl         one JSON object per log or evaluation
    class_frequency.json  each class's rare/common/frequent bin, written by the first
                          evaluation (``jaxscaleseg.evaluation.dataset_class_frequency``)
    tensorboard/          TensorBoard event files
    damaged/              checkpoints found unreadable on a resume (moved, never deleted)
    .lock                 held by the training process using the workdir
    process_<id>.log      several hosts: each process's stderr, C++ reports included
                          (``jaxscaleseg.multihost``)

Training (:mod:`jaxscaleseg.training`), evaluation and prediction read and write it only
through this module. Files a run rewrites (``model.json``, ``config.json``, the trimmed
``metrics.jsonl``) are replaced atomically (a temporary file, then ``os.replace``), so a killed
run never leaves them half-written; :func:`read_metrics` skips a line a killed run cut short.

The package is one module in three files: :mod:`~jaxscaleseg.workdir.files` (layout, run
files, metrics), :mod:`~jaxscaleseg.workdir.checkpoints` and :mod:`~jaxscaleseg.workdir.lock`;
callers use the names below (``from jaxscaleseg import workdir``).
"""

from jaxscaleseg.workdir.checkpoints import (
    RunCheckpoints,
    checkpoint_steps,
    disk_full_error,
    find_checkpoint,
    load_checkpoint,
    load_variables,
    state_tree,
)
from jaxscaleseg.workdir.files import (
    ARCHITECTURE_KEYS,
    BEST_DIR,
    CHECKPOINT_DIRS,
    CLASS_FREQUENCY_FILE,
    CONFIG_FILE,
    DAMAGED_DIR,
    LATEST_DIR,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TENSORBOARD_DIR,
    append_metrics,
    check_model,
    prepare,
    read_class_frequency,
    read_metrics,
    read_model_args,
    resolve,
    trim_metrics,
    write_class_frequency,
    write_run_files,
    write_text_atomic,
)
from jaxscaleseg.workdir.lock import RunLock

__all__ = [
    "ARCHITECTURE_KEYS",
    "BEST_DIR",
    "CHECKPOINT_DIRS",
    "CLASS_FREQUENCY_FILE",
    "CONFIG_FILE",
    "DAMAGED_DIR",
    "LATEST_DIR",
    "LOCK_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "RunCheckpoints",
    "RunLock",
    "TENSORBOARD_DIR",
    "append_metrics",
    "check_model",
    "checkpoint_steps",
    "disk_full_error",
    "find_checkpoint",
    "load_checkpoint",
    "load_variables",
    "prepare",
    "read_class_frequency",
    "read_metrics",
    "read_model_args",
    "resolve",
    "state_tree",
    "trim_metrics",
    "write_class_frequency",
    "write_run_files",
    "write_text_atomic",
]
