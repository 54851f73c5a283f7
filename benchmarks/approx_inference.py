"""Approximate against exact class assignment of one large image (inference), against C.

    python -m benchmarks.approx_inference --classes 1284 100000
    python -m benchmarks.approx_inference --checkpoint WORKDIR --classes 1284 100000

One ``--size`` image (1024×2048 by default) of pixel embeddings, assigned by the exact search
(``knn.assign``) and by each of ``--methods``: the approximate one
(``knn_union.approximate_assign``, K' = ``--candidates``) and the certified one
(``knn_certified.certified_assign``, which also reports the fraction of pixels its bound
certified): the fraction of pixels where each agrees with the exact one and its wall time (jitted,
compiled before timing, one timed run each: at C = 100 000 the exact search of a whole image
takes minutes on a CPU). With ``--exact_rows R`` the exact search runs on the first R rows only
(agreement on those rows; its time scaled by H/R, marked "×H/R" in the table).

Embeddings:

* ``random``: independent random unit vectors on the stride-4 grid, upsampled ×4 bilinearly
  and renormalised, as inference's features (the worst case), D = ``--dim``, random unit table;
* ``trained`` (``--checkpoint WORKDIR``): the trained model's features (renormalised, as the
  ``Predictor``'s) of one image tiling the run's validation images, and its table extended to
  C as in ``benchmarks.approx_search`` (jittered copies of trained rows).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import approx_search
from jaxscaleseg import knn, knn_certified, knn_union

METHODS = ("approximate", "certified")


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _run(compiled, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start, jax.tree.map(np.asarray, out)


def measure(
    features: np.ndarray,
    classes: np.ndarray,
    candidates: int,
    exact_rows: int,
    method: str = "approximate",
):
    """Agreement and times of one image ``[1, H, W, D]`` against ``classes [C, D]``.

    ``method``: ``"approximate"`` (``knn_union.approximate_assign``) or ``"certified"``
    (``knn_certified.certified_assign``, whose certified fractions are reported too).
    """
    height = features.shape[1]
    rows = min(int(exact_rows or height), height)
    full, top = jnp.asarray(features), jnp.asarray(features[:, :rows])
    table = jnp.asarray(classes)

    def exact(x, c):
        return knn.assign(x, c, max_block_bytes="auto")

    def approximate(x, c):
        return knn_union.approximate_assign(x, c, candidates=candidates, max_block_bytes="auto")

    def certified(x, c):
        return knn_certified.certified_assign(x, c, candidates=candidates)

    fn = certified if method == "certified" else approximate
    approx_s, out = _run(_compiled(fn, full, table), full, table)
    approx_ids, stats = (out[0], {"certified": out[1]}) if method == "certified" else (out, {})
    exact_s, exact_ids = _run(_compiled(exact, top, table), top, table)
    return {
        "classes": int(classes.shape[0]),
        "method": method,
        "candidates": candidates,
        "agreement": float(np.mean(np.asarray(approx_ids)[:, :rows] == exact_ids)),
        "exact_s": exact_s * height / rows,
        "exact_scaled": rows < height,
        "approx_s": approx_s,
        **{name: float(value) for name, value in stats.items()},
    }


def _random_features(size, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = approx_search._unit(rng.normal(size=(1, size[0] // 4, size[1] // 4, dim)))
    return approx_search._unit(approx_search._upsample(coarse, 4)).astype(np.float32)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1284, 100_000])
    parser.add_argument("--candidates", type=int, nargs="+", default=[32])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["approximate"])
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--dim", type=int, default=24, help="D of the random embeddings")
    parser.add_argument("--exact_rows", type=int, default=0, help="0: the whole image")
    parser.add_argument("--checkpoint", help="a training workdir: its trained embeddings")
    parser.add_argument("--extra_noise", type=float, default=0.5)
    args = parser.parse_args(argv)
    kinds = {"random": None}
    if args.checkpoint:
        tile = approx_search.trained_queries(args.checkpoint, 1).pixels.shape[1:3]
        mosaic = (args.size[0] // tile[0], args.size[1] // tile[1])
        trained = approx_search.trained_queries(args.checkpoint, 100, mosaic)
        features = trained.pixels / np.linalg.norm(trained.pixels, axis=-1, keepdims=True)
        kinds["trained"] = (features.astype(np.float32), trained.classes)
    print(
        f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.default_backend()}; image {args.size[0]}x{args.size[1]}"
    )
    print("| embeddings | C | method | K' | agreement | certified | exact s | method s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for kind, given in kinds.items():
        for num_classes in args.classes:
            if given is None:
                features = _random_features(args.size, args.dim, seed=0)
                rng = np.random.default_rng(num_classes)
                classes = approx_search._unit(rng.normal(size=(num_classes, args.dim)))
                classes = classes.astype(np.float32)
            else:
                features = given[0]
                classes = approx_search.extend_classes(
                    given[1], num_classes, args.extra_noise, seed=0
                )
            for method in args.methods:
                for candidates in args.candidates:
                    k = min(candidates, num_classes)
                    row = measure(features, classes, k, args.exact_rows, method)
                    row["kind"] = kind
                    rows.append(row)
                    scaled = f" (×{features.shape[1]}/{args.exact_rows})" * row["exact_scaled"]
                    certified = f"{row['certified']:.4f}" if "certified" in row else "—"
                    print(
                        f"| {kind} | {num_classes} | {method} | {k} | {row['agreement']:.4f}"
                        f" | {certified} | {row['exact_s']:.2f}{scaled} | {row['approx_s']:.2f} |",
                        flush=True,
                    )
    return rows


if __name__ == "__main__":
    main()
