"""A run's checkpoints: the saved state tree, finding and loading a checkpoint, and the
latest/best orbax managers of a training run (:class:`RunCheckpoints`) with their recovery
rules."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxscaleseg.errors import (
    CheckpointNotFoundError,
    ModelMismatchError,
    WorkdirError,
    one_line,
)
from jaxscaleseg.models import first_shape_difference
from jaxscaleseg.workdir.files import BEST_DIR, CHECKPOINT_DIRS, DAMAGED_DIR, LATEST_DIR, resolve


def state_tree(state: Any) -> dict[str, Any]:
    """The saved part of a train state: ``{"step", "params", "batch_stats", "opt_state"}``,
    and ``"separation_ids"`` / ``"class_index"`` where the state carries them
    (``loss.separation_refresh_every``, ``loss.search``)."""
    tree = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }
    for carried in ("separation_ids", "class_index"):  # present where the config uses them
        if getattr(state, carried, None) is not None:
            tree[carried] = getattr(state, carried)
    return tree


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
    if not workdir.is_dir():
        raise CheckpointNotFoundError(f"workdir {workdir} does not exist")
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
      WorkdirError: the checkpoint cannot be read.
    """
    directory, step = find_checkpoint(workdir, checkpoint)
    with ocp.CheckpointManager(
        directory.absolute(),
        item_names=("state",),
        options=ocp.CheckpointManagerOptions(create=False),
    ) as manager:
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds)
            raise WorkdirError(
                f"checkpoint {directory / str(step)} is unreadable ({one_line(e)[:300]}); "
                "name another one with --checkpoint"
            ) from e
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


def _disk_full(error: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(workdir: Path, what: str, error: BaseException) -> WorkdirError:
    """The one-line error for a write that found the disk full."""
    return WorkdirError(
        f"workdir {workdir}: no space left on the device while {what} ({one_line(error)}); "
        "what was saved before is intact: free some space and rerun to resume"
    )


class RunCheckpoints:
    """The latest and best checkpoint folders of a training run (orbax managers).

    Recovery rules: the best mIoU is always read from ``best/`` (whatever ``checkpoints/``
    holds); a step already saved is never saved again (a rerun after a kill reaches the same
    state); more than ``keep`` latest checkpoints (a kill between a save and the deletion of the
    oldest) are trimmed on start; a newest checkpoint that cannot be read is moved to
    ``damaged/`` with a one-line warning and the previous one is used; a full disk during a save
    is one :class:`WorkdirError` line.

    Args:
      workdir: the run's workdir.
      keep: how many latest checkpoints to keep.
      log: called with one-line warnings.
    """

    def __init__(self, workdir: Path, keep: int, log: Callable[[str], None] = print):
        self.workdir = workdir
        self._keep = keep
        self._log = log
        self._latest = self._manager(
            LATEST_DIR, {"data": grain.checkpoint.CheckpointHandler()}, keep
        )
        self._best = self._manager(BEST_DIR, {"metrics": ocp.JsonCheckpointHandler()}, 1)
        for manager, limit in ((self._latest, keep), (self._best, 1)):
            for step in manager.all_steps()[:-limit]:
                manager.delete(step)

    def _manager(self, name: str, handlers: dict[str, Any], keep: int) -> ocp.CheckpointManager:
        # Handlers named up front: the state's metadata (shapes) is readable before a restore.
        return ocp.CheckpointManager(
            (self.workdir / name).absolute(),
            item_handlers={"state": ocp.StandardCheckpointHandler(), **handlers},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        """The newest latest-checkpoint step, or None."""
        return self._latest.latest_step()

    def _set_aside(self, manager: ocp.CheckpointManager, name: str, step: int, error) -> None:
        """Moves an unreadable checkpoint to ``damaged/`` (never deleted) and says so."""
        damaged = self.workdir / DAMAGED_DIR
        damaged.mkdir(exist_ok=True)
        target = damaged / f"{name}_{step}"
        n = 1
        while target.exists():
            target, n = damaged / f"{name}_{step}_{n}", n + 1
        try:
            os.replace(self.workdir / name / str(step), target)
        except FileNotFoundError:  # another process of a multi-host run moved it first
            pass
        manager.reload()
        self._log(
            f"warning: checkpoint {name}/{step} in {self.workdir} is unreadable "
            f"({one_line(error)[:300]}); moved to {target}, using the previous one"
        )

    def restore_latest(self, target: Any, iterator: Any) -> tuple[dict[str, Any], int] | None:
        """Restores the newest readable latest checkpoint; ``iterator`` moves to its position.

        Args:
          target: a state tree (:func:`state_tree`) whose shapes, dtypes and shardings the
            restored arrays take.
          iterator: the training iterator.

        Returns:
          ``(state tree, step)``, or None when no checkpoint could be read (the iterator is
          then back at its start).

        Raises:
          ModelMismatchError: a checkpoint holds arrays of other shapes than ``target``.
        """
        abstract_tree = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        start = iterator.get_state()
        for step in reversed(self._latest.all_steps()):
            try:
                _check_shapes(self._latest, step, abstract_tree, self.workdir)
                restored = self._latest.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_tree),
                        data=grain.checkpoint.CheckpointRestore(iterator),
                    ),
                )
            except ModelMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 (orbax/grain/tensorstore raise many kinds)
                text = str(e).lower()
                if "shape" in text and ("compatible" in text or "mismatch" in text):
                    raise ModelMismatchError(
                        f"workdir {self.workdir} holds a checkpoint of another model "
                        f"({one_line(e)[:300]}); use another --workdir"
                    ) from e
                if "does not match" in text:  # grain: the iterator of another dataset
                    raise WorkdirError(
                        f"checkpoint {LATEST_DIR}/{step} in {self.workdir} was saved by a run on "
                        f"other data ({one_line(e)[:300]}); use the run's config or another "
                        "--workdir"
                    ) from e
                self._set_aside(self._latest, LATEST_DIR, step, e)
                continue
            return restored["state"], int(step)
        iterator.set_state(start)
        return None

    def best_miou(self) -> float:
        """The validation mIoU of the best checkpoint, or -1 when there is none."""
        for step in reversed(self._best.all_steps()):
            try:
                stored = self._best.restore(
                    step, args=ocp.args.Composite(metrics=ocp.args.JsonRestore())
                )
                return float(stored["metrics"]["mIoU"])
            except Exception as e:  # noqa: BLE001 (as in restore_latest)
                self._set_aside(self._best, BEST_DIR, step, e)
        return -1.0

    def save_latest(self, step: int, tree: Any, iterator: Any) -> None:
        """Saves a latest checkpoint (state and the iterator's position) at ``step``.

        Raises:
          WorkdirError: the disk is full (the previous checkpoints stay).
        """
        if step in self._latest.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree), data=grain.checkpoint.CheckpointSave(iterator)
        )
        self._save(self._latest, step, args, f"saving checkpoint {step}")

    def save_best(self, step: int, tree: Any, scalars: Mapping[str, float]) -> None:
        """Saves the best checkpoint at ``step`` with its validation scalars.

        Raises:
          WorkdirError: the disk is full (the previous best checkpoint stays).
        """
        if step in self._best.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            metrics=ocp.args.JsonSave({k: float(v) for k, v in scalars.items()}),
        )
        self._save(self._best, step, args, f"saving the best checkpoint {step}")

    def _save(self, manager: ocp.CheckpointManager, step: int, args: Any, what: str) -> None:
        """``manager.save``; a full disk becomes one :class:`WorkdirError` naming ``what``."""
        try:
            manager.save(step, args=args, force=True)
        except Exception as e:
            if _disk_full(e):
                raise disk_full_error(self.workdir, what, e) from e
            raise

    def close(self) -> None:
        """Waits for pending writes and releases the managers."""
        self._latest.close()
        self._best.close()


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract: Any, workdir: Path) -> None:
    """Refuses a checkpoint whose arrays have other shapes than the model's (another model or
    class count in a workdir without ``model.json``), before orbax fails on it."""
    try:
        stored = manager.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)
        stored_shapes = {
            jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]
            if hasattr(leaf, "shape")
        }
    except Exception:  # noqa: BLE001 (no readable metadata: the restore itself decides)
        return
    difference = first_shape_difference(stored_shapes, abstract)
    if difference is not None:
        key, there, here = difference
        raise ModelMismatchError(
            f"workdir {workdir} holds a checkpoint of another model: {key} is {there} there "
            f"but {here} in the config's model; use another --workdir"
        )
