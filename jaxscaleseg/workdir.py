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

Training (:mod:`jaxscaleseg.training`), evaluation and prediction read and write it only
through this module. Files a run rewrites (``model.json``, ``config.json``, the trimmed
``metrics.jsonl``) are replaced atomically (a temporary file, then ``os.replace``), so a killed
run never leaves them half-written; :func:`read_metrics` skips a line a killed run cut short.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxscaleseg.errors import CheckpointNotFoundError, ModelMismatchError, WorkdirError

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
CHECKPOINT_DIRS = {"latest": LATEST_DIR, "best": BEST_DIR}
MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CLASS_FREQUENCY_FILE = "class_frequency.json"
TENSORBOARD_DIR = "tensorboard"
# The build_model arguments that decide the parameters' shapes and meaning: a checkpoint only
# fits a model that agrees on these (dtype and BatchNorm momentum may differ).
ARCHITECTURE_KEYS = (
    "backbone",
    "head",
    "num_classes",
    "embedding_dim",
    "output_stride",
    "separable",
    "tiny_width",
    "center_embedding",
)


def resolve(workdir: str | os.PathLike) -> Path:
    """The workdir as a ``Path`` with ``~`` expanded."""
    return Path(os.path.expanduser(str(workdir)))


def prepare(workdir: str | os.PathLike) -> Path:
    """Creates the workdir if needed and checks that it is writable.

    Raises:
      WorkdirError: naming the workdir and the reason.
    """
    path = resolve(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"workdir {path} is not writable ({e.strerror or e})") from e
    return path


def read_class_frequency(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The stored ``class_frequency.json``, or None when there is none (or it is unreadable)."""
    path = Path(workdir) / CLASS_FREQUENCY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_class_frequency(workdir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Stores ``record`` as the workdir's ``class_frequency.json`` (atomically)."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(workdir) / CLASS_FREQUENCY_FILE, json.dumps(record) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` by ``text`` in one step: readers see the old or the new file, whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run_files(workdir: Path, model_args: Mapping[str, Any], config_json: str) -> None:
    """Writes ``model.json`` (the ``build_model`` arguments) and ``config.json``, atomically."""
    write_text_atomic(workdir / MODEL_FILE, json.dumps(dict(model_args), indent=2) + "\n")
    write_text_atomic(workdir / CONFIG_FILE, config_json + "\n")


def read_model_args(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``build_model`` arguments stored in ``model.json``, or None when there is none.

    Raises:
      WorkdirError: ``model.json`` exists but is not a JSON object.
    """
    path = resolve(workdir) / MODEL_FILE
    if not path.exists():
        return None
    try:
        args = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirError(
            f"{path} is unreadable ({e}); delete it to use the config's model"
        ) from e
    if not isinstance(args, dict):
        raise WorkdirError(f"{path} is not a JSON object; delete it to use the config's model")
    return args


def check_model(workdir: str | os.PathLike, expected: Mapping[str, Any]) -> None:
    """Refuses a workdir whose ``model.json`` describes another model than ``expected``.

    Only :data:`ARCHITECTURE_KEYS` present in both are compared (older workdirs stored fewer).

    Raises:
      ModelMismatchError: naming the workdir and each differing field.
    """
    stored = read_model_args(workdir)
    if stored is None:
        return
    diffs = [
        f"{k}: workdir {stored[k]!r} vs config {expected[k]!r}"
        for k in ARCHITECTURE_KEYS
        if k in stored and k in expected and stored[k] != expected[k]
    ]
    if diffs:
        raise ModelMismatchError(
            f"workdir {resolve(workdir)} holds a different model than the config "
            f"({'; '.join(diffs)}); use another --workdir"
        )


# --------------------------------------------------------------------------- metrics


def read_metrics(workdir_or_file: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a workdir's ``metrics.jsonl`` (or of that file), oldest first.

    A line that is not a JSON object with a ``step`` (a line cut short by a killed run) is
    skipped, so a resume never stops on it. A missing file gives ``[]``.
    """
    path = resolve(workdir_or_file)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def trim_metrics(workdir: Path, last_step: int) -> None:
    """Keeps the records up to ``last_step`` (what a killed run logged after its checkpoint
    goes, with any broken line), rewriting ``metrics.jsonl`` atomically."""
    path = workdir / METRICS_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= last_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(workdir: Path, record: Mapping[str, Any]) -> None:
    """Appends one record to ``metrics.jsonl``."""
    with (workdir / METRICS_FILE).open("a") as f:
        f.write(json.dumps(dict(record)) + "\n")


# --------------------------------------------------------------------------- checkpoints


def state_tree(state: Any) -> dict[str, Any]:
    """The saved part of a train state: ``{"step", "params", "batch_stats", "opt_state"}``."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def checkpoint_steps(directory: Path) -> list[int]:
    """Committed checkpoint steps in a checkpoint folder, ascending (read without writing)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def find_checkpoint(workdir: str | os.PathLike, checkpoint: str | int = "best") -> tuple[Path, int]:
    """The folder and step of the requested checkpoint.

    Args:
      workdir: a training workdir.
      checkpoint: ``"best"`` (best validation mIoU), ``"latest"``, or a step number (looked
        for among the latest checkpoints, then the best).

    Returns:
      ``(checkpoint folder, step)``.

    Raises:
      CheckpointNotFoundError: naming the workdir and what was looked for.
    """
    workdir = resolve(workdir)
    key = str(checkpoint)
    if key in CHECKPOINT_DIRS:
        directory = workdir / CHECKPOINT_DIRS[key]
        steps = checkpoint_steps(directory)
        if steps:
            return directory, steps[-1]
        hint = " (no evaluation has run yet? try --checkpoint latest)" if key == "best" else ""
        raise CheckpointNotFoundError(
            f"no {key} checkpoint in workdir {workdir}: {directory} holds no step{hint}"
        )
    if not key.isdigit():
        raise CheckpointNotFoundError(
            f"checkpoint must be 'best', 'latest' or a step, got {checkpoint!r}"
        )
    for name in (LATEST_DIR, BEST_DIR):
        if int(key) in checkpoint_steps(workdir / name):
            return workdir / name, int(key)
    available = sorted(
        set(checkpoint_steps(workdir / LATEST_DIR)) | set(checkpoint_steps(workdir / BEST_DIR))
    )
    raise CheckpointNotFoundError(
        f"no checkpoint of step {key} in workdir {workdir} (looked in {LATEST_DIR}/ and "
        f"{BEST_DIR}/; steps there: {available or 'none'})"
    )


def load_checkpoint(workdir: str | os.PathLike, checkpoint: str | int = "latest") -> dict:
    """A saved state as numpy trees: ``{"step", "params", "batch_stats", "opt_state"}``.

    Raises:
      CheckpointNotFoundError: see :func:`find_checkpoint`.
    """
    directory, step = find_checkpoint(workdir, checkpoint)
    with ocp.CheckpointManager(
        directory.absolute(),
        item_names=("state",),
        options=ocp.CheckpointManagerOptions(create=False),
    ) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored["state"]


def load_variables(
    workdir: str | os.PathLike, checkpoint: str | int = "best"
) -> tuple[dict[str, Any], int]:
    """The model variables of a saved state: ``({"params", "batch_stats"?}, step)``."""
    _, step = find_checkpoint(workdir, checkpoint)
    state = load_checkpoint(workdir, checkpoint)
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return variables, int(step)


class RunCheckpoints:
    """The latest and best checkpoint folders of a training run (orbax managers).

    Args:
      workdir: the run's workdir.
      keep: how many latest checkpoints to keep.
    """

    def __init__(self, workdir: Path, keep: int):
        self.workdir = workdir
        sync = dict(create=True, enable_async_checkpointing=False)
        self._latest = ocp.CheckpointManager(
            (workdir / LATEST_DIR).absolute(),
            item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, **sync),
        )
        self._best = ocp.CheckpointManager(
            (workdir / BEST_DIR).absolute(),
            item_names=("state", "metrics"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, **sync),
        )

    def latest_step(self) -> int | None:
        """The newest latest-checkpoint step, or None."""
        return self._latest.latest_step()

    def restore_latest(self, target: Any, iterator: Any) -> tuple[dict[str, Any], int]:
        """Restores the newest latest checkpoint; ``iterator`` is moved to its saved position.

        Args:
          target: a state tree (:func:`state_tree`) whose shapes, dtypes and shardings the
            restored arrays take.
          iterator: the training iterator.

        Returns:
          ``(state tree, step)``.
        """
        step = self._latest.latest_step()
        abstract_tree = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_tree),
                data=grain.checkpoint.CheckpointRestore(iterator),
            ),
        )
        return restored["state"], int(step)

    def best_miou(self) -> float:
        """The validation mIoU of the best checkpoint, or -1 when there is none."""
        step = self._best.latest_step()
        if step is None:
            return -1.0
        stored = self._best.restore(step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore()))
        return float(stored["metrics"]["mIoU"])

    def save_latest(self, step: int, tree: Any, iterator: Any) -> None:
        """Saves a latest checkpoint (state and the iterator's position) at ``step``."""
        self._latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                data=grain.checkpoint.CheckpointSave(iterator),
            ),
            force=True,
        )

    def save_best(self, step: int, tree: Any, scalars: Mapping[str, float]) -> None:
        """Saves the best checkpoint at ``step`` with its validation scalars."""
        self._best.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                metrics=ocp.args.JsonSave({k: float(v) for k, v in scalars.items()}),
            ),
            force=True,
        )

    def close(self) -> None:
        """Waits for pending writes and releases the managers."""
        self._latest.close()
        self._best.close()


__all__ = [
    "ARCHITECTURE_KEYS",
    "BEST_DIR",
    "CHECKPOINT_DIRS",
    "CONFIG_FILE",
    "LATEST_DIR",
    "METRICS_FILE",
    "MODEL_FILE",
    "RunCheckpoints",
    "TENSORBOARD_DIR",
    "append_metrics",
    "check_model",
    "checkpoint_steps",
    "find_checkpoint",
    "load_checkpoint",
    "load_variables",
    "prepare",
    "read_metrics",
    "read_model_args",
    "resolve",
    "state_tree",
    "trim_metrics",
    "write_run_files",
    "write_text_atomic",
]
