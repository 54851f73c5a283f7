"""Training curves of a run: ``python -m benchmarks.plot_metrics --workdir DIR [--output PNG]``.

Reads the workdir's ``metrics.jsonl`` (one JSON object per log or evaluation, written by
:mod:`jaxscaleseg.training`) and draws the training loss and its parts, the validation mIoU,
mAcc and aAcc, and the learning rates against the step into one PNG (default
``<workdir>/training_curves.png``). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxscaleseg import visualize, workdir


def main(argv: Sequence[str] | None = None) -> int:
    """Parses the arguments and writes the plot; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training workdir (or a .jsonl file)")
    parser.add_argument("--output", help="PNG path (default <workdir>/training_curves.png)")
    args = parser.parse_args(argv)
    source = Path(args.workdir).expanduser()
    metrics_file = source / "metrics.jsonl" if source.is_dir() else source
    if not metrics_file.is_file():
        print(f"error: no metrics file {metrics_file}", file=sys.stderr)
        return 1
    records = workdir.read_metrics(metrics_file)
    output = Path(args.output) if args.output else metrics_file.parent / "training_curves.png"
    try:
        keys = visualize.plot_training_curves(records, output, title=str(source))
    except ValueError as e:
        print(f"error: {metrics_file}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({len(records)} records; {', '.join(keys)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
