"""What a training run reports while it runs: metric records and a progress line.

* :class:`MetricWriter`: ``metrics.jsonl`` (through :mod:`jaxscaleseg.workdir`) and TensorBoard
  event files, on process 0 only.
* :class:`Progress`: a tqdm bar on a terminal, a periodic line with rate and ETA otherwise.
"""

from __future__ import annotations

import errno
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from tensorboardX import SummaryWriter

from jaxscaleseg import workdir as workdir_lib


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard event files (process 0 only).

    On a resume the records a killed run logged after ``resume_step`` (its last checkpoint),
    and any line it cut short, are dropped first, so the file continues the uninterrupted run.
    """

    def __init__(self, workdir: Path, resume_step: int, enabled: bool = True):
        self._workdir = workdir
        self._enabled = enabled
        self._tb = None
        if not enabled:
            return
        workdir_lib.trim_metrics(workdir, resume_step)
        self._tb = SummaryWriter(
            str(workdir / workdir_lib.TENSORBOARD_DIR),
            purge_step=resume_step + 1 if resume_step else None,
        )

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends one record ``{"step": step, **scalars}``."""
        if not self._enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        try:
            workdir_lib.append_metrics(self._workdir, {"step": int(step), **values})
            for key, value in values.items():
                self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise workdir_lib.disk_full_error(self._workdir, "writing metrics", e) from e
            raise

    def close(self) -> None:
        """Closes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A progress line with loss, rate and ETA (tqdm on a terminal, periodic lines otherwise)."""

    def __init__(self, enabled: bool, start: int, total: int):
        self._bar = None
        self._enabled = enabled
        self._total = total
        self._start = start
        self._t0 = time.perf_counter()
        self._last_print = self._t0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415 (terminal only)

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float) -> None:
        """Reports that ``step`` finished with ``loss``."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_print < 10.0 and step < self._total:
            return
        self._last_print = now
        rate = (step - self._start) / max(now - self._t0, 1e-9)
        eta = (self._total - step) / rate if rate > 0 else float("inf")
        print(
            f"step {step}/{self._total}  loss {loss:.4f}  {rate:.2f} steps/s  "
            f"ETA {format_seconds(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        """Closes the bar (if any)."""
        if self._bar is not None:
            self._bar.close()


def format_seconds(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


__all__ = ["MetricWriter", "Progress", "format_seconds"]
