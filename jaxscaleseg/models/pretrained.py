"""Import ImageNet backbones from torchvision-format checkpoints, without needing torch.

Accepted inputs (the format is recognised from the file's content, not its name):

* ``.pth`` / ``.pt``: what ``torch.save(model.state_dict(), path)`` writes, both the zip format
  (torch ≥ 1.6) and the legacy pickle format, including the files torchvision downloads into
  ``~/.cache/torch/hub/checkpoints``. They are read with a restricted unpickler that only
  rebuilds tensors (nothing else in the file is executed).
* ``.npz``: ``numpy.savez(path, **{k: v.numpy() for k, v in state_dict.items()})``.
* ``.safetensors``: ``safetensors.torch.save_file(state_dict, path)``.

Exporting, on a machine with torch and torchvision::

    import torch, torchvision
    model = torchvision.models.resnet101(weights="IMAGENET1K_V1")
    torch.save(model.state_dict(), "resnet101.pth")  # or the .npz line above

The state dict must be the *whole* torchvision model's (``resnet50``, ``resnet101`` or
``mobilenet_v2``); the classifier (``fc.*``, ``classifier.*``), MobileNetV2's final 1×1 conv to
1280 channels (``features.18.*``, which DeepLabV3+ drops) and BatchNorm's
``num_batches_tracked`` are ignored by name. Any other missing, unexpected or mis-shaped key
fails with a message naming the first one. Layouts are converted: convolution kernels OIHW →
HWIO (depthwise ``[C, 1, kh, kw]`` → ``[kh, kw, 1, C]``), BatchNorm ``weight``/``bias`` →
params ``scale``/``bias``, ``running_mean``/``running_var`` → batch_stats ``mean``/``var``.

The CLI (:mod:`jaxscaleseg.convert_weights`) converts once and writes an ``.npz`` of the
backbone's variables (keys like ``params/layer1_0/conv1/kernel``)::

    python -m jaxscaleseg.convert_weights --arch resnet101 --input resnet101.pth \\
        --output resnet101_imagenet.npz

and training loads it with :func:`load_backbone_variables` and :func:`merge_backbone`.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

ARCHS = ("resnet50", "resnet101", "mobilenet_v2")

# State-dict keys that are not part of the DeepLabV3+ backbone, per architecture.
IGNORED_KEYS = {
    "resnet50": (r"fc\..*",),
    "resnet101": (r"fc\..*",),
    "mobilenet_v2": (r"classifier\..*", r"features\.18\..*"),
}
_ALWAYS_IGNORED = (r".*\.num_batches_tracked",)

StateDict = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Reading state dicts.


def read_state_dict(path: str | Path) -> StateDict:
    """Reads a torchvision-format state dict from ``.pth`` (zip or legacy), ``.npz`` or
    ``.safetensors``, without torch.

    Args:
      path: the file.

    Returns:
      ``{key: array}`` (in the file's order, except for ``.safetensors``, whose reader may sort
      them), arrays in their stored dtype (float16/bfloat16
      tensors come back as ``numpy.float16`` / ``ml_dtypes.bfloat16``).

    Raises:
      ValueError: if the file is in none of the formats, or holds something other than tensors.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith(".npy") for n in names) and not any(
                n.endswith("data.pkl") for n in names
            ):
                with np.load(path, allow_pickle=False) as npz:
                    return {k: npz[k] for k in npz.files}
            return _read_torch_zip(zf, path)
    if head[:1] == b"\x80":
        return _read_torch_legacy(path)
    if len(head) == 8:
        return _read_safetensors(path)
    raise ValueError(f"{path}: not a .pth, .npz or .safetensors file")


_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. in the pickle."""

    def __init__(self, name: str):
        self.dtype = np.dtype(_TORCH_STORAGE_DTYPES[name])


class _Storage:
    """A storage whose bytes may arrive after the tensors that view it (legacy format)."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.data: np.ndarray | None = None


class _LazyTensor:
    """A tensor view recorded by ``_rebuild_tensor_v2``, materialised once storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: Sequence[int], stride: Sequence[int]):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), stride

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError("corrupt checkpoint: a tensor refers to a storage with no data")
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, meta=None):
    del requires_grad, hooks, meta
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks):
    del requires_grad, hooks
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict, allowing only tensors, storages and ordered dicts."""

    _ALLOWED: Mapping[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, load_storage: Callable[[tuple], _Storage], source: Path):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(
            f"{self._source}: refusing to unpickle {module}.{name}; only plain state dicts of "
            "tensors are supported (save model.state_dict(), or export to .npz)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        return self._load_storage(pid)


def _finish(obj: Any, source: Path) -> StateDict:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping), got {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    out = {}
    for key, value in obj.items():
        if not isinstance(value, _LazyTensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = value.materialize()
    return out


def _storage_dtype(storage_type: Any, source: Path) -> np.dtype:
    if not isinstance(storage_type, _StorageType):
        raise ValueError(f"{source}: unsupported storage type {storage_type!r}")
    return storage_type.dtype


def _read_torch_zip(zf: zipfile.ZipFile, source: Path) -> StateDict:
    pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
    if len(pkl) != 1:
        raise ValueError(f"{source}: a zip checkpoint must hold exactly one data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    big_endian = False
    if prefix + "byteorder" in zf.namelist():
        big_endian = zf.read(prefix + "byteorder").strip() == b"big"
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise ValueError(f"{source}: unsupported persistent id {kind!r}")
        if key not in storages:
            dtype = _storage_dtype(storage_type, source)
            storage = _Storage(dtype)
            storage.data = np.frombuffer(
                zf.read(f"{prefix}data/{key}"), dtype=dtype.newbyteorder(">" if big_endian else "<")
            ).astype(dtype)
            storages[key] = storage
        return storages[key]

    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage, source).load()
    return _finish(obj, source)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_torch_legacy(source: Path) -> StateDict:
    storages: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        if pid[0] != "storage":
            raise ValueError(f"{source}: unsupported persistent id {pid[0]!r}")
        _, storage_type, key, _location, _numel, view_metadata = pid
        if view_metadata is not None:
            raise ValueError(f"{source}: storage views (pre-1.0 checkpoints) are not supported")
        if key not in storages:
            storages[key] = _Storage(_storage_dtype(storage_type, source))
        return storages[key]

    with open(source, "rb") as f:
        reject = _RestrictedUnpickler(f, load_storage, source)
        if reject.load() != _LEGACY_MAGIC:
            raise ValueError(f"{source}: not a torch checkpoint (bad magic number)")
        reject.load()  # protocol version
        reject.load()  # sys info
        obj = _RestrictedUnpickler(f, load_storage, source).load()
        keys = pickle.Unpickler(f).load()  # a list of str
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            storage = storages[key]
            raw = f.read(numel * storage.dtype.itemsize)
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return _finish(obj, source)


def _read_safetensors(source: Path) -> StateDict:
    try:
        return dict(safetensors.numpy.load_file(source))
    except (safetensors.SafetensorError, ValueError, TypeError) as e:
        raise ValueError(f"{source}: not a .pth, .npz or .safetensors file ({e})") from e


# --------------------------------------------------------------------------------------------
# Name and layout mapping.


def _resnet_module_name(name: str) -> str:
    """``layer1_0`` → ``layer1.0``; ``downsample_conv``/``_bn`` → ``downsample.0``/``.1``."""
    name = re.sub(r"^(layer\d)_(\d+)$", r"\1.\2", name)
    return {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(name, name)


def _mobilenet_v2_module_names(path: Sequence[str], expands: bool) -> list[str]:
    """Flax module path in MobileNetV2 → torchvision's dotted module path."""
    head, *rest = path
    fixed = {
        "stem_conv": "features.0.0",
        "stem_bn": "features.0.1",
        "last_conv": "features.18.0",
        "last_bn": "features.18.1",
    }
    if head in fixed:
        return [fixed[head]]
    block = re.fullmatch(r"block(\d+)", head)
    if block is None or len(rest) != 1:
        raise KeyError(path)
    inner = {
        "expand_conv": "conv.0.0",
        "expand_bn": "conv.0.1",
        "dw_conv": "conv.1.0" if expands else "conv.0.0",
        "dw_bn": "conv.1.1" if expands else "conv.0.1",
        "project_conv": "conv.2" if expands else "conv.1",
        "project_bn": "conv.3" if expands else "conv.2",
    }
    return [f"features.{block.group(1)}", inner[rest[0]]]


_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_key(arch: str, collection: str, path: Sequence[str], variables: Mapping) -> str:
    """The torchvision state-dict key of one backbone variable.

    Args:
      arch: one of :data:`ARCHS`.
      collection: ``"params"`` or ``"batch_stats"``.
      path: the variable's path inside the collection, e.g. ``("layer1_0", "conv1", "kernel")``.
      variables: the backbone's variables (only their structure is used).

    Returns:
      E.g. ``"layer1.0.conv1.weight"``.
    """
    *modules, leaf = path
    if arch in ("resnet50", "resnet101"):
        names = [_resnet_module_name(m) for m in modules]
    elif arch == "mobilenet_v2":
        expands = "expand_conv" in variables["params"].get(modules[0], {})
        names = _mobilenet_v2_module_names(modules, expands)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return ".".join([*names, _LEAF_NAMES[(collection, leaf)]])


def _to_torch_layout(value_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape a flax variable has in torchvision's layout (HWIO → OIHW)."""
    if len(value_shape) == 4:
        h, w, i, o = value_shape
        return (o, i, h, w)
    return tuple(value_shape)


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    """OIHW → HWIO for convolution kernels; other tensors unchanged."""
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    return value


def backbone_variable_shapes(arch: str) -> dict[str, Any]:
    """The backbone's variables as ``jax.ShapeDtypeStruct`` (nothing is allocated).

    Args:
      arch: one of :data:`ARCHS`.

    Returns:
      ``{"params": ..., "batch_stats": ...}``, the structure the DeepLabV3+ model keeps under
      its ``backbone`` key.
    """
    from jaxscaleseg.models import build_backbone

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    module = build_backbone(arch)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), images)
    return flax.core.unfreeze(shapes)


def expected_torch_keys(arch: str) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """Every state-dict key the importer needs, in the backbone's order.

    Args:
      arch: one of :data:`ARCHS`.

    Returns:
      ``{torch_key: (collection, flax_path, torch_shape)}``.
    """
    shapes = backbone_variable_shapes(arch)
    out = {}
    for collection in ("params", "batch_stats"):
        flat = flax.traverse_util.flatten_dict(shapes[collection])
        for path, leaf in flat.items():
            key = torch_key(arch, collection, path, shapes)
            out[key] = (collection, path, _to_torch_layout(leaf.shape))
    return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _is_ignored(arch: str, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in (*IGNORED_KEYS[arch], *_ALWAYS_IGNORED))


def convert_state_dict(
    state_dict: Mapping[str, Any], arch: str, *, source: str = "state dict"
) -> dict[str, Any]:
    """Maps a full torchvision state dict onto the backbone's flax variables.

    Args:
      state_dict: ``{key: array}`` as from :func:`read_state_dict` (any array-likes).
      arch: ``"resnet50"``, ``"resnet101"`` or ``"mobilenet_v2"``.
      source: named in error messages (e.g. the file name).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays, nested as the backbone
      module (and the model's ``backbone`` subtree) expects.

    Raises:
      ValueError: naming the first missing, unexpected or mis-shaped key.
    """
    expected = expected_torch_keys(arch)
    for key in state_dict:
        if key not in expected and not _is_ignored(arch, key):
            raise ValueError(
                f"{arch} import from {source}: unexpected key {key!r} (not part of torchvision's "
                f"{arch}; is this the right --arch, or does the file carry a prefix such as "
                "'module.' or 'backbone.'?)"
            )
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key, (collection, path, shape) in expected.items():
        if key not in state_dict:
            raise ValueError(
                f"{arch} import from {source}: missing key {key!r} (expected shape {shape})"
            )
        value = np.asarray(state_dict[key])
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{arch} import from {source}: key {key!r} has shape {tuple(value.shape)}, "
                f"expected {shape}"
            )
        flat[collection][path] = _from_torch_layout(value.astype(np.float32))
    return {c: flax.traverse_util.unflatten_dict(v) for c, v in flat.items()}


def import_torchvision_backbone(path: str | Path, arch: str) -> dict[str, Any]:
    """Reads a checkpoint and converts it (:func:`read_state_dict`, :func:`convert_state_dict`).

    Args:
      path: ``.pth``, ``.npz`` or ``.safetensors`` with the full torchvision state dict.
      arch: ``"resnet50"``, ``"resnet101"`` or ``"mobilenet_v2"``.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` for the backbone.
    """
    return convert_state_dict(read_state_dict(path), arch, source=str(path))


# --------------------------------------------------------------------------------------------
# Saving, loading and merging converted backbones.


def save_backbone_variables(variables: Mapping[str, Any], path: str | Path) -> None:
    """Writes backbone variables to an ``.npz`` with ``collection/module/.../leaf`` keys."""
    flat = flax.traverse_util.flatten_dict(dict(variables), sep="/")
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


def load_backbone_variables(path: str | Path) -> dict[str, Any]:
    """Reads what :func:`save_backbone_variables` (or the CLI) wrote.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of numpy arrays.
    """
    with np.load(path, allow_pickle=False) as npz:
        flat = {k: npz[k] for k in npz.files}
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def merge_backbone(variables: Mapping[str, Any], backbone: Mapping[str, Any]) -> dict[str, Any]:
    """Replaces the model's ``backbone`` subtrees with imported ones.

    Args:
      variables: the DeepLabV3+ model's variables (``params`` and ``batch_stats``).
      backbone: imported backbone variables (``params`` and ``batch_stats``).

    Returns:
      A new variables dict; the imported arrays keep their values and take the dtype of the
      leaves they replace.

    Raises:
      ValueError: naming the first backbone variable whose path or shape differs.
    """
    out = flax.core.unfreeze(variables)
    for collection in ("params", "batch_stats"):
        target = flax.traverse_util.flatten_dict(out[collection]["backbone"])
        source = flax.traverse_util.flatten_dict(dict(backbone[collection]))
        for path in target.keys() | source.keys():
            name = f"{collection}/backbone/{'/'.join(path)}"
            if path not in source:
                raise ValueError(f"imported backbone lacks {name}")
            if path not in target:
                raise ValueError(f"imported backbone has {name}, which the model lacks")
            if tuple(source[path].shape) != tuple(target[path].shape):
                raise ValueError(
                    f"{name}: imported shape {tuple(source[path].shape)}, model expects "
                    f"{tuple(target[path].shape)}"
                )
        merged = {p: jnp.asarray(source[p], dtype=target[p].dtype) for p in target}
        out[collection]["backbone"] = flax.traverse_util.unflatten_dict(merged)
    return out
