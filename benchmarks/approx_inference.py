"""Approximate against exact class assignment of one large image (inference), against C.

    python -m benchmarks.approx_inference --classes 1284 100000
    python -m benchmarks.approx_inference --checkpoint WORKDIR --classes 1284 100000

One ``--size`` image (1024×2048 by default) of pixel embeddings, assigned by the exact search
(``knn.assign``) and by the approximate one (``knn_union.approximate_assign``, K' =
``--candidates``): the fraction of pixels where they agree and the wall time of each (jitted,
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
from jaxscaleseg import knn, knn_union


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _run(compiled, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start, np.asarray(out)


def measure(features: np.ndarray, classes: np.ndarray, candidates: int, exact_rows: int):
    """Agreement and times of one image ``[1, H, W, D]`` against ``classes [C, D]``."""
    height = features.shape[1]
    rows = min(int(exact_rows or height), height)
    full, top = jnp.asarray(features), jnp.asarray(features[:, :rows])
    table = jnp.asarray(classes)

    def exact(x, c):
        return knn.assign(x, c, max_block_bytes="auto")

    def approximate(x, c):
        return knn_union.approximate_assign(x, c, candidates=candidates, max_block_bytes="auto")

    approx_s, approx_ids = _run(_compiled(approximate, full, table), full, table)
    exact_s, exact_ids = _run(_compiled(exact, top, table), top, table)
    return {
        "classes": int(classes.shape[0]),
        "candidates": candidates,
        "agreement": float(np.mean(approx_ids[:, :rows] == exact_ids)),
        "exact_s": exact_s * height / rows,
        "exact_scaled": rows < height,
        "approx_s": approx_s,
    }


def _random_features(size, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = approx_search._unit(rng.normal(size=(1, size[0] // 4, size[1] // 4, dim)))
    return approx_search._unit(approx_search._upsample(coarse, 4)).astype(np.float32)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1284, 100_000])
    parser.add_argument("--candidates", type=int, nargs="+", default=[32])
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
    print("| embeddings | C | K' | agreement | exact s | approx s |")
    print("|---|---:|---:|---:|---:|---:|")
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
            for candidates in args.candidates:
                row = measure(features, classes, min(candidates, num_classes), args.exact_rows)
                row["kind"] = kind
                rows.append(row)
                scaled = f" (×{features.shape[1]}/{args.exact_rows})" if row["exact_scaled"] else ""
                print(
                    f"| {kind} | {num_classes} | {row['candidates']} | {row['agreement']:.4f}"
                    f" | {row['exact_s']:.2f}{scaled} | {row['approx_s']:.2f} |",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    main()
