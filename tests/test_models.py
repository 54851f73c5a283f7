"""Tests for jaxscaleseg.models: parameter counts, shapes, dtypes, heads, memory at large C.

Big backbones are checked with ``jax.eval_shape`` only (exact shapes, no compute); real forward
passes use the tiny variant and MobileNetV2 at small inputs.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models_fixtures import random_variables

from jaxscaleseg.models import build_backbone, build_model, l2_normalize, summary
from jaxscaleseg.models.layers import resize_bilinear
from jaxscaleseg.models.mobilenet_v2 import MobileNetV2

BIG = ("resnet50", "resnet101", "mobilenet_v2")
KEY = jax.random.key(0)


def _normal(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@functools.cache
def variable_shapes(name: str, head: str, num_classes: int = 21, embedding_dim: int = 12):
    """eval_shape of init; parameters do not depend on output stride, dtype or input size."""
    model = build_model(name, head=head, num_classes=num_classes, embedding_dim=embedding_dim)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), KEY, images)


# ------------------------------------------------------------------------------------------
# Parameter counts (torchvision's numbers).

TORCHVISION_BACKBONE_PARAMS = {
    "resnet50": 23_508_032,  # 25 557 032 - fc (2048 * 1000 + 1000)
    "resnet101": 42_500_160,  # 44 549 160 - fc
    "mobilenet_v2": 1_811_712,  # features without features.18 (1x1 conv 320 -> 1280 + BN)
}


@pytest.mark.parametrize("name", BIG)
def test_backbone_param_counts_equal_torchvision(name):
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(build_backbone(name).init, KEY, images)
    assert num_params(shapes["params"]) == TORCHVISION_BACKBONE_PARAMS[name]


def test_mobilenet_v2_with_last_conv_equals_torchvision_features():
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(MobileNetV2(last_conv=True).init, KEY, images)
    assert num_params(shapes["params"]) == 2_223_872  # 3 504 872 - classifier (1 281 000)


def _decoder_params(high_channels: int, low_channels: int, separable: bool = False) -> int:
    """ASPP + decoder parameter count for 256/48/256 channels, computed by hand."""
    bn = 2 * 256
    atrous = high_channels * 9 + high_channels * 256 if separable else high_channels * 256 * 9
    aspp = 2 * (high_channels * 256 + bn) + 3 * (atrous + bn) + 5 * 256 * 256 + bn
    fuse_in = 256 + 48
    fuse = (fuse_in * 9 + fuse_in * 256 if separable else fuse_in * 256 * 9) + bn
    return aspp + low_channels * 48 + 2 * 48 + fuse


@pytest.mark.parametrize(
    "name,high,low", [("resnet50", 2048, 256), ("resnet101", 2048, 256), ("mobilenet_v2", 320, 24)]
)
@pytest.mark.parametrize("head", ["softmax", "embedding"])
def test_model_param_counts(name, high, low, head):
    c, d = 21, 12
    shapes = variable_shapes(name, head, c, d)
    params = shapes["params"]
    head_params = 256 * c + c if head == "softmax" else 256 * d + d + c * d
    expected = TORCHVISION_BACKBONE_PARAMS[name] + _decoder_params(high, low) + head_params
    assert num_params(params) == expected
    assert num_params(params["backbone"]) == TORCHVISION_BACKBONE_PARAMS[name]
    top = {"backbone", "aspp", "decoder", "head_conv"}
    assert set(params) == (top | {"class_embedding"} if head == "embedding" else top)
    assert set(shapes["batch_stats"]) == {"backbone", "aspp", "decoder"}
    if head == "embedding":
        assert params["class_embedding"].shape == (c, d)
        assert params["class_embedding"].dtype == jnp.float32


def test_summary_tables(capsys):
    assert (
        summary.main(["--size", "97", "65", "--classes", "40", "--backbones", "mobilenet_v2"]) == 0
    )
    text = capsys.readouterr().out
    assert "| mobilenet_v2 | 1,811,712 | [1,25,17,24] | [1,7,5,320] | [1,13,9,320] |" in text
    table = 40 * 12
    embedding = 1_811_712 + _decoder_params(320, 24) + 256 * 12 + 12 + table
    assert f"pixel_embedding [1,97,65,12] | {embedding:,} |" in text
    assert "logits [1,97,65,40]" in text


def test_separable_param_count():
    model = build_model("resnet50", head="softmax", num_classes=21, separable=True)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), KEY, images)
    expected = 23_508_032 + _decoder_params(2048, 256, separable=True) + 256 * 21 + 21
    assert num_params(shapes["params"]) == expected


# ------------------------------------------------------------------------------------------
# Shapes (eval_shape for every backbone x output stride x head x dtype).


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


# Feature sizes torchvision's convolution arithmetic gives (stride 4 and output stride).
# ResNet-101 differs from ResNet-50 only in layer3's block count.
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_backbone_feature_shapes(name, output_stride):
    backbone = build_backbone(name, output_stride=output_stride)
    variables = jax.eval_shape(
        backbone.init, KEY, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    )
    for h, w in [(321, 321), (512, 384)]:
        images = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
        low, high = jax.eval_shape(backbone.apply, variables, images)
        assert low.shape[1:3] == (_ceil_div(h, 4), _ceil_div(w, 4))
        assert high.shape[1:3] == (_ceil_div(h, output_stride), _ceil_div(w, output_stride))
        channels = (256, 2048) if name.startswith("resnet") else (24, 320)
        assert (low.shape[-1], high.shape[-1]) == channels


@pytest.mark.parametrize("name", BIG)
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("head", ["softmax", "embedding"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_output_shapes_big_models(name, output_stride, head, dtype):
    c, d = 21, 12
    model = build_model(
        name, head=head, num_classes=c, embedding_dim=d, output_stride=output_stride, dtype=dtype
    )
    variables = variable_shapes(name, head, c, d)
    for h, w in [(321, 321), (512, 384)]:
        images = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
        out = jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
        if head == "softmax":
            assert out["logits"].shape == (2, h, w, c)
            assert out["logits"].dtype == dtype
        else:
            assert out["pixel_embedding"].shape == (2, h, w, d)
            assert out["pixel_embedding"].dtype == jnp.float32
            assert out["class_embedding"].shape == (c, d)
            assert out["class_embedding"].dtype == jnp.float32


def test_train_mode_shapes_big_model():
    model = build_model("resnet101", head="embedding", num_classes=21, output_stride=8)
    variables = variable_shapes("resnet101", "embedding")
    images = jax.ShapeDtypeStruct((2, 321, 321, 3), jnp.float32)
    apply = functools.partial(
        model.apply, train=True, mutable=["batch_stats"], rngs={"dropout": KEY}
    )
    out, updates = jax.eval_shape(apply, variables, images)
    assert out["pixel_embedding"].shape == (2, 321, 321, 12)
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )


# ------------------------------------------------------------------------------------------
# Real forward passes: tiny variant and MobileNetV2 at small sizes.


@functools.cache
def tiny_variables(head: str, num_classes: int = 7, embedding_dim: int = 5):
    return random_variables(variable_shapes("tiny", head, num_classes, embedding_dim))


@functools.cache
def _forward(name, head, output_stride, dtype, num_classes, embedding_dim, train):
    model = build_model(
        name,
        head=head,
        num_classes=num_classes,
        embedding_dim=embedding_dim,
        output_stride=output_stride,
        dtype=dtype,
    )

    @jax.jit
    def forward(variables, images):
        if train:
            return model.apply(
                variables, images, train=True, mutable=["batch_stats"], rngs={"dropout": KEY}
            )
        return model.apply(variables, images, train=False), None

    return forward


def _check_outputs(out, head, shape, c, d, dtype):
    b, h, w = shape
    if head == "softmax":
        logits = out["logits"]
        assert logits.shape == (b, h, w, c) and logits.dtype == dtype
        assert np.isfinite(np.asarray(logits, np.float32)).all()
        return
    pixel, table = out["pixel_embedding"], out["class_embedding"]
    assert pixel.shape == (b, h, w, d) and pixel.dtype == jnp.float32
    assert table.shape == (c, d) and table.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(table, axis=-1), 1.0, rtol=1e-5)
    norms = np.linalg.norm(pixel, axis=-1)
    # Unit vectors at stride 4, bilinearly interpolated: never longer than 1, mostly close to it.
    assert norms.max() <= 1.0 + 1e-5
    assert np.median(norms) > 0.5


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("head", ["softmax", "embedding"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_tiny_forward(output_stride, head, dtype):
    c, d = 7, 5
    variables = tiny_variables(head, c, d)
    images = _normal(1, (2, 33, 47, 3))
    forward = _forward("tiny", head, output_stride, dtype, c, d, False)
    out, _ = forward(variables, images)
    _check_outputs(out, head, (2, 33, 47), c, d, dtype)
    if dtype != jnp.float32 or output_stride != 16:
        return  # training mode: once per head is enough (it compiles another program)
    forward_train = _forward("tiny", head, output_stride, dtype, c, d, True)
    out_train, updates = forward_train(variables, images)
    _check_outputs(out_train, head, (2, 33, 47), c, d, dtype)
    for leaf in jax.tree.leaves(updates["batch_stats"]):
        assert leaf.dtype == jnp.float32
    before = variables["batch_stats"]["backbone"]["stem"]["bn"]["mean"]
    after = updates["batch_stats"]["backbone"]["stem"]["bn"]["mean"]
    assert not np.allclose(before, after)


def test_bfloat16_close_to_float32():
    variables = tiny_variables("embedding")
    images = _normal(1, (2, 33, 47, 3))
    f32, _ = _forward("tiny", "embedding", 16, jnp.float32, 7, 5, False)(variables, images)
    bf16, _ = _forward("tiny", "embedding", 16, jnp.bfloat16, 7, 5, False)(variables, images)
    np.testing.assert_allclose(bf16["pixel_embedding"], f32["pixel_embedding"], atol=0.05)
    np.testing.assert_array_equal(bf16["class_embedding"], f32["class_embedding"])


@pytest.mark.parametrize(
    "head,output_stride,dtype",
    [("embedding", 16, jnp.float32), ("softmax", 8, jnp.bfloat16)],
    ids=["embedding-os16-f32", "softmax-os8-bf16"],
)
def test_mobilenet_v2_forward(head, output_stride, dtype):
    c, d = 6, 4
    variables = random_variables(variable_shapes("mobilenet_v2", head, c, d))
    images = _normal(3, (1, 45, 37, 3))
    out, _ = _forward("mobilenet_v2", head, output_stride, dtype, c, d, False)(variables, images)
    _check_outputs(out, head, (1, 45, 37), c, d, dtype)


def test_pixel_embedding_normalised_at_stride_4_then_upsampled():
    model = build_model("tiny", head="embedding", num_classes=7, embedding_dim=5)
    variables = tiny_variables("embedding")
    images = _normal(4, (1, 32, 40, 3))
    apply = functools.partial(
        model.apply,
        train=False,
        capture_intermediates=lambda mdl, _: mdl.name == "head_conv",
        mutable=["intermediates"],
    )
    out, state = jax.jit(apply)(variables, images)
    (raw,) = state["intermediates"]["head_conv"]["__call__"]
    assert raw.shape == (1, 8, 10, 5)  # stride 4
    expected = resize_bilinear(l2_normalize(raw), 32, 40)
    np.testing.assert_allclose(out["pixel_embedding"], expected, rtol=1e-6, atol=1e-6)
    lengths = np.linalg.norm(out["pixel_embedding"], axis=-1)
    assert lengths.min() < 0.999  # interpolation shortens vectors; not re-normalised


def test_resize_matches_align_corners_false():
    # 2 -> 4 upsampling with half-pixel centres: [a, 0.75a + 0.25b, 0.25a + 0.75b, b].
    x = jnp.array([0.0, 4.0]).reshape(1, 1, 2, 1)
    y = resize_bilinear(x, 1, 4)
    np.testing.assert_allclose(y.ravel(), [0.0, 1.0, 3.0, 4.0])


def test_class_table_initialised_uniform_then_normalised():
    model = build_model("tiny", head="embedding", num_classes=2000, embedding_dim=12)
    # An "rbg" key compiles a much smaller init program than the default threefry.
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(functools.partial(model.init, train=False))(key, jnp.zeros((1, 8, 8, 3)))
    raw = np.asarray(variables["params"]["class_embedding"])
    assert raw.shape == (2000, 12) and raw.dtype == np.float32
    assert -1.0 <= raw.min() < -0.99 and 0.99 < raw.max() <= 1.0
    assert abs(raw.mean()) < 0.02
    assert abs(raw.std() - 1 / np.sqrt(3)) < 0.01  # std of U(-1, 1)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, jnp.zeros((1, 8, 8, 3)))
    np.testing.assert_allclose(
        out["class_embedding"], raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-6
    )


def test_bfloat16_keeps_float32_variables():
    for name in ("tiny", "mobilenet_v2"):
        model = build_model(name, head="embedding", num_classes=3, dtype=jnp.bfloat16)
        images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
        variables = jax.eval_shape(functools.partial(model.init, train=False), KEY, images)
        for leaf in jax.tree.leaves(variables):
            assert leaf.dtype == jnp.float32


def test_dropout_needs_rng_in_training_and_is_off_in_eval():
    model = build_model("tiny", head="softmax", num_classes=7, embedding_dim=5)
    variables = tiny_variables("softmax")
    images = _normal(1, (2, 33, 47, 3))
    with pytest.raises(flax.errors.InvalidRngError):
        jax.eval_shape(
            functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, images
        )
    forward = _forward("tiny", "softmax", 16, jnp.float32, 7, 5, False)
    np.testing.assert_array_equal(
        forward(variables, images)[0]["logits"], forward(variables, images)[0]["logits"]
    )
    train = _forward("tiny", "softmax", 16, jnp.float32, 7, 5, True)
    assert not np.allclose(
        train(variables, images)[0]["logits"], forward(variables, images)[0]["logits"]
    )


def test_l2_normalize_gradient_and_zero_vectors():
    x = jnp.asarray(_normal(6, (4, 5)))
    naive = jax.grad(lambda v: jnp.sum(jnp.sin(v / jnp.linalg.norm(v, axis=-1, keepdims=True))))
    ours = jax.grad(lambda v: jnp.sum(jnp.sin(l2_normalize(v))))
    np.testing.assert_allclose(jax.jit(ours)(x), jax.jit(naive)(x), rtol=1e-5, atol=1e-6)
    zero = jnp.zeros((2, 5))
    value, grad = jax.jit(jax.value_and_grad(lambda v: jnp.sum(l2_normalize(v))))(zero)
    assert value == 0 and np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="resnet18", head="softmax"), "unknown backbone"),
        (dict(name="tiny", head="sigmoid"), "unknown head"),
        (dict(name="tiny", head="softmax", output_stride=32), "output_stride"),
    ],
)
def test_build_model_rejects_bad_arguments(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, num_classes=3, **kwargs)


# ------------------------------------------------------------------------------------------
# Memory: the class table costs its own size (params + grads), nothing per pixel.


@functools.cache
def _train_step(num_classes: int):
    """Compiled grads of a loss over both outputs, with the variables' shapes."""
    model = build_model("tiny", head="embedding", num_classes=num_classes, embedding_dim=12)
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), KEY, images)
    weights = jax.ShapeDtypeStruct((2, 64, 64, 12), jnp.float32)

    def grads(params, batch_stats, images, weights):
        def loss(params):
            out, _ = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": KEY},
            )
            pixel = out["pixel_embedding"]
            # A dot of every class with one pixel-derived vector: O(C·D), never B·H·W×C.
            # (Written as multiply-and-sum: XLA:CPU would materialise a matmul's operands.)
            query = jnp.mean(pixel, axis=(0, 1, 2))
            return jnp.sum(pixel * weights) + jnp.sum(out["class_embedding"][:3] * query)

        return jax.grad(loss)(params)

    compiled = (
        jax.jit(grads)
        .lower(variables["params"], variables["batch_stats"], images, weights)
        .compile()
    )
    return compiled, variables


def _memory(num_classes: int) -> int:
    stats = _train_step(num_classes)[0].memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def test_memory_grows_only_by_class_table():
    small, large = _memory(19), _memory(100_000)
    table_bytes = (100_000 - 19) * 12 * 4
    assert large - small <= 2 * table_bytes + 1_000_000, (small, large)
    assert large - small >= 2 * table_bytes  # params in, grads out: sanity of the measurement


def test_gradients_reach_backbone_and_class_table():
    compiled, shapes = _train_step(19)
    variables = random_variables(shapes)
    images, weights = _normal(5, (2, 64, 64, 3)), _normal(6, (2, 64, 64, 12))
    grads = compiled(variables["params"], variables["batch_stats"], images, weights)
    for key in ("backbone", "aspp", "decoder", "head_conv", "class_embedding"):
        largest = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads[key]))
        assert largest > 0, key
    # Only classes 0..2 enter the loss: the other rows get no gradient.
    table_grad = np.asarray(grads["class_embedding"])
    assert np.abs(table_grad[:3]).min() > 0
    assert np.abs(table_grad[3:]).max() == 0
