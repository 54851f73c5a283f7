"""The GPU check's measurements ("pieces"), each run in its own process by ``benchmarks.gpu_check``.

Each ``piece_*`` takes ``(output_dir, scratch_dir, preset, **args)`` and appends its rows to
``rows.jsonl`` (``gpu_check_setup.append_row``); ``PIECES`` names them for ``--piece``. What each
measures is in ``benchmarks.gpu_check``'s docstring.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.gpu_check_setup import (
    COMPILING,
    DUMP_DIR,
    OOM_ENV,
    PATIENCE_S,
    PTX_LINES,
    RUNNING,
    TRACE_DIR,
    Preset,
    append_row,
    compiled_peak,
    current_piece_name,
    device_lock,
    is_out_of_memory,
    median_seconds,
    softmax_peak_lower_bound,
)

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

    # An earlier run's dump (another jax, another device) must not give this run's verdict.
    shutil.rmtree(scratch_dir / DUMP_DIR, ignore_errors=True)
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
            timings[num_classes] = median_seconds(compiled, args, preset.repeats)
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
        # jaxlib 0.11's CPU backend writes object files, not LLVM IR.
        row["verdict"] = f"no PTX written (backend {jax.default_backend()})" + (
            f"; LLVM IR: {verdict}" if llvm_files else "; no LLVM IR written either"
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
        square_s = median_seconds(dot, (square, square), preset.repeats)
        search_s = median_seconds(dot, (queries, classes), preset.repeats)
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
        seconds = median_seconds(compiled, args, preset.repeats)
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
            **compiled_peak(compiled),
            "value": value,
            "pixel_grad_norm": grad_norms[0],
            "table_grad_norm": grad_norms[1],
        },
    )


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
        if os.environ.get(OOM_ENV) == current_piece_name():
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
    row.update(compiled_peak(compiled))
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
