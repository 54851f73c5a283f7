"""The benchmark scripts run end to end (on tiny settings)."""

import csv
import math

import numpy as np
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
def test_scaling_times_one_head_with_loss_overrides(tmp_path):
    common = ["--preset", "cpu", "--classes", "19", "--backbone", "tiny", "--size", "64"]
    common += ["--repeats", "1", "--no_plot", "--output_dir", str(tmp_path), "--heads", "ess"]
    rows = scaling.main(
        [*common, "--loss", "search=union", "--loss", "search_candidates=16"]
        + ["--loss", "separation_refresh_every=3"]
    )
    assert [(r["C"], r["head"]) for r in rows] == [(19, "ess")]
    assert rows[0]["first_step_seconds"] > 0 and rows[0]["step_seconds"] > 0
    config = scaling.make_config(
        scaling.dataclasses.replace(
            scaling.PRESETS["cpu"], loss_overrides=(("separation_refresh_every", "3"),)
        ),
        19,
        "ess",
        "float32",
    )
    assert config.loss.separation_refresh_every == 3
    table = (tmp_path / "scaling_cpu.md").read_text()
    assert "loss.search = union, loss.search_candidates = 16, loss.separation" in table
    # Compiled only: the same peak (the same program), no step run.
    peak_only = scaling.main(
        [*common, "--compile_only", "--loss", "search=union", "--loss", "search_candidates=16"]
        + ["--loss", "separation_refresh_every=3"]
    )
    assert peak_only[0]["compiled_peak_mb"] == rows[0]["compiled_peak_mb"]
    assert "step_seconds" not in peak_only[0]
    assert "| not timed |" in (tmp_path / "scaling_cpu.md").read_text()
    # The certified search on the synthetic set's batch and the initial variables: its
    # certified fraction is reported, below 1 (the random inputs' nearly constant embeddings
    # certify every pixel, which is why --inputs exists).
    certified = ["--loss", "search=certified", "--loss", "normalize_pixels=True"]
    certified += ["--loss", "search_candidates=16", "--classes", "200"]
    for inputs, below_one in (("synthetic", True), ("random", False)):
        (row,) = scaling.main([*common, *certified, "--inputs", inputs])
        assert 0.0 < row["search_certified"] <= 1.0
        assert (row["search_certified"] < 1.0) == below_one, (inputs, row["search_certified"])
    assert f"| {row['search_certified']:.3f} |" in (tmp_path / "scaling_cpu.md").read_text()
    with pytest.raises(SystemExit, match="no such loss key"):
        scaling.main([*common, "--loss", "serch=union"])
    with pytest.raises(SystemExit, match="expected a int"):
        scaling.main([*common, "--loss", "separation_refresh_every=often"])


@pytest.mark.slow
def test_quality_benchmark_trains_both_heads_with_the_same_budget(tmp_path):
    from benchmarks import quality

    args = ["--classes", "20", "--sets", "long_tail", "--seeds", "0", "--steps", "2",
            "--batch", "2", "--image_size", "32", "--train_examples", "8", "--eval_examples", "4",
            "--workdir", str(tmp_path / "runs"), "--output_dir", str(tmp_path)]  # fmt: skip
    rows = quality.main(args)
    assert {(r["C"], r["set"], r["head"]) for r in rows} == {
        (20, "long_tail", "ess"),
        (20, "long_tail", "softmax"),
    }
    for r in rows:
        assert r["steps"] == 2 and 0.0 <= r["mIoU"] <= 1.0
        assert r["step_peak_mb"] > 0 and r["seconds_this_call"] > 0
        # 8 training images cannot make a class common: every class present is rare.
        assert r["classes_rare"] > 0 and r["classes_common"] == r["classes_frequent"] == 0
        assert 0.0 <= r["mIoU_rare"] <= 1.0 and math.isnan(r["mIoU_frequent"])
    for head in ("ess", "softmax"):
        config = quality.make_config(quality.PRESETS["cpu"], 20, head, 0, "long_tail")
        assert config.loss.name == head and config.dataset.num_classes == 20
        assert config.dataset.synthetic.zipf_exponent == 1.0
        assert config.dataset.synthetic.family_size == 4
    assert quality.examples(quality.PRESETS["gpu"], 10_000) == (31_153, 3_895)
    with open(tmp_path / "quality_cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    table = (tmp_path / "quality_cpu.md").read_text()
    assert "| 20 | long_tail | ess | 1 |" in table and "Total wall time" in table
    # A rerun finds both runs finished and only re-evaluates them (here each in its own
    # process, two at once, as on a GPU; a resume needs the input workers it was saved with).
    again = quality.main([*args, "--jobs", "2", "--worker_count", "0"])
    by_head = {r["head"]: r["mIoU"] for r in rows}
    assert {r["head"]: r["mIoU"] for r in again} == pytest.approx(by_head)
    log = (tmp_path / "quality_cpu.log").read_text()
    assert "C20_long_tail_ess_seed0: ok" in log and "C20_long_tail_softmax_seed0: ok" in log
    # A time limit stops the running cell and starts no other; the table lists both.
    cut = quality.main(
        [*args[:-4], "--workdir", str(tmp_path / "cut"), "--output_dir", str(tmp_path / "cut"),
         "--jobs", "1", "--time_limit_s", "0.5"]
    )  # fmt: skip
    assert cut == []
    table = (tmp_path / "cut" / "quality_cpu.md").read_text()
    assert "- C20_long_tail_ess_seed0: stopped at the time limit at step 0" in table
    assert "- C20_long_tail_softmax_seed0: not started (time limit)" in table


def test_quality_cells_run_seed_by_seed_and_the_gpu_preset_starts_at_1284():
    from benchmarks import quality

    cells = quality.cell_order(quality.PRESETS["gpu"], quality.HEADS)
    assert len(cells) == 3 * 2 * 3 * 2
    assert [c.name for c in cells[:4]] == [
        "C1284_uniform_ess_seed0",
        "C1284_uniform_softmax_seed0",
        "C1284_long_tail_ess_seed0",
        "C1284_long_tail_softmax_seed0",
    ]
    assert {c.seed for c in cells[:12]} == {0} and cells[12].seed == 1


def test_approx_search_benchmark_reports_recall_and_times():
    from benchmarks import approx_search

    rows = approx_search.main(
        ["--preset", "small", "--classes", "64", "--probes", "2", "8", "--candidates", "8"]
        + ["--size", "32", "32", "--methods", "index", "union", "--repeats", "1"]
    )
    assert {(r["kind"], r["method"], r["setting"]) for r in rows} == {
        (kind, method, setting)
        for kind in approx_search.KINDS
        for method, setting in (("index", 2), ("index", 8), ("union", 8))
    }
    index_rows = [r for r in rows if r["method"] == "index"]
    # 64 classes make 8 cells: probing all 8 is the exact search.
    assert all(r["recall"] == 1.0 for r in index_rows if r["setting"] == 8)
    assert all(0.0 < r["recall"] < 1.0 for r in index_rows if r["setting"] == 2)
    union_rows = [r for r in rows if r["method"] == "union"]
    assert all(0.0 < r["recall"] <= 1.0 and 0.0 <= r["certified"] <= 1.0 for r in union_rows)
    assert all(r["exact_s"] > 0 and r["approx_s"] > 0 for r in rows)


def test_smoothness_tells_alike_neighbours_from_opposed_ones():
    """A constant stride-4 field has unit blends and cosine 1; a checkerboard of opposite
    vectors has cosine -1 and short blends."""
    from benchmarks import approx_search

    rng = np.random.default_rng(5)
    direction = approx_search._unit(rng.normal(size=(1, 1, 1, 6)))
    constant = np.broadcast_to(direction, (1, 4, 4, 6)).astype(np.float32)
    signs = np.where(np.add.outer(np.arange(4), np.arange(4)) % 2 == 0, 1.0, -1.0)
    board = (constant * signs[None, :, :, None]).astype(np.float32)
    for coarse, cosine, short in ((constant, 1.0, False), (board, -1.0, True)):
        queries = approx_search.Queries(
            approx_search._upsample(coarse, 4), coarse, None, coarse[0, 0]
        )
        alike = approx_search.smoothness(queries)
        assert alike["neighbour_cosine"] == pytest.approx(cosine, abs=1e-6)
        assert (alike["pixel_norm"] < 0.7) == short and alike["pixel_norm"] <= 1.0 + 1e-6


# What the lent GPU machine's image lacks and no wheel brings (BENCHMARKS §2, "GPU check").
NOT_ON_THE_DEVICE = ("tensorflow_datasets", "tensorflow")
DEVICE_IMPORTS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
from benchmarks import gpu_check, quality, scaling  # noqa: F401
from jaxscaleseg import evaluation, training  # noqa: F401
from jaxscaleseg.data import sources
config = quality.make_config(quality.PRESETS["gpu"], 20, "ess", 0, "long_tail")
train, evaluation_source = sources.make_sources(config)
batch = next(iter(sources.train_iterator(config, train, 2, seed=0, worker_count=1)))
assert batch["image"].shape == (2, 64, 64, 3), batch["image"].shape
print("device imports ok")
"""


def test_gpu_benchmarks_run_without_tfds():
    """The GPU check and the quality benchmark's synthetic path need no TFDS or TensorFlow."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", DEVICE_IMPORTS.format(blocked=NOT_ON_THE_DEVICE)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "device imports ok" in result.stdout, result.stderr


def test_approx_inference_benchmark_agrees_with_every_class_as_candidate():
    from benchmarks import approx_inference

    rows = approx_inference.main(
        ["--size", "32", "32", "--classes", "40", "--candidates", "40", "4", "--dim", "6"]
        + ["--exact_rows", "16", "--methods", "approximate", "certified"]
    )
    assert [(r["method"], r["candidates"]) for r in rows] == [
        ("approximate", 40),
        ("approximate", 4),
        ("certified", 40),
        ("certified", 4),
    ]
    # Every class a candidate: the exact assignment; 4 of 40 on random features: less; the
    # certified one: exact either way, having certified fewer pixels with fewer candidates.
    assert rows[0]["agreement"] == 1.0 and 0.0 < rows[1]["agreement"] < 1.0
    assert rows[2]["agreement"] == 1.0 and rows[3]["agreement"] == 1.0
    assert rows[3]["certified"] < rows[2]["certified"]
    assert all(r["exact_scaled"] and r["exact_s"] > 0 and r["approx_s"] > 0 for r in rows)


def test_search_gradient_benchmark_compares_gradients_with_the_exact_search(tmp_path):
    from benchmarks import search_gradient
    from jaxscaleseg import config_schema, training

    config = config_schema.smoke(config_schema.base_config())
    config.dataset.name = "synthetic"
    config.dataset.num_classes = 30
    config.loss.num_neighbors = 3
    config.loss.search_candidates = 8  # the certified search's K'
    training.train_and_evaluate(config, tmp_path / "run")
    variants = ["exact:segment", "union:4", "union:30", "certified"]
    rows = search_gradient.measure(config, tmp_path / "run", variants, batches=2)
    assert [(r["batch"], r["variant"]) for r in rows] == [
        (b, v) for b in range(2) for v in ["exact", *variants]
    ]
    by = {(r["batch"], r["variant"]): r for r in rows}
    for b in range(2):
        exact = by[b, "exact"]
        assert exact["step"] == 2 and exact["all"] == exact["table"] == exact["network"] == 0.0
        # Another table-gradient method: the same sums, rounded otherwise.
        assert by[b, "exact:segment"]["all"] < 1e-5
        # Every class in each source's list: the union's negatives are the exact ones.
        assert by[b, "union:30"]["all"] < 1e-5
        assert by[b, "union:30"]["loss"] == pytest.approx(exact["loss"], rel=1e-6)
        # Four candidates per source at 30 classes miss some negatives.
        assert by[b, "union:4"]["all"] > 1e-4 and by[b, "union:4"]["table"] > 1e-4
        # The certified search's negatives are the exact ones, wherever they come from.
        assert by[b, "certified"]["all"] < 1e-5 and 0.0 <= by[b, "certified"]["certified"] <= 1.0
        assert math.isnan(exact["certified"]) and all(r["seconds"] > 0 for r in rows)
    assert "| union:4 | 2 |" in search_gradient.table(rows)
    assert (tmp_path / "run" / "checkpoints").is_dir()  # the run itself is left untouched
    with pytest.raises(ValueError, match="union:x"):
        search_gradient.variant_spec(search_gradient.steps.LossSpec(), "union:x")
