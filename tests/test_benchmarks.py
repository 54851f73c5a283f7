"""The benchmark scripts run end to end (on tiny settings)."""

import csv

import pytest

from benchmarks import scaling


@pytest.mark.slow
def test_gpu_scaling_preset_runs_on_cpu_with_a_tiny_override(tmp_path):
    rows = scaling.main(
        [
            "--preset",
            "gpu",
            "--classes",
            "19",
            "--backbone",
            "tiny",
            "--size",
            "64",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--output_dir",
            str(tmp_path),
        ]
    )
    cells = {(r["head"], r["dtype"]) for r in rows}
    assert cells == {(h, d) for h in ("softmax", "ess") for d in ("float32", "bfloat16")}
    assert all(r["fits"] and r["step_seconds"] > 0 and r["compiled_peak_mb"] > 0 for r in rows)
    with open(tmp_path / "scaling_gpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| 19 | ess | bfloat16 |" in (tmp_path / "scaling_gpu.md").read_text()
    assert (tmp_path / "scaling_gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
