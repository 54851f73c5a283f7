"""The Colab notebooks in ``colab/``: stored clean, linked from the README, and run end to end.

The executing tests run each notebook top to bottom in a ``python3`` kernel of this
interpreter with nbclient, after injecting a cell of tiny parameters right after the
``parameters``-tagged cell (as papermill does). The install cell skips itself because
``jaxscaleseg`` is importable; any cell error fails the test. The kernels share the run's
persistent JAX compilation cache and compile with XLA's cheapest CPU optimisation level
(``tests/conftest.py``), which keeps the compile-bound runs short.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import fixtures_archives as fx
import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("01_quickstart.ipynb", "02_memory_scaling.ipynb", "03_train_ade20k.ipynb")
COLAB_URL = "https://colab.research.google.com/github/{}/blob/main/colab/{}"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({})"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLAB / name, as_version=4)


def _parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def _colab_link(text: str, name: str) -> str:
    """The 'Open in Colab' target of notebook ``name`` in ``text``."""
    pattern = re.escape(BADGE.format("XXX")).replace("XXX", r"([^)\s]+)")
    links = [u for u in re.findall(pattern, text) if u.endswith(f"/colab/{name}")]
    assert links, f"no Open in Colab badge for {name}"
    return links[0]


# --------------------------------------------------------------------------- stored form


def test_the_notebooks_are_the_three_expected():
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean_with_one_parameters_cell_first(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has outputs"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"
    index = _parameters_index(nb)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert index == first_code <= 2, f"{name}: the parameters cell must be the first code cell"
    assert nb.metadata.kernelspec.name == "python3"
    # The title cell carries the notebook's own badge.
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    own = _colab_link(nb.cells[0].source, name)
    assert own == COLAB_URL.format("jaxscaleseg/jaxscaleseg", name)


def test_readme_links_each_notebook_with_a_colab_badge():
    readme = (REPO / "README.md").read_text()
    for name in NOTEBOOKS:
        assert _colab_link(readme, name) == _colab_link(_read(name).cells[0].source, name)


# --------------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def kernel_env() -> dict[str, str]:
    """The kernels' environment: CPU; the run's compilation cache and quick compiles come with
    ``os.environ`` (``tests/conftest.py``)."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


def execute(
    name: str, cwd: Path, env: dict[str, str], *, until: str = "", **parameters
) -> nbformat.NotebookNode:
    """Runs notebook ``name`` with ``parameters`` injected; raises on any cell error.

    ``until``: stop after the first code cell whose source contains this text (a runtime that
    goes away there); empty: run every cell.
    """
    nb = _read(name)
    if until:
        last = next(
            i for i, c in enumerate(nb.cells) if c.cell_type == "code" and until in c.source
        )
        del nb.cells[last + 1 :]
    lines = ["# Parameters injected by tests/test_notebooks.py"]
    lines += [f"{key} = {value!r}" for key, value in parameters.items()]
    injected = nbformat.v4.new_code_cell("\n".join(lines))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, injected)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=env)
    return nb


def stream_text(nb: nbformat.NotebookNode) -> str:
    """Everything the executed notebook printed (stdout and stderr)."""
    return "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )


def displayed_pngs(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def assert_png(path: Path, min_side: int = 32) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert min(image.size) >= min_side, (path, image.size)
        darkest, brightest = image.convert("L").getextrema()
        assert darkest < brightest, f"{path} is blank"


@pytest.mark.slow
def test_quickstart_runs_and_draws_curves_and_predictions(tmp_path, kernel_env):
    workdir, figures = tmp_path / "work", tmp_path / "figures"
    nb = execute(
        "01_quickstart.ipynb",
        tmp_path,
        kernel_env,
        WORKDIR=str(workdir),
        OUTPUT_DIR=str(figures),
        NUM_CLASSES=1284,
        IMAGE_SIZE=32,
        TRAIN_EXAMPLES=8,
        EVAL_EXAMPLES=2,
        TINY_WIDTH=8,
        BATCH_SIZE=2,
        NUM_TRAIN_STEPS=3,
        LOG_EVERY_STEPS=1,
        EVAL_EVERY_STEPS=0,
        CHECKPOINT_EVERY_STEPS=100,
        NUM_PREDICTIONS=2,
        PRINT_CLASSES=4,
    )
    text = stream_text(nb)
    assert "install skipped" in text
    assert "backend 'cpu'" in text and "No accelerator" in text
    assert_png(figures / "training_curves.png", min_side=200)
    assert_png(figures / "predictions.png", min_side=200)
    assert displayed_pngs(nb) >= 2
    assert "mIoU" in text and "rank" in text  # the validation table
    assert json.loads((workdir / "eval_validation_best.json").read_text())["images"] == 2


@pytest.mark.slow
def test_memory_scaling_runs_and_plots(tmp_path, kernel_env):
    out = tmp_path / "scaling"
    nb = execute(
        "02_memory_scaling.ipynb",
        tmp_path,
        kernel_env,
        PRESET="auto",
        CLASSES=[19],
        BACKBONE="tiny",
        SIZE=32,
        BATCH=1,
        REPEATS=1,
        OUTPUT_DIR=str(out),
        GPU_CHECK=True,  # forced on this CPU: its tiny preset, one piece
        GPU_CHECK_PRESET="tiny",
        GPU_CHECK_ONLY=["versions"],
        GPU_CHECK_DIR=str(tmp_path / "gpu_check"),
    )
    rows = (out / "scaling_cpu.csv").read_text().splitlines()
    assert len(rows) == 3  # header, softmax, ess
    assert_png(out / "scaling_cpu.png", min_side=200)
    assert displayed_pngs(nb) >= 1
    assert "C =      19: softmax" in stream_text(nb)
    summary = (tmp_path / "gpu_check" / "summary.md").read_text()
    assert "backend `cpu`" in summary and "| versions | ok |" in summary
    shown = [o for o in nb.cells[-1].outputs if "text/markdown" in o.get("data", {})]
    assert shown and shown[0]["data"]["text/markdown"] == summary


@pytest.mark.slow
def test_ade20k_prepares_trains_resumes_evaluates_and_predicts(tmp_path, kernel_env):
    archives = tmp_path / "archives"
    archives.mkdir()
    fx.make_ade20k(archives)
    parameters = {
        "ARCHIVE": str(archives / "ADEChallengeData2016.zip"),
        "DATA_DIR": str(tmp_path / "tfds"),
        "WORKDIR": str(tmp_path / "work"),
        "CONFIG_VARIANT": "smoke",
        "NUM_TRAIN_STEPS": 2,
        "CHECKPOINT_EVERY_STEPS": 100,
        "OUTPUT_DIR": str(tmp_path / "predictions"),
    }
    # The first session ends after training (the runtime goes away) ...
    nb = execute(
        "03_train_ade20k.ipynb", tmp_path, kernel_env, until="train_and_evaluate(", **parameters
    )
    first = stream_text(nb)
    assert "prepared seg_ade20k" in first and "train: 2 images" in first
    assert "holds no checkpoint yet" in first and "trained to step 2" in first
    # ... and a restarted runtime runs everything again: a fresh kernel, the same workdir and
    # data directory, a longer run.
    parameters["NUM_TRAIN_STEPS"] = 3
    nb = execute("03_train_ade20k.ipynb", tmp_path, kernel_env, **parameters)
    second = stream_text(nb)
    assert "already prepared" in second
    assert "resuming from step 2" in second and "trained to step 3" in second
    result = json.loads((tmp_path / "work" / "eval_validation_best_slide.json").read_text())
    assert result["images"] == 1 and result["mIoU"] is not None
    for kind in ("labels", "color", "overlay", "legend"):
        assert (tmp_path / "predictions" / f"validation_0_{kind}.png").is_file()
    assert_png(tmp_path / "predictions" / "validation_0_overlay.png")
    assert displayed_pngs(nb) >= 2
