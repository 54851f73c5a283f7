"""The first thing to run on a lent GPU: versions, atomics, loss and train-step timings, a profile.

    python -m benchmarks.gpu_check --output_dir DIR                  # H200: within ~8 minutes
    python -m benchmarks.gpu_check --output_dir DIR --preset tiny    # any CPU, a few seconds each

Every measurement ("piece") runs in its own process with its own time limit, so a crash (a
CUDA error, an out-of-memory abort) or a hang loses only that piece's row. Rows are appended to
``DIR/rows.jsonl`` as they finish (one JSON object a line, ``kind`` says which table), each
piece's exit is a ``status`` row, the pieces' output goes to ``DIR/log.txt``, and at the end
``DIR/summary.md`` renders every table (``--summarize`` re-renders it from ``rows.jsonl``).
Up to ``--workers`` pieces run at once: they compile side by side, but only one at a time holds
the device (a file lock) for allocation and timing, so the timings do not overlap.

The pieces (``--preset full``: batch 8, 512×512, bfloat16, D = 12, k = 7):

* ``versions``: jax, jaxlib, the CUDA plugin, the driver (``nvidia-smi``), the device.
* ``atomics``: whether a float32 scatter-add compiles to native atomic adds or to
  compare-and-swap loops (the PTX that ``--xla_dump_to`` writes, lines in
  ``DIR/scatter_ptx.txt``), and its time into 19 rows against 100 000 rows (contention).
* ``matmul``: the float32 (precision HIGHEST) matmul rate, square and in the search's shape.
* ``loss``: ``value_and_grad`` of ``losses.ess_objective`` (raw table, ``normalize_classes``,
  the backend's ``"auto"`` sizes) at N = 8·512² for C in {19, 1 284, 100 000} with each
  (table gradient, selection) variant of the preset: time, compiled memory, the loss value and
  gradient norms (which must agree).
* ``step``: the whole ``training.train_step`` (model, loss, SGD update) for ESS and softmax,
  MobileNetV2 and ResNet-101 at output stride 16, C in {150, 1 284, 10 000, 100 000}, and at
  C = 1 284 the ESS step with each other selection of the preset (``loss.selection``) and with
  the stride-4 union search (``loss.search="union"``), at the largest C the certified search
  (``loss.search="certified"``, what ``"auto"`` takes there: issue 15's sub-linear mode); both
  with the separation ids every 100 steps and ``loss.normalize_pixels``: compiled peak (arguments +
  outputs + temporaries − aliased), median step time where it fits. A step whose compiled peak
  exceeds 90 % of the device's memory is "does not fit", never run; a softmax step whose logits
  alone would exceed it (``softmax_peak_lower_bound``) is not even compiled, and a piece that
  dies of an out-of-memory error while compiling is reported "does not fit (crashed in
  compile)" (XLA's autotuner allocates the program's buffers).
* ``floor``: beside the largest-C ESS step, the exact search's arithmetic floor, 2·N·C·(D+1)
  flops at the measured matmul rates (computed from the rows, no process of its own).
* ``profile``: a ``jax.profiler`` trace of one ESS step (``DIR/trace``) and its ten most
  expensive ops with their share of the step's wall time, from the trace's device ops (on
  CPU, from the events that carry an ``hlo_op``).
* ``input``: where ``grain`` imports, the input pipeline's images/s (synthetic source, the
  preset's batch and crop, ``--input_workers``) beside the steps' images/s.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import functools
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
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


def _median_seconds(fn, args, repeats: int) -> float:
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


def _compiled_peak(compiled) -> dict:
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {"compiled_peak_mb": peak / 2**20, "temp_mb": memory.temp_size_in_bytes / 2**20}


# ----------------------------------------------------------------------------------------------
# The pieces. Each takes (output_dir, preset, **args) and appends its rows.


def piece_versions(output_dir: Path, scratch_dir: Path, preset: Preset) -> None:
    import jax  # noqa: PLC0415

    packages = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "grain"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "libtpu")):
            packages[name] = dist.version
    driver = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = "--query-gpu=name,driver_version,memory.total,compute_cap"
        driver = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    append_row(
        output_dir,
        {
            "kind": "versions",
            "python": platform.python_version(),
            "packages": packages,
            "backend": jax.default_backend(),
            "device": str(device),
            "device_kind": device.device_kind,
            "device_count": jax.device_count(),
            "device_memory_gb": stats.get("bytes_limit", 0) / 2**30,
            "nvidia_smi": driver,
            "cpus": os.cpu_count(),
        },
    )


def _classify_atomics(text: str) -> tuple[str, dict, list[str]]:
    """Verdict on the float32 atomics in PTX text: ``native``, ``cas loop``, ``both``, ``none``."""
    lines = [line.strip() for line in text.splitlines() if "atom." in line or "red." in line]
    # atom.global.add.f32, red.global.add.f32, red.global.v4.f32.add (Hopper's vector form)...
    native = [line for line in lines if ".add" in line and ".f32" in line and ".cas" not in line]
    return _atomics_verdict(lines, native, [line for line in lines if ".cas." in line])


def _atomics_verdict(lines: list[str], native: list[str], cas: list[str]):
    """``(verdict, counts, lines)`` of the atomic instructions ``lines``, of which ``native``
    are float atomic adds and ``cas`` compare-and-swaps."""
    counts = {"float_add_atomics": len(native), "cas_atomics": len(cas), "atomic_lines": len(lines)}
    verdict = {
        (True, False): "native f32 atomic add",
        (False, True): "compare-and-swap loop",
        (True, True): "both native adds and compare-and-swap",
        (False, False): "no atomics found",
    }[(bool(native), bool(cas))]
    return verdict, counts, lines


def _classify_llvm_atomics(text: str) -> tuple[str, dict, list[str]]:
    """:func:`_classify_atomics` for LLVM IR: ``atomicrmw fadd`` is a native float atomic add,
    ``cmpxchg`` a compare-and-swap loop."""
    lines = [line.strip() for line in text.splitlines() if "atomicrmw" in line or "cmpxchg" in line]
    native = [line for line in lines if "atomicrmw fadd" in line]
    return _atomics_verdict(lines, native, [line for line in lines if "cmpxchg" in line])


def piece_atomics(output_dir: Path, scratch_dir: Path, preset: Preset) -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    def scatter_add_probe(table, ids, rows):
        return table.at[ids].add(rows)

    rng = np.random.default_rng(0)
    num_updates, dim = preset.scatter_updates, 16
    rows = rng.normal(size=(num_updates, dim)).astype(np.float32)
    row = {"kind": "atomics", "backend": jax.default_backend(), "updates": num_updates}
    timings = {}
    for num_classes in (19, 100_000):
        table = np.zeros((num_classes, dim), np.float32)
        ids = rng.integers(0, num_classes, num_updates).astype(np.int32)
        compiled = jax.jit(scatter_add_probe).lower(table, ids, rows).compile()
        with device_lock(scratch_dir):
            args = tuple(jnp.asarray(a) for a in (table, ids, rows))
            timings[num_classes] = _median_seconds(compiled, args, preset.repeats)
            del args
        if num_classes == 19:
            row["hlo_has_scatter"] = "scatter" in compiled.as_text()
    row["seconds_into_19_rows"] = timings[19]
    row["seconds_into_100000_rows"] = timings[100_000]
    row["contention_ratio"] = timings[19] / timings[100_000]
    dumped = sorted(p for p in (scratch_dir / DUMP_DIR).rglob("*") if p.is_file())
    # What the dump held, so that a run with no PTX says what it wrote instead (the first H200
    # run wrote none).
    row["dump_files"] = {"count": len(dumped), "names": [p.name for p in dumped[:40]]}
    ptx_files = [p for p in dumped if p.suffix == ".ptx"]
    llvm_files = [p for p in dumped if p.suffix == ".ll"]
    if ptx_files:
        text = "\n".join(p.read_text(errors="replace") for p in ptx_files)
        row["verdict"], counts, lines = _classify_atomics(text)
        source = f"{len(ptx_files)} PTX file(s)"
    else:
        # No PTX: the LLVM IR says it too (atomicrmw fadd: a native atomic; cmpxchg: a loop).
        text = "\n".join(p.read_text(errors="replace") for p in llvm_files)
        verdict, counts, lines = _classify_llvm_atomics(text)
        row["verdict"] = f"no PTX written (backend {jax.default_backend()})" + (
            f"; LLVM IR: {verdict}" if llvm_files else ""
        )
        source = f"{len(llvm_files)} LLVM IR file(s)"
    row.update(counts)
    row["atomics_source"] = source
    (output_dir / PTX_LINES).write_text(
        f"{len(lines)} atomic instructions in {source} of the scatter-add probe:\n"
        + "\n".join(lines[:200])
        + "\n"
    )
    append_row(output_dir, row)


def piece_matmul(output_dir: Path, scratch_dir: Path, preset: Preset) -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax import lax  # noqa: PLC0415

    size = preset.matmul_size
    dot = jax.jit(functools.partial(jnp.dot, precision=lax.Precision.HIGHEST))
    # The search's shape: a block of rows of [q, 1] against [−2e, ‖e‖²] of many classes.
    dim = preset.embedding_dim + 1
    rows, cols = (2**17, 2**13) if size >= 4096 else (1024, 512)
    with device_lock(scratch_dir):
        square = jnp.ones((size, size), jnp.float32)
        queries, classes = jnp.ones((rows, dim), jnp.float32), jnp.ones((dim, cols), jnp.float32)
        square_s = _median_seconds(dot, (square, square), preset.repeats)
        search_s = _median_seconds(dot, (queries, classes), preset.repeats)
    append_row(
        output_dir,
        {
            "kind": "matmul",
            "square_size": size,
            "square_tflops": 2 * size**3 / square_s / 1e12,
            "search_shape": [rows, dim, cols],
            "search_tflops": 2 * rows * dim * cols / search_s / 1e12,
        },
    )


def piece_loss(
    output_dir: Path,
    scratch_dir: Path,
    preset: Preset,
    num_classes: int,
    table_gradient: str,
    selection: str = "auto",
) -> None:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jaxscaleseg import loss_plan, losses  # noqa: PLC0415

    rng = np.random.default_rng(0)
    shape = (preset.batch, preset.size, preset.size)
    num_pixels = int(np.prod(shape))
    dim = preset.embedding_dim
    pixels = rng.normal(size=(*shape, dim)).astype(np.float32)
    pixels /= np.linalg.norm(pixels, axis=-1, keepdims=True)
    labels = rng.integers(0, num_classes, shape).astype(np.int32)
    labels[rng.random(shape) < 0.05] = -1
    table = rng.uniform(-1, 1, (num_classes, dim)).astype(np.float32)

    def objective(p, y, e):
        return losses.ess_objective(
            p,
            y,
            e,
            num_neighbors=preset.num_neighbors,
            normalize_classes=True,
            max_block_bytes="auto",
            pixels_per_chunk="auto",
            table_gradient=table_gradient,
            search_method=selection,
        )[0]

    fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 2)))
    start = time.perf_counter()
    compiled = fn.lower(pixels, labels, table).compile()
    compile_s = time.perf_counter() - start
    plan = loss_plan.loss_plan(
        None, num_classes, table_gradient=table_gradient, search_method=selection
    )
    with device_lock(scratch_dir):
        args = tuple(jax.device_put(a) for a in (pixels, labels, table))
        seconds = _median_seconds(compiled, args, preset.repeats)
        value, (pixel_grad, table_grad) = compiled(*args)
        value = float(value)
        grad_norms = [float(np.linalg.norm(np.asarray(g))) for g in (pixel_grad, table_grad)]
    append_row(
        output_dir,
        {
            "kind": "loss",
            "C": num_classes,
            "N": num_pixels,
            "table_gradient": plan.table_gradient,
            "selection": plan.search_method,
            "plan": dataclasses.asdict(plan),
            "seconds": seconds,
            "compile_seconds": compile_s,
            **_compiled_peak(compiled),
            "value": value,
            "pixel_grad_norm": grad_norms[0],
            "table_grad_norm": grad_norms[1],
        },
    )


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


def _current_piece_name() -> str:
    return os.environ.get(PIECE_ENV, "")


def softmax_peak_lower_bound(batch: int, size: int, num_classes: int) -> int:
    """Bytes the softmax step needs at least: its logits and their gradient in float32."""
    return SOFTMAX_BYTES_PER_PIXEL_CLASS * batch * size * size * num_classes


def is_out_of_memory(text: str) -> bool:
    """Whether an error message or a piece's output reports an allocation that failed."""
    return any(marker in text for marker in OOM_MARKERS)


def piece_step(
    output_dir: Path,
    scratch_dir: Path,
    preset: Preset,
    backbone: str,
    num_classes: int,
    head: str,
    trace: bool,
    selection: str = "auto",
    search: str = "exact",
) -> None:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from benchmarks import scaling  # noqa: PLC0415
    from jaxscaleseg import loss_plan  # noqa: PLC0415

    row = {
        "kind": "step",
        "backbone": backbone,
        "C": num_classes,
        "head": head,
        "dtype": preset.dtype,
        "batch": preset.batch,
        "size": preset.size,
        "embedding_dim": preset.embedding_dim,
    }
    # What many classes train with (BENCHMARKS §7.5): the separation ids every 100 steps (the
    # timed steps are the 99 in between) and unit-length pixels in the loss.
    many_class_loss = {"separation_refresh_every": 100, "normalize_pixels": True}
    stride4_search = head == "ess" and search in ("union", "certified")
    if head == "ess":
        row.update(selection_setting=selection, search=search)
    if stride4_search:
        row.update(many_class_loss)
    if head == "softmax":
        bound = softmax_peak_lower_bound(preset.batch, preset.size, num_classes)
        if bound >= 0.9 * scaling.device_memory_bytes():
            # Not compiled: XLA would try (and fail) to allocate it while autotuning.
            row.update(fits=False, compiled_peak_mb=bound / 2**20, peak_estimated=True)
            append_row(output_dir, row)
            return

    bench = scaling.Preset(
        backbone,
        16,
        preset.batch,
        preset.size,
        (preset.dtype,),
        (num_classes,),
        preset.embedding_dim,
    )
    config = scaling.make_config(bench, num_classes, head, preset.dtype)
    config.loss.num_neighbors = preset.num_neighbors
    config.loss.selection = selection
    config.loss.search = search
    if stride4_search:
        config.loss.update(many_class_loss)
    image_shape = (preset.batch, preset.size, preset.size, 3)
    parts = scaling.step_parts(config, image_shape)
    new_state, init, step = parts.new_state, parts.init, parts.step
    abstract_state, batch_shapes = parts.abstract_state, parts.batch_shapes
    key = jax.random.key(0)
    start = time.perf_counter()
    print(COMPILING, flush=True)
    try:
        if os.environ.get(OOM_ENV) == _current_piece_name():
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate (test)")
        compiled = step.lower(abstract_state, batch_shapes, key).compile()
    except Exception as e:  # noqa: BLE001 (XLA raises several kinds; only OOM is expected)
        if not is_out_of_memory(str(e)):
            raise
        row.update(fits=False, compiled_peak_mb=None, note="out of memory while compiling")
        row["error"] = str(e).splitlines()[0][:300]
        append_row(output_dir, row)
        return
    row["compile_seconds"] = time.perf_counter() - start
    row.update(_compiled_peak(compiled))
    if head == "ess":
        row["plan"] = dataclasses.asdict(
            loss_plan.loss_plan(None, num_classes, search_method=selection)
        )
    row["fits"] = row["compiled_peak_mb"] * 2**20 < 0.9 * scaling.device_memory_bytes()
    if not row["fits"]:
        append_row(output_dir, row)
        return
    rng = np.random.default_rng(0)
    with device_lock(scratch_dir):
        print(RUNNING, flush=True)
        state = new_state(scaling.random_variables(jax.eval_shape(init, key)))
        batch = {
            "image": jnp.asarray(rng.normal(size=image_shape).astype(np.float32)),
            "label": jnp.asarray(rng.integers(-1, num_classes, image_shape[:3]).astype(np.int32)),
        }
        start = time.perf_counter()
        for _ in range(2):  # warm-up
            state, out = compiled(state, batch, key)
        jax.block_until_ready(out["loss"])
        slow = time.perf_counter() - start > 2 * PATIENCE_S
        times = []
        for _ in range(1 if slow else preset.repeats):
            start = time.perf_counter()
            state, out = compiled(state, batch, key)
            jax.block_until_ready(out["loss"])
            times.append(time.perf_counter() - start)
        row["step_seconds"] = statistics.median(times)
        row["images_per_second"] = preset.batch / row["step_seconds"]
        row["loss"] = float(out["loss"])
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            row["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
        append_row(output_dir, row)  # the step's row stands even if tracing fails
        if not trace:
            return
        with jax.profiler.trace(str(scratch_dir / TRACE_DIR)):
            start = time.perf_counter()
            state, out = compiled(state, batch, key)
            jax.block_until_ready(out["loss"])
            traced_s = time.perf_counter() - start
    profile = {k: row[k] for k in ("backbone", "C", "head", "dtype", "step_seconds", "plan")}
    profile.update(kind="profile", traced_step_seconds=traced_s)
    profile.update(top_ops(scratch_dir / TRACE_DIR, row["step_seconds"]))
    append_row(output_dir, profile)


def top_ops(trace_dir: Path, step_seconds: float, count: int = 10) -> dict:
    """The most expensive ops of a ``jax.profiler`` trace and their share of the step's time.

    On a GPU the trace's device planes (``/device:...``) have an "XLA Ops" line whose events are
    the HLO ops run on the device; their durations are summed by op name. Without one, the
    device planes' "Stream" lines (kernels, by kernel name); without a device plane (CPU), the
    events that carry an ``hlo_op`` statistic (the runtime's thunks).

    Returns:
      ``{"ops_source": ..., "device_busy_seconds": ..., "top_ops": [{"op", "seconds",
      "share", "calls", "long_name"}]}``; shares are of ``step_seconds`` (a step's wall time
      measured without the profiler).
    """
    from jax.profiler import ProfileData  # noqa: PLC0415

    files = sorted(glob.glob(str(trace_dir / "**" / "*.xplane.pb"), recursive=True))
    if not files:
        return {"ops_source": "no trace file written", "top_ops": []}
    data = ProfileData.from_file(files[-1])
    totals = collections.Counter()
    calls = collections.Counter()
    long_names = {}
    source = "device plane 'XLA Ops' events"
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if line.name != "XLA Ops":
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns
                calls[event.name] += 1
                stats = dict(event.stats)
                if "long_name" in stats:
                    long_names.setdefault(event.name, str(stats["long_name"])[:160])
    if not totals:
        source = "device plane stream events (kernels; no 'XLA Ops' line)"
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    for event in line.events:
                        totals[event.name] += event.duration_ns
                        calls[event.name] += 1
    if not totals:
        source = "host events with an hlo_op statistic (no device op line)"
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if "hlo_op" in stats:
                        name = str(stats["hlo_op"])
                        totals[name] += event.duration_ns
                        calls[name] += 1
    busy = sum(totals.values()) / 1e9
    ops = [
        {
            "op": name,
            "seconds": ns / 1e9,
            "share": ns / 1e9 / step_seconds,
            "calls": calls[name],
            "long_name": long_names.get(name, ""),
        }
        for name, ns in totals.most_common(count)
    ]
    return {"ops_source": source, "device_busy_seconds": busy, "top_ops": ops}


def piece_input(output_dir: Path, scratch_dir: Path, preset: Preset, workers: int) -> None:
    from benchmarks import input_pipeline  # noqa: PLC0415
    from jaxscaleseg.data.synthetic import SyntheticSegmentation  # noqa: PLC0415

    source = SyntheticSegmentation(1284, (preset.size, preset.size), 200, seed=0, split="train")
    batches = 20 if preset.size >= 256 else 5
    rate = input_pipeline.measure(
        source,
        num_classes=1284,
        batch_size=preset.batch,
        crop_size=(preset.size, preset.size),
        worker_count=workers,
        num_batches=batches,
        warmup=3,
    )
    append_row(
        output_dir,
        {
            "kind": "input",
            "workers": workers,
            "batch": preset.batch,
            "size": preset.size,
            "batches_per_second": rate,
            "images_per_second": rate * preset.batch,
            "cpus": os.cpu_count(),
        },
    )


PIECES = {
    "versions": piece_versions,
    "atomics": piece_atomics,
    "matmul": piece_matmul,
    "loss": piece_loss,
    "step": piece_step,
    "input": piece_input,
}


# ----------------------------------------------------------------------------------------------
# The plan of a run and the driver.


@dataclasses.dataclass
class Piece:
    """One measurement, run as ``python -m benchmarks.gpu_check --piece ...``."""

    name: str
    function: str
    args: dict
    timeout_s: int
    env: dict = dataclasses.field(default_factory=dict)


def plan_pieces(preset: Preset, scratch_dir: Path, input_workers: int) -> list[Piece]:
    """The pieces in the order they start (what the acceptance needs first)."""
    pieces = [
        Piece("versions", "versions", {}, 90),
        Piece(
            "atomics",
            "atomics",
            {},
            150,
            # A fresh compile (no cache), dumped with its PTX.
            {
                "XLA_FLAGS": f"--xla_dump_to={scratch_dir / DUMP_DIR} "
                "--xla_dump_hlo_module_re=.*scatter_add_probe.*",
                "JAX_COMPILATION_CACHE_DIR": None,
            },
        ),
    ]
    loss = [
        Piece(
            f"loss C={num_classes} {method}" + (f" {selection}" * (selection != "auto")),
            "loss",
            {"num_classes": num_classes, "table_gradient": method, "selection": selection},
            preset.loss_timeout_s,
        )
        for num_classes in preset.loss_classes
        for method, selection in preset.loss_variants
    ]

    def step(backbone, num_classes, head, selection="auto", search="exact"):
        # One default ESS cell also traces a step (no second compile of it).
        trace = (backbone, num_classes, head, selection, search) == (
            *preset.profile,
            "ess",
            "auto",
            "exact",
        )
        name = f"step {backbone} C={num_classes} {head}"
        name += f" {selection}" * (selection != "auto") + f" {search}" * (search != "exact")
        args = {"backbone": backbone, "num_classes": num_classes, "head": head, "trace": trace}
        if head == "ess":
            args.update(selection=selection, search=search)
        return Piece(name + " + profile" * trace, "step", args, preset.step_timeout_s)

    def steps(num_classes):
        return [step(b, num_classes, h) for b in preset.backbones for h in ("ess", "softmax")]

    # What the acceptance needs first: the steps at the C nearest 1 284 (ESS against softmax,
    # then ESS with the other selections), the loss at every C, the largest C (and its
    # approximate search), the profile; then the other class counts.
    middle = min(preset.step_classes, key=lambda c: abs(c - 1284))
    largest = max(preset.step_classes)
    pieces += steps(middle)
    pieces += [step(b, middle, "ess", s) for s in preset.step_selections for b in preset.backbones]
    if preset.approximate and largest != middle:
        # The union at C = 1 284 too: 16x fewer queries for the selection that took 37 % of
        # the first H200 run's step (§2), a candidate for the ESS/softmax target of issue 14.
        pieces.append(step(preset.backbones[-1], middle, "ess", search="union"))
    pieces += loss + [Piece("matmul", "matmul", {}, 90)]
    if largest != middle:
        pieces += steps(largest)
    if preset.approximate:
        # The certified search (knn_certified), what loss.search="auto" takes at many classes:
        # the union's negatives where a bound proves them exact, the exact search elsewhere.
        pieces.append(step(preset.backbones[-1], largest, "ess", search="certified"))
    if importlib.util.find_spec("grain") is not None:
        pieces.append(Piece("input", "input", {"workers": input_workers}, 120))
    for num_classes in preset.step_classes:
        if num_classes not in (middle, largest):
            pieces += steps(num_classes)
    return pieces


def run_pieces(
    pieces: list[Piece],
    output_dir: Path,
    preset_name: str,
    budget_s: float,
    workers: int,
    scratch_dir: Path,
    cache_dir: str,
) -> None:
    """Runs the pieces, ``workers`` at a time, each in its own process with its own limit."""
    start = time.monotonic()
    deadline = budget_s + 60  # running pieces are stopped here
    queue = list(pieces)
    running = []  # (piece, process, started, log file)
    log_path = output_dir / LOG

    def launch(piece: Piece):
        env = dict(os.environ)
        # Pieces share the device in turn: each allocates what it needs, up to 95 %.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"
        env["PYTHONUNBUFFERED"] = "1"
        if cache_dir:
            env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        for name, value in piece.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        command = [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--output_dir",
            str(output_dir),
            "--preset",
            preset_name,
            "--scratch_dir",
            str(scratch_dir),
            "--piece",
            json.dumps({"name": piece.name, "function": piece.function, "args": piece.args}),
        ]
        log = open(scratch_dir / f"log.{time.monotonic_ns()}", "w+")  # noqa: SIM115
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        return piece, process, time.monotonic(), log

    def finish(entry, status: str):
        piece, process, started, log = entry
        log.seek(0)
        output = log.read()
        log.close()
        os.unlink(log.name)
        seconds = time.monotonic() - started
        if status.startswith("crashed"):
            status = exit_status(status, output)
            if status.startswith("does not fit") and piece.function == "step":
                append_row(output_dir, crashed_step_row(piece, status))
        with open(log_path, "a") as f:
            f.write(f"===== {piece.name}: {status} after {seconds:.1f} s\n{output}\n")
        append_row(
            output_dir,
            {"kind": "status", "piece": piece.name, "status": status, "seconds": seconds},
        )
        print(f"[{time.monotonic() - start:6.1f} s] {piece.name}: {status}", flush=True)

    while queue or running:
        while queue and len(running) < workers:
            if time.monotonic() - start > budget_s:
                for piece in queue:
                    append_row(
                        output_dir,
                        {
                            "kind": "status",
                            "piece": piece.name,
                            "status": f"skipped (time budget {budget_s:.0f} s spent)",
                            "seconds": 0.0,
                        },
                    )
                    print(f"{piece.name}: skipped (time budget)", flush=True)
                queue = []
                break
            running.append(launch(queue.pop(0)))
        time.sleep(0.2)
        for entry in list(running):
            piece, process, started, _ = entry
            code = process.poll()
            late = time.monotonic() - start > deadline
            if code is None and (time.monotonic() - started > piece.timeout_s or late):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.wait()
                running.remove(entry)
                limit = f"the run's deadline, {deadline:.0f} s" if late else f"{piece.timeout_s} s"
                finish(entry, f"timed out ({limit})")
            elif code is not None:
                running.remove(entry)
                finish(entry, "ok" if code == 0 else f"crashed (exit code {code})")


def exit_status(status: str, output: str) -> str:
    """A crashed piece's status from its output: out of memory is "does not fit".

    A step piece prints ``COMPILING`` and then ``RUNNING``; an out-of-memory error after the
    first and before the second died in XLA's compiler (its autotuner allocates the program's
    buffers), one after the second while running.
    """
    if not is_out_of_memory(output):
        return status
    if RUNNING in output:
        return "does not fit (out of memory while running)"
    return "does not fit (crashed in compile)"


def crashed_step_row(piece: Piece, status: str) -> dict:
    """The step table's row of a step piece that died of an out-of-memory error."""
    row = {"kind": "step", "fits": False, "compiled_peak_mb": None, "note": status}
    row.update(C=piece.args["num_classes"], backbone=piece.args["backbone"])
    row.update(head=piece.args["head"])
    if piece.args["head"] == "ess":
        row.update(selection_setting=piece.args["selection"], search=piece.args["search"])
    return row


# ----------------------------------------------------------------------------------------------
# The summary.


def _fmt_s(seconds) -> str:
    return "—" if seconds is None else f"{seconds:.4f} s"


def summarize(output_dir: Path) -> str:
    """``summary.md`` from the rows written so far."""
    rows = read_rows(output_dir)
    by_kind = collections.defaultdict(list)
    for row in rows:
        by_kind[row["kind"]].append(row)
    out = ["# GPU check", ""]
    for row in by_kind["versions"]:
        out += [
            f"- backend `{row['backend']}`, device `{row['device']}` ({row['device_kind']}, "
            f"{row['device_memory_gb']:.1f} GiB), {row['device_count']} device(s), "
            f"{row['cpus']} CPUs, Python {row['python']}",
            f"- packages: {', '.join(f'{k} {v}' for k, v in sorted(row['packages'].items()))}",
            f"- nvidia-smi: {row['nvidia_smi'] or '—'}",
            "",
        ]
    for row in by_kind["atomics"]:
        out += [
            f"## f32 scatter-add: {row['verdict']}",
            "",
            f"{row['updates']:,} row updates into 19 rows: {_fmt_s(row['seconds_into_19_rows'])}; "
            f"into 100 000 rows: {_fmt_s(row['seconds_into_100000_rows'])} "
            f"(contention ×{row['contention_ratio']:.1f}).",
            "",
        ]
    for row in by_kind["matmul"]:
        out += [
            f"Matmul rate (float32, HIGHEST): {row['square_tflops']:.1f} TFLOP/s square "
            f"({row['square_size']}³), {row['search_tflops']:.2f} TFLOP/s in the search's "
            f"shape {row['search_shape']}.",
            "",
        ]
    if by_kind["loss"]:
        out += [
            "## ESS loss (value_and_grad, raw table, auto sizes)",
            "",
            "| C | N | table gradient | selection | time | compiled peak | value "
            "| table grad norm |",
            "|---:|---:|---|---|---:|---:|---:|---:|",
        ]
        for row in sorted(by_kind["loss"], key=_loss_key):
            out.append(
                f"| {row['C']:,} | {row['N']:,} | {row['table_gradient']} | "
                f"{row.get('selection', row['plan']['search_method'])} | "
                f"{_fmt_s(row['seconds'])} | {row['compiled_peak_mb']:,.1f} MB | "
                f"{row['value']:.6f} | {row['table_grad_norm']:.6g} |"
            )
        out.append("")
    if by_kind["step"]:
        out += [
            "## Train step (batch, crop, dtype as the preset)",
            "",
            "| backbone | C | head | variant | compiled peak | step time | images/s "
            "| device peak | plan |",
            "|---|---:|---|---|---:|---:|---:|---:|---|",
        ]
        for row in sorted(by_kind["step"], key=_step_key):
            out.append(_step_line(row))
        out.append("")
        out += _acceptance(by_kind)
    for row in by_kind["profile"]:
        out += [
            f"## Profile: one ESS step, {row['backbone']} C = {row['C']:,} "
            f"({row['step_seconds']:.4f} s; ops from {row['ops_source']}, device busy "
            f"{row.get('device_busy_seconds', 0):.4f} s)",
            "",
            "| op | time | share of step | calls | HLO |",
            "|---|---:|---:|---:|---|",
        ]
        for op in row["top_ops"]:
            hlo = op["long_name"].replace("|", "\\|")
            out.append(
                f"| `{op['op']}` | {op['seconds']:.4f} s | {100 * op['share']:.1f} % | "
                f"{op['calls']} | {hlo} |"
            )
        out.append("")
    for row in by_kind["input"]:
        out += [
            f"Input pipeline (synthetic, batch {row['batch']}, {row['size']}², "
            f"{row['workers']} workers, {row['cpus']} CPUs): {row['images_per_second']:.1f} "
            "images/s.",
            "",
        ]
    out += ["## Pieces", "", "| piece | status | seconds |", "|---|---|---:|"]
    for row in by_kind["status"]:
        out.append(f"| {row['piece']} | {row['status']} | {row['seconds']:.1f} |")
    return "\n".join(out) + "\n"


def _loss_key(row: dict) -> tuple:
    return row["C"], row["table_gradient"], row.get("selection", "")


def _variant(row: dict) -> str:
    """An ESS step row's selection and search as set ("" for the defaults, and softmax)."""
    parts = [row.get("selection_setting", "auto"), row.get("search", "exact")]
    return ", ".join(p for p in parts if p not in ("auto", "exact"))


def _step_key(row: dict) -> tuple:
    return row["backbone"], row["C"], row["head"], _variant(row)


def _step_line(row: dict) -> str:
    """One line of the train-step table."""
    fits = row["fits"]
    plan = row.get("plan")
    plan_text = (
        f"{plan['max_block_bytes'] // 2**20} MiB, {plan['pixels_per_chunk']} px, "
        f"{plan['table_gradient']}, {plan['search_method']}"
        if plan
        else ""
    )
    peak = row.get("compiled_peak_mb")
    if peak is None:
        peak_text = "—"
    elif row.get("peak_estimated"):
        peak_text = f"≥ {peak:,.1f} MB (logits, not compiled)"
    else:
        peak_text = f"{peak:,.1f} MB"
    device = f"{row['device_peak_mb']:,.0f} MB" if "device_peak_mb" in row else "—"
    if fits:
        time_text = f"{row['step_seconds']:.4f} s | {row['images_per_second']:.1f}"
    else:
        time_text = f"{row.get('note', 'does not fit')} | —"
    return (
        f"| {row['backbone']} | {row['C']:,} | {row['head']} | {_variant(row)} | {peak_text} | "
        f"{time_text} | {device} | {plan_text} |"
    )


def _acceptance(by_kind) -> list[str]:
    """The issue's acceptance lines, from the step rows (and the matmul rate for the floor).

    The defaults' rows (ESS with ``loss.selection="auto"`` and the exact search) make the
    issue's lines; each other ESS variant gets its own time ratio.
    """
    steps = {(r["backbone"], r["C"], r["head"]): r for r in by_kind["step"] if not _variant(r)}
    variants = [r for r in by_kind["step"] if _variant(r)]
    lines = []
    for row in sorted(variants, key=_step_key):
        default = steps.get((row["backbone"], row["C"], "ess"))
        softmax = steps.get((row["backbone"], row["C"], "softmax"))
        if not (row.get("step_seconds") and default and default.get("step_seconds")):
            continue
        line = (
            f"- {row['backbone']}, C = {row['C']:,}, ESS with {_variant(row)}: "
            f"{row['step_seconds']:.4f} s, {row['step_seconds'] / default['step_seconds']:.2f}"
            " × the default ESS step"
        )
        if softmax and softmax.get("step_seconds"):
            line += f", {row['step_seconds'] / softmax['step_seconds']:.2f} × softmax"
        lines.append(line)
        exact = [r for k, r in steps.items() if k[0] == row["backbone"] and k[2] == "ess"]
        if row.get("search") in ("approximate", "union", "certified") and exact:
            middle = min(exact, key=lambda r: abs(r["C"] - 1284))
            if middle.get("step_seconds"):
                lines.append(
                    f"- {row['backbone']}: approximate ESS step at C = {row['C']:,} / exact "
                    f"ESS step at C = {middle['C']:,} = "
                    f"{row['step_seconds'] / middle['step_seconds']:.2f} (issue 15: at most 2)"
                )
    for backbone in sorted({r["backbone"] for r in by_kind["step"]}):
        classes = sorted({c for b, c, _ in steps if b == backbone})
        ess = {c: steps.get((backbone, c, "ess")) for c in classes}
        softmax = {c: steps.get((backbone, c, "softmax")) for c in classes}
        for c in classes:
            e, s = ess[c], softmax[c]
            if e and s and e.get("step_seconds") and s.get("step_seconds"):
                lines.append(
                    f"- {backbone}, C = {c:,}: ESS / softmax step time = "
                    f"{e['step_seconds'] / s['step_seconds']:.2f}"
                )
        present = [c for c in classes if ess[c]]
        if len(present) >= 2:
            # The issue compares the largest C with C = 1 284 (the nearest C present).
            low, high = min(present[:-1], key=lambda c: abs(c - 1284)), present[-1]
            peaks = ess[high].get("compiled_peak_mb"), ess[low].get("compiled_peak_mb")
            if all(peaks):
                lines.append(
                    f"- {backbone}: ESS compiled peak at C = {high:,} vs C = {low:,}: "
                    f"{100 * (peaks[0] / peaks[1] - 1):+.1f} %"
                )
        largest = present[-1] if present else None
        row = ess.get(largest) if largest else None
        if row and row.get("step_seconds") and by_kind["matmul"]:
            rate = by_kind["matmul"][-1]
            n = row["batch"] * row["size"] ** 2
            dim = row.get("embedding_dim", 12)
            flops = 2 * n * largest * (dim + 1)
            lines.append(
                f"- {backbone}, C = {largest:,}: ESS step {row['step_seconds']:.4f} s; the exact "
                f"search's floor 2·N·C·(D+1) = {flops:.3g} flops takes "
                f"{flops / (rate['square_tflops'] * 1e12):.4f} s at the square matmul rate, "
                f"{flops / (rate['search_tflops'] * 1e12):.4f} s at the search-shaped rate"
            )
    return lines + [""] if lines else []


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--workers", type=int, default=0, help="pieces at once (0: preset's)")
    parser.add_argument(
        "--budget_s", type=float, default=0, help="start no piece after (0: preset's)"
    )
    parser.add_argument("--only", nargs="*", help="run only pieces whose name starts with these")
    parser.add_argument(
        "--input_workers", type=int, default=-1, help="grain workers (input piece; -1: preset's)"
    )
    parser.add_argument(
        "--scratch_dir",
        default="/tmp/jaxscaleseg-gpu-check",
        help="the profiler trace, the XLA dump, the device lock and the pieces' logs",
    )
    parser.add_argument(
        "--cache_dir",
        default="/tmp/jaxscaleseg-gpu-check/cache",
        help="persistent compilation cache shared by the pieces ('' for none): a rerun is faster",
    )
    parser.add_argument("--summarize", action="store_true", help="only rewrite summary.md")
    parser.add_argument("--piece", help=argparse.SUPPRESS)  # internal: run one piece
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    scratch_dir = Path(args.scratch_dir).resolve()
    scratch_dir.mkdir(parents=True, exist_ok=True)
    preset = PRESETS[args.preset]
    if args.piece:
        spec = json.loads(args.piece)
        os.environ[PIECE_ENV] = spec["name"]
        if os.environ.get(CRASH_ENV) == spec["name"]:
            os.abort()  # tests: a piece that dies
        PIECES[spec["function"]](output_dir, scratch_dir, preset, **spec["args"])
        return
    if not args.summarize:
        input_workers = preset.input_workers if args.input_workers < 0 else args.input_workers
        pieces = plan_pieces(preset, scratch_dir, input_workers)
        if args.only:
            pieces = [p for p in pieces if p.name.startswith(tuple(args.only))]
        run_pieces(
            pieces,
            output_dir,
            args.preset,
            args.budget_s or preset.budget_s,
            args.workers or preset.workers,
            scratch_dir,
            args.cache_dir,
        )
    (output_dir / SUMMARY).write_text(summarize(output_dir))
    print(f"wrote {output_dir / SUMMARY}")


if __name__ == "__main__":
    main()
