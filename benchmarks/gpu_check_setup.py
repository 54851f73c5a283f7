"""What the GPU check's processes share: presets, output files, rows, the device lock, timing.

``benchmarks.gpu_check`` runs each measurement (``benchmarks.gpu_check_pieces``) in its own
process; they meet only through what is here: the run's sizes (``PRESETS``), the files of the
output folder, the rows appended to ``rows.jsonl``, the lock that gives one process at a time the
device, and the markers a piece prints or reads from its environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import statistics
import time
from pathlib import Path

ROWS = "rows.jsonl"
LOG = "log.txt"
SUMMARY = "summary.md"
PTX_LINES = "scatter_ptx.txt"
# Under --scratch_dir, not the output folder (which keeps only the few files worth copying back).
TRACE_DIR = "trace"
DUMP_DIR = "xla_dump"
LOCK = "device.lock"
# Set in a piece's environment to make it abort (tests: a crash must lose only that row).
CRASH_ENV = "JAXSCALESEG_GPU_CHECK_CRASH"
# The name of the piece a process runs, set by ``main`` in that process.
PIECE_ENV = "JAXSCALESEG_GPU_CHECK_PIECE"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one run of the check."""

    batch: int
    size: int
    dtype: str
    embedding_dim: int
    num_neighbors: int
    backbones: tuple[str, ...]
    step_classes: tuple[int, ...]
    loss_classes: tuple[int, ...]
    loss_variants: tuple[tuple[str, str], ...]  # (table gradient, selection) of each loss row
    step_selections: tuple[str, ...]  # other selections of the ESS step at the middle C
    approximate: bool  # an approximate-search ESS step at the largest C (first backbone last)
    profile: tuple[str, int]  # (backbone, C) of the ESS step cell that is also traced
    repeats: int
    matmul_size: int
    scatter_updates: int
    step_timeout_s: int
    loss_timeout_s: int
    budget_s: int  # no piece starts after this many seconds
    workers: int  # pieces at once (they compile side by side; the device is taken in turn)
    input_workers: int  # grain worker processes of the input piece


PRESETS = {
    "full": Preset(
        batch=8,
        size=512,
        dtype="bfloat16",
        embedding_dim=12,
        num_neighbors=7,
        backbones=("mobilenet_v2", "resnet101"),
        step_classes=(150, 1284, 10_000, 100_000),
        loss_classes=(19, 1284, 100_000),
        # The first run (BENCHMARKS §2) measured scatter, matmul and segment: none beat sorted
        # by much where it mattered, so the selections are compared on the default gradient.
        loss_variants=(
            ("auto", "auto"),
            ("auto", "min_rounds"),
            ("auto", "tile_minima"),
            ("auto", "tiled_top_k"),
        ),
        step_selections=("min_rounds", "tile_minima"),
        approximate=True,
        profile=("resnet101", 1284),
        repeats=3,
        matmul_size=8192,
        scatter_updates=2**22,
        # The first run's C = 1 284 softmax steps took up to 163 s with 4 pieces at once.
        step_timeout_s=280,
        loss_timeout_s=120,
        budget_s=420,
        workers=6,
        input_workers=8,
    ),
    "tiny": Preset(
        batch=1,
        size=32,
        dtype="float32",
        embedding_dim=4,
        num_neighbors=3,
        backbones=("tiny",),
        step_classes=(40,),
        loss_classes=(40,),
        loss_variants=(
            ("scatter", "auto"),
            ("sorted", "auto"),
            ("matmul", "auto"),
            ("segment", "auto"),
            ("auto", "min_rounds"),
            ("auto", "tile_minima"),
        ),
        step_selections=("min_rounds", "tile_minima"),
        approximate=True,
        profile=("tiny", 40),
        repeats=2,
        matmul_size=256,
        scatter_updates=2**12,
        step_timeout_s=120,
        loss_timeout_s=120,
        budget_s=300,
        workers=2,
        input_workers=0,
    ),
}


# ----------------------------------------------------------------------------------------------
# Rows and the device lock (used by the pieces, in their own processes).


def append_row(output_dir: Path, row: dict) -> None:
    """Appends one JSON row to ``rows.jsonl`` and syncs it (pieces run concurrently)."""
    line = json.dumps(row, sort_keys=True) + "\n"
    with open(output_dir / ROWS, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_rows(output_dir: Path) -> list[dict]:
    """Every row written so far (a torn last line, from a killed piece, is skipped)."""
    rows = []
    path = output_dir / ROWS
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


@contextlib.contextmanager
def device_lock(scratch_dir: Path):
    """Holds the device for allocation and timing: one piece at a time."""
    with open(scratch_dir / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# A warm run slower than this is timed once, not ``repeats`` times: a pathological cell (the
# old ESS step took 17 s on the H200) must not hold the device for minutes.
PATIENCE_S = 5.0


def median_seconds(fn, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` after one warm-up (the warm-up alone when slow)."""
    import jax  # noqa: PLC0415 (pieces import jax in their own process)

    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if time.perf_counter() - start > PATIENCE_S:
        repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compiled_peak(compiled) -> dict:
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {"compiled_peak_mb": peak / 2**20, "temp_mb": memory.temp_size_in_bytes / 2**20}


# The softmax step's compiled peak grows by 8 bytes per pixel and class (its float32 logits and
# their gradient): 16.0 MB per class at N = 8·512² on the H200 for both backbones (bfloat16;
# BENCHMARKS §2, first GPU check) and 1.00 MB per class at N = 2·256² on CPU (float32; §2's CPU
# preset). Without the rest of the step it is a lower bound of the peak.
SOFTMAX_BYTES_PER_PIXEL_CLASS = 8
# Words of an out-of-memory error, in a piece's output (XLA's autotuner and allocator).
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
# Printed by a step piece before it compiles and before it runs (its log tells which one died).
COMPILING, RUNNING = "gpu_check: compiling", "gpu_check: running"
# Set to a piece's name to make its compile raise an out-of-memory error (tests).
OOM_ENV = "JAXSCALESEG_GPU_CHECK_OOM"


def current_piece_name() -> str:
    return os.environ.get(PIECE_ENV, "")


def softmax_peak_lower_bound(batch: int, size: int, num_classes: int) -> int:
    """Bytes the softmax step needs at least: its logits and their gradient in float32."""
    return SOFTMAX_BYTES_PER_PIXEL_CLASS * batch * size * size * num_classes


def is_out_of_memory(text: str) -> bool:
    """Whether an error message or a piece's output reports an allocation that failed."""
    return any(marker in text for marker in OOM_MARKERS)
