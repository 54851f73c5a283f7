"""Scaling benchmark: the full DeepLabV3+ train step against the number of classes.

    python -m benchmarks.scaling --preset cpu        # MobileNetV2, batch 2, 256×256 (this machine)
    python -m benchmarks.scaling --preset gpu        # ResNet-101 OS 16, batch 8, 512×512, f32+bf16

For C in {19, 150, 1 284, 10 000, 100 000} and both heads (the softmax baseline and ESS) it
compiles ``steps.train_step`` (model + loss + optimiser update) and reports

* compiled peak memory per step: arguments + outputs + temporaries from ``memory_analysis()``
  (the state is donated, so it is counted once);
* median step time over warm runs and images per second, where the step fits: a setting whose
  compiled size exceeds the device's memory is marked "does not fit" instead of crashing;
* on a GPU, the peak the device itself reports (``memory_stats()['peak_bytes_in_use']``).

It writes ``benchmarks/results/scaling_<preset>.csv`` and ``.md`` and a PNG plot (memory and
time against C, log-scaled, both heads) ``benchmarks/results/scaling_<preset>.png``.
``--classes``, ``--backbone``, ``--size``, ``--batch`` and ``--dtypes`` override a preset
(the tests run the ``gpu`` preset on CPU with a tiny override); ``--heads ess`` times one head
only, and ``--loss KEY=VALUE`` (repeatable) sets a ``loss`` config key of the ESS cells, e.g.

    python -m benchmarks.scaling --classes 1284 100000 --heads ess \
        --loss search=union --loss separation_refresh_every=100 --output_dir /tmp/union

Each row also reports the first (warm-up) step after compiling, which is step 0: with
``separation_refresh_every = n > 1`` it is the step that refreshes the separation ids, the
median one of those that do not, so a step costs ``(first + (n - 1) * median) / n`` on average.
``--compile_only`` reports the compiled peaks alone (deterministic: no quiet machine needed).

What the step is timed on (``--inputs``): ``random`` (the default) fills the variables with
small random values (no initialiser to compile) and the batch with Gaussian noise; the exact
search's time does not depend on them. The certified search's does (``loss.search =
"certified"``, what ``"auto"`` takes from 10 000 classes with ``loss.normalize_pixels``): its
exact fallback runs for the pixels its bound does not certify, and the nearly constant
embeddings of small random weights certify every pixel. ``synthetic`` times the step on the
model's own initial variables and a batch of the built-in synthetic set, as a training run's
first steps see them. Each ESS row reports the fraction certified where the step measures it
(the mean over the timed steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results_files import write_tables
from jaxscaleseg import config_schema, initial_state, optim, steps

RESULTS = Path(__file__).resolve().parent / "results"
INPUTS = ("random", "synthetic")


@dataclasses.dataclass(frozen=True)
class Preset:
    """One benchmark setting."""

    backbone: str
    output_stride: int
    batch: int
    size: int
    dtypes: tuple[str, ...]
    class_counts: tuple[int, ...] = (19, 150, 1284, 10_000, 100_000)
    embedding_dim: int = 12
    repeats: int = 3
    heads: tuple[str, ...] = ("softmax", "ess")
    loss_overrides: tuple[tuple[str, str], ...] = ()


PRESETS = {
    "cpu": Preset("mobilenet_v2", 16, 2, 256, ("float32",)),
    "gpu": Preset("resnet101", 16, 8, 512, ("float32", "bfloat16")),
}


def make_config(preset: Preset, num_classes: int, head: str, dtype: str):
    """A training config for one benchmark cell."""
    config = config_schema.base_config()
    config.batch_size = preset.batch
    config.num_train_steps = 1000
    config.dataset.num_classes = num_classes
    config.dataset.crop_size = (preset.size, preset.size)
    config.model.backbone = preset.backbone
    config.model.output_stride = preset.output_stride
    config.model.embedding_dim = preset.embedding_dim
    config.model.dtype = dtype
    config.loss.name = "softmax" if head == "softmax" else "ess"
    if head != "softmax":
        for key, text in preset.loss_overrides:
            config.loss[key] = parse_loss_value(config.loss, key, text)
        config_schema.validate(config)
    return config


def parse_loss_value(loss_config, key: str, text: str):
    """``text`` converted to the type of ``loss_config[key]``; unknown keys are refused."""
    if key not in loss_config:
        raise SystemExit(f"error: --loss {key}=...: no such loss key; known: {sorted(loss_config)}")
    current = loss_config[key]
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise SystemExit(f"error: --loss {key}={text}: expected true or false")
        return text.lower() == "true"
    try:
        return type(current)(text) if current is not None else text
    except ValueError:
        raise SystemExit(
            f"error: --loss {key}={text}: expected a {type(current).__name__}"
        ) from None


def device_memory_bytes() -> int:
    """Memory of the benchmark device (host RAM on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def random_variables(shapes) -> dict:
    """Variables of the given shapes filled with small random values (no init to compile).

    Timing does not depend on the values; BatchNorm variances are set to 1.
    """
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        if any(getattr(k, "key", None) == "var" for k in path):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.05 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What compiling and running one cell's train step needs.

    Attributes:
      new_state: ``variables -> steps.TrainState`` (the model and optimiser of the cell).
      init: ``key -> variables``, the model's initialiser on a zero image batch.
      step: the jitted ``steps.train_step`` (state donated).
      abstract_state: the state's shapes, from ``jax.eval_shape``.
      batch_shapes: ``{"image", "label"}`` shapes of one batch.
    """

    new_state: Callable
    init: Callable
    step: Callable
    abstract_state: Any
    batch_shapes: dict


def step_parts(config, image_shape: tuple[int, int, int, int]) -> StepParts:
    """The train step of ``config`` for batches of ``image_shape`` ``[B, H, W, 3]``, not compiled.

    The same model and optimiser objects serve the abstract and the real state, so the compiled
    step accepts the real one.
    """
    spec = steps.LossSpec.from_config(config.loss)
    model = initial_state.make_model(config)
    tx = optim.make_optimizer(config.optim, config.num_train_steps)

    def new_state(variables):
        return steps.TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            tx=tx,
            batch_stats=variables.get("batch_stats", {}),
            # The separation ids or the approximate search's index, where the loss carries them.
            **initial_state.carried_state(config, variables["params"]),
        )

    def init(key):
        return model.init({"params": key}, jnp.zeros(image_shape, jnp.float32), train=False)

    return StepParts(
        new_state=new_state,
        init=init,
        step=jax.jit(functools.partial(steps.train_step, spec=spec), donate_argnums=0),
        abstract_state=jax.eval_shape(lambda: new_state(init(jax.random.key(0)))),
        batch_shapes={
            "image": jax.ShapeDtypeStruct(image_shape, jnp.float32),
            "label": jax.ShapeDtypeStruct(image_shape[:3], jnp.int32),
        },
    )


def first_state_and_batch(parts: StepParts, config, image_shape, inputs: str):
    """The state and batch a cell is timed on (``inputs``: see the module docstring)."""
    key = jax.random.key(0)
    if inputs == "random":
        state = parts.new_state(random_variables(jax.eval_shape(parts.init, key)))
        rng = np.random.default_rng(0)
        num_classes = config.dataset.num_classes
        return state, {
            "image": jnp.asarray(rng.normal(size=image_shape).astype(np.float32)),
            "label": jnp.asarray(rng.integers(-1, num_classes, image_shape[:3]).astype(np.int32)),
        }
    if inputs != "synthetic":
        raise ValueError(f"inputs={inputs!r}; expected one of {INPUTS}")
    from jaxscaleseg.data import sources  # noqa: PLC0415 (grain, only for these inputs)

    data = config.copy_and_resolve_references()  # the built-in set at the cell's C and size
    data.dataset.name = "synthetic"
    data.dataset.synthetic.image_size = tuple(image_shape[1:3])
    data.dataset.synthetic.train_examples = max(image_shape[0], 8)
    data.dataset.scale_range = (1.0, 1.0)
    train, _ = sources.make_sources(data)
    iterator = sources.train_iterator(data, train, image_shape[0], seed=0, worker_count=0)
    batch = next(iter(iterator))
    batch = {name: jnp.asarray(batch[name]) for name in ("image", "label")}
    return parts.new_state(jax.jit(parts.init)(key)), batch


def measure(
    preset: Preset,
    num_classes: int,
    head: str,
    dtype: str,
    compile_only: bool = False,
    inputs: str = "random",
) -> dict:
    """Compiled memory and (where it fits, unless ``compile_only``) step time of one
    (C, head, dtype) cell, timed on ``inputs`` (see the module docstring)."""
    config = make_config(preset, num_classes, head, dtype)
    image_shape = (preset.batch, preset.size, preset.size, 3)
    parts = step_parts(config, image_shape)
    step = parts.step
    abstract_state, batch_shapes = parts.abstract_state, parts.batch_shapes
    key = jax.random.key(0)
    compiled = step.lower(abstract_state, batch_shapes, key).compile()
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    row = {
        "C": num_classes,
        "head": "softmax" if head == "softmax" else "ess",
        "dtype": dtype,
        "compiled_peak_mb": peak / 2**20,
        "temp_mb": memory.temp_size_in_bytes / 2**20,
        "fits": peak < 0.9 * device_memory_bytes(),
    }
    if compile_only or not row["fits"]:
        return row
    state, batch = first_state_and_batch(parts, config, image_shape, inputs)
    start = time.perf_counter()
    state, _ = compiled(state, batch, key)  # warm-up: step 0 (refreshes carried ids)
    jax.block_until_ready(state)
    row["first_step_seconds"] = time.perf_counter() - start
    times, certified = [], []
    for _ in range(preset.repeats):
        start = time.perf_counter()
        state, out = compiled(state, batch, key)
        jax.block_until_ready(out["loss"])
        times.append(time.perf_counter() - start)
        if "search_certified" in out:  # it changes from step to step as the network trains
            certified.append(float(out["search_certified"]))
    row["step_seconds"] = statistics.median(times)
    if certified:
        row["search_certified"] = statistics.mean(certified)
    row["images_per_second"] = preset.batch / row["step_seconds"]
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return row


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| C | head | dtype | compiled peak | step time | images/s | first step | certified "
        "| device peak |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "step_seconds" in row:
            time_cell = f"{row['step_seconds']:.3f} s"
            rate = f"{row['images_per_second']:.2f}"
            first = f"{row['first_step_seconds']:.3f} s"
        else:
            time_cell = "not timed" if row["fits"] else "does not fit"
            rate, first = "—", "—"
        device = f"{row['device_peak_mb']:,.0f} MB" if "device_peak_mb" in row else "—"
        certified = f"{row['search_certified']:.3f}" if "search_certified" in row else "—"
        lines.append(
            f"| {row['C']:,} | {row['head']} | {row['dtype']} | "
            f"{row['compiled_peak_mb']:,.1f} MB | {time_cell} | {rate} | {first} | {certified} "
            f"| {device} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Memory and step time against C (log scale), one line per head and dtype."""
    import matplotlib  # noqa: PLC0415 (optional dependency, only for the picture)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["head"], r["dtype"]) for r in rows}):
        cell = [r for r in rows if (r["head"], r["dtype"]) == key]
        label = f"{key[0]} ({key[1]})"
        memory_axis.plot(
            [r["C"] for r in cell], [r["compiled_peak_mb"] for r in cell], "o-", label=label
        )
        timed = [r for r in cell if "step_seconds" in r]
        time_axis.plot(
            [r["C"] for r in timed], [r["step_seconds"] for r in timed], "o-", label=label
        )
    for axis, title in ((memory_axis, "compiled peak memory (MB)"), (time_axis, "step time (s)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("number of classes C")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe(preset: Preset, inputs: str = "random") -> str:
    overrides = "".join(f", loss.{k} = {v}" for k, v in preset.loss_overrides)
    return (
        f"DeepLabV3+ {preset.backbone} OS {preset.output_stride}, batch {preset.batch}, "
        f"{preset.size}×{preset.size}, D = {preset.embedding_dim}{overrides}, full train step "
        f"(model + loss + SGD update), timed on {inputs} inputs; jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, {platform.machine()}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--classes", type=int, nargs="*")
    parser.add_argument("--backbone")
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--dtypes", nargs="*", choices=("float32", "bfloat16"))
    parser.add_argument("--heads", nargs="*", choices=("softmax", "ess"))
    parser.add_argument(
        "--loss", action="append", default=[], metavar="KEY=VALUE", help="an ESS loss key"
    )
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--no_plot", action="store_true")
    parser.add_argument(
        "--compile_only", action="store_true", help="compiled peaks only, no step timed"
    )
    parser.add_argument(
        "--inputs", choices=INPUTS, default="random", help="what the step is timed on"
    )
    args = parser.parse_args(argv)
    for item in args.loss:
        if "=" not in item:
            parser.error(f"--loss {item}: expected KEY=VALUE")
    preset = PRESETS[args.preset]
    overrides = {
        "class_counts": tuple(args.classes) if args.classes else None,
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "dtypes": tuple(args.dtypes) if args.dtypes else None,
        "heads": tuple(args.heads) if args.heads else None,
        "loss_overrides": tuple(tuple(item.split("=", 1)) for item in args.loss) or None,
    }
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v})
    print(describe(preset, args.inputs), flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scaling_{args.preset}"
    rows = []
    for num_classes in preset.class_counts:
        for head in preset.heads:
            for dtype in preset.dtypes:
                start = time.perf_counter()
                rows.append(
                    measure(preset, num_classes, head, dtype, args.compile_only, args.inputs)
                )
                print(
                    f"  C = {num_classes:,} {head} {dtype}: {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
                write_tables(rows, stem, describe(preset, args.inputs), markdown(rows))
    print()
    print(markdown(rows))
    if not args.no_plot:
        plot(rows, Path(f"{stem}.png"))
    return rows


if __name__ == "__main__":
    main()
