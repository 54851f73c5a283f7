"""The ESS objective's plan: its block and chunk sizes and methods, resolved per backend.

Sizes that suit a CPU cache are far too small for a GPU, where each loop iteration is a kernel
launch; every ``"auto"`` setting is turned into a value here, by a pure function of the backend
and the class count (tested for every backend on any machine).
"""

from __future__ import annotations

import dataclasses

import jax

from jaxscaleseg import knn

# Pixels per chunk of the ESS loss; each chunk's k+1 gathered class rows are recomputed in the
# backward pass instead of being stored for all pixels at once.
DEFAULT_PIXELS_PER_CHUNK = 8192


# What ``pixels_per_chunk="auto"`` means: the cache-sized chunk on CPU (as measured in
# BENCHMARKS.md §2); on GPU/TPU a chunk is a loop iteration of several kernels, so 2¹⁸ pixels
# (8 chunks a step at batch 8, 512×512).
AUTO_PIXELS_PER_CHUNK = {"cpu": DEFAULT_PIXELS_PER_CHUNK}
ACCELERATOR_PIXELS_PER_CHUNK = 2**18


# What ``table_gradient="auto"`` takes off the CPU. Measured on an H200 (BENCHMARKS §2, GPU
# check, N = 8·512²): sorted took 0.008 / 0.083 / 2.28 s at C = 19 / 1 284 / 100 000, within
# 25 % of the best method at each C, where matmul took 0.155 s at 1 284 and segment 4.27 s at
# 100 000.
ACCELERATOR_TABLE_GRADIENT = "sorted"
TABLE_GRADIENTS = ("auto", "scatter", "sorted", "matmul", "segment")


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """How the ESS objective is cut up and how its table gradient is summed.

    Attributes:
      max_block_bytes: budget of the nearest-class searches (queries×classes scores, and the
        matmul table gradient's classes×pixels weights).
      pixels_per_chunk: pixels per chunk of the loss (rows gathered and recomputed per chunk).
      table_gradient: ``"scatter"``, ``"sorted"``, ``"matmul"`` or ``"segment"`` (see
        ``losses.ess_objective``).
      search_method: ``"pyramid"``, ``"top_k"``, ``"min_rounds"`` or ``"tiled_top_k"`` (see
        ``knn.nearest_class_ids``).
    """

    max_block_bytes: int
    pixels_per_chunk: int
    table_gradient: str
    search_method: str


def loss_plan(
    backend: str | None,
    num_classes: int,
    *,
    max_block_bytes: int | str = "auto",
    pixels_per_chunk: int | str = "auto",
    table_gradient: str = "auto",
    search_method: str = "auto",
) -> LossPlan:
    """Resolves every ``"auto"`` setting of the ESS objective for a backend (pure).

    On ``"cpu"``: 8 MiB blocks, 8 192-pixel chunks, scatter-add, the pyramid search (the values
    the CPU benchmarks were measured with). On any other backend: 1 GiB blocks, 2¹⁸-pixel
    chunks, ``lax.top_k`` and the sorted table gradient (``ACCELERATOR_TABLE_GRADIENT``: per-id
    sums written once, no contended float atomics). Ints and named methods are
    kept as given.

    Args:
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"``...; None: ``jax.default_backend()``.
      num_classes: C.
      max_block_bytes, pixels_per_chunk, table_gradient, search_method: the settings, each
        ``"auto"`` or a value.

    Returns:
      The resolved :class:`LossPlan`.
    """
    backend = backend or jax.default_backend()
    if table_gradient not in TABLE_GRADIENTS:
        raise ValueError(f"table_gradient={table_gradient!r}; expected one of {TABLE_GRADIENTS}")
    if isinstance(pixels_per_chunk, str):
        if pixels_per_chunk != "auto":
            raise ValueError(f"pixels_per_chunk={pixels_per_chunk!r}; expected 'auto' or an int")
        pixels_per_chunk = AUTO_PIXELS_PER_CHUNK.get(backend, ACCELERATOR_PIXELS_PER_CHUNK)
    if int(pixels_per_chunk) < 1:
        raise ValueError(f"pixels_per_chunk={pixels_per_chunk} must be positive")
    if table_gradient == "auto":
        table_gradient = "scatter" if backend == "cpu" else ACCELERATOR_TABLE_GRADIENT
    return LossPlan(
        max_block_bytes=knn.resolve_block_bytes(max_block_bytes, backend),
        pixels_per_chunk=int(pixels_per_chunk),
        table_gradient=table_gradient,
        search_method=knn.resolve_method(search_method, backend),
    )
