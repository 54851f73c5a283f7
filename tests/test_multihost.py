"""Several hosts: each reads its rows of the global batch; two processes train as one.

The data test runs in this process. The two-process test starts ``python -m
jaxscaleseg.train`` twice on the loopback address (two simulated CPU devices each, CPU
collectives over gloo) and compares them with one process of four devices.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_training import tiny_config

from jaxscaleseg import config_schema, multihost
from jaxscaleseg import workdir as workdir_lib
from jaxscaleseg.data import augment, pipeline
from jaxscaleseg.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


class _Counting:
    """A random-access source of constant images (the value is the index) that records reads."""

    def __init__(self, n: int, size=(6, 6)):
        self.n, self.size, self.reads = n, size, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        self.reads.append(int(index))
        return {
            "image": np.full((*self.size, 3), index, np.uint8),
            "label": np.zeros(self.size, np.uint16),
            "file_name": str(index),
        }

    def __repr__(self) -> str:
        return f"_Counting({self.n})"


def _iterator(source, batch_size, shard_index=0, shard_count=1):
    return pipeline.make_train_iterator(
        source,
        batch_size=batch_size,
        crop_size=(4, 4),
        seed=3,
        num_classes=1,
        scale_range=(0.5, 2.0),  # random crops and flips: the per-example generators matter
        shard_index=shard_index,
        shard_count=shard_count,
        read_threads=1,
    )


def test_hosts_read_only_their_rows_of_the_one_host_batches():
    """Two hosts of batch 2 build, row for row, the batches of one host of batch 4 (images
    augmented by the same draws), each reading only its own examples."""
    steps, n = 5, 10  # 20 examples drawn: two epochs, the second reshuffled
    one = _iterator(_Counting(n), 4)
    expected = [next(one) for _ in range(steps)]
    sources = [_Counting(n), _Counting(n)]
    hosts = [_iterator(sources[k], 2, k, 2) for k in range(2)]
    got = [[next(h) for _ in range(steps)] for h in hosts]
    for step in range(steps):
        for key in ("image", "label"):
            joined = np.concatenate([got[0][step][key], got[1][step][key]])
            np.testing.assert_array_equal(joined, expected[step][key])
    # Each host read its rows (and at most the few its read-ahead threads fetched beyond).
    index = [
        # the padding holds the mean (~124), the example its index (< 10)
        [int(v) for v in np.rint(augment.denormalize(b["image"])[..., 0].min(axis=(1, 2)))]
        for b in expected
    ]
    for k, source in enumerate(sources):
        mine = [i for step in index for i in step[2 * k : 2 * k + 2]]
        assert source.reads[: len(mine)] == mine
        others = [i for step in index for i in step[2 * (1 - k) : 2 * (1 - k) + 2]]
        assert len(source.reads) < len(mine) + len(others)  # not every example of the batches


def test_a_host_iterator_restores_its_position():
    hosts = [_iterator(_Counting(10), 2, 1, 2) for _ in range(2)]
    for _ in range(3):
        next(hosts[0])
    hosts[1].set_state(hosts[0].get_state())
    for key in ("image", "label"):
        np.testing.assert_array_equal(next(hosts[0])[key], next(hosts[1])[key])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"distributed_num_processes": 2}, "distributed_num_processes is set but distributed"),
        ({"distributed": True, "distributed_coordinator": "host0"}, "must be host:port"),
        ({"distributed": True, "distributed_coordinator": "h:99999"}, "port 1-65535"),
        ({"distributed": True, "distributed_num_processes": -1}, "must be >= 1"),
        (
            {"distributed": True, "distributed_num_processes": 2, "distributed_process_id": 2},
            "distributed_process_id must be in 0..1",
        ),
        ({"distributed": True, "distributed_timeout_seconds": 0}, "timeout_seconds must be >= 1"),
    ],
    ids=["not-distributed", "no-port", "bad-port", "count", "id", "timeout"],
)
def test_distributed_fields_are_checked_in_one_line(overrides, message):
    config = tiny_config(**overrides)
    with pytest.raises(ConfigError, match=message) as info:
        config_schema.validate(config)
    assert "\n" not in str(info.value)


def test_distributed_without_a_coordinator_is_one_line(tmp_path):
    """Nothing given and nothing JAX detects: one line from the command, status 1."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "JAX_COORDINATOR_ADDRESS" and not k.startswith(("SLURM_", "OMPI_", "TPU_"))
    }
    proc = subprocess.run(
        [
            sys.executable, "-m", "jaxscaleseg.train", "--config",
            f"{REPO / 'configs' / 'synthetic.py'}:smoke", "--workdir", str(tmp_path),
            "--config.distributed",
        ],
        cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: distributed: ") and "distributed_coordinator" in lines[0]


def test_a_worker_channel_holds_its_error_line_and_the_log_keeps_everything():
    messages = io.BytesIO(
        b"step 3: validation mIoU 0.1000\n"
        b"error: a computation with the run's other processes failed (...)\n"
    )
    out, log, held = io.BytesIO(), io.BytesIO(), []
    multihost._copy(messages, out, log, held)  # noqa: SLF001
    assert out.getvalue() == b"step 3: validation mIoU 0.1000\n"
    assert log.getvalue() == messages.getvalue()
    assert held == ["error: a computation with the run's other processes failed (...)"]


def test_the_fatal_report_of_a_dead_coordinator_is_one_line():
    """What JAX writes to file descriptor 2 as it ends a process whose coordinator died
    (abridged from a real one)."""
    log = (
        "Traceback (most recent call last):\n"
        "W1130 16:09:56.313272     609 preemption_sync_manager.cc:147] Failed to retrieve\n"
        "Additional GRPC error information from remote target coordination_service\n"
        "F1130 16:09:56.313377     609 client.h:80] Terminating process because the JAX "
        "distributed service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send "
        "RPC to coordination service.\n"
        "*** Check failure stack trace: ***\n"
        "    @     0x7fc6dee40634  absl::log_internal::LogMessage::SendToLog()\n"
    )
    fatal = multihost.fatal_report(log)
    assert len(fatal) == 3 and fatal[0].startswith("F1130")
    line = multihost.failure_line(fatal, "1", Path("w/process_1.log"))
    assert line.startswith("error: process 1: the run's coordinator (process 0) ended")
    assert line.endswith("(JAX's report: w/process_1.log)")
    heartbeat = ["F1130 ... The following tasks are unhealthy (stopped sending heartbeats):"]
    assert "stopped responding" in multihost.failure_line(heartbeat, "0", Path("x"))
    assert multihost.fatal_report("W1130 12:00:00.1 9 a.cc:1] only a warning\n") == []


def test_the_last_runs_report_is_found_past_jaxs_own_separator_lines():
    """A worker's log holds every run; jax 0.12's fatal report has "=== ... ===" lines of its
    own after its ``F`` line, which must not be taken for the start of a run."""
    earlier = (
        "=== 2026-12-01 12:00:00: python -m jaxscaleseg.train --workdir w\n"
        "F1201 12:00:09.000001   7 client.h:86] Terminating process because the JAX distributed "
        "service detected fatal errors. The following tasks are unhealthy (stopped sending "
        "heartbeats):\n"
    )
    last = (
        "=== 2026-12-01 12:55:37: python -m jaxscaleseg.train --workdir w\n"
        "E1201 12:55:55.251601   30268 coordination_service_agent.cc:288] Polled an error\n"
        "F1201 12:55:55.251611   30268 client.h:86] Terminating process because the JAX "
        "distributed service detected fatal errors. absl::Status: UNAVAILABLE: Failed to send "
        "RPC to coordination service.\n"
        "Additional GRPC error information from remote target coordination_service:\n"
        "=== Source Location Trace: === \n"
        "external/xla+/xla/pjrt/distributed/coordination/coordination_service_error_util.cc:64\n"
        "Fatal Python error: Aborted\n"
    )
    assert multihost.last_run(earlier + last) == last
    assert multihost.last_run("no header\n") == "no header\n"
    fatal = multihost.fatal_report(multihost.last_run(earlier + last))
    assert fatal[0].startswith("F1201 12:55:55")
    line = multihost.failure_line(fatal, "1", Path("w/process_1.log"))
    assert line.startswith("error: process 1: the run's coordinator (process 0) ended"), line


# ----------------------------------------------------------------------------- two processes

STEPS = 4
# The run of test_training.test_four_devices_match_one_device, a checkpoint at every step.
CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_training import tiny_config


def get_config():
    return tiny_config(
        num_train_steps={steps}, eval_every_steps=0, checkpoint_every_steps=1,
        **{{"dataset.eval_batch_size": 4}}
    )
"""


def _unsupported() -> str | None:
    """Why this JAX cannot run the two-process test (None: it can)."""
    params = inspect.signature(jax.distributed.initialize).parameters
    if "heartbeat_timeout_seconds" not in params:
        return (
            f"jax {jax.__version__}: jax.distributed.initialize takes no heartbeat timeout, so a "
            "killed process would keep the other waiting for minutes"
        )
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        return f"jax {jax.__version__} has no collectives across CPU processes"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """``python -m jaxscaleseg.train`` processes, each in its own process group (a host)."""

    def __init__(self, config_file: Path, workdir: Path, devices: int):
        self.config_file, self.workdir = config_file, workdir
        flags = os.environ.get("XLA_FLAGS", "")
        self.env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}",
        }

    def start(self, *overrides: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable, "-m", "jaxscaleseg.train", "--config", str(self.config_file),
                "--workdir", str(self.workdir), *overrides,
            ],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip

    def pair(self, port: int) -> list[subprocess.Popen]:
        common = (
            "--config.distributed",
            f"--config.distributed_coordinator=127.0.0.1:{port}",
            "--config.distributed_num_processes=2",
            f"--config.distributed_timeout_seconds={TIMEOUT_SECONDS}",
        )
        return [self.start(*common, f"--config.distributed_process_id={k}") for k in (0, 1)]


TIMEOUT_SECONDS = 10


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no end within {timeout} s:\n{out[-2000:]}\n{err[-3000:]}")


def _losses(workdir: Path) -> dict[int, float]:
    records = [r for r in workdir_lib.read_metrics(workdir) if "train_loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps  # one record per step: metrics written once
    return {r["step"]: r["train_loss"] for r in records}


@pytest.mark.slow
def test_two_processes_train_as_one_with_four_devices_and_resume_after_a_kill(tmp_path):
    reason = _unsupported()
    if reason:
        pytest.skip(reason)
    config_file = tmp_path / "tiny.py"
    config_file.write_text(CONFIG_FILE.format(tests=str(REPO / "tests"), steps=STEPS))
    single = _Processes(config_file, tmp_path / "single", devices=4).start()
    out, err = _finish(single)
    assert single.returncode == 0, err[-3000:]
    expected = _losses(tmp_path / "single")
    assert sorted(expected) == list(range(1, STEPS + 1))

    workdir = tmp_path / "two"
    hosts = _Processes(config_file, workdir, devices=2)
    procs = hosts.pair(_free_port())
    # Both processes train; stop process 0 (the coordinator) once checkpoint 1 is written, so
    # neither can finish (every step needs both; three steps and saves are left), then kill it
    # as a host would die.
    deadline = time.monotonic() + 240
    while not (workdir / "checkpoints" / "1").is_dir():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, "checkpoint 1 never appeared"
        time.sleep(0.02)
    assert procs[0].poll() is None, "process 0 ended before it could be stopped"
    os.killpg(procs[0].pid, signal.SIGSTOP)
    os.killpg(procs[0].pid, signal.SIGKILL)
    killed = time.monotonic()
    out, err = _finish(procs[1], timeout=TIMEOUT_SECONDS + 60)
    waited = time.monotonic() - killed
    procs[0].communicate()
    # The survivor ends within the heartbeat timeout (JAX ends it at once when the coordinator
    # is gone), with one line and status 1: JAX's end, or the collective it was in failing
    # first (gloo reads a closed connection), whichever comes first.
    lines = [line for line in err.splitlines() if line.strip()]
    assert procs[1].returncode == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: process 1: "), lines
    assert "the run's coordinator (process 0) ended" in lines[0] or (
        "a computation with the run's other processes failed" in lines[0]
    ), lines
    assert waited < TIMEOUT_SECONDS + 30, waited
    assert "Check failure" in (workdir / "process_1.log").read_text()  # JAX's report, kept
    assert (workdir / "process_0.log").exists()

    # Rerun both: they resume from the last checkpoint and end where one process does.
    procs = hosts.pair(_free_port())
    (out0, err0), (out1, err1) = _finish(procs[0]), _finish(procs[1])
    assert procs[0].returncode == 0 and procs[1].returncode == 0, err0[-3000:] + err1[-3000:]
    resumed = int(out0.split("resuming from step ")[1].split()[0])
    assert resumed >= 1, out0
    assert out1 == "" and err1 == "", (out1, err1)  # process 0 alone prints
    got = _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Four devices in two processes sum the loss and gradients over the devices in another
    # order than one process does (gloo's all-reduce against XLA's in-process one): float32
    # reductions exact to a few ulps (eps = 1.2e-7) times the depth of their summation trees,
    # carried by four SGD steps into the parameters. Measured: 8.5e-7 relative (AMD EPYC).
    # 1e-4 bounds that with room and still fails on a real divergence (a process reading the
    # other's rows, or the wrong rows, moves the loss by percents). The steps after the resume
    # are held to the same bound.
    np.testing.assert_allclose(
        [got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-4, atol=0
    )
    # Written once: the run files by process 0 (its own config), each checkpoint by orbax
    # with both processes' iterator positions in it.
    assert json.loads((workdir / "config.json").read_text())["distributed_process_id"] == 0
    assert workdir_lib.read_model_args(workdir)["num_classes"] == 30
    last = workdir / "checkpoints" / str(STEPS)
    assert sorted(p.name for p in (last / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert workdir_lib.checkpoint_steps(workdir / "checkpoints") == [STEPS - 1, STEPS]
    assert not list(workdir.glob("**/*.orbax-checkpoint-tmp*"))
