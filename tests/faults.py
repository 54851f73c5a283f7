"""Fault injection: SIGKILL the training CLI at seeded random points, check every resume.

    python -m tests.faults --kills 30      # the long run (its result is in the README)
    python -m tests.faults --kills 3       # about what `make test` runs (tests/test_faults.py)

The training process is a black box: ``python -m jaxscaleseg.train`` on ``configs/synthetic.py``
(its ``smoke`` variant: the demo's model, loss and optimiser on tiny inputs) for 8 steps, with
checkpoints every 3 steps, an evaluation every 2 (so the first best checkpoint comes before the
first latest one) and a metrics record every step. This module only starts it, watches its
workdir and kills it.

1. An uninterrupted run gives the reference: final state, metrics, and how long each phase
   took (start-up, a step, a checkpoint save, an evaluation), read from the workdir's
   timeline as this module saw it.
2. A chain of runs on one workdir is killed again and again. Each kill point is drawn from a
   generator seeded with ``--seed``: a phase, a step among the next ones the resumed run has to
   reach (within two checkpoint periods), and a delay within that phase's duration:

   - ``start``: during start-up (imports, restore, compile), a delay after the process began;
   - ``step``: inside a training step, a delay after step s's metrics record appeared;
   - ``save``: inside a checkpoint save, a delay after orbax's temporary folder for checkpoint
     s appeared;
   - ``eval``: inside an evaluation, a delay after evaluation step s's training record;
   - ``append``: while ``metrics.jsonl`` is appended: killed as step s's training record
     appears, then its line is cut short as a kill inside the ``write`` would leave it (only
     when that record is newer than the last checkpoint, as a real torn write would be).

3. After each kill a copy of the killed workdir is resumed uninterrupted to the end; it must
   say it resumes from the newest checkpoint the kill left (or starts from scratch), end with
   the reference's state (params, batch statistics, optimiser state and step: bit for bit),
   its best checkpoint at the reference's step, no more latest checkpoints than the
   run keeps, and a ``metrics.jsonl`` whose every line is a JSON record, with one training
   record per step and one evaluation record per evaluation step, equal to the reference's
   (timings aside). The chain then goes on from the killed workdir, so later kills resume
   workdirs that earlier kills shaped. When a chained run finishes before its kill point, the
   chain starts over from an empty workdir.

Exit status 0 when every resume was identical; the last line says ``N kills, N identical
resumes``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxscaleseg import workdir as workdir_lib

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "synthetic.py"
PHASES = ("start", "step", "save", "eval", "append")
TMP_MARK = ".orbax-checkpoint-tmp"
POLL_SECONDS = 0.002
RUN_TIMEOUT_SECONDS = 600


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The run every process trains (command-line overrides of ``configs/synthetic.py:smoke``)."""

    steps: int = 8
    checkpoint_every: int = 3
    eval_every: int = 2  # the first evaluation (and best checkpoint) comes before a checkpoint
    keep: int = 2

    def args(self, workdir: Path) -> list[str]:
        return [
            "--config",
            f"{CONFIG}:smoke",
            "--workdir",
            str(workdir),
            f"--config.num_train_steps={self.steps}",
            f"--config.checkpoint_every_steps={self.checkpoint_every}",
            f"--config.eval_every_steps={self.eval_every}",
            f"--config.keep_checkpoints={self.keep}",
            "--config.log_every_steps=1",
            "--config.progress_bar=False",
        ]

    def eval_steps(self) -> list[int]:
        every = range(self.eval_every, self.steps + 1, self.eval_every)
        return sorted({*every, self.steps})

    def checkpoint_steps(self) -> list[int]:
        every = range(self.checkpoint_every, self.steps + 1, self.checkpoint_every)
        return sorted({*every, self.steps})


@dataclasses.dataclass(frozen=True)
class Event:
    """Something the watcher saw appear in the workdir, ``time`` seconds after the start."""

    time: float
    kind: str  # "train" / "eval" record, "save_start" / "save_done" (of ``folder``)
    step: int
    folder: str = ""


class Watcher:
    """Polls a workdir for new metrics records and checkpoint folders.

    A resumed run first trims ``metrics.jsonl`` to its checkpoint (rewriting the file), so only
    records of steps after ``after_step`` (the checkpoint it resumes from) count as new, each
    once; a line that does not parse (cut short) is skipped.
    """

    def __init__(self, workdir: Path, start: float, after_step: int = 0):
        self.workdir, self.start, self.after_step = workdir, start, after_step
        self.file_id, self.offset, self.partial = None, 0, b""
        self.records: set[tuple[str, int]] = set()
        self.seen = {name: self._listing(name) for name in ("checkpoints", "best")}

    def _listing(self, name: str) -> set[str]:
        try:
            return set(os.listdir(self.workdir / name))
        except FileNotFoundError:
            return set()

    def _new_lines(self) -> list[bytes]:
        path = self.workdir / workdir_lib.METRICS_FILE
        try:
            with path.open("rb") as f:
                stat = os.fstat(f.fileno())
                if (stat.st_ino, stat.st_dev) != self.file_id or stat.st_size < self.offset:
                    self.file_id, self.offset, self.partial = (stat.st_ino, stat.st_dev), 0, b""
                f.seek(self.offset)
                data = self.partial + f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data) - len(self.partial)
        *lines, self.partial = data.split(b"\n")
        return lines

    def poll(self) -> list[Event]:
        now = time.monotonic() - self.start
        events = []
        for line in self._new_lines():
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            kind = "eval" if any(k.startswith("eval_") for k in record) else "train"
            if step > self.after_step and (kind, step) not in self.records:
                self.records.add((kind, step))
                events.append(Event(now, kind, step))
        for name in ("checkpoints", "best"):
            listing = self._listing(name)
            for entry in sorted(listing - self.seen[name]):
                step = entry.split(".")[0]
                if step.isdigit():
                    kind = "save_start" if TMP_MARK in entry else "save_done"
                    events.append(Event(now, kind, int(step), name))
            self.seen[name] = listing
        return events


@dataclasses.dataclass(frozen=True)
class KillPoint:
    """Where to kill: at ``phase``'s trigger for ``step`` (none for ``start``), then ``delay``
    seconds later."""

    phase: str
    step: int
    delay: float

    def describe(self) -> str:
        what = {
            "start": "during start-up",
            "step": f"inside a step (after step {self.step}'s record)",
            "save": f"inside the save of checkpoint {self.step}",
            "eval": f"inside the evaluation of step {self.step}",
            "append": f"at the append of step {self.step}'s record",
        }[self.phase]
        return f"{what}, +{self.delay * 1000:.0f} ms"


@dataclasses.dataclass
class Spans:
    """How long each phase took in the reference run (seconds)."""

    start: float
    step: float
    save: float
    eval: float

    @classmethod
    def from_timeline(cls, events: list[Event], schedule: Schedule) -> Spans:
        train = {e.step: e.time for e in events if e.kind == "train"}
        evals = {e.step: e.time for e in events if e.kind == "eval"}
        starts = {e.step: e.time for e in events if e.kind == "save_start"}
        dones = {
            e.step: e.time for e in events if e.kind == "save_done" and e.folder == "checkpoints"
        }
        steps = [train[s] - train[s - 1] for s in train if s - 1 in train]
        saves = [dones[s] - starts[s] for s in dones if s in starts]
        eval_spans = [evals[s] - train[s] for s in evals if s in train]
        return cls(
            start=min(train.values()),
            step=float(np.median(steps)),
            save=float(np.median(saves)) if saves else 0.05,
            eval=float(np.median(eval_spans)) if eval_spans else 0.05,
        )

    def draw(
        self, rng: np.random.Generator, schedule: Schedule, after: int, phase: str = ""
    ) -> KillPoint | None:
        """A random kill point (in ``phase``, or in a random one) for a run resuming from step
        ``after``; None when that run has no such point left."""
        phase = phase or str(rng.choice(PHASES))
        candidates = {
            "start": [0],
            "step": range(after + 1, schedule.steps + 1),
            "save": schedule.checkpoint_steps(),
            "eval": schedule.eval_steps(),
            "append": range(after + 1, schedule.steps + 1),
        }[phase]
        # Within two checkpoint periods: a chain moves on about a checkpoint a kill, so its
        # kills spread over the whole run.
        horizon = after + 2 * schedule.checkpoint_every
        candidates = [s for s in candidates if after < s <= horizon or phase == "start"]
        if not candidates:
            return None
        step = int(rng.choice(candidates))
        span = {"start": self.start, "step": self.step, "save": self.save, "eval": self.eval}
        delay = 0.0 if phase == "append" else float(rng.uniform(0, span[phase]))
        return KillPoint(phase, step, delay)


def _env(root: Path) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # The runs compile the same programs: share them (the test suite sets its own cache).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    return env


def _start(schedule: Schedule, workdir: Path, root: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "jaxscaleseg.train", *schedule.args(workdir)],
            cwd=REPO,
            env=_env(root),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _resume_step(workdir: Path) -> int:
    steps = workdir_lib.checkpoint_steps(workdir / workdir_lib.LATEST_DIR)
    return steps[-1] if steps else 0


def _trigger(point: KillPoint, event: Event) -> bool:
    if event.step != point.step:
        return False
    if point.phase == "save":
        return event.kind == "save_start" and event.folder == "checkpoints"
    return event.kind == "train"  # step, eval (an evaluation step's record), append


def run_to_end(schedule: Schedule, workdir: Path, root: Path, log: Path) -> list[Event]:
    """Runs (or resumes) to the end, watching; returns the timeline. Raises on failure."""
    start = time.monotonic()
    watcher, events = Watcher(workdir, start, _resume_step(workdir)), []
    proc = _start(schedule, workdir, root, log)
    while proc.poll() is None:
        events += watcher.poll()
        if time.monotonic() - start > RUN_TIMEOUT_SECONDS:
            _kill(proc)
            raise RuntimeError(f"run in {workdir} took over {RUN_TIMEOUT_SECONDS} s ({log})")
        time.sleep(POLL_SECONDS)
    events += watcher.poll()
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"run in {workdir} exited with {proc.returncode}:\n{tail}")
    return events


def run_and_kill(
    schedule: Schedule, workdir: Path, root: Path, log: Path, point: KillPoint
) -> bool:
    """Runs (or resumes) and kills at ``point``; False when the run ended first."""
    start = time.monotonic()
    watcher, deadline = Watcher(workdir, start, _resume_step(workdir)), None
    proc = _start(schedule, workdir, root, log)
    if point.phase == "start":
        deadline = start + point.delay
    while proc.poll() is None:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            _kill(proc)
            return True
        if deadline is None:
            if any(_trigger(point, event) for event in watcher.poll()):
                deadline = now + point.delay
        if now - start > RUN_TIMEOUT_SECONDS:
            _kill(proc)
            raise RuntimeError(f"run in {workdir} took over {RUN_TIMEOUT_SECONDS} s ({log})")
        time.sleep(POLL_SECONDS)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"run in {workdir} exited with {proc.returncode}:\n{tail}")
    return False


def tear_last_record(workdir: Path, rng: np.random.Generator) -> bool:
    """Cuts the last line of ``metrics.jsonl`` short if its step is past the last checkpoint."""
    path = workdir / workdir_lib.METRICS_FILE
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        return False
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    step = json.loads(data[start:])["step"]
    committed = workdir_lib.checkpoint_steps(workdir / workdir_lib.LATEST_DIR)
    if committed and step <= committed[-1]:
        return False
    cut = start + int(rng.integers(1, len(data) - start - 1))
    with path.open("r+b") as f:
        f.truncate(cut)
    return True


def _deterministic(record: dict) -> dict:
    return {k: v for k, v in record.items() if "seconds" not in k and "per_second" not in k}


def compare(workdir: Path, reference: Path, schedule: Schedule) -> list[str]:
    """What differs between a finished run and the reference (empty: identical)."""
    problems = []
    a = workdir_lib.load_checkpoint(reference, "latest")
    b = workdir_lib.load_checkpoint(workdir, "latest")
    for key in ("step", "params", "batch_stats", "opt_state"):
        la, lb = _leaves(a[key]), _leaves(b[key])
        if len(la) != len(lb) or not all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=False)
        ):
            problems.append(f"{key} differs from the uninterrupted run's")
    for name in ("latest", "best"):
        ref_step = workdir_lib.find_checkpoint(reference, name)[1]
        got_step = workdir_lib.find_checkpoint(workdir, name)[1]
        if ref_step != got_step:
            problems.append(f"{name} checkpoint at step {got_step}, not {ref_step}")
    kept = workdir_lib.checkpoint_steps(workdir / workdir_lib.LATEST_DIR)
    if len(kept) > schedule.keep:
        problems.append(f"{len(kept)} latest checkpoints kept ({kept}), not {schedule.keep}")
    problems += _compare_metrics(workdir, reference, schedule)
    return problems


def _leaves(tree) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
    if isinstance(tree, list | tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [np.asarray(tree)]


def _compare_metrics(workdir: Path, reference: Path, schedule: Schedule) -> list[str]:
    lines = (workdir / workdir_lib.METRICS_FILE).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            return [f"metrics.jsonl line {number} is not JSON: {line[:60]!r}"]
    train = [r for r in records if not any(k.startswith("eval_") for k in r)]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    problems = []
    if [r["step"] for r in train] != list(range(1, schedule.steps + 1)):
        problems.append(f"training records at steps {[r['step'] for r in train]}")
    if [r["step"] for r in evals] != schedule.eval_steps():
        problems.append(f"evaluation records at steps {[r['step'] for r in evals]}")
    expected = [_deterministic(r) for r in workdir_lib.read_metrics(reference)]
    if not problems and [_deterministic(r) for r in records] != expected:
        problems.append("metric values differ from the uninterrupted run's")
    return problems


@dataclasses.dataclass
class Report:
    kills: int = 0
    identical: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    lines: list[str] = dataclasses.field(default_factory=list)
    phases: list[str] = dataclasses.field(default_factory=list)  # of the kills made

    def summary(self) -> str:
        return f"{self.kills} kills, {self.identical} identical resumes"


def run(
    kills: int,
    seed: int,
    root: Path,
    schedule: Schedule = Schedule(),
    phases: tuple[str, ...] = (),
    echo=print,
) -> Report:
    """Runs the reference and ``kills`` kill-and-resume checks under ``root``.

    Args:
      kills: how many kills to make (each followed by a checked resume).
      seed: seeds the kill points.
      root: a folder for the workdirs and logs.
      schedule: the training run.
      phases: the phase of each kill in turn (cycled); empty: random phases.
      echo: prints a line per kill.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    reference = root / "reference"
    events = run_to_end(schedule, reference, root, root / "reference.log")
    spans = Spans.from_timeline(events, schedule)
    echo(
        f"reference: {schedule.steps} steps; start-up {spans.start:.1f} s, step "
        f"{spans.step * 1000:.0f} ms, save {spans.save * 1000:.0f} ms, evaluation "
        f"{spans.eval * 1000:.0f} ms"
    )
    report, chain, links = Report(), 0, 0
    chained = root / "chain0"
    while report.kills < kills:
        phase = phases[report.kills % len(phases)] if phases else ""
        point = spans.draw(rng, schedule, _resume_step(chained), phase)
        log = root / f"kill{report.kills + 1}.log"
        try:
            killed = point is not None and run_and_kill(schedule, chained, root, log, point)
        except RuntimeError as error:
            report.failures.append(f"chain {chain} after {links} kills: {error}")
            echo(report.failures[-1])
            killed = False
        if not killed:  # the run ended before the kill point (or failed): a new chain
            chain, links = chain + 1, 0
            chained = root / f"chain{chain}"
            continue
        report.kills += 1
        report.phases.append(point.phase)
        links += 1
        torn = point.phase == "append" and tear_last_record(chained, rng)
        steps = workdir_lib.checkpoint_steps(chained / workdir_lib.LATEST_DIR)
        copy = root / "resume"
        shutil.rmtree(copy, ignore_errors=True)
        if chained.exists():  # a kill early in start-up can come before the workdir exists
            shutil.copytree(chained, copy)
        try:
            resumed = run_to_end(schedule, copy, root, root / "resume.log")
            problems = compare(copy, reference, schedule)
            # The reference's start-up included compiling; a resume's is what a start-up kill
            # must fall within.
            started = [e.time for e in resumed if e.kind == "train"]
            spans.start = min([spans.start, *started[:1]])
        except RuntimeError as error:
            problems = [str(error)]
        said = f"resuming from step {steps[-1]}" if steps else "starting from scratch"
        if said not in (root / "resume.log").read_text():
            problems.append(f"the resumed run did not say {said!r}")
        where = f"latest checkpoint {steps[-1] if steps else 'none'}"
        line = f"kill {report.kills}/{kills} {point.describe()}{' (torn)' if torn else ''}; {where}"
        if problems:
            report.failures.append(f"{line}: {'; '.join(problems)}")
            echo(f"{line}: NOT IDENTICAL: {'; '.join(problems)}")
            shutil.copytree(copy, root / f"failed{report.kills}")
        else:
            report.identical += 1
            echo(f"{line}: resumed identically")
        report.lines.append(line)
    echo(report.summary())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=Schedule.steps)
    parser.add_argument("--root", help="where the workdirs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    schedule = Schedule(steps=args.steps)
    echo = functools.partial(print, flush=True)
    if args.root:
        report = run(args.kills, args.seed, Path(args.root), schedule, echo=echo)
    else:
        with tempfile.TemporaryDirectory(prefix="faults_") as root:
            report = run(args.kills, args.seed, Path(root), schedule, echo=echo)
    return 0 if report.identical == report.kills and not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
