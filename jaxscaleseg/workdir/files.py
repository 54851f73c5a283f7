"""A run's folder: its layout, its run files (``model.json``, ``config.json``, the class
frequencies), the model mismatch check, atomic rewrites and the metrics file."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxscaleseg.errors import ModelMismatchError, WorkdirError

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
CHECKPOINT_DIRS = {"latest": LATEST_DIR, "best": BEST_DIR}
MODEL_FILE = "model.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CLASS_FREQUENCY_FILE = "class_frequency.json"
TENSORBOARD_DIR = "tensorboard"
DAMAGED_DIR = "damaged"  # unreadable checkpoints are moved here, never deleted
LOCK_FILE = ".lock"
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
        # A probe of this process's own: the processes of a multi-host run share the folder.
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test.")
        os.close(fd)
        os.unlink(probe)
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
    """Replaces ``path`` by ``text`` in one step: readers see the old or the new file, whole.

    The text goes to a new file beside ``path`` (created with the permissions a plain write
    gives: ``0o666`` less the umask), flushed to the disk, then renamed over ``path``; a
    failure or a kill before the rename leaves ``path`` as it was.
    """
    path = Path(path)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
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
