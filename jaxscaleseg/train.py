"""Trains a model: ``python -m jaxscaleseg.train --config configs/<name>.py --workdir DIR``.

Any config field can be overridden with ``--config.key=value`` (e.g.
``--config.num_train_steps=1000``); ``--config configs/<name>.py:smoke`` selects a config's
tiny variant. Rerunning the same command resumes from the workdir's latest checkpoint. User
errors (flags, config, dataset, workdir) end with one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxscaleseg import cli, training

flags.declare_key_flag("config")
flags.declare_key_flag("workdir")


def main(argv: list[str]) -> int:
    """Runs ``train_and_evaluate`` with the parsed flags; returns the exit status."""
    cli.refuse_arguments(argv)
    cli.check_flags(used=("config", "workdir"), required=("config", "workdir"))
    try:
        training.train_and_evaluate(cli.CONFIG.value, cli.WORKDIR.value)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    cli.run(main)
