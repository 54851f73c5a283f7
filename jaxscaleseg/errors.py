"""The user errors: mistakes a user can fix, reported by every CLI as one line and exit status 1.

Every exception a user can cause by a config value, a flag, a missing file or a workdir in the
wrong state derives from :class:`UserError`; the CLIs (:mod:`jaxscaleseg.cli`) catch that one
class. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; its message says what and where, on one line."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field."""


class DatasetNotPreparedError(UserError):
    """The configured TFDS dataset is missing from ``data_dir``; the message names the command."""


class DatasetError(UserError, ValueError):
    """A prepared dataset holds an example the run cannot use (a label beyond the class
    count); the message names the dataset, the split and the example."""


class WorkdirError(UserError):
    """The workdir cannot be created, written, or is in use by another run."""


class ModelMismatchError(UserError, ValueError):
    """The workdir holds a model (``model.json`` or checkpoint) other than the config's."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
    """The workdir holds no checkpoint of the requested kind; the message says what was sought."""


class DistributedError(UserError):
    """The processes of a multi-host run could not join, or one of them stopped."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when the message is empty)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


__all__ = [
    "CheckpointNotFoundError",
    "ConfigError",
    "DatasetError",
    "DatasetNotPreparedError",
    "DistributedError",
    "ModelMismatchError",
    "NonFiniteLossError",
    "UserError",
    "WorkdirError",
    "one_line",
]
