"""Approximate against exact nearest-class search: recall@k, loss error and time against C.

    python -m benchmarks.approx_search                  # synthetic queries, C up to 100 000
    python -m benchmarks.approx_search --preset small   # C = 1 284 and 10 000, 64×64 pixels
    python -m benchmarks.approx_search --checkpoint WORKDIR --classes 1284 10000 100000

Methods (``--methods``):

* ``index``: the two-level index of ``jaxscaleseg.knn_index`` (about √C cells over the class
  table), each full-resolution pixel probing its ``--probes`` nearest cells;
* ``union``: ``jaxscaleseg.knn_union``: each stride-4 source's ``--candidates`` (K') nearest
  classes, exact, and every full-resolution pixel re-ranking the union of its four sources'
  lists; reports the fraction of pixels whose result is certified exact;
* ``union_index``: the same union, the sources' lists searched through the index instead
  (sub-linear in C; probes ``--probes``, no certificate).

Each is compared with the exact search (``knn.nearest_class_ids``): recall@k, and, where the
queries have labels, the ESS loss's relative error (the loss with the approximate negatives
against the loss with the exact ones), both excluding each pixel's target as the loss does;
median wall times of the jitted searches (same inputs, exact and approximate timed in turn so
that a drifting load on a shared CPU hits both alike); the index build time.

Query kinds (synthetic, random unit class table):

* ``random``: independent random unit vectors, one per stride-4 position (the worst case: no
  structure a partition or a union could use);
* ``smooth``: a smooth random field (random unit vectors on a grid 4× coarser than the
  stride-4 positions, upsampled ×4 and renormalised to make the stride-4 sources);
* ``near_class``: each stride-4 position is a random class's embedding plus Gaussian noise
  (σ = 0.5/√D per axis), renormalised.

Full-resolution queries are the ×4 bilinear upsampling of the sources, as the model makes them
(not renormalised: against unit class rows the ranking is the same).

``--checkpoint WORKDIR``: the queries are the trained model's pixel embeddings (full
resolution and stride 4) of the first ``--examples`` validation images of the run's dataset,
with their labels, and the class table is the trained one. For C above the trained table's
size, ``C − C₀`` classes are added: each a trained row chosen at random plus Gaussian noise
(σ = ``--extra_noise``/√D per axis), renormalised — new classes where the trained ones are,
which keeps them near the pixels (random rows elsewhere on the sphere would rarely be
anyone's neighbour and make the search look better). The pixels keep their labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxscaleseg import knn, knn_index, knn_union, losses
from jaxscaleseg import workdir as workdir_lib
from jaxscaleseg.data import augment, sources
from jaxscaleseg.models import build_model

KINDS = ("random", "smooth", "near_class")
METHODS = ("index", "union", "union_index")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark setting: queries are ``height × width`` full-resolution pixels."""

    height: int
    width: int
    dim: int
    num_neighbors: int
    class_counts: tuple[int, ...]
    probes: tuple[int, ...]
    candidates: tuple[int, ...]
    repeats: int


PRESETS = {
    "full": Preset(256, 512, 16, 7, (1284, 10_000, 100_000), (8, 32), (16, 32), 3),
    "small": Preset(64, 64, 16, 7, (1284, 10_000), (8, 32), (16, 32), 2),
}


@dataclasses.dataclass(frozen=True)
class Queries:
    """Inputs of one measurement.

    Attributes:
      pixels: float32 ``[B, H, W, D]``; coarse: float32 ``[B, h, w, D]`` (stride 4).
      labels: int32 ``[B, H, W]`` (-1 ignore) or None (no exclusion, no loss).
      classes: float32 ``[C, D]`` unit rows.
    """

    pixels: np.ndarray
    coarse: np.ndarray
    labels: np.ndarray | None
    classes: np.ndarray


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _upsample(field: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear ×factor of ``[B, h, w, D]`` with half-pixel centres (as the model's)."""
    b, h, w, dim = field.shape
    up = jax.image.resize(
        jnp.asarray(field, jnp.float32), (b, h * factor, w * factor, dim), "bilinear"
    )
    return np.asarray(up, np.float32)


def make_queries(kind: str, preset: Preset, classes: np.ndarray, seed: int) -> Queries:
    """Synthetic queries of one kind (see the module docstring)."""
    rng = np.random.default_rng(seed)
    h, w, dim = preset.height // 4, preset.width // 4, preset.dim
    if kind == "random":
        coarse = _unit(rng.normal(size=(1, h, w, dim)))
    elif kind == "smooth":
        if h % 4 or w % 4:
            raise ValueError(f"smooth queries need a size that is a multiple of 16, got {h * 4}")
        coarse = _unit(_upsample(_unit(rng.normal(size=(1, h // 4, w // 4, dim))), 4))
    elif kind == "near_class":
        picks = classes[rng.integers(0, len(classes), (1, h, w))].astype(np.float64)
        coarse = _unit(picks + rng.normal(size=(1, h, w, dim)) * 0.5 / np.sqrt(dim))
    else:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    coarse = coarse.astype(np.float32)
    return Queries(_upsample(coarse, 4), coarse, None, classes)


def trained_queries(workdir: str, examples: int, mosaic: tuple[int, int] | None = None) -> Queries:
    """The trained model's embeddings of the first ``examples`` validation images of the run
    in ``workdir`` (its ``config.json``, ``model.json`` and best checkpoint); with ``mosaic``
    ``(rows, cols)``, of one image tiling them (cycled) ``rows × cols`` times."""
    config = ml_collections.ConfigDict(
        json.loads((Path(workdir) / workdir_lib.CONFIG_FILE).read_text())
    )
    variables, _ = workdir_lib.load_variables(workdir, "best")
    model = build_model(**workdir_lib.read_model_args(workdir))
    _, evaluation = sources.make_sources(config)
    count = min(int(examples), len(evaluation))
    items = [evaluation[i] for i in range(count)]
    mean, std = augment.normalization(config.dataset.normalization)
    images = np.stack([augment.normalize(item["image"], mean, std) for item in items])
    labels = np.stack([np.asarray(item["label"]).astype(np.int32) for item in items])
    labels = np.where(labels >= model.num_classes, -1, labels).astype(np.int32)
    if mosaic is not None:
        order = np.arange(mosaic[0] * mosaic[1]) % count
        images, labels = (_tile(x[order], *mosaic) for x in (images, labels))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    out = apply(variables, jnp.asarray(images))
    return Queries(
        np.asarray(out["pixel_embedding"]),
        np.asarray(out["coarse_pixel_embedding"]),
        labels,
        np.asarray(out["class_embedding"]),
    )


def smoothness(queries: Queries) -> dict[str, float]:
    """How alike neighbouring stride-4 embeddings are: the mean length of the full-resolution
    pixel embeddings (their bilinear blends; 1 where the sources agree) and the mean cosine of
    horizontally and vertically adjacent stride-4 embeddings (negative where a network has
    turned them apart, the worst case of the union search; BENCHMARKS §7.5)."""
    coarse = np.asarray(queries.coarse, np.float64)
    across = (coarse[:, :, 1:] * coarse[:, :, :-1]).sum(-1)
    down = (coarse[:, 1:] * coarse[:, :-1]).sum(-1)
    return {
        "pixel_norm": float(np.linalg.norm(np.asarray(queries.pixels, np.float64), axis=-1).mean()),
        "neighbour_cosine": float(np.concatenate([across.ravel(), down.ravel()]).mean()),
    }


def _tile(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``[rows·cols, h, w, ...]`` → ``[1, rows·h, cols·w, ...]``, row by row."""
    n, h, w = images.shape[:3]
    grid = images.reshape(rows, cols, h, w, *images.shape[3:]).swapaxes(1, 2)
    return grid.reshape(1, rows * h, cols * w, *images.shape[3:])


def extend_classes(classes: np.ndarray, num_classes: int, noise: float, seed: int) -> np.ndarray:
    """``[num_classes, D]`` unit rows: ``classes`` and, after them, jittered copies of random
    rows of it (Gaussian, σ = noise/√D per axis), renormalised."""
    base, dim = classes.shape
    if num_classes <= base:
        return classes[:num_classes]
    rng = np.random.default_rng(seed)
    picks = classes[rng.integers(0, base, num_classes - base)].astype(np.float64)
    extra = _unit(picks + rng.normal(size=picks.shape) * noise / np.sqrt(dim))
    return np.concatenate([classes, extra.astype(np.float32)])


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, out


def _exact_search(k: int, has_labels: bool):
    """Jitted ``(pixels, classes, labels) -> ids``: the exact search."""

    def exact(pixels, classes, labels):
        return knn.nearest_class_ids(
            pixels, classes, k, exclude=labels if has_labels else None, max_block_bytes="auto"
        )

    return jax.jit(exact)


def _approximate_search(method: str, k: int, setting: int, probes: int, has_labels: bool):
    """Jitted ``(pixels, coarse, classes, labels, index) -> ids`` (or ``(ids, certified)``)."""

    def approximate(pixels, coarse, classes, labels, index):
        exclude = labels if has_labels else None
        if method == "index":
            return knn_index.approximate_nearest_class_ids(
                pixels, classes, index, k, probes=setting, exclude=exclude, max_block_bytes="auto"
            )
        return knn_union.union_nearest_class_ids(
            pixels,
            coarse,
            classes,
            k,
            candidates=setting,
            exclude=exclude,
            index=index if method == "union_index" else None,
            probes=probes,
            max_block_bytes="auto",
        )

    return jax.jit(approximate)


def _ess(pixels, labels, classes, ids, k):
    return float(
        losses.ess_objective(
            jnp.asarray(pixels),
            jnp.asarray(labels),
            jnp.asarray(classes),
            num_neighbors=k,
            separation_weight=0.0,
            neighbor_ids=ids,
        )[1]["ess"]
    )


def _labels(queries: Queries) -> jax.Array:
    if queries.labels is None:
        return jnp.zeros(queries.pixels.shape[:3], jnp.int32)
    return jnp.asarray(queries.labels)


def exact_reference(queries: Queries, k: int, repeats: int) -> dict[str, object]:
    """The exact search's ids, median time, loss; the index and its median build time."""
    classes = jnp.asarray(queries.classes)
    has_labels = queries.labels is not None
    exact = _exact_search(k, has_labels)
    args = (jnp.asarray(queries.pixels), classes, _labels(queries))
    _, ids = _timed(exact, *args)  # compiles
    times = [_timed(exact, *args)[0] for _ in range(repeats)]
    build = jax.jit(knn_index.build_index)
    index = build(classes)
    loss = _ess(queries.pixels, queries.labels, queries.classes, ids, k) if has_labels else None
    return {
        "ids": ids,
        "exact_s": statistics.median(times),
        "loss": loss,
        "index": index,
        "build_s": statistics.median(_timed(build, classes)[0] for _ in range(repeats)),
    }


def measure(
    queries: Queries,
    reference: dict[str, object],
    method: str,
    setting: int,
    k: int,
    probes: int,
    repeats: int,
) -> dict[str, float]:
    """Recall, loss error, certified fraction and times of one (queries, method, setting)
    against :func:`exact_reference`'s result.

    ``setting``: probes for ``index``, candidates K' for the unions (``probes`` is the union
    index's probes)."""
    classes = jnp.asarray(queries.classes)
    labels = _labels(queries)
    index = reference["index"]
    approximate = _approximate_search(method, k, setting, probes, queries.labels is not None)
    args = (jnp.asarray(queries.pixels), jnp.asarray(queries.coarse), classes, labels, index)
    _, out = _timed(approximate, *args)  # compiles
    times = [_timed(approximate, *args)[0] for _ in range(repeats)]
    approx_ids, certified = (out, None) if method == "index" else out
    row = {
        "method": method,
        "classes": int(classes.shape[0]),
        "cells": int(index.members.shape[0]),
        "setting": setting,
        "recall": float(knn_index.recall_at_k(approx_ids, reference["ids"], labels >= 0)),
        "certified": float("nan") if certified is None else float(jnp.mean(certified)),
        "ess_rel_error": float("nan"),
        "exact_s": reference["exact_s"],
        "approx_s": statistics.median(times),
        "build_s": reference["build_s"],
    }
    if reference["loss"] is not None:
        approx_loss = _ess(queries.pixels, queries.labels, queries.classes, approx_ids, k)
        exact_loss = reference["loss"]
        row["ess_rel_error"] = abs(approx_loss - exact_loss) / max(abs(exact_loss), 1e-30)
    return row


def _settings(method: str, preset: Preset, num_classes: int) -> list[int]:
    if method == "index":
        cells, _ = knn_index.index_shape(num_classes)
        return [p for p in preset.probes if p <= cells]
    return [c for c in preset.candidates if c < num_classes]


def _format(row: dict[str, float], source: str) -> str:
    def num(x):
        return "—" if x != x else f"{x:.3f}"

    error = "—" if row["ess_rel_error"] != row["ess_rel_error"] else f"{row['ess_rel_error']:.2e}"
    return (
        f"| {source} | {row['classes']} | {row['method']} | {row['setting']} | {num(row['recall'])}"
        f" | {num(row['certified'])} | {error} | {row['exact_s']:.3f} | {row['approx_s']:.3f}"
        f" | {row['build_s']:.3f} |"
    )


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--classes", type=int, nargs="*", help="override the class counts")
    parser.add_argument("--probes", type=int, nargs="*", help="override the index's probes")
    parser.add_argument("--candidates", type=int, nargs="*", help="override the unions' K'")
    parser.add_argument("--union_probes", type=int, default=8, help="probes of union_index")
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--kinds", nargs="*", choices=KINDS, default=list(KINDS))
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="query pixels")
    parser.add_argument("--checkpoint", help="a training workdir: its trained embeddings")
    parser.add_argument("--examples", type=int, default=16, help="validation images used")
    parser.add_argument("--repeats", type=int, help="override the timed runs per row")
    parser.add_argument("--extra_noise", type=float, default=0.5, help="see the docstring")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {"class_counts": args.classes, "probes": args.probes, "candidates": args.candidates}
    preset = dataclasses.replace(preset, **{k: tuple(v) for k, v in overrides.items() if v})
    if args.repeats:
        preset = dataclasses.replace(preset, repeats=args.repeats)
    if args.size:
        preset = dataclasses.replace(preset, height=args.size[0], width=args.size[1])
    trained = trained_queries(args.checkpoint, args.examples) if args.checkpoint else None
    what = (
        f"{trained.pixels.shape[0]} validation images of {args.checkpoint}"
        if trained
        else f"{preset.height}x{preset.width} queries, D={preset.dim}"
    )
    print(
        f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.default_backend()}; {what}, k={preset.num_neighbors}, median of {preset.repeats}"
    )
    if trained:
        alike = smoothness(trained)
        print(
            f"# full-resolution pixel norm {alike['pixel_norm']:.3f}, adjacent stride-4"
            f" cosine {alike['neighbour_cosine']:.3f}"
        )
    print(
        "| queries | C | method | probes/K' | recall@k | certified | ESS rel. error | exact s"
        " | approx s | build s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for kind in ["trained"] if trained else args.kinds:
        for num_classes in preset.class_counts:
            if trained:
                classes = extend_classes(trained.classes, num_classes, args.extra_noise, seed=0)
                queries = dataclasses.replace(trained, classes=classes)
            else:
                rng = np.random.default_rng(num_classes)
                classes = _unit(rng.normal(size=(num_classes, preset.dim))).astype(np.float32)
                queries = make_queries(kind, preset, classes, seed=0)
            reference = exact_reference(queries, preset.num_neighbors, preset.repeats)
            for method in args.methods:
                for setting in _settings(method, preset, num_classes):
                    row = measure(
                        queries,
                        reference,
                        method,
                        setting,
                        preset.num_neighbors,
                        args.union_probes,
                        preset.repeats,
                    )
                    row["kind"] = kind
                    rows.append(row)
                    print(_format(row, kind), flush=True)
    return rows


if __name__ == "__main__":
    main()
