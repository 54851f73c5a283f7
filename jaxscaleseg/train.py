"""Trains a model: ``python -m jaxscaleseg.train --config configs/<name>.py --workdir DIR``.

Any config field can be overridden with ``--config.key=value`` (e.g.
``--config.num_train_steps=1000``); ``--config configs/<name>.py:smoke`` selects a config's
tiny variant. Rerunning the same command resumes from the workdir's latest checkpoint. User
errors (config, dataset, workdir) end with one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/<name>.py[:smoke]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the flags and runs ``train_and_evaluate``; returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    try:
        flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: a field that does not exist
        print(f"error: unknown config field {_one_line(e)}", file=sys.stderr)
        return 1
    except (flags.Error, ValueError, TypeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    if _WORKDIR.value is None or _CONFIG.value is None:
        print("error: --config and --workdir are required", file=sys.stderr)
        return 1
    from jaxscaleseg import training  # noqa: PLC0415 (after flag parsing: fast errors)

    user_errors = (
        training.ConfigError,
        training.DatasetNotPreparedError,
        training.WorkdirError,
        training.CheckpointMismatchError,
        training.NonFiniteLossError,
    )
    try:
        training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except user_errors as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()).replace("\"'", "'").replace("'\"", "'")
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
