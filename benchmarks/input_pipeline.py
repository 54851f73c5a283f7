"""Throughput of the training input pipeline (batches per second), as a Markdown table.

Run from the repository root:

    .venv/bin/python benchmarks/input_pipeline.py                       # synthetic source
    .venv/bin/python benchmarks/input_pipeline.py --tfds_name=NAME --data_dir=DIR \\
        --num_classes=C [--split=train]                                 # a prepared TFDS set

For every worker count in ``--worker_counts`` it builds ``make_train_iterator`` (random scale
0.5-2.0, crop with padding, flip, optional colour jitter, normalise, batch), discards
``--warmup`` batches (worker start-up) and times the next ``--num_batches``, ``--repeats``
times (a fresh pipeline each time; the table shows the median and the range). The first row,
"source only", times reading and decoding records (``source[i]``) without augmentation or
batching, in the main process. Any random-access source can be measured from Python with
``measure(source, ...)``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxscaleseg.data import pipeline
from jaxscaleseg.data.synthetic import SyntheticSegmentation


def measure_source(source: Any, num_classes: int, num_records: int) -> float:
    """Records per second for reading and decoding ``source[i]`` (no augmentation)."""
    indices = np.random.default_rng(0).permutation(len(source))[:num_records]
    pipeline.decode_example(source[int(indices[0])], num_classes)
    start = time.perf_counter()
    for i in indices:
        pipeline.decode_example(source[int(i)], num_classes)
    return len(indices) / (time.perf_counter() - start)


def measure(
    source: Any,
    *,
    num_classes: int,
    batch_size: int,
    crop_size: tuple[int, int],
    worker_count: int,
    num_batches: int,
    warmup: int,
    color_jitter: bool = False,
    read_threads: int = 2,
    seed: int = 0,
) -> float:
    """Batches per second of ``make_train_iterator`` on ``source`` after ``warmup`` batches."""
    iterator = pipeline.make_train_iterator(
        source,
        batch_size=batch_size,
        crop_size=crop_size,
        seed=seed,
        num_classes=num_classes,
        color_jitter=color_jitter,
        worker_count=worker_count,
        read_threads=read_threads,
    )
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["image"].shape == (batch_size, *crop_size, 3)
    del iterator, batch
    gc.collect()  # stop the workers now, not during interpreter shutdown
    return num_batches / elapsed


def _pair(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tfds_name", default=None, help="prepared TFDS dataset; else synthetic")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir of the prepared set")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_classes", type=int, default=1284)
    parser.add_argument("--image_size", type=_pair, default=(512, 512), help="synthetic HxW")
    parser.add_argument("--num_examples", type=int, default=2000, help="synthetic split size")
    parser.add_argument("--crop_size", type=_pair, default=(512, 512))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--worker_counts", default="0,1,2")
    parser.add_argument("--num_batches", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--color_jitter", action="store_true")
    parser.add_argument("--read_threads", type=int, default=2, help="per process")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median, range)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    if args.tfds_name:
        import tensorflow_datasets as tfds  # reads array_record files; TensorFlow not needed

        source = tfds.data_source(args.tfds_name, split=args.split, data_dir=args.data_dir)
        name = f"tfds `{args.tfds_name}` ({args.split}, {len(source)} examples)"
        first = pipeline.decode_example(source[0], args.num_classes)
        image_size = "x".join(map(str, first["label"].shape)) + " (first)"
    else:
        source = SyntheticSegmentation(
            args.num_classes, args.image_size, args.num_examples, seed=0, split=args.split
        )
        name = f"synthetic, C={args.num_classes}"
        image_size = "x".join(map(str, args.image_size))
    crop = "x".join(map(str, args.crop_size))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    jitter = "on" if args.color_jitter else "off"
    print(f"Machine: {machine}. Batch size {args.batch_size}, crop {crop}, scale 0.5-2.0, flip,")
    print(f"colour jitter {jitter}; {args.read_threads} read threads per process;")
    print(
        f"{args.num_batches} batches timed after {args.warmup} warm-up batches, {args.repeats} runs"
    )
    print("per row: median batches/s (min-max); images/s from the median.\n")
    print("| source | image size | crop | batch | workers | batches/s | images/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    records = measure_source(source, args.num_classes, min(len(source), 4 * args.batch_size))
    print(f"| {name} | {image_size} | - | - | source only | - | {records:.1f} |", flush=True)
    for workers in (int(w) for w in args.worker_counts.split(",")):
        rates = [
            measure(
                source,
                num_classes=args.num_classes,
                batch_size=args.batch_size,
                crop_size=args.crop_size,
                worker_count=workers,
                num_batches=args.num_batches,
                warmup=args.warmup,
                color_jitter=args.color_jitter,
                read_threads=args.read_threads,
            )
            for _ in range(args.repeats)
        ]
        rate = float(np.median(rates))
        spread = f" ({min(rates):.2f}-{max(rates):.2f})" if len(rates) > 1 else ""
        print(
            f"| {name} | {image_size} | {crop} | {args.batch_size} | {workers} | "
            f"{rate:.2f}{spread} | {rate * args.batch_size:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
