"""What every command-line tool shares: the common flags, and one way to run and to fail.

Every CLI (``train``, ``evaluate``, ``predict``, ``data.prepare``, ``convert_weights``) is a
module with a thin ``main(argv)`` over a library function, started by :func:`run` through
``absl.app`` (so ``--help``, ``--helpshort`` and ``--helpfull`` work). The flags several tools
share are defined here once (absl flags are global: two modules defining ``--config`` could not
be imported together); each tool declares the ones it reads as key flags, so its ``--help``
lists them, and :func:`check_flags` refuses a shared flag it does not read.

Failures a user can fix (:class:`jaxscaleseg.errors.UserError`, bad flags, a config file that
does not load) end with one ``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxscaleseg import inference
from jaxscaleseg.errors import UserError, one_line

FLAGS = flags.FLAGS

CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "The run's config file, configs/<name>.py[:variant]; override any field with "
    "--config.key=value.",
    lock_config=True,
)
WORKDIR = flags.DEFINE_string("workdir", None, "The run's folder (checkpoints, logs, results).")
CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
MODE = flags.DEFINE_string("mode", None, "Inference mode: whole (image) or slide (windows).")
CROP_SIZE = flags.DEFINE_string("crop_size", None, "Sliding-window size H,W.")
STRIDE = flags.DEFINE_string("stride", None, "Sliding-window stride H,W (default 2/3 of the crop).")
FLIP = flags.DEFINE_boolean("flip", None, "Horizontal-flip test-time augmentation.")
SCALES = flags.DEFINE_string(
    "scales", None, "Test scales, comma-separated, or 'common' (0.5,0.75,...,1.75)."
)
SEARCH = flags.DEFINE_enum(
    "search",
    None,
    list(inference.SEARCHES),
    "Embedding head: exact nearest class; the approximate stride-4 union search; 'certified', "
    "the exact answer through the union where a bound proves it and an exact search elsewhere; "
    f"or 'auto' (the default): certified from {inference.AUTO_CERTIFIED_MIN_CLASSES} classes on "
    "on CPU, else exact.",
)
OUTPUT = flags.DEFINE_string(
    "output", None, "Where to write: the pictures' directory (predict), the .npz (convert_weights)."
)
SHARED_FLAGS = (
    "config",
    "workdir",
    "checkpoint",
    "mode",
    "crop_size",
    "stride",
    "flip",
    "scales",
    "search",
    "output",
)
INFERENCE_FLAGS = ("checkpoint", "mode", "crop_size", "stride", "flip", "scales", "search")

# Errors raised while absl parses the flags: bad values, and a config file that does not load
# (missing, syntax error, unknown field in --config.key=value).
_PARSE_ERRORS = (flags.Error, KeyError, AttributeError, ValueError, TypeError, SyntaxError, OSError)


def check_flags(used: Sequence[str], required: Sequence[str] = ()) -> None:
    """Refuses shared flags this tool does not read, and missing required ones.

    Raises:
      UserError: naming the flag.
    """
    if "config" in used and FLAGS["config"].value is not None:
        try:  # a config file that failed to load raises on first use
            FLAGS["config"].value.get("seed")
        except _PARSE_ERRORS as e:
            raise UserError(f"--config: {_summary(e)}") from e
    unused = [f"--{n}" for n in SHARED_FLAGS if n not in used and FLAGS[n].present]
    if unused:
        raise UserError(f"{', '.join(unused)}: not a flag of this command (see --help)")
    missing = [f"--{n}" for n in required if FLAGS[n].value is None]
    if missing:
        raise UserError(f"{', '.join(missing)} required (see --help)")


def refuse_arguments(argv: Sequence[str]) -> None:
    """Refuses positional arguments (``argv[0]`` is the program)."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {' '.join(argv[1:])!r} (only flags; see --help)")


def inference_flags() -> dict[str, str | bool | None]:
    """The inference flags as given (None: not given), for :func:`settings_from_text`."""
    names = ("mode", "crop_size", "stride", "flip", "scales", "search")
    return {n: FLAGS[n].value for n in names}


def _pair(text: str | None, name: str) -> tuple[int, int] | None:
    """``"H,W"`` (or ``"HxW"``, or one number for both) as two positive ints; None stays None."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise UserError(f"--{name} must be H,W (positive integers), got {text!r}")
    return values


def _scales(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    if text.strip() == "common":
        return inference.COMMON_SCALES
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--scales must be numbers or 'common', got {text!r}") from None


def settings_from_text(
    config: ml_collections.ConfigDict,
    *,
    mode: str | None = None,
    crop_size: str | None = None,
    stride: str | None = None,
    flip: bool | None = None,
    scales: str | None = None,
    search: str | None = None,
) -> inference.InferenceSettings:
    """Settings from the config's ``inference`` section overridden by command-line text.

    ``crop_size``/``stride`` are ``"H,W"``, ``scales`` comma-separated numbers or ``common``;
    None keeps the config's value.

    Raises:
      UserError: a value that does not parse or describes no valid settings.
    """
    try:
        return inference.InferenceSettings.from_config(
            config,
            mode=mode,
            crop_size=_pair(crop_size, "crop_size"),
            stride=_pair(stride, "stride"),
            flip=flip,
            scales=_scales(scales),
            search=search,
        )
    except ValueError as e:
        raise UserError(one_line(e)) from e


def _summary(error: BaseException) -> str:
    """One line for a flag error: a traceback or a multi-line report keeps its last line."""
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: no such field
        return f"unknown config field {one_line(error)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and ("Traceback" in str(error) or isinstance(error, OSError)):
        return f"{lines[0].split(':')[0]}: {lines[-1]}" if "flag --" in lines[0] else lines[-1]
    return one_line(error)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 1


_HELP = {"-?", "-h", "--h", "-help", "--help", "--helpshort", "--helpfull", "--helpxml"}


def _parse(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with one-line errors (exit status 1); help exits with status 0."""
    try:
        return FLAGS(list(argv))
    except _PARSE_ERRORS as e:
        sys.exit(_fail(_summary(e)))
    except SystemExit:
        if _HELP & {a.split("=")[0] for a in argv[1:]}:  # absl exits 1 after printing help
            sys.exit(0)
        raise


def _guarded(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    if "verbosity" in FLAGS and not FLAGS["verbosity"].present:
        # absl.app logs INFO to stderr by default: keep the libraries' chatter (orbax) out.
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        return main(argv) or 0
    except UserError as e:
        return _fail(one_line(e))


def run(main: Callable[[list[str]], int | None]) -> None:
    """Runs a CLI's ``main(argv)`` under ``absl.app`` (exits with its status)."""
    app.run(lambda argv: _guarded(main, argv), flags_parser=_parse)


def call(main: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """Parses ``argv`` (``argv[0]`` = program name) and calls ``main`` in-process, as
    :func:`run` would; returns the exit status (for tests and notebooks)."""
    FLAGS.unparse_flags()
    try:
        remaining = FLAGS(list(argv))
    except _PARSE_ERRORS as e:
        return _fail(_summary(e))
    return _guarded(main, remaining)


__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "INFERENCE_FLAGS",
    "OUTPUT",
    "SHARED_FLAGS",
    "WORKDIR",
    "call",
    "check_flags",
    "inference_flags",
    "refuse_arguments",
    "run",
]
