"""Tests for jaxscaleseg.models.pretrained: reading checkpoints, name/layout mapping, errors, CLI.

Round trips use torchvision-format state dicts with random values built from
``models_fixtures.torchvision_state_dict_spec`` (no download, no torch). Tests marked by
``pytest.importorskip("torch")`` compare against torchvision itself when it is installed.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import subprocess
import sys
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_fixtures import (
    TORCHVISION_NUM_PARAMS,
    random_state_dict,
    small_pth,
    small_pth_expected,
    torchvision_state_dict_spec,
    write_safetensors,
)

from jaxscaleseg import cli, convert_weights
from jaxscaleseg.models import build_backbone, build_model
from jaxscaleseg.models import pretrained as P

ARCHS = ("resnet50", "resnet101", "mobilenet_v2")
BACKBONE_PARAMS = {"resnet50": 23_508_032, "resnet101": 42_500_160, "mobilenet_v2": 1_811_712}
IGNORED = {
    "resnet50": ("fc.",),
    "resnet101": ("fc.",),
    "mobilenet_v2": ("classifier.", "features.18."),
}


def _ignored(arch: str, key: str) -> bool:
    return key.endswith("num_batches_tracked") or key.startswith(IGNORED[arch])


@functools.cache
def _state_dict(arch: str) -> dict[str, np.ndarray]:
    return random_state_dict(arch, seed=len(arch))


@functools.cache
def _converted(arch: str):
    return P.convert_state_dict(_state_dict(arch), arch)


def _fingerprint(x: np.ndarray) -> tuple:
    """Identifies a tensor up to a transposition: its size and sorted values."""
    x = np.asarray(x, np.float32)
    return x.size, hashlib.sha1(np.sort(x, axis=None).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# The test's own torchvision description.


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_matches_torchvision_documented_counts(arch):
    spec = torchvision_state_dict_spec(arch)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = sum(int(np.prod(s)) for k, s in spec if not k.endswith(buffers))
    assert params == TORCHVISION_NUM_PARAMS[arch]


# ------------------------------------------------------------------------------------------
# Round trip: every tensor lands where it should.


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_full_tree(arch):
    sd, variables = _state_dict(arch), _converted(arch)
    kept = {k: v for k, v in sd.items() if not _ignored(arch, k)}
    params = jax.tree.leaves(variables["params"])
    stats = jax.tree.leaves(variables["batch_stats"])
    # Counts: leaves, parameter total (torchvision's), statistics total.
    assert len(params) + len(stats) == len(kept)
    assert sum(p.size for p in params) == BACKBONE_PARAMS[arch]
    running = sum(v.size for k, v in kept.items() if k.endswith(("running_mean", "running_var")))
    assert sum(s.size for s in stats) == running
    # Every kept tensor appears exactly once (up to its layout), nothing else does.
    assert sorted(map(_fingerprint, params + stats)) == sorted(map(_fingerprint, kept.values()))
    for leaf in params + stats:
        assert leaf.dtype == np.float32
    # The structure is exactly the backbone's (and the model's "backbone" subtree).
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(build_backbone(arch).init, jax.random.key(0), images)
    for collection in ("params", "batch_stats"):
        got = jax.tree.map(np.shape, variables[collection])
        assert got == jax.tree.map(lambda s: s.shape, flax.core.unfreeze(shapes[collection]))


SPOT_CHECKS = {
    "resnet50": [
        ("conv1.weight", "params", "conv1/kernel"),
        ("bn1.weight", "params", "bn1/scale"),
        ("bn1.running_mean", "batch_stats", "bn1/mean"),
        ("layer1.0.downsample.0.weight", "params", "layer1_0/downsample_conv/kernel"),
        ("layer1.0.downsample.1.running_var", "batch_stats", "layer1_0/downsample_bn/var"),
        ("layer3.5.conv2.weight", "params", "layer3_5/conv2/kernel"),
        ("layer4.2.bn3.bias", "params", "layer4_2/bn3/bias"),
    ],
    "resnet101": [
        ("layer3.22.conv3.weight", "params", "layer3_22/conv3/kernel"),
        ("layer3.17.bn2.running_mean", "batch_stats", "layer3_17/bn2/mean"),
    ],
    "mobilenet_v2": [
        ("features.0.0.weight", "params", "stem_conv/kernel"),
        ("features.0.1.weight", "params", "stem_bn/scale"),
        ("features.1.conv.0.0.weight", "params", "block1/dw_conv/kernel"),
        ("features.1.conv.1.weight", "params", "block1/project_conv/kernel"),
        ("features.1.conv.2.running_var", "batch_stats", "block1/project_bn/var"),
        ("features.5.conv.0.0.weight", "params", "block5/expand_conv/kernel"),
        ("features.5.conv.1.0.weight", "params", "block5/dw_conv/kernel"),
        ("features.17.conv.2.weight", "params", "block17/project_conv/kernel"),
        ("features.17.conv.3.running_mean", "batch_stats", "block17/project_bn/mean"),
    ],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_spot_checks(arch):
    sd, variables = _state_dict(arch), _converted(arch)
    for torch_key, collection, path in SPOT_CHECKS[arch]:
        value = variables[collection]
        for part in path.split("/"):
            value = value[part]
        source = sd[torch_key]
        if source.ndim == 4:  # OIHW -> HWIO, element by element
            o, i, h, w = source.shape
            assert value.shape == (h, w, i, o), torch_key
            for oo, ii, hh, ww in [
                (0, 0, 0, 0),
                (o - 1, i - 1, h - 1, w - 1),
                (o // 3, i // 2, h // 2, 0),
            ]:
                assert value[hh, ww, ii, oo] == source[oo, ii, hh, ww], torch_key
            np.testing.assert_array_equal(value, source.transpose(2, 3, 1, 0))
        else:
            np.testing.assert_array_equal(value, source, err_msg=torch_key)


def test_depthwise_kernel_layout():
    kernel = _converted("mobilenet_v2")["params"]["block2"]["dw_conv"]["kernel"]
    source = _state_dict("mobilenet_v2")["features.2.conv.1.0.weight"]  # [96, 1, 3, 3]
    assert kernel.shape == (3, 3, 1, 96)
    assert kernel[2, 0, 0, 95] == source[95, 0, 2, 0]


def test_classifier_and_last_conv_are_optional():
    sd = {k: v for k, v in _state_dict("mobilenet_v2").items() if not _ignored("mobilenet_v2", k)}
    variables = P.convert_state_dict(sd, "mobilenet_v2")
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 1_811_712


# ------------------------------------------------------------------------------------------
# Clear errors.


def test_missing_key_is_named():
    sd = dict(_state_dict("resnet50"))
    del sd["layer2.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'layer2\.1\.bn2\.running_var'.*\(128,\)"):
        P.convert_state_dict(sd, "resnet50")


def test_wrong_shape_is_named():
    sd = dict(_state_dict("resnet50"))
    sd["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 3), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'layer1\.0\.conv2\.weight' has shape \(64, 64, 1, 3\), expected \(64, 64, 3, 3\)",
    ):
        P.convert_state_dict(sd, "resnet50")


@pytest.mark.parametrize("key", ["layer5.0.conv1.weight", "module.conv1.weight"])
def test_unexpected_key_is_named(key):
    sd = dict(_state_dict("resnet50"))
    sd[key] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError, match=rf"unexpected key '{key}'"):
        P.convert_state_dict(sd, "resnet50")


def test_wrong_arch_fails_clearly():
    with pytest.raises(
        ValueError, match=r"resnet50 import.*unexpected key 'features\.0\.0\.weight'"
    ):
        P.convert_state_dict(_state_dict("mobilenet_v2"), "resnet50")


# ------------------------------------------------------------------------------------------
# File formats.


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_torch_save_without_torch(tmp_path, legacy):
    path = tmp_path / "small.pth"
    path.write_bytes(small_pth(legacy))
    got = P.read_state_dict(path)
    expected = small_pth_expected()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(got[key], np.float64), value, err_msg=key)
    assert got["c.half"].dtype == np.float16
    assert got["c.num_batches_tracked"].dtype == np.int64


def test_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="refusing to unpickle builtins.print"):
        P.read_state_dict(path)


def test_rejects_unknown_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello world, not a checkpoint")
    with pytest.raises(ValueError, match="not a .pth, .npz or .safetensors"):
        P.read_state_dict(path)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_reads_npz_and_safetensors(tmp_path, fmt):
    sd = _state_dict("mobilenet_v2")
    path = tmp_path / f"mnv2.{fmt}"
    if fmt == "npz":
        np.savez(path, **sd)
    else:
        write_safetensors(path, sd)
    got = P.read_state_dict(path)
    # npz keeps the file's order; older versions of the safetensors package sort the keys.
    assert (list(got) if fmt == "npz" else sorted(got)) == (
        list(sd) if fmt == "npz" else sorted(sd)
    )
    for key in sd:
        np.testing.assert_array_equal(got[key], sd[key])
        assert got[key].dtype == sd[key].dtype


# ------------------------------------------------------------------------------------------
# CLI, saving, merging into the model.


def test_cli_converts_and_merges(tmp_path, capsys):
    source, out = tmp_path / "mnv2.npz", tmp_path / "mnv2_backbone.npz"
    np.savez(source, **_state_dict("mobilenet_v2"))
    args = ["convert", "--arch", "mobilenet_v2", "--input", str(source), "--output", str(out)]
    assert cli.call(convert_weights.main, args) == 0
    assert "1,811,712 parameters" in capsys.readouterr().out
    loaded = P.load_backbone_variables(out)
    expected = _converted("mobilenet_v2")
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)

    model = build_model("mobilenet_v2", head="embedding", num_classes=5)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    merged = P.merge_backbone(shapes, loaded)
    np.testing.assert_array_equal(
        merged["params"]["backbone"]["block4"]["dw_conv"]["kernel"],
        expected["params"]["block4"]["dw_conv"]["kernel"],
    )
    assert merged["params"]["aspp"] == shapes["params"]["aspp"]  # the rest is untouched

    loaded["params"]["block4"]["dw_conv"]["kernel"] = np.zeros((3, 3, 1, 7), np.float32)
    with pytest.raises(ValueError, match="params/backbone/block4/dw_conv/kernel: imported shape"):
        P.merge_backbone(shapes, loaded)


def test_cli_reports_errors(tmp_path, capsys):
    sd = dict(_state_dict("mobilenet_v2"))
    del sd["features.3.conv.1.1.running_mean"]
    source = tmp_path / "broken.npz"
    np.savez(source, **sd)
    args = ["convert", "--arch", "mobilenet_v2", "--input", str(source)]
    assert cli.call(convert_weights.main, [*args, "--output", str(tmp_path / "o.npz")]) == 1
    err = capsys.readouterr().err
    assert "missing key 'features.3.conv.1.1.running_mean'" in err and err.count("\n") == 1
    assert not (tmp_path / "o.npz").exists()


def test_cli_module_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxscaleseg.convert_weights", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--arch" in result.stdout and "resnet101" in result.stdout


# ------------------------------------------------------------------------------------------
# Against torchvision itself (optional).


def _torch():
    torch = pytest.importorskip("torch", reason="torch is not installed (optional comparison)")
    torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
    torch.set_num_threads(2)
    return torch, torchvision


@pytest.mark.parametrize("arch", ARCHS)
def test_spec_matches_torchvision(arch):
    _, torchvision = _torch()
    model = getattr(torchvision.models, arch)()
    actual = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert actual == torchvision_state_dict_spec(arch)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_torch_save_of_full_model(tmp_path, legacy):
    torch, torchvision = _torch()
    sd = torchvision.models.resnet50().state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = P.read_state_dict(path)
    assert list(got) == list(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)


def _randomise_batch_norm(torch, model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


def _dilate_torchvision_mobilenet_v2(model, output_stride):
    """Applies our output-stride rule to torchvision's MobileNetV2 (its own code has none)."""
    setting = [(1, 1), (6, 2), (6, 3), (6, 4), (6, 3), (6, 3), (6, 1)]
    strides = [1, 2, 2, 2, 1, 2, 1]
    current, dilation, index = 2, 1, 1
    for (t, n), s in zip(setting, strides, strict=True):
        previous = dilation
        if current == output_stride:
            stride, dilation = 1, dilation * s
        else:
            stride, current = s, current * s
        for i in range(n):
            depthwise = model.features[index].conv[0 if t == 1 else 1][0]
            d = previous if i == 0 else dilation
            depthwise.stride = (stride if i == 0 else 1,) * 2
            depthwise.dilation = (d, d)
            depthwise.padding = (d, d)
            index += 1
    return model


def _relative_error(ours, reference) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize(
    "arch,output_stride",
    [
        ("resnet50", 16),
        ("resnet50", 8),
        ("resnet101", 16),
        ("mobilenet_v2", 32),
        ("mobilenet_v2", 16),
        ("mobilenet_v2", 8),
    ],
)
def test_features_match_torchvision(tmp_path, arch, output_stride):
    torch, torchvision = _torch()
    torch.manual_seed(0)
    if arch.startswith("resnet"):
        dilation = {8: [False, True, True], 16: [False, False, True]}[output_stride]
        model = getattr(torchvision.models, arch)(replace_stride_with_dilation=dilation)
    else:
        model = _dilate_torchvision_mobilenet_v2(torchvision.models.mobilenet_v2(), output_stride)
    model = _randomise_batch_norm(torch, model, seed=output_stride)
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)  # the file goes through the torch-free reader

    images = np.random.default_rng(0).standard_normal((2, 3, 53, 45)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(images)
        if arch.startswith("resnet"):
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            low = model.layer1(x)
            high = model.layer4(model.layer3(model.layer2(low)))
        else:
            low = model.features[:4](x)
            high = model.features[4:18](low)
    low, high = (t.numpy().transpose(0, 2, 3, 1) for t in (low, high))

    variables = P.import_torchvision_backbone(path, arch)
    backbone = build_backbone(arch, output_stride=output_stride)
    ours_low, ours_high = jax.jit(functools.partial(backbone.apply, train=False))(
        variables, images.transpose(0, 2, 3, 1)
    )
    assert ours_low.shape == low.shape and ours_high.shape == high.shape
    errors = (
        _relative_error(np.asarray(ours_low), low),
        _relative_error(np.asarray(ours_high), high),
    )
    print(f"{arch} OS {output_stride}: relative errors low {errors[0]:.2e} high {errors[1]:.2e}")
    assert max(errors) < 1e-4
    np.testing.assert_allclose(ours_high, high, rtol=1e-4, atol=1e-4 * np.abs(high).max())
