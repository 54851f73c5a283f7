"""ImageNet backbones named in a config: fetched once, hash-checked, converted without torch.

``model.pretrained`` takes either a path or a torchvision name:

* ``"torchvision:resnet50"``, ``"torchvision:resnet101"``, ``"torchvision:mobilenet_v2"``: the
  official torchvision checkpoint ``IMAGENET1K_V1`` (what torchvision's ``pretrained=True``
  loads, and so what the original ESSNet code starts from); ``"torchvision:resnet50:IMAGENET1K_V2"``
  names the newer recipe's weights. The file is downloaded once into the cache directory
  (``$JAXSCALESEG_CACHE`` or ``~/.cache/jaxscaleseg``, subfolder ``torchvision``) under its
  official name, its SHA-256 is checked against the hex digits torchvision puts in that name
  (the check torchvision itself does), and it is converted on every start by the torch-free
  reader of :mod:`jaxscaleseg.models.pretrained`. No torch is needed at any point.
* anything else: a path to backbone variables already converted by
  ``python -m jaxscaleseg.convert_weights`` (``.npz``).

The download comes from ``https://download.pytorch.org/models/`` unless ``$JAXSCALESEG_WEIGHTS_URL``
(or the ``base_url`` argument) names another base URL, e.g. a local mirror. On a machine without
network the error says, in one line, which file to put where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxscaleseg.models import pretrained

PREFIX = "torchvision:"
DEFAULT_WEIGHTS = "IMAGENET1K_V1"
OFFICIAL_BASE_URL = "https://download.pytorch.org/models/"
BASE_URL_ENV = "JAXSCALESEG_WEIGHTS_URL"
CACHE_ENV = "JAXSCALESEG_CACHE"
DEFAULT_CACHE = "~/.cache/jaxscaleseg"

# torchvision's official ImageNet checkpoints (torchvision/models/resnet.py and mobilenetv2.py,
# ``<Arch>_Weights.IMAGENET1K_V1/V2``). The hex digits in each name are the first digits of the
# file's SHA-256.
OFFICIAL_FILES: dict[str, dict[str, str]] = {
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

_CHUNK = 1 << 20


class WeightsError(ValueError):
    """Pretrained weights cannot be named, fetched or verified; the message is one line."""


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights:
    """One official torchvision checkpoint.

    Attributes:
      arch: ``resnet50``, ``resnet101`` or ``mobilenet_v2``.
      weights: ``IMAGENET1K_V1`` or ``IMAGENET1K_V2``.
      file_name: the official file name, e.g. ``resnet101-63fe2227.pth``.
    """

    arch: str
    weights: str
    file_name: str

    @property
    def sha256_prefix(self) -> str:
        """The hex digits after the last ``-`` of the file name (torchvision's convention)."""
        return self.file_name.rsplit("-", 1)[-1].split(".", 1)[0]


def is_torchvision_name(value: str) -> bool:
    """Whether a ``model.pretrained`` value names torchvision weights (``torchvision:...``)."""
    return str(value).startswith(PREFIX)


def parse(value: str, files: Mapping[str, Mapping[str, str]] | None = None) -> TorchvisionWeights:
    """Reads ``torchvision:<arch>[:<weights>]``.

    Args:
      value: e.g. ``"torchvision:resnet101"`` or ``"torchvision:mobilenet_v2:IMAGENET1K_V2"``.
      files: the table of official names (default :data:`OFFICIAL_FILES`).

    Returns:
      The checkpoint it names.

    Raises:
      WeightsError: naming the unknown architecture or weights and the known ones.
    """
    files = OFFICIAL_FILES if files is None else files
    if not is_torchvision_name(value):
        raise WeightsError(f"{value!r} does not start with {PREFIX!r}")
    arch, _, weights = value[len(PREFIX) :].partition(":")
    weights = weights or DEFAULT_WEIGHTS
    if arch not in files:
        raise WeightsError(f"{value}: unknown architecture {arch!r}; known: {', '.join(files)}")
    if weights not in files[arch]:
        known = ", ".join(files[arch])
        raise WeightsError(f"{value}: unknown weights {weights!r} for {arch}; known: {known}")
    return TorchvisionWeights(arch, weights, files[arch][weights])


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where downloaded checkpoints live: ``explicit``, else ``$JAXSCALESEG_CACHE``, else
    ``~/.cache/jaxscaleseg``; the files go into its ``torchvision`` subfolder."""
    root = explicit or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(os.path.expanduser(str(root))) / "torchvision"


def base_url(explicit: str | None = None) -> str:
    """The download base: ``explicit``, else ``$JAXSCALESEG_WEIGHTS_URL``, else torchvision's."""
    url = explicit or os.environ.get(BASE_URL_ENV) or OFFICIAL_BASE_URL
    return url if url.endswith("/") else url + "/"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(path: Path, digest: str, spec: TorchvisionWeights, origin: str) -> None:
    if not digest.startswith(spec.sha256_prefix):
        raise WeightsError(
            f"{origin}: SHA-256 {digest[:16]}... does not start with {spec.sha256_prefix} (the "
            f"digits in the official name {spec.file_name}); refusing it"
        )


def fetch(
    spec: TorchvisionWeights,
    *,
    cache: str | os.PathLike | None = None,
    url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """The checked local copy of an official checkpoint, downloading it if it is not cached.

    A cached file is used without any network access (its hash is checked each time). A
    download goes to a temporary file beside the destination, is hashed as it arrives and is
    renamed into place only when its hash matches, so an interrupted or wrong download never
    leaves a file under the official name.

    Args:
      spec: the checkpoint (:func:`parse`).
      cache: cache root (see :func:`cache_dir`).
      url: download base URL (see :func:`base_url`).
      timeout: seconds to wait for the server before giving up.

    Returns:
      ``<cache>/torchvision/<official file name>``.

    Raises:
      WeightsError: the download failed (no network, server error) — the message names the
        URL and where to put the file by hand — or the file's hash is wrong.
    """
    dest = cache_dir(cache) / spec.file_name
    if dest.is_file():
        _check_hash(dest, sha256_of(dest), spec, f"cached {dest}")
        return dest
    source = base_url(url) + spec.file_name
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    print(f"downloading {source} to {dest}", file=sys.stderr, flush=True)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response, open(part, "wb") as f:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                f.write(chunk)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, refused connections
        part.unlink(missing_ok=True)
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
            e.close()  # it holds the server's answer, and with it the connection
        else:
            reason = getattr(e, "reason", None) or e
        raise WeightsError(
            f"cannot download {source} ({reason}); without network, fetch that file elsewhere "
            f"and put it at {dest}"
        ) from e
    try:
        _check_hash(part, digest.hexdigest(), spec, f"downloaded {source}")
    except WeightsError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _spec_for(value: str, arch: str) -> TorchvisionWeights:
    spec = parse(value)
    if spec.arch != arch:
        raise WeightsError(f"{value} holds a {spec.arch} but model.backbone is {arch}")
    return spec


def load_backbone(
    value: str,
    *,
    arch: str,
    cache: str | os.PathLike | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """Backbone variables for a ``model.pretrained`` value (a torchvision name or a path).

    Args:
      value: ``torchvision:<arch>[:<weights>]`` or the path of converted variables (``.npz``).
      arch: the config's backbone; a torchvision name must name the same architecture.
      cache: cache root for torchvision names (see :func:`cache_dir`).
      url: download base URL for torchvision names (see :func:`base_url`).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` of float32 numpy arrays, as
      :func:`jaxscaleseg.models.pretrained.merge_backbone` expects.

    Raises:
      WeightsError: one line naming the value and what is wrong (unknown name, other
        architecture, missing file, failed download, wrong hash, unreadable checkpoint).
    """
    if is_torchvision_name(value):
        spec = _spec_for(value, arch)
        path = fetch(spec, cache=cache, url=url)
        try:
            return pretrained.import_torchvision_backbone(path, spec.arch)
        except (ValueError, OSError) as e:
            raise WeightsError(f"{path}: {e}") from e
    path = Path(os.path.expanduser(value))
    if not path.is_file():
        raise WeightsError(
            f"no such file {value}; name official weights instead (e.g. "
            f"'{PREFIX}{arch}'), convert a checkpoint with `python -m "
            f"jaxscaleseg.convert_weights --arch {arch} --input {arch}.pth --output {value}`, "
            "or pass --config.model.pretrained='' to train from scratch"
        )
    return pretrained.load_backbone_variables(path)


def prefetch(
    value: str,
    *,
    arch: str,
    cache: str | os.PathLike | None = None,
    url: str | None = None,
) -> None:
    """Checks a ``model.pretrained`` value before any other work: downloads and verifies a
    torchvision checkpoint, or checks that a path exists (raises :class:`WeightsError`)."""
    if is_torchvision_name(value):
        fetch(_spec_for(value, arch), cache=cache, url=url)
    elif not Path(os.path.expanduser(value)).is_file():
        load_backbone(value, arch=arch)  # raises the missing-file message
