"""benchmarks.gpu_check: the tiny preset on CPU writes every row, and a crash loses one row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_check_pieces, gpu_check_setup, gpu_check_summary

ROOT = Path(__file__).resolve().parents[1]
CRASHED = "loss C=40 sorted"
OUT_OF_MEMORY = "step tiny C=40 ess min_rounds"


def _tiny_run(tmp_path):
    """One ``--preset tiny`` run in which the piece ``CRASHED`` aborts: (output dir, rows)."""
    output_dir, scratch_dir = tmp_path / "gpu_check", tmp_path / "gpu_check_scratch"
    output_dir.mkdir()
    scratch_dir.mkdir()
    # An earlier run's dump, as a rerun on the same machine finds it: it must not count.
    stale = scratch_dir / gpu_check_setup.DUMP_DIR / "module_0000.stale.ir-with-opt.ll"
    stale.parent.mkdir()
    stale.write_text("%old = atomicrmw fadd ptr %p, float %v monotonic\n")
    env = dict(
        os.environ, **{gpu_check_setup.CRASH_ENV: CRASHED, gpu_check_setup.OOM_ENV: OUT_OF_MEMORY}
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--output_dir",
            str(output_dir),
            "--preset",
            "tiny",
            "--scratch_dir",
            str(scratch_dir),
            "--cache_dir",
            "",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, gpu_check_setup.read_rows(output_dir)


@pytest.mark.slow
def test_tiny_run_writes_every_row_and_a_crash_loses_only_its_row(tmp_path):
    """One run serves both checks (it is the suite's costliest setup: each piece is a process)."""
    output_dir, rows = _tiny_run(tmp_path)
    _check_every_row(output_dir, rows)
    _check_the_crash_lost_only_its_row(output_dir, rows)


def _check_every_row(output_dir, rows):
    kinds = {row["kind"] for row in rows}
    assert {"versions", "atomics", "matmul", "loss", "step", "profile", "status"} <= kinds
    (versions,) = [r for r in rows if r["kind"] == "versions"]
    assert versions["backend"] == "cpu" and "jax" in versions["packages"]
    (atomics,) = [r for r in rows if r["kind"] == "atomics"]
    assert atomics["verdict"].startswith("no PTX") and atomics["hlo_has_scatter"]
    # The CPU dump's LLVM IR is read instead (its scatter adds with no atomics at all) where
    # XLA writes it (jaxlib 0.10); jaxlib 0.11's CPU backend writes object files instead, and
    # the verdict must say so. The dump is this run's: the piece clears an earlier one.
    assert atomics["dump_files"]["count"] > 0
    assert not any("stale" in name for name in atomics["dump_files"]["names"])
    wrote_ir = any(name.endswith(".ll") for name in atomics["dump_files"]["names"])
    ending = "LLVM IR: no atomics found" if wrote_ir else "no LLVM IR written either"
    assert atomics["verdict"].endswith(ending), (atomics["verdict"], atomics["dump_files"])
    steps = {
        (r["C"], r["head"], gpu_check_summary._variant(r)): r for r in rows if r["kind"] == "step"
    }
    assert set(steps) == {
        (40, "ess", ""),
        (40, "softmax", ""),
        (40, "ess", "min_rounds"),
        (40, "ess", "tile_minima"),
        (40, "ess", "certified"),
    }
    # The ESS step with the selection made to fail compiling "does not fit", and says why.
    failed = steps.pop((40, "ess", "min_rounds"))
    assert not failed["fits"] and failed["note"] == "out of memory while compiling"
    assert all(r["fits"] and r["step_seconds"] > 0 for r in steps.values())
    assert steps[40, "ess", ""]["plan"]["table_gradient"] == "scatter"  # CPU's auto plan
    assert steps[40, "ess", ""]["plan"]["search_method"] == "pyramid"
    assert steps[40, "ess", "certified"]["search"] == "certified"
    assert steps[40, "ess", "certified"]["normalize_pixels"] is True
    (profile,) = [r for r in rows if r["kind"] == "profile"]
    assert 1 <= len(profile["top_ops"]) <= 10 and profile["ops_source"].startswith("host")
    assert all(0 < op["share"] for op in profile["top_ops"])
    summary = (output_dir / gpu_check_setup.SUMMARY).read_text()
    for heading in ("## ESS loss", "## Train step", "## Profile", "## Pieces"):
        assert heading in summary
    assert "ESS / softmax step time" in summary and "floor" in summary
    assert "| tiny | 40 | ess | min_rounds | — | out of memory while compiling | — |" in summary
    assert "ESS with certified:" in summary and "(issue 15: at most 2)" in summary
    assert "C = 40, ESS with tile_minima:" in summary


def _check_the_crash_lost_only_its_row(output_dir, rows):
    losses = {(r["table_gradient"], r["selection"]): r for r in rows if r["kind"] == "loss"}
    # On CPU "auto" is scatter and the pyramid; ("sorted", "pyramid") crashed.
    assert set(losses) == {
        ("scatter", "pyramid"),
        ("matmul", "pyramid"),
        ("segment", "pyramid"),
        ("scatter", "min_rounds"),
        ("scatter", "tile_minima"),
    }
    # The surviving methods agree (float32 sums in another order: relative 1e-5; the
    # selections find the same ids, so their sums are the same).
    reference = losses["scatter", "pyramid"]
    for row in losses.values():
        assert row["value"] == pytest.approx(reference["value"], rel=1e-5)
        assert row["table_grad_norm"] == pytest.approx(reference["table_grad_norm"], rel=1e-5)
    status = {r["piece"]: r["status"] for r in rows if r["kind"] == "status"}
    assert status[CRASHED].startswith("crashed")
    # The compile that ran out of memory wrote its row and ended normally.
    assert all(s == "ok" for piece, s in status.items() if piece != CRASHED), status
    assert f"| {CRASHED} | crashed" in (output_dir / gpu_check_setup.SUMMARY).read_text()
    # The output folder keeps only what is worth copying back (trace and dump are in scratch).
    assert {p.name for p in output_dir.iterdir()} <= {
        gpu_check_setup.ROWS,
        gpu_check_setup.LOG,
        gpu_check_setup.SUMMARY,
        gpu_check_setup.PTX_LINES,
    }
    # Every line of rows.jsonl is one JSON object.
    for line in (output_dir / gpu_check_setup.ROWS).read_text().splitlines():
        json.loads(line)


def test_atomics_verdict_from_ptx_text():
    native = "atom.global.add.f32 %f1, [%rd1], %f2;\nred.global.add.f32 [%rd2], %f3;"
    cas = "atom.global.cas.b32 %r1, [%rd1], %r2, %r3;"
    assert gpu_check_pieces._classify_atomics(native)[0] == "native f32 atomic add"
    vector = "red.global.v4.f32.add [%rd1], {%f1, %f2, %f3, %f4};"
    assert gpu_check_pieces._classify_atomics(vector)[0] == "native f32 atomic add"
    assert gpu_check_pieces._classify_atomics(cas)[0] == "compare-and-swap loop"
    assert gpu_check_pieces._classify_atomics("add.f32 %f1, %f2, %f3;")[0] == "no atomics found"
    # Without PTX, the LLVM IR of the dump.
    ir_native = "%3 = atomicrmw fadd ptr addrspace(1) %2, float %1 seq_cst, align 4"
    ir_cas = "%5 = cmpxchg ptr addrspace(1) %4, i32 %old, i32 %new seq_cst seq_cst, align 4"
    assert gpu_check_pieces._classify_llvm_atomics(ir_native)[0] == "native f32 atomic add"
    assert gpu_check_pieces._classify_llvm_atomics(ir_cas)[0] == "compare-and-swap loop"
    assert (
        gpu_check_pieces._classify_llvm_atomics("%1 = fadd float %a, %b")[0] == "no atomics found"
    )


def test_full_preset_plan_puts_the_acceptance_first(tmp_path):
    pieces = gpu_check.plan_pieces(gpu_check_setup.PRESETS["full"], tmp_path, input_workers=8)
    names = [p.name for p in pieces]
    assert names[:2] == ["versions", "atomics"]
    assert names[2:11] == [
        "step mobilenet_v2 C=1284 ess",
        "step mobilenet_v2 C=1284 softmax",
        "step resnet101 C=1284 ess + profile",
        "step resnet101 C=1284 softmax",
        "step mobilenet_v2 C=1284 ess min_rounds",
        "step resnet101 C=1284 ess min_rounds",
        "step mobilenet_v2 C=1284 ess tile_minima",
        "step resnet101 C=1284 ess tile_minima",
        "step resnet101 C=1284 ess union",
    ]
    assert names[11:15] == ["loss C=19 auto", *(f"loss C=19 auto {s}" for s in SELECTIONS)]
    assert sum(n.startswith("loss") for n in names) == 12
    # 16 cells of the first run, 4 with other selections, the union at 1 284 and 100 000.
    assert sum(n.startswith("step") for n in names) == 22
    assert "step resnet101 C=100000 ess certified" in names
    # The class counts outside the acceptance come last (the first to be cut by the budget).
    assert names.index("input") < names.index("step mobilenet_v2 C=150 ess")
    assert len(set(names)) == len(names)


SELECTIONS = ("min_rounds", "tile_minima", "tiled_top_k")


def test_out_of_memory_crashes_are_does_not_fit():
    # The H200's error when XLA's autotuner could not allocate a softmax step's buffers.
    error = (
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Failed to get configs for: 10 out of "
        "466 instructions. Out of memory while trying to allocate 781.27GiB with allocator"
    )
    compiling = f"{gpu_check_setup.COMPILING}\n{error}"
    assert gpu_check.exit_status("crashed (exit code 1)", compiling) == (
        "does not fit (crashed in compile)"
    )
    running = f"{gpu_check_setup.COMPILING}\n{gpu_check_setup.RUNNING}\n{error}"
    assert gpu_check.exit_status("crashed (exit code 1)", running).startswith(
        "does not fit (out of memory while running"
    )
    other = "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert gpu_check.exit_status("crashed (exit code -6)", other) == "crashed (exit code -6)"
    piece = gpu_check.Piece("step resnet101 C=100000 softmax", "step", {}, 1)
    piece.args.update(backbone="resnet101", num_classes=100_000, head="softmax", trace=False)
    row = gpu_check.crashed_step_row(piece, "does not fit (crashed in compile)")
    assert row["fits"] is False and row["compiled_peak_mb"] is None


def test_softmax_cells_too_big_for_the_device_are_not_compiled():
    # 8 bytes per pixel and class: the H200's 16.0 MB per class at N = 8·512².
    assert gpu_check_setup.softmax_peak_lower_bound(8, 512, 1) == 16 * 2**20
    h200 = 0.95 * 141 * 2**30  # the pieces' memory fraction of the H200
    bound = gpu_check_setup.softmax_peak_lower_bound
    assert bound(8, 512, 1284) < 0.9 * h200  # compiled 24 111 MB: fits
    # ResNet-101 compiled to 162 472 MB at 10 000 classes; 100 000 crashed in the autotuner.
    assert bound(8, 512, 10_000) > 0.9 * h200 and bound(8, 512, 100_000) > 0.9 * h200


def test_summary_of_gpu_like_rows(tmp_path):
    """Rows as an H200 run would write them: a softmax cell that does not fit, the floor."""

    def step(c, head, peak, seconds=None):
        row = {"kind": "step", "backbone": "resnet101", "C": c, "head": head, "batch": 8}
        row.update(size=512, embedding_dim=12, compiled_peak_mb=peak, fits=seconds is not None)
        if seconds is not None:
            row.update(step_seconds=seconds, images_per_second=8 / seconds)
        return row

    rows = [
        step(1284, "ess", 4000.0, 0.07),
        step(1284, "softmax", 24000.0, 0.06),
        step(100_000, "ess", 4100.0, 0.5),
        step(100_000, "softmax", 900_000.0),
        {**step(10_000, "softmax", 160_000.0), "peak_estimated": True},
        {**step(1284, "ess", 4000.0, 0.035), "selection_setting": "min_rounds"},
        {**step(100_000, "ess", 4000.0, 0.06), "search": "union"},
        {"kind": "matmul", "square_size": 8192, "square_tflops": 50.0},
        {"kind": "status", "piece": "step resnet101 C=100000 ess", "status": "ok", "seconds": 1.0},
    ]
    rows[7].update(search_shape=[131072, 13, 8192], search_tflops=5.0)
    for row in rows:
        gpu_check_setup.append_row(tmp_path, row)
    summary = gpu_check_summary.summarize(tmp_path)
    assert "| resnet101 | 100,000 | softmax |  | 900,000.0 MB | does not fit | — |" in summary
    assert "| 10,000 | softmax |  | ≥ 160,000.0 MB (logits, not compiled) | does not fit" in summary
    assert "C = 1,284, ESS with min_rounds: 0.0350 s, 0.50 × the default ESS step" in summary
    assert "0.58 × softmax" in summary
    assert "approximate ESS step at C = 100,000 / exact ESS step at C = 1,284 = 0.86" in summary
    assert "C = 1,284: ESS / softmax step time = 1.17" in summary
    assert "ESS compiled peak at C = 100,000 vs C = 1,284: +2.5 %" in summary
    # 2·N·C·(D+1) with N = 8·512², C = 100 000, D = 12, at 50 TFLOP/s.
    flops = 2 * 8 * 512**2 * 100_000 * 13
    assert f"{flops:.3g} flops takes {flops / 50e12:.4f} s" in summary


def test_next_device_command_is_ready():
    """The prepared device command fits the tool (2 000 characters) and its script parses."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    section = text.split("#### Next device session", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert "\n" not in command and len(command) <= 2000
    assert f"({len(command)} characters)" in section
    assert "bash benchmarks/device_session.sh $OUT" in command
    script = ROOT / "benchmarks" / "device_session.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
