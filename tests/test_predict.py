"""``jaxscaleseg.predict``, pictures (``visualize``), checkpoint loading and the curve plot."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from jaxscaleseg import (
    cli,
    config_schema,
    evaluation,
    inference,
    initial_state,
    predict,
    prediction,
    visualize,
)
from jaxscaleseg import workdir as workdir_lib
from jaxscaleseg.data import sources
from jaxscaleseg.errors import CheckpointNotFoundError, ModelMismatchError
from jaxscaleseg.models import build_model

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 30
CONFIG_FILE = """
from jaxscaleseg import config_schema


def get_config():
    c = config_schema.smoke(config_schema.base_config())
    c.dataset.name = "synthetic"
    c.dataset.num_classes = {num_classes}
    c.dataset.synthetic.image_size = (24, 20)
    c.dataset.synthetic.eval_examples = 3
    c.loss.num_neighbors = 5
    return c
"""


def _config():
    c = config_schema.smoke(config_schema.base_config())
    c.dataset.name = "synthetic"
    c.dataset.num_classes = NUM_CLASSES
    c.dataset.synthetic.image_size = (24, 20)
    c.dataset.synthetic.eval_examples = 3
    c.loss.num_neighbors = 5
    return c


def _random_variables(model):
    """Variables of the right shapes without ``model.init`` (whose compile is slow on CPU)."""
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)

    def draw(path, s):
        if "var" in jax.tree_util.keystr(path):
            return (1.0 + np.abs(rng.normal(size=s.shape))).astype(s.dtype)
        return (0.3 * rng.normal(size=s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir in the training module's layout: checkpoints/<step>/state, best/<step>/state,
    model.json, config file (the state tree: step, params, batch_stats, opt_state)."""
    root = tmp_path_factory.mktemp("run")
    config = _config()
    spec = initial_state.model_args(config)
    model = build_model(**spec)
    variables = _random_variables(model)
    state = {
        "step": np.asarray(3, np.int32),  # a 0-d array: older orbax refuses numpy scalars
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt_state": {"momentum": jax.tree.map(np.zeros_like, variables["params"])},
    }
    for name in ("checkpoints", "best"):
        with ocp.CheckpointManager(
            (root / name).absolute(),
            item_names=("state",),
            options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        ) as manager:
            manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    (root / "model.json").write_text(json.dumps(spec))
    (root / "config.py").write_text(CONFIG_FILE.format(num_classes=NUM_CLASSES))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A real photograph plus RGBA, grey, 16-bit grey, palette and broken files."""
    import matplotlib.cbook  # noqa: PLC0415 (the photograph ships with matplotlib)

    folder = tmp_path_factory.mktemp("images")
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f)
        photo.load()
    photo = photo.resize((photo.width // 8, photo.height // 8))  # 64 x 75: keeps tests fast
    photo.save(folder / "grace_hopper.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (21, 17, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (13, 19), dtype=np.uint8)).save(folder / "grey.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    return folder


def _run(args, capsys):
    status = cli.call(predict.main, ["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.slow
def test_predict_writes_four_pictures_per_image_and_names_the_unreadable_one(
    workdir, inputs, tmp_path, capsys
):
    output = tmp_path / "out"
    args = ["--config", workdir / "config.py", "--workdir", workdir, "--output", output]
    status, out, err = _run([*args, "--legend", inputs], capsys)
    assert status == 1  # broken.jpg
    assert f"cannot read image {inputs / 'broken.jpg'}" in err
    assert len(err.strip().splitlines()) == 1
    for stem in ("grace_hopper", "rgba", "grey"):
        size = Image.open(inputs / f"{stem}.{'jpg' if stem == 'grace_hopper' else 'png'}").size
        for kind in ("labels", "color", "overlay", "legend"):
            with Image.open(output / f"{stem}_{kind}.png") as picture:
                picture.load()
                if kind != "legend":
                    assert picture.size == size, (stem, kind)
        labels = np.asarray(Image.open(output / f"{stem}_labels.png"))
        assert labels.dtype == np.uint8 and labels.max() < NUM_CLASSES
        color = np.asarray(Image.open(output / f"{stem}_color.png"))
        np.testing.assert_array_equal(color, visualize.colorize(labels, _palette()))
    assert "grace_hopper" in out

    # The same image alone: exit 0; a step number selects that checkpoint.
    status, _, err = _run(
        [*args, "--checkpoint", "3", "--flip", inputs / "grace_hopper.jpg"], capsys
    )
    assert status == 0, err


def _palette():
    return sources.class_info(_config())[1]


def test_missing_checkpoint_is_one_line_naming_the_workdir(tmp_path, inputs, capsys):
    config = tmp_path / "config.py"
    config.write_text(CONFIG_FILE.format(num_classes=NUM_CLASSES))
    empty = tmp_path / "empty"
    empty.mkdir()  # a workdir without checkpoints (a missing one: tests/test_recovery.py)
    status, _, err = _run(
        ["--config", config, "--workdir", empty, "--output", tmp_path / "o", inputs], capsys
    )
    assert status == 1
    assert err.count("\n") == 1 and str(empty) in err and "best" in err
    with pytest.raises(CheckpointNotFoundError, match="step 9"):
        workdir_lib.find_checkpoint(empty, 9)


def test_predictor_from_workdir_and_evaluate_run(workdir, capsys):
    config = _config()
    predictor = inference.Predictor.from_workdir(config, workdir, "latest")
    assert predictor.step == 3 and predictor.num_classes == NUM_CLASSES
    assert predictor.class_names[0] == "class_00000"
    result = evaluation.run(config, workdir, checkpoint="latest", print_classes=4)
    assert result["images"] == 3 and result["labelled_pixels"] > 0
    assert (workdir / "eval_validation_latest.json").exists()
    assert (workdir / "eval_validation_latest.csv").exists()
    out = capsys.readouterr().out
    assert "mIoU" in out and "mIoU_rare" in out and "binning the" in out
    # The rare/common/frequent mIoU, with bins counted from the synthetic training split and
    # stored in the workdir; a second evaluation reads them back.
    stored = workdir_lib.read_class_frequency(workdir)
    assert stored["source"] == "training split" and len(stored["bins"]) == NUM_CLASSES
    bins = np.asarray(stored["bins"])
    for name in ("rare", "common", "frequent"):
        ids = [r["class_id"] for r in result["per_class"] if r["bin"] == name]
        assert result[f"classes_{name}"] == len(ids)
        assert set(ids) <= set(np.flatnonzero(bins == name).tolist())
    again = evaluation.run(config, workdir, checkpoint="latest", print_classes=4)
    assert "binning the" not in capsys.readouterr().out
    assert again["mIoU_rare"] == result["mIoU_rare"]
    rows = list(csv.DictReader((workdir / "eval_validation_latest.csv").open()))
    assert {r["bin"] for r in rows} <= {"rare", "common", "frequent"}

    other = _config()
    other.dataset.num_classes = 31
    with pytest.raises(ModelMismatchError, match="num_classes"):
        inference.Predictor.from_workdir(other, workdir)


# ----------------------------------------------------------------------------- bad images
# predict on broken and odd files (issue 18): one row per case, its expected outcome, run
# through ``prediction.predict_files`` with the real model (module fixture) except where a row
# says otherwise. Outcomes: ``("predicted", (H, W))``, the size of the label map written (the
# image's, after EXIF rotation), or ``("skipped", text)``, the one-line message naming the file.


def _jpeg_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def _noise(shape, dtype=np.uint8, high=256):
    return np.random.default_rng(0).integers(0, high, shape, dtype=dtype)


def _save(image: Image.Image, path: Path, **kwargs) -> None:
    image.save(path, **kwargs)


def _rgba_pixels(path: Path) -> None:
    """Opaque, transparent and half-transparent pixels of grey 200 over black."""
    rgba = np.zeros((13, 19, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3], rgba[0, 1, 3], rgba[0, 2, 3] = 255, 0, 128
    Image.fromarray(rgba).save(path)


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_noise((13, 19, 3))).save(path, exif=exif)


def _animated_gif(path: Path) -> None:
    frames = [Image.fromarray(_noise((13, 19)) // (k + 1)).convert("P") for k in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _palette_with_transparency(path: Path) -> None:
    image = Image.fromarray(_noise((13, 19), high=4)).convert("P")
    image.save(path, transparency=0)


BAD_IMAGES = {
    # name: (file name, how to write it, expected outcome, check of the RGB image read)
    "photo": ("photo.jpg", lambda p: p.write_bytes(_jpeg_bytes(_noise((75, 64, 3)))),
              ("predicted", (75, 64)), None),
    "empty": ("empty.jpg", lambda p: p.write_bytes(b""),
              ("skipped", "cannot identify image file"), None),
    "truncated": ("truncated.jpg",
                  lambda p: p.write_bytes(_jpeg_bytes(_noise((64, 64, 3)))[:400]),
                  ("skipped", "truncated"), None),  # Pillow: "Truncated File Read"
    "text-as-jpeg": ("text.jpg", lambda p: p.write_bytes(b"this is not a jpeg"),
                     ("skipped", "cannot identify image file"), None),
    "16-bit": ("deep.png",
               lambda p: _save(Image.fromarray((np.arange(247, dtype=np.uint16) * 250)
                                               .reshape(13, 19)), p),
               ("predicted", (13, 19)), lambda rgb: rgb.max() == 255),  # scaled by its peak
    "32-bit float": ("float.tif",
                     lambda p: _save(Image.fromarray(_noise((13, 19)).astype(np.float32)), p),
                     ("predicted", (13, 19)), None),
    "grey": ("grey.png", lambda p: _save(Image.fromarray(_noise((13, 19))), p),
             ("predicted", (13, 19)), lambda rgb: (rgb[..., 0] == rgb[..., 2]).all()),
    "palette": ("palette.png",
                lambda p: _save(Image.fromarray(_noise((13, 19))).convert("P"), p),
                ("predicted", (13, 19)), None),
    "palette+transparency": ("ptrans.png", _palette_with_transparency,
                             ("predicted", (13, 19)), None),
    "LA": ("la.png", lambda p: _save(Image.fromarray(_noise((13, 19, 2)), "LA"), p),
           ("predicted", (13, 19)), None),
    "RGBA": ("rgba.png", _rgba_pixels, ("predicted", (13, 19)),
             # composited onto black: opaque 200, transparent 0, half 100
             lambda rgb: (rgb[0, 0, 0], rgb[0, 1, 0]) == (200, 0) and 95 <= rgb[0, 2, 0] <= 105),
    "CMYK": ("cmyk.jpg",
             lambda p: _save(Image.fromarray(_noise((13, 19, 3))).convert("CMYK"), p),
             ("predicted", (13, 19)), None),
    "animated GIF": ("animated.gif", _animated_gif, ("predicted", (13, 19)), None),  # frame 0
    "EXIF-rotated": ("rotated.jpg", _exif_rotated, ("predicted", (19, 13)), None),
    "1x1": ("dot.png", lambda p: _save(Image.fromarray(_noise((1, 1, 3))), p),
            ("predicted", (1, 1)), None),
    # Read at full size and given to the model as it is (no limit, no downsizing). The row runs
    # a stand-in model and writes no pictures: their three 8000x8000 PNGs alone took 26 s and
    # 2.9 GB (measured under load), and the real model would need more.
    "8000x8000": ("huge.png", lambda p: _save(Image.new("L", (8000, 8000), 90), p),
                  ("predicted", (8000, 8000)), lambda rgb: (rgb == 90).all()),
}  # fmt: skip


class _StandIn:
    """A model stand-in for the huge row: records the image it is given, predicts class 0."""

    num_classes, class_names, palette = NUM_CLASSES, (), np.zeros((NUM_CLASSES, 3), np.uint8)

    def __init__(self):
        self.seen = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.seen.append(image)
        return np.zeros(image.shape[:2], np.uint8)  # class ids; uint8 keeps the row light


@pytest.fixture(scope="module")
def predictor(workdir):
    """The real model, once for every row (its jit compiles once per image size)."""
    return inference.Predictor.from_workdir(_config(), workdir, "latest")


@pytest.mark.parametrize("case", list(BAD_IMAGES), ids=list(BAD_IMAGES))
def test_predict_on_broken_and_odd_images(case, predictor, tmp_path, monkeypatch):
    name, write, (outcome, expected), check = BAD_IMAGES[case]
    path = tmp_path / name
    write(path)
    huge = case == "8000x8000"
    model = _StandIn() if huge else predictor
    if huge:
        monkeypatch.setattr(prediction, "write_prediction", lambda *a, **k: [])
    lines = []
    written, failures = prediction.predict_files(model, [path], tmp_path / "out", log=lines.append)
    if outcome == "skipped":
        assert written == {} and len(failures) == 1, failures
        assert failures[0].startswith(f"cannot read image {path}: ")
        assert expected in failures[0].lower() and "\n" not in failures[0], failures
        return
    assert failures == [] and len(lines) == 1, (failures, lines)
    assert lines[0].startswith(f"{path}: {expected[1]}x{expected[0]}, "), lines
    rgb = model.seen[0] if huge else prediction.read_image(path)  # what the model was given
    assert rgb.shape == (*expected, 3) and rgb.dtype == np.uint8
    assert check is None or check(rgb), case
    if huge:
        return
    with Image.open(tmp_path / "out" / f"{path.stem}_labels.png") as labels:
        assert labels.size == (expected[1], expected[0])
        assert np.asarray(labels).max() < NUM_CLASSES


def test_label_png_is_16_bit_beyond_256_classes(tmp_path):
    labels = np.asarray([[0, 255], [256, 4999]])
    array = visualize.label_png_array(labels, 5000)
    assert array.dtype == np.uint16
    visualize.save_png(array, tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "l.png")), labels)
    assert visualize.label_png_array(labels[:1], 256).dtype == np.uint8


def test_colorize_overlay_legend():
    palette = np.asarray([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    labels = np.asarray([[0, 1, 1, -1], [2, 2, 2, 2]])
    color = visualize.colorize(labels, palette)
    assert tuple(color[0, 1]) == (0, 255, 0) and tuple(color[0, 3]) == (0, 0, 0)
    image = np.full((2, 4, 3), 100, np.uint8)
    blended = visualize.overlay(image, color, alpha=0.5)
    assert tuple(blended[0, 0]) == (178, 50, 50)
    assert visualize.class_shares(labels, 3) == [(2, 0.5), (1, 0.25), (0, 0.125)]
    legend = visualize.legend_image(labels, ["red", "green", "blue"], palette)
    assert legend.ndim == 3 and legend.shape[2] == 3 and legend.dtype == np.uint8
    # Each present class's colour appears in its swatch.
    for rgb in palette:
        assert (legend == rgb).all(-1).any()


def test_plot_metrics_script_writes_png(tmp_path):
    records = [
        {"step": 1, "train_loss": 3.0, "lr_head": 0.01, "lr_backbone": 0.001},
        {"step": 2, "train_loss": 2.5, "lr_head": 0.009, "lr_backbone": 0.0009},
        {"step": 2, "eval_mIoU": 0.1, "eval_mAcc": 0.2, "eval_aAcc": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "train_lo'
    )
    spec = importlib.util.spec_from_file_location(
        "plot_metrics", REPO / "benchmarks/plot_metrics.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--workdir", str(tmp_path)]) == 0
    with Image.open(tmp_path / "training_curves.png") as picture:
        assert picture.size[0] > 100
    assert module.main(["--workdir", str(tmp_path / "none")]) == 1


def test_other_class_count_without_model_json_is_one_error(workdir, tmp_path):
    """Without ``model.json`` the model comes from the config: a checkpoint of another class
    count used to fail deep inside flax with a shape traceback."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    (copy / "model.json").unlink()
    other = _config()
    other.dataset.num_classes = NUM_CLASSES + 1
    with pytest.raises(ModelMismatchError, match="class_embedding.*no model.json"):
        inference.Predictor.from_workdir(other, copy, "latest")
    assert inference.Predictor.from_workdir(_config(), copy, "latest").num_classes == NUM_CLASSES


def test_approx_search_benchmark_on_a_checkpoint(workdir, tmp_path):
    """``benchmarks.approx_search --checkpoint``: the trained embeddings of the workdir's
    validation images, the table extended to more classes; every row measured."""
    from benchmarks import approx_search
    from jaxscaleseg import training

    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    (run / "config.json").write_text(training.config_json(_config()))
    rows = approx_search.main(
        ["--checkpoint", str(run), "--examples", "2", "--classes", str(NUM_CLASSES), "64"]
        + ["--probes", "2", "--candidates", "8", "--union_probes", "2", "--repeats", "1"]
    )
    assert {(r["classes"], r["method"]) for r in rows} == {
        (c, m) for c in (NUM_CLASSES, 64) for m in approx_search.METHODS
    }
    for r in rows:
        assert 0.0 < r["recall"] <= 1.0 and r["ess_rel_error"] >= 0.0
        assert (r["certified"] >= 0.0) if r["method"] == "union" else True
