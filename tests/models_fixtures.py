"""Helpers for tests/test_models.py and tests/test_pretrained.py (no torch needed).

``torchvision_state_dict_spec`` re-derives torchvision's state-dict keys and shapes from the
architectures' definitions (independently of the importer's own name mapping);
tests/test_pretrained.py checks it against torchvision itself when torch is installed.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
MOBILENET_V2_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# torchvision's documented parameter counts (weights + biases, no buffers) of the full models.
TORCHVISION_NUM_PARAMS = {
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "mobilenet_v2": 3_504_872,
}


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def torchvision_state_dict_spec(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """``[(key, shape)]`` of torchvision's full ``arch`` state dict, in its order."""
    spec: list[tuple[str, tuple[int, ...]]] = []
    if arch in RESNET_BLOCKS:
        spec += [("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64)]
        inplanes = 64
        for stage, blocks in enumerate(RESNET_BLOCKS[arch]):
            planes = 64 * 2**stage
            for b in range(blocks):
                p = f"layer{stage + 1}.{b}"
                spec += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1)), *_bn(f"{p}.bn1", planes)]
                spec += [(f"{p}.conv2.weight", (planes, planes, 3, 3)), *_bn(f"{p}.bn2", planes)]
                spec += [
                    (f"{p}.conv3.weight", (4 * planes, planes, 1, 1)),
                    *_bn(f"{p}.bn3", 4 * planes),
                ]
                if b == 0:
                    spec += [
                        (f"{p}.downsample.0.weight", (4 * planes, inplanes, 1, 1)),
                        *_bn(f"{p}.downsample.1", 4 * planes),
                    ]
                inplanes = 4 * planes
        return spec + [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    if arch == "mobilenet_v2":
        spec += [("features.0.0.weight", (32, 3, 3, 3)), *_bn("features.0.1", 32)]
        cin, i = 32, 1
        for t, c, n, _ in MOBILENET_V2_SETTING:
            for _ in range(n):
                hid, p = cin * t, f"features.{i}.conv"
                if t == 1:
                    spec += [(f"{p}.0.0.weight", (hid, 1, 3, 3)), *_bn(f"{p}.0.1", hid)]
                    spec += [(f"{p}.1.weight", (c, hid, 1, 1)), *_bn(f"{p}.2", c)]
                else:
                    spec += [(f"{p}.0.0.weight", (hid, cin, 1, 1)), *_bn(f"{p}.0.1", hid)]
                    spec += [(f"{p}.1.0.weight", (hid, 1, 3, 3)), *_bn(f"{p}.1.1", hid)]
                    spec += [(f"{p}.2.weight", (c, hid, 1, 1)), *_bn(f"{p}.3", c)]
                cin, i = c, i + 1
        spec += [("features.18.0.weight", (1280, 320, 1, 1)), *_bn("features.18.1", 1280)]
        return spec + [("classifier.1.weight", (1000, 1280)), ("classifier.1.bias", (1000,))]
    raise ValueError(arch)


def random_state_dict(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision-format state dict with random values (running_var positive)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in torchvision_state_dict_spec(arch):
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(int(rng.integers(1, 1000)), dtype=np.int64)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            out[key] = rng.standard_normal(shape).astype(np.float32)
    return out


def write_safetensors(path: Path, state_dict: dict[str, np.ndarray]) -> None:
    """Writes a .safetensors file (the format's spec: u64 header size, JSON header, data)."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16"}
    header, chunks, offset = {}, [], 0
    for key, value in state_dict.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[key] = {
            "dtype": names[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


# Written by torch 2.14.1 with (``legacy`` = ``_use_new_zipfile_serialization=False``):
#   base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8
#   sd = OrderedDict([("a.weight", base), ("a.bias", base.t()), ("b.weight", base[1, 1:]),
#                     ("c.half", torch.tensor([1.5, -2.25], dtype=torch.float16)),
#                     ("c.bf16", torch.tensor([0.5, 3.0], dtype=torch.bfloat16)),
#                     ("c.num_batches_tracked", torch.tensor(7))])
#   torch.save(sd, f)
# Views share base's storage, so reading them exercises storage offsets and strides.
SMALL_PTH_ZIP_B64 = (
    "UEsDBAAACAgAAAAAAAAAAAAAAAAAAAAAAAAQABIAYXJjaGl2ZS9kYXRhLnBrbEZCDgBaWlpaWlpaWlpaWlpaWoACY2Nv"
    "bGxlY3Rpb25zCk9yZGVyZWREaWN0CnEAKVJxAShYCAAAAGEud2VpZ2h0cQJjdG9yY2guX3V0aWxzCl9yZWJ1aWxkX3Rl"
    "bnNvcl92MgpxAygoWAcAAABzdG9yYWdlcQRjdG9yY2gKRmxvYXRTdG9yYWdlCnEFWAEAAAAwcQZYAwAAAGNwdXEHSwx0"
    "cQhRSwBLA0sEhnEJSwRLAYZxColoAClScQt0cQxScQ1YBgAAAGEuYmlhc3EOaAMoKGgEaAVoBmgHSwx0cQ9RSwBLBEsD"
    "hnEQSwFLBIZxEYloAClScRJ0cRNScRRYCAAAAGIud2VpZ2h0cRVoAygoaARoBWgGaAdLDHRxFlFLBUsDhXEXSwGFcRiJ"
    "aAApUnEZdHEaUnEbWAYAAABjLmhhbGZxHGgDKChoBGN0b3JjaApIYWxmU3RvcmFnZQpxHVgBAAAAMXEeaAdLAnRxH1FL"
    "AEsChXEgSwGFcSGJaAApUnEidHEjUnEkWAYAAABjLmJmMTZxJWgDKChoBGN0b3JjaApCRmxvYXQxNlN0b3JhZ2UKcSZY"
    "AQAAADJxJ2gHSwJ0cShRSwBLAoVxKUsBhXEqiWgAKVJxK3RxLFJxLVgVAAAAYy5udW1fYmF0Y2hlc190cmFja2VkcS5o"
    "AygoaARjdG9yY2gKTG9uZ1N0b3JhZ2UKcS9YAQAAADNxMGgHSwF0cTFRSwApKYloAClScTJ0cTNScTR1LlBLBwgul0vz"
    "JQIAACUCAABQSwMEAAAICAAAAAAAAAAAAAAAAAAAAAAAABcAFgBhcmNoaXZlLy5mb3JtYXRfdmVyc2lvbkZCEgBaWlpa"
    "WlpaWlpaWlpaWlpaWloxUEsHCLfv3IMBAAAAAQAAAFBLAwQAAAgIAAAAAAAAAAAAAAAAAAAAAAAAGgA3AGFyY2hpdmUv"
    "LnN0b3JhZ2VfYWxpZ25tZW50RkIzAFpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWjY0UEsHCD93cekCAAAAAgAAAFBLAwQAAAgIAAAAAAAAAAAAAAAAAAAAAAAAEQA/AGFyY2hpdmUvYnl0ZW9yZGVy"
    "RkI7AFpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpabGl0dGxl"
    "UEsHCIU94xkGAAAABgAAAFBLAwQAAAgIAAAAAAAAAAAAAAAAAAAAAAAADgA+AGFyY2hpdmUvZGF0YS8wRkI6AFpaWlpa"
    "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWloAAAAAAAAAPgAAgD4AAMA+"
    "AAAAPwAAID8AAEA/AABgPwAAgD8AAJA/AACgPwAAsD9QSwcIbzFgdTAAAAAwAAAAUEsDBAAACAgAAAAAAAAAAAAAAAAA"
    "AAAAAAAOABQAYXJjaGl2ZS9kYXRhLzFGQhAAWlpaWlpaWlpaWlpaWlpaWgA+gMBQSwcIfU1WrwQAAAAEAAAAUEsDBAAA"
    "CAgAAAAAAAAAAAAAAAAAAAAAAAAOAEAAYXJjaGl2ZS9kYXRhLzJGQjwAWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaAD9AQFBLBwgkc9aIBAAAAAQAAABQSwMEAAAICAAAAAAAAAAA"
    "AAAAAAAAAAAAAA4AQABhcmNoaXZlL2RhdGEvM0ZCPABaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWlpaWlpaWlpaWlpaWlpaWlpaWloHAAAAAAAAAFBLBwhw1udvCAAAAAgAAABQSwMEAAAICAAAAAAAAAAAAAAAAAAA"
    "AAAAAA8AOwBhcmNoaXZlL3ZlcnNpb25GQjcAWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaWlpaWlpaWlpaWjMKUEsHCNGeZ1UCAAAAAgAAAFBLAwQAAAgIAAAAAAAAAAAAAAAAAAAAAAAAHgAyAGFyY2hpdmUv"
    "LmRhdGEvc2VyaWFsaXphdGlvbl9pZEZCLgBaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpa"
    "WlpaMTA3Nzg2MjcyOTc5OTg1NDE2MjUxMTY2Njg5NjkwMDM0NjA3NTczMlBLBwik0CHvKAAAACgAAABQSwECAAAAAAgI"
    "AAAAAAAALpdL8yUCAAAlAgAAEAAAAAAAAAAAAAAAAAAAAAAAYXJjaGl2ZS9kYXRhLnBrbFBLAQIAAAAACAgAAAAAAAC3"
    "79yDAQAAAAEAAAAXAAAAAAAAAAAAAAAAAHUCAABhcmNoaXZlLy5mb3JtYXRfdmVyc2lvblBLAQIAAAAACAgAAAAAAAA/"
    "d3HpAgAAAAIAAAAaAAAAAAAAAAAAAAAAANECAABhcmNoaXZlLy5zdG9yYWdlX2FsaWdubWVudFBLAQIAAAAACAgAAAAA"
    "AACFPeMZBgAAAAYAAAARAAAAAAAAAAAAAAAAAFIDAABhcmNoaXZlL2J5dGVvcmRlclBLAQIAAAAACAgAAAAAAABvMWB1"
    "MAAAADAAAAAOAAAAAAAAAAAAAAAAANYDAABhcmNoaXZlL2RhdGEvMFBLAQIAAAAACAgAAAAAAAB9TVavBAAAAAQAAAAO"
    "AAAAAAAAAAAAAAAAAIAEAABhcmNoaXZlL2RhdGEvMVBLAQIAAAAACAgAAAAAAAAkc9aIBAAAAAQAAAAOAAAAAAAAAAAA"
    "AAAAANQEAABhcmNoaXZlL2RhdGEvMlBLAQIAAAAACAgAAAAAAABw1udvCAAAAAgAAAAOAAAAAAAAAAAAAAAAAFQFAABh"
    "cmNoaXZlL2RhdGEvM1BLAQIAAAAACAgAAAAAAADRnmdVAgAAAAIAAAAPAAAAAAAAAAAAAAAAANgFAABhcmNoaXZlL3Zl"
    "cnNpb25QSwECAAAAAAgIAAAAAAAApNAh7ygAAAAoAAAAHgAAAAAAAAAAAAAAAABSBgAAYXJjaGl2ZS8uZGF0YS9zZXJp"
    "YWxpemF0aW9uX2lkUEsGBiwAAAAAAAAAHgMtAAAAAAAAAAAACgAAAAAAAAAKAAAAAAAAAIMCAAAAAAAA+AYAAAAAAABQ"
    "SwYHAAAAAHsJAAAAAAAAAQAAAFBLBQYAAAAACgAKAIMCAAD4BgAAAAA="
)

SMALL_PTH_LEGACY_B64 = (
    "gAKKCmz8nEb5IGqoUBkugAJN6QMugAJ9cQAoWBAAAABwcm90b2NvbF92ZXJzaW9ucQFN6QNYDQAAAGxpdHRsZV9lbmRp"
    "YW5xAohYCgAAAHR5cGVfc2l6ZXNxA31xBChYBQAAAHNob3J0cQVLAlgDAAAAaW50cQZLBFgEAAAAbG9uZ3EHSwR1dS6A"
    "AmNjb2xsZWN0aW9ucwpPcmRlcmVkRGljdApxAClScQEoWAgAAABhLndlaWdodHECY3RvcmNoLl91dGlscwpfcmVidWls"
    "ZF90ZW5zb3JfdjIKcQMoKFgHAAAAc3RvcmFnZXEEY3RvcmNoCkZsb2F0U3RvcmFnZQpxBVgOAAAAOTQzMTkwNDg0NDc2"
    "MzJxBlgDAAAAY3B1cQdLDE50cQhRSwBLA0sEhnEJSwRLAYZxColoAClScQt0cQxScQ1YBgAAAGEuYmlhc3EOaAMoKGgE"
    "aAVYDgAAADk0MzE5MDQ4NDQ3NjMycQ9oB0sMTnRxEFFLAEsESwOGcRFLAUsEhnESiWgAKVJxE3RxFFJxFVgIAAAAYi53"
    "ZWlnaHRxFmgDKChoBGgFWA4AAAA5NDMxOTA0ODQ0NzYzMnEXaAdLDE50cRhRSwVLA4VxGUsBhXEaiWgAKVJxG3RxHFJx"
    "HVgGAAAAYy5oYWxmcR5oAygoaARjdG9yY2gKSGFsZlN0b3JhZ2UKcR9YDgAAADk0MzE5MTY0MTAyODE2cSBoB0sCTnRx"
    "IVFLAEsChXEiSwGFcSOJaAApUnEkdHElUnEmWAYAAABjLmJmMTZxJ2gDKChoBGN0b3JjaApCRmxvYXQxNlN0b3JhZ2UK"
    "cShYDgAAADk0MzE5MDQ4NDUwOTc2cSloB0sCTnRxKlFLAEsChXErSwGFcSyJaAApUnEtdHEuUnEvWBUAAABjLm51bV9i"
    "YXRjaGVzX3RyYWNrZWRxMGgDKChoBGN0b3JjaApMb25nU3RvcmFnZQpxMVgOAAAAOTQzMTkwNDkxOTc3NzZxMmgHSwFO"
    "dHEzUUsAKSmJaAApUnE0dHE1UnE2dS6AAl1xAChYDgAAADk0MzE5MDQ4NDQ3NjMycQFYDgAAADk0MzE5MDQ4NDUwOTc2"
    "cQJYDgAAADk0MzE5MDQ5MTk3Nzc2cQNYDgAAADk0MzE5MTY0MTAyODE2cQRlLgwAAAAAAAAAAAAAAAAAAD4AAIA+AADA"
    "PgAAAD8AACA/AABAPwAAYD8AAIA/AACQPwAAoD8AALA/AgAAAAAAAAAAP0BAAQAAAAAAAAAHAAAAAAAAAAIAAAAAAAAA"
    "AD6AwA=="
)


def small_pth(legacy: bool) -> bytes:
    """The bytes of the small torch.save file above."""
    return base64.b64decode(SMALL_PTH_LEGACY_B64 if legacy else SMALL_PTH_ZIP_B64)


def small_pth_expected() -> dict[str, np.ndarray]:
    """What reading :func:`small_pth` must give."""
    base = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    return {
        "a.weight": base,
        "a.bias": base.T,
        "b.weight": base[1, 1:],
        "c.half": np.array([1.5, -2.25], np.float16),
        "c.bf16": np.array([0.5, 3.0], np.float32),
        "c.num_batches_tracked": np.array(7, np.int64),
    }


def random_variables(shapes, seed: int = 0):
    """Real variables with the structure of ``shapes`` (from ``jax.eval_shape(model.init, ..)``),
    filled with numpy random values, so tests skip compiling ``model.init``.

    Kernels get He-normal values, BatchNorm scales 1 and biases/means 0, variances 1, and the
    class table uniform values in [-1, 1].
    """
    import flax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            value = rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)
        elif leaf in ("scale", "var"):
            value = np.ones(s.shape)
        elif leaf == "class_embedding":
            value = rng.uniform(-1.0, 1.0, s.shape)
        else:
            value = np.zeros(s.shape)
        return jnp.asarray(value, dtype=s.dtype)

    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
    return flax.traverse_util.unflatten_dict({p: fill(p, s) for p, s in flat.items()})


_TORCH_STORAGES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
}


def torch_zip_checkpoint(state_dict: dict[str, np.ndarray]) -> bytes:
    """The bytes ``torch.save(state_dict, f)`` writes (zip format), made without torch.

    The pickle is written opcode by opcode (protocol 2): an ``OrderedDict`` of
    ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`` with one
    storage per tensor, each a persistent id ``("storage", torch.<Type>Storage, key, "cpu",
    numel)`` whose little-endian bytes are ``archive/data/<key>``.
    """

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"X" + struct.pack("<I", len(raw)) + raw

    def integer(i: int) -> bytes:
        return b"J" + struct.pack("<i", int(i))

    def tup(items) -> bytes:
        return b"(" + b"".join(items) + b"t"

    def glob(module: str, name: str) -> bytes:
        return b"c" + f"{module}\n{name}\n".encode()

    ordered_dict = glob("collections", "OrderedDict") + b")R"
    pkl = [b"\x80\x02", ordered_dict, b"("]
    storages = {}
    for i, (key, value) in enumerate(state_dict.items()):
        value = np.array(value, order="C")  # (ascontiguousarray would make scalars 1-D)
        storages[str(i)] = value.astype(value.dtype.newbyteorder("<")).tobytes()
        strides = [s // value.itemsize for s in value.strides]
        pid = tup([text("storage"), glob("torch", _TORCH_STORAGES[value.dtype]), text(str(i)),
                   text("cpu"), integer(value.size)]) + b"Q"  # fmt: skip
        args = tup([pid, integer(0), tup(map(integer, value.shape)), tup(map(integer, strides)),
                    b"\x89", ordered_dict])  # fmt: skip
        pkl += [text(key), glob("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    pkl += [b"u", b"."]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", b"".join(pkl))
        zf.writestr("archive/byteorder", b"little")
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", b"3\n")
    return out.getvalue()
