"""benchmarks.gpu_check: the tiny preset on CPU writes every row, and a crash loses one row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
CRASHED = "loss C=40 sorted"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``--preset tiny`` run in which the piece ``CRASHED`` aborts."""
    output_dir = tmp_path_factory.mktemp("gpu_check")
    scratch_dir = tmp_path_factory.mktemp("gpu_check_scratch")
    env = dict(os.environ, **{gpu_check.CRASH_ENV: CRASHED})
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
    return output_dir, gpu_check.read_rows(output_dir)


def test_tiny_run_writes_every_row(tiny_run):
    output_dir, rows = tiny_run
    kinds = {row["kind"] for row in rows}
    assert {"versions", "atomics", "matmul", "loss", "step", "profile", "status"} <= kinds
    (versions,) = [r for r in rows if r["kind"] == "versions"]
    assert versions["backend"] == "cpu" and "jax" in versions["packages"]
    (atomics,) = [r for r in rows if r["kind"] == "atomics"]
    assert atomics["verdict"].startswith("no PTX") and atomics["hlo_has_scatter"]
    steps = {(r["C"], r["head"]): r for r in rows if r["kind"] == "step"}
    assert set(steps) == {(40, "ess"), (40, "softmax")}
    assert all(r["fits"] and r["step_seconds"] > 0 for r in steps.values())
    assert steps[40, "ess"]["plan"]["table_gradient"] == "scatter"  # CPU's auto plan
    (profile,) = [r for r in rows if r["kind"] == "profile"]
    assert 1 <= len(profile["top_ops"]) <= 10 and profile["ops_source"].startswith("host")
    assert all(0 < op["share"] for op in profile["top_ops"])
    summary = (output_dir / gpu_check.SUMMARY).read_text()
    for heading in ("## ESS loss", "## Train step", "## Profile", "## Pieces"):
        assert heading in summary
    assert "ESS / softmax step time" in summary and "floor" in summary


def test_a_crashing_piece_loses_only_its_row(tiny_run):
    output_dir, rows = tiny_run
    losses = {r["table_gradient"]: r for r in rows if r["kind"] == "loss"}
    assert set(losses) == {"scatter", "matmul", "segment"}  # "sorted" crashed
    # The surviving methods agree (float32 sums in another order: relative 1e-5).
    for method in ("matmul", "segment"):
        assert losses[method]["value"] == pytest.approx(losses["scatter"]["value"], rel=1e-5)
        assert losses[method]["table_grad_norm"] == pytest.approx(
            losses["scatter"]["table_grad_norm"], rel=1e-5
        )
    status = {r["piece"]: r["status"] for r in rows if r["kind"] == "status"}
    assert status[CRASHED].startswith("crashed")
    assert all(s == "ok" for piece, s in status.items() if piece != CRASHED), status
    assert f"| {CRASHED} | crashed" in (output_dir / gpu_check.SUMMARY).read_text()
    # The output folder keeps only what is worth copying back (trace and dump are in scratch).
    assert {p.name for p in output_dir.iterdir()} <= {
        gpu_check.ROWS,
        gpu_check.LOG,
        gpu_check.SUMMARY,
        gpu_check.PTX_LINES,
    }
    # Every line of rows.jsonl is one JSON object.
    for line in (output_dir / gpu_check.ROWS).read_text().splitlines():
        json.loads(line)


def test_atomics_verdict_from_ptx_text():
    native = "atom.global.add.f32 %f1, [%rd1], %f2;\nred.global.add.f32 [%rd2], %f3;"
    cas = "atom.global.cas.b32 %r1, [%rd1], %r2, %r3;"
    assert gpu_check._classify_atomics(native)[0] == "native f32 atomic add"
    vector = "red.global.v4.f32.add [%rd1], {%f1, %f2, %f3, %f4};"
    assert gpu_check._classify_atomics(vector)[0] == "native f32 atomic add"
    assert gpu_check._classify_atomics(cas)[0] == "compare-and-swap loop"
    assert gpu_check._classify_atomics("add.f32 %f1, %f2, %f3;")[0] == "no atomics found"


def test_full_preset_plan_puts_the_acceptance_first(tmp_path):
    pieces = gpu_check.plan_pieces(gpu_check.PRESETS["full"], tmp_path, input_workers=8)
    names = [p.name for p in pieces]
    assert names[:2] == ["versions", "atomics"]
    assert names[2:6] == [
        "step mobilenet_v2 C=1284 ess",
        "step mobilenet_v2 C=1284 softmax",
        "step resnet101 C=1284 ess + profile",
        "step resnet101 C=1284 softmax",
    ]
    assert sum(n.startswith("loss") for n in names) == 12
    assert sum(n.startswith("step") for n in names) == 16
    assert len(set(names)) == len(names)


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
        {"kind": "matmul", "square_size": 8192, "square_tflops": 50.0},
        {"kind": "status", "piece": "step resnet101 C=100000 ess", "status": "ok", "seconds": 1.0},
    ]
    rows[4].update(search_shape=[131072, 13, 8192], search_tflops=5.0)
    for row in rows:
        gpu_check.append_row(tmp_path, row)
    summary = gpu_check.summarize(tmp_path)
    assert "| resnet101 | 100,000 | softmax | 900,000.0 MB | does not fit | — |" in summary
    assert "C = 1,284: ESS / softmax step time = 1.17" in summary
    assert "ESS compiled peak at C = 100,000 vs C = 1,284: +2.5 %" in summary
    # 2·N·C·(D+1) with N = 8·512², C = 100 000, D = 12, at 50 TFLOP/s.
    flops = 2 * 8 * 512**2 * 100_000 * 13
    assert f"{flops:.3g} flops takes {flops / 50e12:.4f} s" in summary
