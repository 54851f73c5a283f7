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
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check_pieces import PIECES
from benchmarks.gpu_check_setup import (
    CRASH_ENV,
    DUMP_DIR,
    LOG,
    PIECE_ENV,
    PRESETS,
    RUNNING,
    SUMMARY,
    Preset,
    append_row,
    is_out_of_memory,
)
from benchmarks.gpu_check_summary import summarize

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
            # A fresh compile (no cache), dumped with its PTX and (GPUs) its LLVM IR.
            {
                "XLA_FLAGS": f"--xla_dump_to={scratch_dir / DUMP_DIR} "
                "--xla_dump_hlo_module_re=.*scatter_add_probe.* --xla_gpu_dump_llvmir=true",
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
