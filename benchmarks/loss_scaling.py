"""Loss scaling: memory and time of the ESS loss against the number of classes.

    python -m benchmarks.loss_scaling                 # the full table (BENCHMARKS.md)
    python -m benchmarks.loss_scaling --preset demo   # a small table in about a minute
    python -m benchmarks.loss_scaling --max_block_mb auto --pixels_per_chunk auto  # GPU sizes

For each class count C it compiles ``jax.value_and_grad`` of ``ess_loss + separation_loss``
(N pixels, D dimensions, k neighbours) and reports the compiled temporary memory
(``memory_analysis()``; "total" adds arguments and outputs) and the median wall time over warm
runs, beside

* the softmax baseline: ``softmax_cross_entropy`` on given ``[N, C]`` logits with its gradient,
  measured where its arguments and temporaries fit in half this machine's memory, otherwise
  reported as "n/a — would need X GB" from the compiled size;
* a straightforward ESS search (at the preset's ``compare_counts``): row-chunked distances and
  ``lax.top_k`` over each chunk's whole class axis, the same loss otherwise, to show what the
  pruned search buys. The two are timed in turn, run after run, so that a drifting load on a
  shared CPU hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxscaleseg import knn, loss_plan, losses


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark setting."""

    batch: int
    height: int
    width: int
    dim: int
    num_neighbors: int
    class_counts: tuple[int, ...]
    compare_counts: tuple[int, ...]
    repeats: int


PRESETS = {
    "full": Preset(2, 256, 256, 16, 7, (19, 150, 1284, 10_000, 100_000), (1284, 10_000), 5),
    "speed": Preset(2, 256, 256, 12, 7, (1284, 10_000), (1284, 10_000), 3),
    "demo": Preset(1, 128, 128, 16, 7, (19, 150, 1284, 10_000), (1284,), 3),
}


def straightforward_nearest_ids(
    queries: jax.Array, classes: jax.Array, k: int, exclude: jax.Array, rows: int = 4096
) -> jax.Array:
    """The comparison search: chunked rows, ``lax.top_k`` over each chunk's full class axis.

    Args:
      queries: float32 ``[N, D]``.
      classes: float32 ``[C, D]``.
      k: neighbours.
      exclude: int32 ``[N]`` ids never returned.
      rows: queries per chunk.

    Returns:
      int32 ``[N, k]``.
    """
    queries = lax.stop_gradient(queries)
    classes = lax.stop_gradient(classes)
    num, dim = queries.shape
    rows = min(rows, num)
    pad = -num % rows
    queries = jnp.pad(queries, ((0, pad), (0, 0)))
    exclude = jnp.pad(exclude, (0, pad), constant_values=-1)
    sq_norms = jnp.sum(classes * classes, axis=-1)
    ids = jnp.arange(classes.shape[0])

    def chunk(block):
        q, x = block
        scores = sq_norms[None, :] - 2.0 * jnp.dot(q, classes.T, precision=lax.Precision.HIGHEST)
        scores = jnp.where(ids[None, :] == x[:, None], jnp.inf, scores)
        return lax.top_k(-scores, k)[1]

    out = lax.map(chunk, (queries.reshape(-1, rows, dim), exclude.reshape(-1, rows)))
    return out.reshape(-1, k)[:num]


def straightforward_objective(pixels, labels, classes, *, k, temperature=20.0, margin=0.2):
    """``ess_loss + separation_loss`` with the straightforward search (same maths)."""
    dim = classes.shape[-1]
    flat = pixels.reshape(-1, dim)
    flat_labels = labels.reshape(-1)
    valid = flat_labels >= 0
    targets = jnp.where(valid, flat_labels, 0)
    neighbors = straightforward_nearest_ids(flat, classes, k, targets)
    candidates = jnp.concatenate([targets[:, None], neighbors], axis=-1)
    logits = -temperature * knn.pairwise_distance(flat[:, None, :], classes[candidates])
    per_pixel = jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]
    ess = jnp.sum(jnp.where(valid, per_pixel, 0.0)) / jnp.maximum(valid.sum(), 1)
    own = jnp.arange(classes.shape[0], dtype=jnp.int32)
    nearest = straightforward_nearest_ids(classes, classes, 1, own)[:, 0]
    separation = jnp.mean(jax.nn.relu(margin - knn.pairwise_distance(classes, classes[nearest])))
    return ess + separation


def ess_objective(
    pixels,
    labels,
    classes,
    *,
    k,
    max_block_bytes=knn.DEFAULT_MAX_BLOCK_BYTES,
    table_gradient="auto",
    pixels_per_chunk=8192,
):
    """``ess_loss + separation_loss`` as the library computes it (``losses.ess_objective``)."""
    total, _ = losses.ess_objective(
        pixels,
        labels,
        classes,
        num_neighbors=k,
        max_block_bytes=max_block_bytes,
        pixels_per_chunk=pixels_per_chunk,
        table_gradient=table_gradient,
    )
    return total


def random_inputs(preset: Preset, num_classes: int, seed: int = 0):
    """Pixel embeddings of norm <= 1, labels with ~5% ignored, unit class embeddings."""
    rng = np.random.default_rng(seed)
    shape = (preset.batch, preset.height, preset.width)
    pixels = rng.normal(size=(*shape, preset.dim)).astype(np.float32)
    pixels *= rng.uniform(0.5, 1.0, (*shape, 1)) / np.linalg.norm(pixels, axis=-1, keepdims=True)
    labels = rng.integers(0, num_classes, shape).astype(np.int32)
    labels[rng.random(shape) < 0.05] = -1
    classes = rng.uniform(-1, 1, (num_classes, preset.dim)).astype(np.float32)
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    return jnp.asarray(pixels), jnp.asarray(labels), jnp.asarray(classes)


def compiled_bytes(compiled) -> tuple[int, int]:
    """(temporary bytes, arguments + outputs + temporaries) of a compiled function."""
    memory = compiled.memory_analysis()
    total = (
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return memory.temp_size_in_bytes, total


def median_seconds(fn: Callable, args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over warm runs (one warm-up run first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict[str, Callable], args, repeats: int) -> dict[str, float]:
    """Median wall times of several functions timed in turn, run after run.

    On a shared CPU the load drifts; alternating the functions exposes them to the same
    drift, so their ratio is steadier than that of medians taken one function after another.
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def available_bytes() -> int:
    """Memory of the device the benchmark runs on (host RAM on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measure(
    preset: Preset,
    num_classes: int,
    *,
    compare: bool,
    max_block_bytes: int | str = knn.DEFAULT_MAX_BLOCK_BYTES,
    table_gradient: str = "auto",
    pixels_per_chunk: int | str = 8192,
) -> dict:
    """One table row: ESS (and optionally the straightforward search) and softmax at C."""
    pixels, labels, classes = random_inputs(preset, num_classes)
    row = {"C": num_classes}
    ess = jax.jit(
        jax.value_and_grad(
            lambda p, y, e: ess_objective(
                p,
                y,
                e,
                k=preset.num_neighbors,
                max_block_bytes=max_block_bytes,
                table_gradient=table_gradient,
                pixels_per_chunk=pixels_per_chunk,
            ),
            argnums=(0, 2),
        )
    )
    compiled = ess.lower(pixels, labels, classes).compile()
    row["ess_temp"], row["ess_total"] = compiled_bytes(compiled)
    if compare:
        plain = jax.jit(
            jax.value_and_grad(
                lambda p, y, e: straightforward_objective(p, y, e, k=preset.num_neighbors),
                argnums=(0, 2),
            )
        )
        compiled_plain = plain.lower(pixels, labels, classes).compile()
        seconds = interleaved_median_seconds(
            {"ess": compiled, "plain": compiled_plain}, (pixels, labels, classes), preset.repeats
        )
        row["ess_seconds"], row["plain_seconds"] = seconds["ess"], seconds["plain"]
        value, _ = compiled(pixels, labels, classes)
        plain_value, _ = compiled_plain(pixels, labels, classes)
        row["agree"] = bool(np.isclose(float(value), float(plain_value), rtol=1e-5))
    else:
        row["ess_seconds"] = median_seconds(compiled, (pixels, labels, classes), preset.repeats)
    num_pixels = preset.batch * preset.height * preset.width
    logits_shape = jax.ShapeDtypeStruct((num_pixels, num_classes), jnp.float32)
    label_shape = jax.ShapeDtypeStruct((num_pixels,), jnp.int32)
    softmax = jax.jit(jax.value_and_grad(losses.softmax_cross_entropy))
    compiled_softmax = softmax.lower(logits_shape, label_shape).compile()
    row["softmax_temp"], row["softmax_total"] = compiled_bytes(compiled_softmax)
    if row["softmax_total"] < available_bytes() // 2:  # room for the inputs too
        rng = np.random.default_rng(1)
        logits = jnp.asarray(rng.normal(size=(num_pixels, num_classes)).astype(np.float32))
        row["softmax_seconds"] = median_seconds(
            compiled_softmax, (logits, labels.reshape(-1)), preset.repeats
        )
        del logits
    return row


def megabytes(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.1f} MB"


def format_table(preset: Preset, rows: list[dict]) -> str:
    """Markdown table of the measured rows."""
    lines = [
        "| C | ESS temporaries | ESS total | ESS time | straightforward ESS time | speed-up | "
        "softmax total | softmax time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        plain = row.get("plain_seconds")
        if "softmax_seconds" in row:
            softmax_time = f"{row['softmax_seconds']:.3f} s"
        else:
            softmax_time = f"n/a — would need {row['softmax_total'] / 2**30:.1f} GB"
        lines.append(
            f"| {row['C']:,} | {megabytes(row['ess_temp'])} | {megabytes(row['ess_total'])} | "
            f"{row['ess_seconds']:.3f} s | "
            + (f"{plain:.3f} s | {plain / row['ess_seconds']:.1f}× | " if plain else "— | — | ")
            + f"{megabytes(row['softmax_total'])} | {softmax_time} |"
        )
    return "\n".join(lines)


def describe(preset: Preset) -> str:
    return (
        f"N = {preset.batch}×{preset.height}×{preset.width} pixels, D = {preset.dim}, "
        f"k = {preset.num_neighbors}, `value_and_grad(ess_loss + separation_loss)`; "
        f"median of {preset.repeats} warm runs (ESS and the straightforward search run in turn); "
        f"jax {jax.__version__} on {jax.devices()[0]}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--classes", type=int, nargs="*", help="override the preset's class counts")
    parser.add_argument(
        "--max_block_mb",
        default=str(knn.DEFAULT_MAX_BLOCK_BYTES // 2**20),
        help="block budget of the ESS search (MiB), or 'auto' (by backend: loss_plan.loss_plan)",
    )
    parser.add_argument(
        "--pixels_per_chunk",
        default="8192",
        help="pixels per chunk of the ESS loss, or 'auto' (by backend: loss_plan.loss_plan)",
    )
    parser.add_argument(
        "--table_gradient",
        choices=loss_plan.TABLE_GRADIENTS,
        default="auto",
        help="how row gradients reach the class table (losses.ess_objective)",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    block = "auto" if args.max_block_mb == "auto" else int(float(args.max_block_mb) * 2**20)
    chunk = "auto" if args.pixels_per_chunk == "auto" else int(args.pixels_per_chunk)
    counts = tuple(args.classes) if args.classes else preset.class_counts
    print(describe(preset), flush=True)
    rows = []
    for num_classes in counts:
        start = time.perf_counter()
        compare = num_classes in preset.compare_counts
        rows.append(
            measure(
                preset,
                num_classes,
                compare=compare,
                max_block_bytes=block,
                table_gradient=args.table_gradient,
                pixels_per_chunk=chunk,
            )
        )
        print(f"  C = {num_classes:,} done in {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(format_table(preset, rows))


if __name__ == "__main__":
    main()
