"""Shared pytest fixtures, and how the suite compiles: once per program, cheaply.

Most of the suite's time is XLA compiling small programs on the CPU, many of them several
times: the same tiny model trained by several tests, by a test and then by its resumed rerun,
by subprocesses (the CLI, the notebooks' kernels, the fault injection). Two settings, made here
for this process and, through the environment, for every subprocess it starts:

- JAX's persistent compilation cache keeps each compiled executable on disk under the key of
  its program and compile options, so every later compile of the same program in any process
  (this one, the other xdist workers, the subprocesses) loads it instead. A loaded executable is
  the one that was compiled, so results stay bit-identical. The cache is in pytest's cache
  directory (``.pytest_cache/d/jax_compilation_cache``, removed by ``make clean``); a corrupt or
  half-written entry (a killed process) costs JAX only a warning and a fresh compile.
- XLA's CPU backend compiles at LLVM optimisation level 0: the HLO program (fusion, layout,
  buffer assignment, hence ``memory_analysis()``) is the same, only the machine code is less
  optimised. On the suite's tiny shapes compiling dominates running (a train-state init took
  10.7 s of CPU to compile at the default level, 2.1 s at level 0).

A variable already set in the environment wins over these defaults.
"""

import os
from pathlib import Path

import jax
import pytest

# Programs that compile faster than this are not worth a file (most unit-test jits): writing and
# reading one costs about what compiling it does.
MIN_COMPILE_SECONDS = 0.3
OPT_LEVEL_FLAG = "--xla_backend_optimization_level"


def pytest_configure(config: pytest.Config) -> None:
    """Sets the compilation cache and XLA's CPU optimisation level for the run's processes."""
    if getattr(config, "cache", None) is not None:
        cache_dir = config.cache.mkdir("jax_compilation_cache")
    else:  # -p no:cacheprovider
        cache_dir = Path(config.rootpath) / ".pytest_cache" / "d" / "jax_compilation_cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "jax_compilation_cache_dir": str(cache_dir),
        "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECONDS,
        "jax_persistent_cache_min_entry_size_bytes": -1,  # no size floor
    }
    for name, value in settings.items():
        os.environ.setdefault(name.upper(), str(value))
        jax.config.update(name, type(value)(os.environ[name.upper()]))
    # XLA reads XLA_FLAGS when the backend starts, at the first computation (after this hook).
    flags = os.environ.get("XLA_FLAGS", "")
    if OPT_LEVEL_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {OPT_LEVEL_FLAG}=0".strip()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Runs the ``slow`` end-to-end tests first (in their order), then the rest; runs each
    test's un-jitted (``maybe_jit`` "nojit") variant for its first parametrization only.

    With ``make test``'s one-test-at-a-time distribution (``--maxschedchunk 1``) the long tests
    then spread over the workers first and the short ones fill the gaps, so no worker is left
    with a long test at the end while the other idles.

    The jitted variants check every parametrization against the references; an un-jitted call
    runs the same code op by op, 2-3x slower (63 s of the three numerical files' 152 s), and
    one parametrization shows that it runs and agrees. ``--all-eager`` runs them all.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if config.getoption("all_eager"):
        return
    seen, kept, dropped = set(), [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("maybe_jit") is False:
            if item.originalname in seen:
                dropped.append(item)
                continue
            seen.add(item.originalname)
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all-eager",
        action="store_true",
        dest="all_eager",
        help="run the un-jitted (maybe_jit 'nojit') variant of every parametrization",
    )


@pytest.fixture(params=[True, False], ids=["jit", "nojit"])
def maybe_jit(request):
    """Returns a wrapper that jits a function (static keyword args) or leaves it as is."""

    def wrap(fn, **static):
        def call(*args):
            return fn(*args, **static)

        return jax.jit(call) if request.param else call

    return wrap
