"""What every segmentation builder shares: features, archive access, corrupt-example policy.

Record format (every builder, every config)::

    image:     tfds.features.Image(shape=(None, None, 3), dtype=uint8)  # the archive's own
               JPEG/PNG bytes (re-encoded as PNG only when not RGB, e.g. a grey JPEG)
    label:     tfds.features.Tensor(shape=(None, None), dtype=uint16, encoding=ZLIB)
               # train ids 0..C-1, void = STORED_VOID (65535)
    file_name: tfds.features.Text()  # the image's path inside its archive

The label is a zlib-compressed tensor rather than a 16-bit PNG because TFDS decodes PNG images
without TensorFlow through PIL, which refuses 16-bit images; the tensor decodes with numpy alone.
Class names and colours are in ``builder.info.metadata["class_names"]`` / ``["palette"]``.

Corrupt examples: an image or label that cannot be read or decoded, or whose sizes disagree, is
skipped, logged with its name in the archive and counted; at the end of each split a summary is
logged, and the build stops with :class:`CorruptDataError` listing the names if more than
``max_corrupt_fraction`` (default 1 %) of the split's examples were skipped. A missing archive
raises :class:`FileNotFoundError` and an unreadable one :class:`CorruptArchiveError`, both naming
the file and the directory searched.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tensorflow_datasets as tfds

from jaxscaleseg.data import image_classes
from jaxscaleseg.labels import STORED_VOID

DEFAULT_MAX_CORRUPT_FRACTION = 0.01

log = logging.getLogger(__name__)


class CorruptArchiveError(ValueError):
    """An archive in the manual directory cannot be opened or read."""


class CorruptExampleError(ValueError):
    """One example's image or label cannot be read; the builder skips and counts it."""


class CorruptDataError(ValueError):
    """Too many examples of a split were corrupt; the build stops."""


def segmentation_features() -> tfds.features.FeaturesDict:
    """The features every segmentation builder stores (see the module docstring)."""
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            "label": tfds.features.Tensor(
                shape=(None, None), dtype=np.uint16, encoding=tfds.features.Encoding.ZLIB
            ),
            "file_name": tfds.features.Text(),
        }
    )


# ---------------------------------------------------------------------------------------------
# Locating and reading archives.


def manual_dir_of(dl_manager, dataset: str, needed: str) -> Path:
    """The manual directory, or a FileNotFoundError naming what the dataset needs.

    Args:
      dl_manager: the TFDS download manager.
      dataset: builder name, for the message.
      needed: the archive(s) the dataset needs, for the message.
    """
    try:
        return Path(dl_manager.manual_dir)
    except AssertionError:
        where = getattr(dl_manager, "_manual_dir", None)
        raise FileNotFoundError(
            f"{dataset} needs {needed}; the manual directory {where} does not exist or is empty"
        ) from None


def find_archive(
    manual_dir: Path, names: Sequence[str], *, dataset: str, source: str, required: bool = True
) -> Path | None:
    """Returns the first of ``names`` present in ``manual_dir``.

    Args:
      manual_dir: directory searched.
      names: accepted file names, preferred first.
      dataset: builder name, for the message.
      source: where to download it, for the message.
      required: when False a missing archive gives None instead of an error.

    Raises:
      FileNotFoundError: naming the archive, the directory searched and the source.
    """
    for name in names:
        path = Path(manual_dir) / name
        if path.is_file():
            return path
    if not required:
        return None
    wanted = " or ".join(names)
    raise FileNotFoundError(
        f"{dataset} needs {wanted}; looked in {manual_dir} (download it from {source})"
    )


class Archive:
    """Read access to the members of a zip or tar archive, by name.

    Member names are the archive's own (e.g. ``ADEChallengeData2016/images/...``). Reading
    from compressed tars is sequential: use :meth:`iter_members` for those.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._names: list[str] | None = None
        self._members: dict = {}
        try:
            if zipfile.is_zipfile(self.path):
                self._zip = zipfile.ZipFile(self.path)
                self._tar = None
            else:
                self._zip = None
                self._tar = tarfile.open(self.path)
        except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
            raise CorruptArchiveError(
                f"{self.path} is not a readable zip or tar archive ({e}); download it again"
            ) from e

    @property
    def names(self) -> list[str]:
        """Names of the archive's files (directories excluded); a tar is indexed on first use."""
        return self._index()

    def _index(self) -> list[str]:
        if self._names is None:
            if self._zip is not None:
                self._names = [n for n in self._zip.namelist() if not n.endswith("/")]
            else:
                try:
                    self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise CorruptArchiveError(
                        f"cannot read {self.path} ({e}); download it again"
                    ) from e
                self._names = list(self._members)
            self._name_set = set(self._names)
        return self._names

    def __contains__(self, name: str) -> bool:
        self._index()
        return name in self._name_set

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``; a damaged member raises CorruptExampleError."""
        try:
            if self._zip is not None:
                return self._zip.read(name)
            self._index()
            return self._tar.extractfile(self._members[name]).read()
        except KeyError:
            raise CorruptExampleError(f"{name} is missing from {self.path}") from None
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
            raise CorruptExampleError(f"cannot read {name} from {self.path} ({e})") from e

    def open(self, name: str) -> BinaryIO:
        """A file object streaming member ``name`` (nothing is read whole); close it after use.

        Raises:
          CorruptExampleError: the member is missing or cannot be opened.
        """
        try:
            if self._zip is not None:
                return self._zip.open(name)
            self._index()
            return self._tar.extractfile(self._members[name])
        except KeyError:
            raise CorruptExampleError(f"{name} is missing from {self.path}") from None
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
            raise CorruptExampleError(f"cannot read {name} from {self.path} ({e})") from e

    def iter_members(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        """Yields ``(name, bytes)`` of the members ``wanted`` accepts, in archive order."""
        if self._zip is not None:
            for name in self.names:
                if wanted(name):
                    yield name, self.read(name)
            return
        try:
            with tarfile.open(self.path) as tar:
                for member in tar:
                    if member.isfile() and wanted(member.name):
                        yield member.name, tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise CorruptArchiveError(f"cannot read {self.path} ({e}); download it again") from e

    def find(self, suffix: str) -> str:
        """The single member whose name ends with ``suffix`` (after a ``/`` or at the start)."""
        hits = [n for n in self.names if n == suffix or n.endswith("/" + suffix)]
        if len(hits) != 1:
            what = "no member" if not hits else f"{len(hits)} members"
            raise CorruptArchiveError(f"{self.path} has {what} named like {suffix!r}")
        return hits[0]


# ---------------------------------------------------------------------------------------------
# Decoding one example.


def _pil():
    from PIL import Image

    return Image


def rgb_image_bytes(data: bytes, name: str) -> tuple[bytes, tuple[int, int]]:
    """Checks that ``data`` decodes to an image; returns RGB JPEG/PNG bytes and ``(H, W)``.

    RGB JPEG and PNG bytes are kept as they are; other modes (grey, CMYK, palette, alpha) are
    converted to RGB and re-encoded losslessly as PNG.

    Raises:
      CorruptExampleError: naming ``name`` when the bytes do not decode.
    """
    image_lib = _pil()
    try:
        with image_lib.open(io.BytesIO(data)) as im:
            im.load()
            size = (im.height, im.width)
            if im.mode == "RGB" and im.format in ("JPEG", "PNG"):
                return data, size
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
            return out.getvalue(), size
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptExampleError(f"cannot decode image {name} ({e})") from e


def label_png(data: bytes, name: str) -> np.ndarray:
    """Decodes a single-channel (grey or palette-index) label PNG to ``[H, W]`` integers.

    Raises:
      CorruptExampleError: naming ``name`` when it does not decode or is not single-channel.
    """
    image_lib = _pil()
    try:
        with image_lib.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise CorruptExampleError(f"label {name} has mode {im.mode}, not one channel")
            return np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        if isinstance(e, CorruptExampleError):
            raise
        raise CorruptExampleError(f"cannot decode label {name} ({e})") from e


def load_mat(data: bytes, name: str) -> dict:
    """Reads a MATLAB v5 ``.mat`` file's variables (scipy), naming ``name`` when it fails."""
    from scipy import io as sio

    try:
        return sio.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
    except (OSError, ValueError, NotImplementedError, TypeError, EOFError) as e:
        raise CorruptExampleError(f"cannot read MATLAB file {name} ({e})") from e


def make_example(image: bytes, name: str, label: np.ndarray, label_name: str) -> dict:
    """Validates one example and returns its feature dict.

    Args:
      image: encoded image bytes.
      name: the image's name in its archive (stored as ``file_name``).
      label: uint16 ``[H, W]`` train ids (void = STORED_VOID).
      label_name: the label's name, for the size-mismatch message.

    Raises:
      CorruptExampleError: when the image does not decode or its size is not the label's.
    """
    image, size = rgb_image_bytes(image, name)
    label = np.asarray(label)
    if label.dtype != np.uint16 or label.ndim != 2:
        raise TypeError(f"label for {name} must be uint16 [H, W], got {label.dtype} {label.shape}")
    if tuple(label.shape) != size:
        raise CorruptExampleError(
            f"image {name} is {size[0]}x{size[1]} but label {label_name} is "
            f"{label.shape[0]}x{label.shape[1]}"
        )
    return {"image": image, "label": label, "file_name": name}


@dataclasses.dataclass(frozen=True)
class Source:
    """One example still to be read: a key, its image name and a loader.

    ``load()`` returns the feature dict (see :func:`make_example`) or raises
    :class:`CorruptExampleError`.
    """

    key: str
    name: str
    load: Callable[[], dict]


def guarded_examples(
    sources: Iterator[Source] | Sequence[Source],
    *,
    dataset: str,
    split: str,
    max_corrupt_fraction: float,
) -> Iterator[tuple[str, dict]]:
    """Yields ``(key, example)`` for every readable source, skipping and counting corrupt ones.

    Args:
      sources: the split's examples.
      dataset: builder name, for messages.
      split: split name, for messages.
      max_corrupt_fraction: the largest share of skipped examples that still lets the build
        finish.

    Raises:
      CorruptDataError: after the split, when more than ``max_corrupt_fraction`` of it was
        skipped; lists the skipped names.
    """
    skipped: list[str] = []
    total = 0
    for source in sources:
        total += 1
        try:
            example = source.load()
        except CorruptExampleError as e:
            log.warning("%s/%s: skipping %s: %s", dataset, split, source.name, e)
            skipped.append(f"{source.name} ({e})")
            continue
        yield source.key, example
    if skipped:
        log.warning(
            "%s/%s: skipped %d corrupt of %d examples: %s",
            dataset,
            split,
            len(skipped),
            total,
            "; ".join(skipped[:20]),
        )
        if len(skipped) > max_corrupt_fraction * total:
            raise CorruptDataError(
                f"{dataset}/{split}: {len(skipped)} of {total} examples are corrupt, more than "
                f"max_corrupt_fraction={max_corrupt_fraction:g}: " + "; ".join(skipped[:20])
            )


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the segmentation builders: shared features, metadata and corrupt policy.

    Subclasses set ``DESCRIPTION``/``HOMEPAGE`` and implement ``_class_info()`` and
    ``_split_sources(dl_manager) -> {split: iterable of Source}``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = ""
    HOMEPAGE = ""

    def __init__(
        self, *, max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION, **kwargs
    ) -> None:
        """Creates the builder.

        Args:
          max_corrupt_fraction: share of a split's examples that may be skipped as corrupt
            before preparation stops (see the module docstring).
          **kwargs: passed to ``tfds.core.GeneratorBasedBuilder``.
        """
        self._max_corrupt_fraction = max_corrupt_fraction
        super().__init__(**kwargs)

    def _class_info(self) -> tuple[Sequence[str], Sequence[Sequence[int]]]:
        """``(class_names, palette)`` of the current config."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        names, palette = self._class_info()
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=segmentation_features(),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(
                class_names=list(names),
                palette=[[int(c) for c in rgb] for rgb in palette],
                num_classes=len(names),
                void_value=STORED_VOID,
            ),
        )

    def _split_sources(self, dl_manager) -> dict[str, Iterator[Source] | Sequence[Source]]:
        raise NotImplementedError

    def download_and_prepare(self, *args, **kwargs):
        """TFDS's preparation, then each split's image-classes sidecar (see
        :mod:`jaxscaleseg.data.image_classes`) where it is missing or stale."""
        super().download_and_prepare(*args, **kwargs)
        write_image_classes(self)

    def _split_generators(self, dl_manager):
        sources = self._split_sources(dl_manager)
        return {split: self._generate_examples(split, srcs) for split, srcs in sources.items()}

    def _generate_examples(self, split, sources):
        yield from guarded_examples(
            sources,
            dataset=self.name,
            split=split,
            max_corrupt_fraction=self._max_corrupt_fraction,
        )


def write_image_classes(builder: tfds.core.DatasetBuilder) -> None:
    """Writes ``<split>.image_classes.npz`` beside every prepared split that lacks a current one.

    Reads each record's label only (the image bytes are not decoded), in index order, once at
    preparation, so that training never has to.
    """
    skip_image = {"image": tfds.decode.SkipDecoding()}
    for split, split_info in builder.info.splits.items():
        path = image_classes.sidecar_path(builder.data_dir, split)
        found = image_classes.read(path)
        if found is not None and len(found[0]) == split_info.num_examples + 1:
            continue
        source = builder.as_data_source(split, decoders=skip_image)
        labels = (source[i]["label"] for i in range(len(source)))
        n = image_classes.write(path, map(image_classes.classes_of_label, labels))
        log.info("%s/%s: wrote the classes of %d examples to %s", builder.name, split, n, path)
