"""Trains a model: ``python -m jaxscaleseg.train --config configs/<name>.py --workdir DIR``.

Any config field can be overridden with ``--config.key=value`` (e.g.
``--config.num_train_steps=1000``); ``--config configs/<name>.py:smoke`` selects a config's
tiny variant. Rerunning the same command resumes from the workdir's latest checkpoint. User
errors (flags, config, dataset, workdir) end with one ``error: ...`` line and exit status 1.

With ``--config.distributed`` (one process per host, see :mod:`jaxscaleseg.multihost`) the
command trains in a child process it watches, so that the end JAX gives a process whose
peer died is one line too.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path

import jax
from absl import flags

from jaxscaleseg import cli, config_schema, multihost, training
from jaxscaleseg import workdir as workdir_lib

flags.declare_key_flag("config")
flags.declare_key_flag("workdir")

# What a computation raises when the processes of a multi-host run can no longer reach each
# other (jax.errors.JaxRuntimeError in recent JAX, a RuntimeError subclass in all).
_RUNTIME_ERRORS = (getattr(jax.errors, "JaxRuntimeError", RuntimeError),)


def _started_as_command() -> bool:
    """Whether this module is the program (``python -m jaxscaleseg.train``), not imported."""
    return bool(sys.argv) and Path(sys.argv[0]).resolve() == Path(__file__).resolve()


def main(argv: list[str]) -> int:
    """Runs ``train_and_evaluate`` with the parsed flags; returns the exit status."""
    cli.refuse_arguments(argv)
    cli.check_flags(used=("config", "workdir"), required=("config", "workdir"))
    config = cli.CONFIG.value
    if config.distributed and _started_as_command() and not multihost.is_worker():
        config_schema.validate_distributed(config)
        workdir = workdir_lib.prepare(cli.WORKDIR.value)
        pid = config.distributed_process_id
        label = str(pid) if pid >= 0 else f"{socket.gethostname()}-{os.getpid()}"
        command = [sys.executable, "-m", "jaxscaleseg.train", *sys.argv[1:]]
        return multihost.supervise(command, label, workdir / f"process_{label}.log")
    worker = multihost.is_worker()
    if worker:
        multihost.attach_worker()
    try:
        training.train_and_evaluate(config, cli.WORKDIR.value)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _RUNTIME_ERRORS as e:
        if not worker:
            raise
        traceback.print_exc(file=sys.__stderr__)  # the whole report, kept in the worker's log
        raise multihost.collective_failure(e) from e
    return 0


if __name__ == "__main__":
    cli.run(main)
