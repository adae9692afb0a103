"""One run, one writer: two runs on one directory never mix; a lock never outlives its run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from verlite.errors import VerliteError
from verlite.trainer.run_lock import LOCK_FILE, RunLock

ROWS = [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"{i} + {i + 1} = {2 * i + 1}。答案是{2 * i + 1}。"}
        for i in range(24)]
# A constant schedule: a run extended to more steps follows the same curve as one planned that long.
FLAT_LR = ["optim.lr=1e-3", "optim.lr_scheduler=constant", "optim.warmup_steps_ratio=0"]


def sft_cmd(data: Path, model: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "verlite.cli", "sft", f"data.train_files={data}", f"model.partial_pretrain={model}",
            "trainer.device=cpu", f"trainer.default_local_dir={run}", "data.micro_batch_size_per_gpu=2",
            "data.train_batch_size=4", f"trainer.total_training_steps={steps}", "trainer.log_interval=1",
            "model.enable_gradient_checkpointing=false", *FLAT_LR, *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def verlite_lines(stderr: str) -> list[str]:
    """What verlite itself printed on stderr (libraries may add their own import warnings)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("verlite:")]


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def losses(run: Path) -> dict:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and any(json.loads(x).get("step", 0) >= step for x in path.read_text().splitlines()
                                 if x.endswith("}")):
            return
        assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached")


def concurrent_pair(tmp_path: Path, model: Path, steps: int) -> tuple[Path, Path]:
    """Two identical runs started together on one directory; checks that exactly one wrote."""
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run = tmp_path / "run"
    a = start(sft_cmd(data, model, run, steps, "trainer.save_freq=2"))
    b = start(sft_cmd(data, model, run, steps, "trainer.save_freq=2"))
    # The winner is paused while it holds the lock, so that the other run surely meets it
    # however slowly it starts on a busy machine (a run that finished first would be resumed).
    winner = wait_for_holder(run, (a, b))
    winner.send_signal(signal.SIGSTOP)
    loser = b if winner is a else a
    try:
        loser.wait(timeout=300)
    finally:
        winner.send_signal(signal.SIGCONT)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    (win_out, win_err), (lose_out, lose_err) = outs if a.returncode == 0 else outs[::-1]
    lines = verlite_lines(lose_err)
    assert len(lines) == 1 and str(run) in lines[0] and "in use by another verlite run" in lines[0], lose_err
    assert f"host {socket.gethostname()}, pid " in lines[0]
    assert "Step" not in lose_out and "Checkpoint saved" not in lose_out
    # Only the winner's output: its checkpoints, one metrics line per step, and no lock left.
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [f"global_step_{s}" for s in range(2, steps + 1, 2)] + ["latest_checkpointed_iteration.txt", "metrics.jsonl"])
    assert metrics_steps(run) == list(range(1, steps + 1))
    return data, run


def wait_for_holder(run: Path, procs: tuple, timeout: float = 120) -> subprocess.Popen:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            pid = json.loads((run / LOCK_FILE).read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = None
        for p in procs:
            if p.pid == pid:
                return p
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs]
        time.sleep(0.01)
    raise AssertionError("no run took the lock")


def test_two_concurrent_runs_one_trains_the_other_writes_nothing(tmp_path, tiny_model):
    concurrent_pair(tmp_path, tiny_model, 4)


@pytest.mark.slow
def test_a_run_won_in_a_race_resumes_exactly(tmp_path, tiny_model):
    ref = start(sft_cmd(write_jsonl(tmp_path / "ref.jsonl", ROWS), tiny_model, tmp_path / "ref", 8,
                        "trainer.save_freq=4"))
    data, run = concurrent_pair(tmp_path, tiny_model, 4)
    # Resuming the winner's run to 8 steps follows the uninterrupted 8-step run exactly.
    more = start(sft_cmd(data, tiny_model, run, 8, "trainer.save_freq=2"))
    out, err = more.communicate(timeout=300)
    assert more.returncode == 0, err[-2000:]
    assert "resuming with changed settings: trainer.total_training_steps 4 -> 8" in out
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    weights = "global_step_8/huggingface/model.safetensors"
    assert (run / weights).read_bytes() == (tmp_path / "ref" / weights).read_bytes()
    assert losses(run) == losses(tmp_path / "ref")
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow  # ~15 s of killed subprocesses; the two-concurrent-runs case stays in the default run
def test_lock_of_a_killed_run_is_taken_over_and_sigterm_releases_it(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run = tmp_path / "run"
    victim = start(sft_cmd(data, tiny_model, run, 5000, "trainer.save_freq=-1"))
    wait_for_step(run, 2, victim)
    holder = json.loads((run / LOCK_FILE).read_text())
    assert holder["pid"] == victim.pid and holder["host"] == socket.gethostname()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (run / LOCK_FILE).exists()  # nothing ran to remove it
    (run / "metrics.jsonl").unlink()  # so that waiting for step 2 below waits for the new run
    heir = start(sft_cmd(data, tiny_model, run, 5000, "trainer.save_freq=-1"))
    wait_for_step(run, 2, heir)
    heir.send_signal(signal.SIGTERM)
    out, err = heir.communicate(timeout=300)
    assert heir.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"taking over the lock of a run that is gone (host {socket.gethostname()}, pid {victim.pid}" in out
    assert not (run / LOCK_FILE).exists()
    assert any(p.name.startswith("global_step_") for p in run.iterdir())  # the SIGTERM stop saved


def test_a_lock_held_elsewhere_refuses_and_a_released_one_is_gone(tmp_path):
    run = tmp_path / "run"
    first = RunLock(run)
    first.acquire()
    second = RunLock(run)  # flock: another open of the file conflicts even inside one process
    with pytest.raises(VerliteError, match=f"in use by another verlite run .*pid {os.getpid()}"):
        second.acquire()
    first.release()
    assert not (run / LOCK_FILE).exists() and not run.exists()  # a run that wrote nothing leaves nothing
    second.acquire()
    second.release()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    text = json.dumps({"host": "node-7.cluster", "pid": 1234, "started": "2026-11-24 10:00:00 UTC"})
    (run / LOCK_FILE).write_text(text)
    with pytest.raises(VerliteError) as err:
        RunLock(run).acquire()
    msg = str(err.value)
    assert "node-7.cluster" in msg and "pid 1234" in msg and f"delete {run / LOCK_FILE}" in msg
    assert "\n" not in msg
    assert (run / LOCK_FILE).read_text() == text


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    lock = RunLock(run)
    lock.acquire()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {int(dead.stdout)}" in caplog.text and "taking over" in caplog.text
    lock.release()
    assert not (run / LOCK_FILE).exists() and run.is_dir()


@pytest.mark.slow
def test_torchrun_ranks_stop_together_on_a_held_lock(tmp_path, tiny_model):
    """Rank 0 finds the lock held; both ranks stop with its message and nothing is written.
    VERLITE_TEST_DEVICE=cuda runs it on two GPUs (NCCL carries the outcome instead of gloo)."""
    from test_distributed import free_port

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    run = tmp_path / "run"
    held = RunLock(run)
    held.acquire()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--node_rank=0",
                "--rdzv_backend=c10d"]
    device = os.environ.get("VERLITE_TEST_DEVICE", "cpu")
    args = [a.replace("trainer.device=cpu", f"trainer.device={device}")
            for a in sft_cmd(data, tiny_model, run, 2, "trainer.save_freq=2")[3:]]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    refused = subprocess.run([*torchrun, f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "verlite.cli", *args],
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    # Each rank prints the same line (the two may share one line of the pipe, written at once).
    message = f"verlite: error: {run} is in use by another verlite run (host {socket.gethostname()}, pid {os.getpid()}"
    assert refused.stderr.count(message) == 2, refused.stderr
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    held.release()
    ok = subprocess.run([*torchrun, f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "verlite.cli", *args],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert metrics_steps(run) == [1, 2] and not (run / LOCK_FILE).exists()


def test_without_working_flock_a_live_holder_still_refuses(tmp_path, monkeypatch):
    """Some shared filesystems refuse flock (ENOLCK): the holder file alone then decides."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": "x"}))
        monkeypatch.setattr(fcntl, "flock", no_locks)
        with pytest.raises(VerliteError, match=f"in use by another verlite run .*pid {live.pid}"):
            RunLock(run).acquire()
    finally:
        live.kill()
        live.wait()
    lock = RunLock(run)  # its holder is gone now
    lock.acquire()
    lock.release()
    assert not (run / LOCK_FILE).exists()
