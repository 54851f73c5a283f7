"""Approximate against exact nearest-class search: recall@k and time against C.

    python -m benchmarks.approx_search                  # the full table (C up to 100 000)
    python -m benchmarks.approx_search --preset small   # C = 1 284 and 10 000, 4 096 queries

For each kind of query embeddings, class count C and number of probed cells, it builds the
two-level index of ``jaxscaleseg.knn_index`` (about √C cells) over random unit class
embeddings and reports recall@k of ``approximate_nearest_class_ids`` against
``knn.nearest_class_ids`` (exact), the median wall time of each search over warm runs (jitted,
same queries) and the index build time. Query kinds:

* ``random``: independent random unit vectors, one per stride-4 position, upsampled ×4
  bilinearly and renormalised (the worst case: no structure a partition could use);
* ``smooth``: a smooth random field: random unit vectors on a grid 4× coarser than the
  stride-4 positions, upsampled ×16 in all and renormalised;
* ``near_class``: each stride-4 position is a random class's embedding plus Gaussian noise
  (σ = 0.5/√D per axis), upsampled ×4 — pixels close to their class, as after training.

Exact and approximate are timed in turn, run after run, so that a drifting load on a shared
CPU hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxscaleseg import knn, knn_index

KINDS = ("random", "smooth", "near_class")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark setting: queries are ``height × width`` full-resolution pixels."""

    height: int
    width: int
    dim: int
    num_neighbors: int
    class_counts: tuple[int, ...]
    probes: tuple[int, ...]
    repeats: int


PRESETS = {
    "full": Preset(256, 512, 16, 7, (1284, 10_000, 100_000), (8, 32), 3),
    "small": Preset(64, 64, 16, 7, (1284, 10_000), (8, 32), 2),
}


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _upsample(field: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear ×factor of ``[h, w, D]``, rows renormalised (as the decoder's output)."""
    h, w, dim = field.shape
    up = jax.image.resize(jnp.asarray(field), (h * factor, w * factor, dim), "bilinear")
    return _unit(np.asarray(up, np.float64)).reshape(-1, dim).astype(np.float32)


def make_queries(kind: str, preset: Preset, classes: np.ndarray, seed: int) -> np.ndarray:
    """float32 ``[height·width, D]`` query embeddings of one kind (see the module docstring)."""
    rng = np.random.default_rng(seed)
    h, w, dim = preset.height // 4, preset.width // 4, preset.dim
    if kind == "random":
        return _upsample(_unit(rng.normal(size=(h, w, dim))), 4)
    if kind == "smooth":
        if h % 4 or w % 4:
            raise ValueError(f"smooth queries need a size that is a multiple of 16, got {h * 4}")
        return _upsample(_unit(rng.normal(size=(h // 4, w // 4, dim))), 16)
    if kind == "near_class":
        picks = classes[rng.integers(0, len(classes), (h, w))].astype(np.float64)
        return _upsample(_unit(picks + rng.normal(size=(h, w, dim)) * 0.5 / np.sqrt(dim)), 4)
    raise ValueError(f"kind={kind!r}; expected one of {KINDS}")


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def run_row(
    kind: str, preset: Preset, num_classes: int, probes: int, seed: int = 0
) -> dict[str, float]:
    """Recall and times for one (kind, C, probes)."""
    rng = np.random.default_rng(seed + num_classes)
    classes = _unit(rng.normal(size=(num_classes, preset.dim))).astype(np.float32)
    queries = jnp.asarray(make_queries(kind, preset, classes, seed))
    k = preset.num_neighbors
    build = jax.jit(knn_index.build_index)
    exact = jax.jit(lambda q, e: knn.nearest_class_ids(q, e, k, max_block_bytes="auto"))

    def approximate(q, e, index):
        return knn_index.approximate_nearest_class_ids(
            q, e, index, k, probes=probes, max_block_bytes="auto"
        )

    index = build(classes)
    cells, size = index.members.shape
    build_times, exact_times, approx_times = [], [], []
    _, exact_ids = _timed(exact, queries, classes)  # compiles
    _, approx_ids = _timed(approximate, queries, classes, index)
    for _ in range(preset.repeats):
        build_times.append(_timed(build, classes)[0])
        exact_times.append(_timed(exact, queries, classes)[0])
        approx_times.append(_timed(approximate, queries, classes, index)[0])
    return {
        "kind": kind,
        "classes": num_classes,
        "cells": cells,
        "cell_size": size,
        "probes": probes,
        "recall": float(knn_index.recall_at_k(approx_ids, exact_ids)),
        "exact_s": statistics.median(exact_times),
        "approx_s": statistics.median(approx_times),
        "build_s": statistics.median(build_times),
    }


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--classes", type=int, nargs="*", help="override the class counts")
    parser.add_argument("--probes", type=int, nargs="*", help="override the probes")
    parser.add_argument("--kinds", nargs="*", choices=KINDS, default=list(KINDS))
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="query pixels")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.classes:
        preset = dataclasses.replace(preset, class_counts=tuple(args.classes))
    if args.probes:
        preset = dataclasses.replace(preset, probes=tuple(args.probes))
    if args.size:
        preset = dataclasses.replace(preset, height=args.size[0], width=args.size[1])
    print(
        f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.default_backend()}; {preset.height}x{preset.width} queries, D={preset.dim}, "
        f"k={preset.num_neighbors}, median of {preset.repeats}"
    )
    print("| queries | C | cells × size | probes | recall@k | exact s | approx s | build s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for kind in args.kinds:
        for num_classes in preset.class_counts:
            for probes in preset.probes:
                cells, _ = knn_index.index_shape(num_classes)
                if probes > cells:
                    continue
                row = run_row(kind, preset, num_classes, probes)
                rows.append(row)
                print(
                    f"| {kind} | {num_classes} | {row['cells']} × {row['cell_size']} | {probes}"
                    f" | {row['recall']:.3f} | {row['exact_s']:.3f} | {row['approx_s']:.3f}"
                    f" | {row['build_s']:.3f} |",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
