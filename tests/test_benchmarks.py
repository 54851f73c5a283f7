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


@pytest.mark.slow
def test_quality_benchmark_trains_both_heads_with_the_same_budget(tmp_path):
    from benchmarks import quality

    rows = quality.main(
        [
            "--classes",
            "20",
            "--steps",
            "2",
            "--batch",
            "2",
            "--image_size",
            "32",
            "--train_examples",
            "8",
            "--eval_examples",
            "4",
            "--workdir",
            str(tmp_path / "runs"),
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert {(r["C"], r["head"]) for r in rows} == {(20, "ess"), (20, "softmax")}
    assert all(r["steps"] == 2 and 0.0 <= r["mIoU"] <= 1.0 for r in rows)
    for head in ("ess", "softmax"):
        config = quality.make_config(quality.PRESETS["cpu"], 20, head, 0)
        assert config.loss.name == head and config.dataset.num_classes == 20
    with open(tmp_path / "quality_cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    table = (tmp_path / "quality_cpu.md").read_text()
    assert "| 20 | 0 |" in table
    # A rerun finds both runs finished and only re-evaluates them.
    again = quality.main(
        ["--classes", "20", "--steps", "2", "--batch", "2", "--image_size", "32",
         "--train_examples", "8", "--eval_examples", "4", "--workdir", str(tmp_path / "runs"),
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    assert [r["mIoU"] for r in again] == pytest.approx([r["mIoU"] for r in rows])
