"""Tests for jaxscaleseg.models.weights_cache: ``model.pretrained = "torchvision:<arch>"``.

End to end against a local HTTP server on 127.0.0.1 serving a generated torch-format checkpoint
(written without torch by ``models_fixtures.torch_zip_checkpoint``) under torchvision's naming
convention ``<arch>-<first 8 hex digits of its SHA-256>.pth``: download, cache hit without a
second request, a wrong hash refused, an unreachable server refused in one line. The official
names are pinned separately; the generated file cannot carry their hash digits.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import re
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import jax
import numpy as np
import pytest
from models_fixtures import random_state_dict, torch_zip_checkpoint

from jaxscaleseg import config_schema, initial_state
from jaxscaleseg.models import pretrained
from jaxscaleseg.models import weights_cache as W

ARCH = "mobilenet_v2"  # the smallest of the three (14 MB as a checkpoint)


@functools.cache
def _checkpoint() -> tuple[dict[str, np.ndarray], bytes, str]:
    """``(state dict, its torch.save bytes, the file name torchvision would give it)``."""
    sd = random_state_dict(ARCH, seed=3)
    raw = torch_zip_checkpoint(sd)
    return sd, raw, f"{ARCH}-{hashlib.sha256(raw).hexdigest()[:8]}.pth"


class _Server:
    """``http.server`` on 127.0.0.1 in a thread, serving ``files`` and counting requests."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/models/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh cache, proxies bypassed for the loopback server, the generated file's name
    standing in for the official one; yields a function that starts a server."""
    _, _, name = _checkpoint()
    monkeypatch.setitem(W.OFFICIAL_FILES, ARCH, {"IMAGENET1K_V1": name})
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    servers = []

    def serve(files):
        server = _Server(files)
        servers.append(server)
        monkeypatch.setenv(W.BASE_URL_ENV, server.url)
        return server

    yield serve
    for server in servers:
        server.close()


def _assert_equal_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_official_names():
    # torchvision/models/resnet.py and mobilenetv2.py, ``IMAGENET1K_V1`` / ``IMAGENET1K_V2``.
    assert W.OFFICIAL_FILES == {
        "resnet50": {
            "IMAGENET1K_V1": "resnet50-0676ba61.pth",
            "IMAGENET1K_V2": "resnet50-11ad3fa6.pth",
        },
        "resnet101": {
            "IMAGENET1K_V1": "resnet101-63fe2227.pth",
            "IMAGENET1K_V2": "resnet101-cd907fc2.pth",
        },
        "mobilenet_v2": {
            "IMAGENET1K_V1": "mobilenet_v2-b0353104.pth",
            "IMAGENET1K_V2": "mobilenet_v2-7ebf99e0.pth",
        },
    }
    assert set(W.OFFICIAL_FILES) == set(pretrained.ARCHS)
    assert W.OFFICIAL_BASE_URL == "https://download.pytorch.org/models/"


def test_parse():
    spec = W.parse("torchvision:resnet101")
    assert (spec.arch, spec.weights, spec.file_name) == (
        "resnet101",
        "IMAGENET1K_V1",
        "resnet101-63fe2227.pth",
    )
    assert spec.sha256_prefix == "63fe2227"
    assert W.parse("torchvision:mobilenet_v2:IMAGENET1K_V2").sha256_prefix == "7ebf99e0"
    with pytest.raises(W.WeightsError, match=r"unknown architecture 'resnet18'; known: resnet50"):
        W.parse("torchvision:resnet18")
    with pytest.raises(W.WeightsError, match=r"unknown weights 'V3' for resnet50"):
        W.parse("torchvision:resnet50:V3")


def test_download_then_cache_hit_then_offline(env, tmp_path):
    sd, raw, name = _checkpoint()
    server = env({name: raw})
    expected = pretrained.convert_state_dict(sd, ARCH)

    first = W.load_backbone(f"torchvision:{ARCH}", arch=ARCH)
    _assert_equal_trees(first, expected)
    assert server.requests == [f"/models/{name}"]
    cached = tmp_path / "cache" / "torchvision" / name
    assert cached.read_bytes() == raw
    assert sorted(p.name for p in cached.parent.iterdir()) == [name]  # no partial file left

    second = W.load_backbone(f"torchvision:{ARCH}", arch=ARCH)
    _assert_equal_trees(second, expected)
    assert len(server.requests) == 1  # the cache answered, no second request

    server.close()
    W.prefetch(f"torchvision:{ARCH}", arch=ARCH)  # works with the server gone


def test_wrong_hash_is_refused(env, tmp_path):
    _, raw, name = _checkpoint()
    env({name: raw[:-1] + bytes([raw[-1] ^ 1])})  # one bit differs
    with pytest.raises(W.WeightsError, match=rf"SHA-256 .* does not start with {name[-12:-4]}"):
        W.load_backbone(f"torchvision:{ARCH}", arch=ARCH)
    folder = tmp_path / "cache" / "torchvision"
    assert list(folder.iterdir()) == []  # nothing kept under the official name or as a part

    folder.joinpath(name).write_bytes(b"not the checkpoint")  # a wrong file put by hand
    with pytest.raises(W.WeightsError, match=rf"cached {re.escape(str(folder / name))}: SHA"):
        W.load_backbone(f"torchvision:{ARCH}", arch=ARCH)


@pytest.mark.parametrize("how", ["server down", "not found"])
def test_unreachable_is_refused_in_one_line(env, tmp_path, how):
    _, _, name = _checkpoint()
    server = env({})
    if how == "server down":
        server.close()
    with pytest.raises(W.WeightsError) as info:
        W.load_backbone(f"torchvision:{ARCH}", arch=ARCH)
    message = str(info.value)
    assert "\n" not in message
    dest = tmp_path / "cache" / "torchvision" / name
    assert message.startswith(f"cannot download {server.url}{name} (")
    assert message.endswith(f"put it at {dest}")
    # The reason in brackets (the URL's port may itself hold "404").
    assert ("(HTTP 404 " in message) == (how == "not found"), message
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_an_http_error_closes_its_connection(env, monkeypatch):
    """An HTTP error holds the server's answer (its socket, for a real one): the refusal closes
    it rather than leave it to the garbage collector (Python 3.13 warned of the socket)."""
    env({})
    answer = io.BytesIO(b"Not Found")

    def refuse(url, timeout):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, answer)

    monkeypatch.setattr(W.urllib.request, "urlopen", refuse)
    with pytest.raises(W.WeightsError, match=r"\(HTTP 404 Not Found\)") as info:
        W.load_backbone(f"torchvision:{ARCH}", arch=ARCH)
    # Closed by the refusal, while the error (the message's cause) is still alive.
    assert isinstance(info.value.__cause__, urllib.error.HTTPError)
    assert answer.closed


def test_training_uses_torchvision_weights(env, tmp_path):
    sd, raw, name = _checkpoint()
    server = env({name: raw})
    config = config_schema.base_config()
    config.model.backbone = ARCH
    config.model.pretrained = f"torchvision:{ARCH}"
    config.dataset.num_classes = 3
    initial_state.pretrained_backbone(config, fetch_only=True)  # what train_and_evaluate does first
    backbone = initial_state.pretrained_backbone(config)  # and then, converted, into the init
    init = functools.partial(initial_state.create_train_state, config, image_shape=(1, 32, 32, 3))
    state = jax.jit(init)(jax.random.key(0), backbone=backbone)
    expected = pretrained.convert_state_dict(sd, ARCH)
    _assert_equal_trees(jax.device_get(state.params["backbone"]), expected["params"])
    _assert_equal_trees(jax.device_get(state.batch_stats["backbone"]), expected["batch_stats"])
    assert len(server.requests) == 1

    config.model.backbone = "resnet50"
    with pytest.raises(config_schema.ConfigError, match="holds a mobilenet_v2 but model.backbone"):
        initial_state.pretrained_backbone(config)
    config.model.pretrained = str(tmp_path / "missing.npz")
    with pytest.raises(config_schema.ConfigError, match=r"model.pretrained: no such file .*"):
        initial_state.pretrained_backbone(config, fetch_only=True)


def test_train_cli_offline_is_one_line(env, tmp_path):
    """``python -m jaxscaleseg.train`` with the server down: exit 1, one line naming the file
    (the official name: the fixture's stand-in name lives only in this process)."""
    name = "mobilenet_v2-b0353104.pth"
    server = env({})
    server.close()
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxscaleseg.train", "--workdir", str(tmp_path / "w"),
         "--config", str(repo / "configs" / "synthetic.py") + ":smoke",
         "--config.model.backbone=mobilenet_v2", f"--config.model.pretrained=torchvision:{ARCH}"],
        cwd=repo, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert lines[-1].startswith(f"error: model.pretrained: cannot download {server.url}{name}")
    assert lines[-1].endswith(f"put it at {tmp_path / 'cache' / 'torchvision' / name}")
    assert all(line.startswith("downloading ") for line in lines[:-1]), proc.stderr
