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
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import jax
import ml_collections

from jaxscaleseg import config_schema
from jaxscaleseg.errors import ConfigError, DistributedError, one_line

# Set in the worker's environment by :func:`supervise`.
WORKER_ENV = "JAXSCALESEG_DISTRIBUTED_WORKER"
# A C++ (absl/glog) log line: severity, date, time, thread, source file and line.
_CPP_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+\.(?:cc|h):\d+\]")
_JAX_FATAL = "JAX distributed service detected fatal errors"


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


def exit_with_parent() -> None:
    """Ends the worker at once when its supervisor ends (its stdin, a pipe, closes).

    A supervisor killed with SIGKILL cannot stop its worker; without this the worker would
    keep the run's other processes waiting on it.
    """

    def watch() -> None:
        # os.read: no lock of Python's buffered stdin, which would stop the interpreter's exit.
        while os.read(0, 4096):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _forward(stream: IO[bytes], out: IO[bytes], log: IO[bytes] | None, fatal: list) -> None:
    """Copies a worker's output to ``out`` line by line, and to ``log`` when given.

    C++ log lines and gloo's connection notes stay out of ``out``; so does everything after a
    C++ fatal line (JAX's report and stack trace as the process aborts), whose lines are
    appended to ``fatal``.
    """
    for raw in iter(stream.readline, b""):
        if log is not None:
            log.write(raw)
            log.flush()
        text = raw.decode("utf-8", "replace")
        if fatal or (text.startswith("F") and _CPP_LOG.match(text)):
            fatal.append(text.rstrip("\n"))
        elif not (_CPP_LOG.match(text) or text.startswith("[Gloo]")):
            out.write(raw)
            out.flush()


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

    The worker's stdout and stderr come through (without C++ log lines: JAX's
    ``TF_CPP_MIN_LOG_LEVEL`` is 3 unless set); everything it writes to stderr is also kept in
    ``log_path``. SIGTERM and SIGHUP are passed on; SIGINT (Ctrl-C) reaches the worker
    directly, as it shares this process's group.

    Args:
      command: the worker's command line (the same ``train`` command).
      label: this process's name in messages (its id).
      log_path: where the worker's stderr is kept.

    Returns:
      The exit status: the worker's own, or 1 with one ``error:`` line when JAX's distributed
      service ended it (another process died) or a signal did.
    """
    env = {**os.environ, WORKER_ENV: "1"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    fatal: list[str] = []
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            list(command),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def pass_on(signum, frame):
            del frame
            if signum != signal.SIGINT:  # Ctrl-C reaches the worker itself
                child.send_signal(signum)

        previous = {
            s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
        }
        threads = [
            threading.Thread(target=_forward, args=(child.stdout, sys.stdout.buffer, None, [])),
            threading.Thread(target=_forward, args=(child.stderr, sys.stderr.buffer, log, fatal)),
        ]
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
    if status >= 0 and not fatal:
        return status
    if any(_JAX_FATAL in line for line in fatal):
        message = failure_line(fatal, label, log_path)
    else:
        name = signal.Signals(-status).name if status < 0 else f"status {status}"
        message = f"error: process {label} ended by {name} (its stderr: {log_path})"
    print(message, file=sys.stderr, flush=True)
    return 1


__all__ = [
    "WORKER_ENV",
    "exit_with_parent",
    "failure_line",
    "initialize",
    "is_worker",
    "supervise",
]
