"""Writing a benchmark's results: a CSV of its rows and a Markdown file of its table."""

from __future__ import annotations

import csv
from pathlib import Path


def write_tables(rows: list[dict], stem: Path, header: str, table: str) -> None:
    """Writes ``<stem>.csv`` (every key of every row, sorted) and ``<stem>.md`` (header, table).

    Called after every measured cell, so a run that is cut short keeps what it measured.
    """
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{stem}.md").write_text(f"{header}\n\n{table}\n")
