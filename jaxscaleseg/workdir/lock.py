"""The exclusive lock of a training process on its workdir."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from jaxscaleseg.errors import WorkdirError
from jaxscaleseg.workdir.files import LOCK_FILE


class RunLock:
    """An exclusive lock on a workdir for one training process.

    ``fcntl.flock`` on ``<workdir>/.lock``: the system drops it when the process ends, however
    it ends, so a killed run never leaves the workdir locked.

    Raises:
      WorkdirError: another process holds the lock.
    """

    def __init__(self, workdir: Path):
        self._file = open(workdir / LOCK_FILE, "a+")  # held until release()
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise WorkdirError(
                f"workdir {workdir} is in use by another training run ({holder}); wait for it "
                "to end or use another --workdir"
            ) from e
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()

    def release(self) -> None:
        """Releases the lock."""
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
