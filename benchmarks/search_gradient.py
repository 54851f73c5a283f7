"""How far an approximate search moves the training gradients from the exact search's.

    python -m benchmarks.search_gradient --config configs/synthetic.py \\
        --config.dataset.num_classes=10000 ... --workdir RUN \\
        [--variants union:32,union:64,exact:segment] [--batches 3] [--output FILE.md]

Training logs an approximate search's recall@k and the ESS loss's relative error
(``steps.search_quality``); what moves the parameters is the gradient, and a search can miss
1 % of the negatives while the loss changes by 0.01 %. This loads a run's latest checkpoint
(the ``--config`` flags must be the run's), takes the training batches that follow it, and
for each variant compares :func:`jaxscaleseg.steps.step_gradients` with the exact search's on
the same state and batch: the relative L2 distance ``‖g − g_exact‖ / ‖g_exact‖`` over all the
parameters, over the class table and over the network, the loss, and the time of each
variant's compiled loss-and-gradient computation on that state (where a search's speed depends
on the state, as the certified search's does, the trained state is the one that tells).

Variants: ``exact`` (the reference), ``exact:<table_gradient>`` (the exact search with another
table-gradient method, e.g. ``exact:segment``: the same arithmetic in another float rounding
order, the floor of what the comparison can resolve), ``union:<K'>`` (the stride-4 union with K'
candidates per source), ``certified``, ``approximate`` (the class index). The run's workdir is
read from a temporary copy, so it is left as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags

from jaxscaleseg import cli, steps, training

_PARTS = ("all", "table", "network")


def variant_spec(base: steps.LossSpec, variant: str) -> steps.LossSpec:
    """``base`` with one variant's search settings (see the module docstring).

    Raises:
      ValueError: naming the variant, when it is not one of the forms above.
    """
    name, _, arg = variant.partition(":")
    if name == "exact":
        return dataclasses.replace(base, search="exact", **({"table_gradient": arg} if arg else {}))
    if name == "union" and arg.isdigit():
        return dataclasses.replace(base, search="union", search_candidates=int(arg))
    if name in ("certified", "approximate") and not arg:
        return dataclasses.replace(base, search=name)
    raise ValueError(
        f"variant {variant!r}; expected exact[:TABLE_GRADIENT], union:K, certified or approximate"
    )


def relative_distances(grads: Any, reference: Any) -> dict[str, float]:
    """``{part: ‖g − g_ref‖ / ‖g_ref‖}`` for the parts of ``_PARTS`` (NaN where empty), summed
    leaf by leaf in float64 (no concatenated copy of the trees)."""
    squares = {part: [0.0, 0.0] for part in _PARTS}  # [‖g − g_ref‖², ‖g_ref‖²]
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    for (path, g), r in zip(leaves, jax.tree_util.tree_leaves(reference), strict=True):
        part = "table" if "class_embedding" in jax.tree_util.keystr(path) else "network"
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        for name in (part, "all"):
            squares[name][0] += float(np.sum((g - r) ** 2))
            squares[name][1] += float(np.sum(r * r))
    return {
        part: math.sqrt(diff / ref) if ref > 0 else float("nan")
        for part, (diff, ref) in squares.items()
    }


def measure(config, workdir: str | Path, variants: list[str], batches: int) -> list[dict]:
    """One row per (batch, variant): the checkpoint's ``step``, ``batch``, ``variant``,
    ``loss``, ``seconds`` (the compiled loss-and-gradient computation, timed alone),
    ``certified`` (the fraction of pixels the certified search proved, else NaN) and the
    relative distances of its gradients to the exact search's (``all``, ``table``,
    ``network``).

    Args:
      config: the run's training config (an ESS run).
      workdir: the run's folder; its latest checkpoint is loaded from a temporary copy.
      variants: variant names (module docstring); ``exact`` is always measured first.
      batches: how many of the training batches that follow the checkpoint.
    """
    base = steps.LossSpec.from_config(config.loss)
    if base.name != "ess":
        raise ValueError(f"loss.name={base.name!r}: only the ESS loss has a search to compare")
    specs = {v: variant_spec(base, v) for v in ["exact", *(v for v in variants if v != "exact")]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("best", "tensorboard"))
        run, state = training.setup(config, copy)
        compiled = {}
        for b in range(batches):
            batch = training.next_batch(run)
            reference = None
            for variant, spec in specs.items():
                if variant not in compiled:
                    jitted = jax.jit(functools.partial(steps.step_gradients, spec=spec))
                    compiled[variant] = jitted.lower(state, batch, run.base_rng).compile()
                start = time.perf_counter()
                computed = jax.block_until_ready(compiled[variant](state, batch, run.base_rng))
                seconds = time.perf_counter() - start
                reference = computed.grads if reference is None else reference
                distances = relative_distances(computed.grads, reference)
                rows.append(
                    {
                        "step": int(state.step),
                        "batch": b,
                        "variant": variant,
                        "loss": float(computed.loss),
                        "seconds": seconds,
                        "certified": float(computed.parts.get("search_certified", np.nan)),
                        **distances,
                    }
                )
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table of ``measure``'s rows: each variant's means over the batches."""
    lines = [
        f"Checkpoint at step {rows[0]['step']}; relative distances to the exact search's"
        " gradients, same state and batches.",
        "",
        "| variant | batches | loss (mean) | ‖Δg‖/‖g‖ all | class table | network"
        " | seconds (median) | certified (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        means = [np.mean([r[k] for r in mine]) for k in ("loss", *_PARTS, "certified")]
        seconds = np.median([r["seconds"] for r in mine])
        distances = " | ".join(f"{m:.2e}" for m in means[1:4])
        certified = "—" if np.isnan(means[4]) else f"{means[4]:.3f}"
        lines.append(
            f"| {variant} | {len(mine)} | {means[0]:.6f} | {distances} | {seconds:.3f}"
            f" | {certified} |"
        )
    return "\n".join(lines)


_VARIANTS = flags.DEFINE_list(
    "variants", ["union:32", "union:64", "exact:segment"], "Variants compared with exact."
)
_BATCHES = flags.DEFINE_integer("batches", 3, "Training batches after the checkpoint.")
for _name in ("config", "workdir", "output"):
    flags.declare_key_flag(_name)


def main(argv: list[str]) -> int:
    """Prints the table (and appends it to ``--output`` when given)."""
    cli.refuse_arguments(argv)
    cli.check_flags(used=("config", "workdir", "output"), required=("config", "workdir"))
    rows = measure(cli.CONFIG.value, cli.WORKDIR.value, _VARIANTS.value, _BATCHES.value)
    text = table(rows)
    print(text)
    if cli.OUTPUT.value:
        with open(cli.OUTPUT.value, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    cli.run(main)
