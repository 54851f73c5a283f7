"""Several hosts: one training process per host, joined by ``jax.distributed``.

Every host runs the same command on the same workdir (a folder every host sees), naming
process 0's address and a free port, the number of processes and its own id::

    python -m jaxscaleseg.train --config configs/<name>.py --workdir /shared/run \\
        --config.distributed --config.distributed_coordinator=host0:12355 \\
        --config.distributed_num_processes=2 --config.distributed_process_id=0   # 1 on host1

Empty fields fall back on what ``jax.distributed.initialize`` reads itself: the
``JAX_COORDINATOR_ADDRESS`` variable, and the cluster it detects (Slurm, Open MPI, Cloud TPU).
On CPUs the processes reduce over gloo (``jax_cpu_collectives_implementation``).

What the processes share: ``batch_size`` is the global batch; each process reads and augments
only its rows of every global batch (``data.pipeline``), so the batches, hence the run, are
those of one process with all the devices. Process 0 alone prints, writes ``model.json``,
``config.json``, ``metrics.jsonl`` and the TensorBoard files and holds the workdir's lock;
orbax writes each checkpoint once, with every process's data-iterator position in it, and
every process restores it on a rerun.

When a process dies, JAX's coordination service ends the others: at once when process 0 is
gone, otherwise when the dead process has sent no heartbeat for
``distributed_timeout_seconds``. JAX ends them with a fatal C++ abort (a stack trace, no
Python exception), so the ``train`` command runs the training in a child process (the
*worker*, :func:`supervise`) and turns that end into one ``error:`` line naming the cause,
keeping JAX's own report in ``<workdir>/process_<id>.log``. Rerunning the command on every
host resumes from the last checkpoint.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import jax
import ml_collections

from jaxscaleseg import config_schema
from jaxscaleseg.errors import ConfigError, DistributedError, one_line

# Set in the worker's environment by :func:`supervise`.
WORKER_ENV = "JAXSCALESEG_DISTRIBUTED_WORKER"
# The file descriptor of the worker's message channel (its ``sys.stderr``).
MESSAGES_FD_ENV = "JAXSCALESEG_MESSAGES_FD"
# A C++ (absl/glog) log line: severity, date, time, thread, source file and line.
_CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+\.(?:cc|h):\d+\]")
_JAX_FATAL = "JAX distributed service detected fatal errors"
# The line :func:`supervise` writes to a worker's log as each run starts ("=== <when>: <command>").
# JAX's own reports hold other "=== ... ===" lines (jax 0.12: "=== Source Location Trace: ===").
_RUN_HEADER = re.compile(r"^=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: ", re.MULTILINE)


def initialize(config: ml_collections.ConfigDict) -> None:
    """Joins this process to the run's others (``jax.distributed.initialize``).

    Call before anything touches a JAX device. Does nothing when ``jax.distributed`` is
    initialised already.

    Raises:
      ConfigError: a ``distributed*`` field is invalid, or the coordinator, the process count
        or the id is neither given nor detected.
      DistributedError: the processes could not join (within JAX's initialisation timeout).
    """
    config_schema.validate_distributed(config)
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is not None and is_initialized():
        return
    _use_cpu_collectives()
    timeout = int(config.distributed_timeout_seconds)
    kwargs = {
        "coordinator_address": config.distributed_coordinator or None,
        "num_processes": config.distributed_num_processes or None,
        "process_id": None if config.distributed_process_id < 0 else config.distributed_process_id,
        "heartbeat_timeout_seconds": timeout,
        "shutdown_timeout_seconds": timeout,
    }
    accepted = inspect.signature(jax.distributed.initialize).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"distributed: {one_line(e)} (set distributed_coordinator, "
            "distributed_num_processes and distributed_process_id, or run where JAX detects "
            "them: Slurm, Open MPI, Cloud TPU)"
        ) from e
    except RuntimeError as e:  # XlaRuntimeError: the coordinator was not reached in time
        where = kwargs.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
        raise DistributedError(
            f"could not join the run's processes at {where}: {one_line(e)[:300]}"
        ) from e


def _use_cpu_collectives() -> None:
    """Collectives across CPU processes over gloo, where the JAX version leaves them off."""
    name = "jax_cpu_collectives_implementation"
    try:
        if getattr(jax.config, name) in (None, "none"):
            jax.config.update(name, "gloo")
    except AttributeError:  # a JAX without the option
        pass


def is_worker() -> bool:
    """Whether this process is the worker a :func:`supervise` started."""
    return os.environ.get(WORKER_ENV) == "1"


def attach_worker() -> None:
    """Sets up a worker (call first in its ``main``): Python's ``sys.stdout`` and
    ``sys.stderr`` go to the supervisor's output and message channels, while file descriptors
    1 and 2, where the C++ side writes (gloo's connection notes, JAX's logs and fatal reports),
    go to the log channel only; and the worker ends at once when its supervisor ends."""
    fd = os.environ.get(MESSAGES_FD_ENV)
    if fd is not None:
        sys.stdout.flush()
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stderr = os.fdopen(int(fd), "w", buffering=1)
    exit_with_parent()


def exit_with_parent() -> None:
    """Ends the worker at once when its supervisor ends (its stdin, a pipe, closes).

    A supervisor killed with SIGKILL cannot stop its worker; without this the worker would
    keep the run's other processes waiting on it.
    """

    def watch() -> None:
        # os.read: no lock of Python's buffered stdin, which would stop the interpreter's exit.
        try:
            while os.read(0, 4096):
                pass
        except OSError:  # no readable stdin: nothing to watch
            return
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def collective_failure(error: BaseException) -> DistributedError:
    """The one-line error of a worker whose computation with the other processes failed (a
    peer died mid-collective: gloo's read fails before JAX's service ends the process)."""
    return DistributedError(
        f"process {jax.process_index()}: a computation with the run's other processes failed "
        f"({one_line(error)[:300]}); if one of them stopped, rerun the command on every host "
        "to resume"
    )


def _copy(stream: IO[bytes], out: IO[bytes] | None, log: IO[bytes] | None, held: list) -> None:
    """Copies a worker's channel line by line to ``log`` and to ``out``, except ``error:``
    lines (appended to ``held``: the supervisor decides)."""
    for raw in iter(stream.readline, b""):
        if log is not None:
            log.write(raw)
            log.flush()
        if raw.startswith(b"error: "):
            held.append(raw.decode("utf-8", "replace").rstrip("\n"))
        elif out is not None:
            out.write(raw)
            out.flush()


def last_run(log_text: str) -> str:
    """The part of a worker's log (``log_text``, appended to by every run) that its last run
    wrote, from its ``=== <when>: <command>`` line on; all of it when there is no such line."""
    starts = [match.start() for match in _RUN_HEADER.finditer(log_text)]
    return log_text[starts[-1] :] if starts else log_text


def fatal_report(log_text: str) -> list[str]:
    """The lines of a C++ fatal report (from its ``F`` log line on) in a worker's log."""
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("F") and _CPP_LOG.match(line):
            return lines[i:]
    return []


def failure_line(fatal: Sequence[str], label: str, log_path: Path) -> str:
    """The one line for a worker that JAX's distributed service ended (``fatal``: the lines of
    its C++ fatal report)."""
    text = " ".join(fatal)
    if "stopped sending heartbeats" in text:
        cause = "another process of the run stopped responding (no heartbeat)"
    elif "coordination service" in text and ("RPC" in text or "UNAVAILABLE" in text):
        cause = "the run's coordinator (process 0) ended or cannot be reached"
    else:
        cause = f"JAX's distributed service stopped it ({text[:200]})"
    return (
        f"error: process {label}: {cause}; rerun the command on every host to resume "
        f"(JAX's report: {log_path})"
    )


def supervise(command: Sequence[str], label: str, log_path: Path) -> int:
    """Runs the training ``command`` as a worker process and reports how it ended.

    The worker's Python output comes through (``sys.stdout``, and ``sys.stderr`` on a pipe of
    its own: see :func:`attach_worker`), except its ``error:`` line, held to the end. What it
    writes to file descriptors 1 and 2 (C++ logs, gloo's notes, fatal reports, Python's
    fatal-error dumps) goes to ``log_path`` only, with the messages. SIGTERM and SIGHUP are
    passed on; SIGINT (Ctrl-C) reaches the worker directly, as it shares this process's group.

    Args:
      command: the worker's command line (the same ``train`` command).
      label: this process's name in messages (its id).
      log_path: the worker's log (appended to: a rerun keeps the report of the last end).

    Returns:
      The exit status: the worker's own (with its ``error:`` line), or 1 with one ``error:``
      line of its own when JAX's distributed service ended the worker (another process died)
      or a signal did.
    """
    env = {**os.environ, WORKER_ENV: "1"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    read_messages, write_messages = os.pipe()
    env[MESSAGES_FD_ENV] = str(write_messages)
    held: list[str] = []
    with open(log_path, "ab") as log, os.fdopen(read_messages, "rb") as messages:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {started}: {' '.join(command)}\n".encode())
        try:
            child = subprocess.Popen(
                list(command),
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(write_messages,),
            )
        finally:
            os.close(write_messages)

        def pass_on(signum, frame):
            del frame
            if signum != signal.SIGINT:  # Ctrl-C reaches the worker itself
                child.send_signal(signum)

        previous = {
            s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
        }
        channels = [
            (child.stdout, sys.stdout.buffer, None),
            (messages, sys.stderr.buffer, log),
            (child.stderr, None, log),
        ]
        threads = [threading.Thread(target=_copy, args=(*c, held)) for c in channels]
        for thread in threads:
            thread.start()
        try:
            status = child.wait()
            for thread in threads:
                thread.join()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            child.stdin.close()
    if status == 0:
        for line in held:
            print(line, file=sys.stderr, flush=True)
        return 0
    text = log_path.read_text(errors="replace")
    fatal = fatal_report(last_run(text))
    if any(_JAX_FATAL in line for line in fatal):
        message = failure_line(fatal, label, log_path)
    elif held:
        message = held[-1]
    elif status < 0:
        message = f"error: process {label} ended by {signal.Signals(-status).name} ({log_path})"
    else:
        return status
    print(message, file=sys.stderr, flush=True)
    return status if status > 0 and not fatal else 1


__all__ = [
    "MESSAGES_FD_ENV",
    "WORKER_ENV",
    "attach_worker",
    "collective_failure",
    "exit_with_parent",
    "failure_line",
    "fatal_report",
    "initialize",
    "is_worker",
    "last_run",
    "supervise",
]
