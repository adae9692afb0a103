"""Warm start (verlite/warm.py): the first `verlite sft` leaves a helper with torch and
transformers imported; the next launch in the same environment runs in its forked child with
the same results, exit codes, terminal output and signals as a process of its own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_fast import sft_args

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract Unix sockets: Linux")


def _env(tmp: Path) -> dict:
    # The repository first, then whatever the caller's PYTHONPATH held (e.g. wheels installed
    # with --target on a machine without internet).
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, VERLITE_WARM="1", VERLITE_CACHE_DIR=str(tmp / "cache"), PYTHONUNBUFFERED="1",
                PYTHONPATH=path)


def _run(tmp: Path, model: Path, steps: int, *extra: str, env: dict) -> subprocess.CompletedProcess:
    # One working folder for all (`python -m` puts it on sys.path, so it is part of the environment).
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "verlite.cli", "sft", *sft_args(tmp, model, steps, *extra)],
                          capture_output=True, text=True, env=env, cwd=tmp.parent, timeout=300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float = 20) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _start_long_run(tmp: Path, model: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """A run through the helper that trains long enough to be signalled; (client, child pid)."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "verlite.cli", "sft",
                             *sft_args(tmp, model, 100000, "trainer.save_freq=-1")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp.parent)
    child = None
    for line in proc.stdout:
        found = re.search(r"this run's process \(pid (\d+)\) was forked", line)
        child = int(found.group(1)) if found else child
        if re.search(r"\| Step \d+/", line):
            break
    assert child is not None, "the run did not go through the helper"
    return proc, child


@pytest.mark.slow  # ~37 s on two cores; run on the GPU machine by runbook V (warm start is on only where a GPU is)
def test_second_launch_runs_in_the_warm_helper(tmp_path, tiny_model):
    env = _env(tmp_path)
    spawned: list[int] = []  # every helper and command started here, killed at the end whatever happens
    procs: list[subprocess.Popen] = []
    try:
        first = _run(tmp_path / "a", tiny_model, 3, env=env)
        assert first.returncode == 0, first.stderr[-2000:]
        helper = int(re.search(r"a helper process \(pid (\d+)\)", first.stdout).group(1))
        spawned.append(helper)
        log = tmp_path / "cache" / "warm" / "helper.log"
        end = time.monotonic() + 120
        while "; serving" not in (log.read_text() if log.exists() else "") and time.monotonic() < end:
            assert _alive(helper), log.read_text() if log.exists() else "the helper exited"
            time.sleep(0.2)
        second = _run(tmp_path / "b", tiny_model, 3, env=env)
        assert second.returncode == 0, second.stderr[-2000:]
        assert "was forked from a helper" in second.stdout and "a helper process" not in second.stdout
        loss = [re.search(r"final train/loss=([\d.]+)", r.stdout).group(1) for r in (first, second)]
        assert loss[0] == loss[1]  # the same run, in another process
        assert (tmp_path / "b" / "run" / "global_step_3" / "huggingface").is_dir()
        # A user error is still one line on the command's stderr and exit 2.
        bad = _run(tmp_path / "c", tiny_model, 3, "data.max_length=abc", env=env)
        assert bad.returncode == 2 and not bad.stdout  # the helper's child reports the bad key, as a process of its own
        assert bad.stderr.strip().count("\n") == 0 and "data.max_length" in bad.stderr and "Traceback" not in bad.stderr
        # LoRA needs torchao (through peft), which this helper (started by a full fine-tune) left
        # out: the child hands the run back and the command runs it in a fresh process.
        lora = _run(tmp_path / "h", tiny_model, 1, "model.lora_rank=4", env=env)
        assert lora.returncode == 0, lora.stderr[-2000:]
        assert "was forked" not in lora.stdout and "final train/loss" in lora.stdout
        # A command killed outright takes its run with it.
        proc, child = _start_long_run(tmp_path / "e", tiny_model, env)
        procs.append(proc)
        spawned.append(child)
        proc.kill()
        proc.wait()
        assert _wait_gone(child), "the run outlived its killed command"
        # Two runs at once: the short one ends on its own; then, with the helper gone, SIGTERM
        # still reaches the long one, which saves, stops and reports 128 + 15 itself.
        proc, child = _start_long_run(tmp_path / "d", tiny_model, env)
        procs.append(proc)
        spawned.append(child)
        short = _run(tmp_path / "g", tiny_model, 1, env=env)
        assert short.returncode == 0 and "was forked" in short.stdout
        os.kill(helper, signal.SIGKILL)
        assert _wait_gone(helper)
        proc.send_signal(signal.SIGTERM)
        out = proc.stdout.read()
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, out[-2000:]
        assert "stopped at step" in out and _wait_gone(child)
        # A different environment is another helper's.
        other = _run(tmp_path / "f", tiny_model, 1, env=dict(env, VERLITE_TEST_OTHER_ENV="1"))
        found = re.search(r"a helper process \(pid (\d+)\)", other.stdout)
        spawned += [int(found.group(1))] if found else []
        assert other.returncode == 0 and "was forked" not in other.stdout and found
    finally:
        for proc in procs:
            proc.kill()
        for pid in spawned:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert all(_wait_gone(pid) for pid in spawned)


def test_warm_start_is_off_without_a_gpu_or_under_torchrun(monkeypatch):
    from verlite import warm

    monkeypatch.setenv("VERLITE_WARM", "auto")
    monkeypatch.setattr(os.path, "exists", lambda p: False)  # no /dev/nvidiactl
    assert not warm.enabled()
    monkeypatch.setenv("VERLITE_WARM", "1")
    assert warm.enabled()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not warm.enabled()
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("VERLITE_WARM", "0")
    assert not warm.enabled()


def test_without_a_helper_the_command_runs_itself(monkeypatch):
    from verlite import warm

    monkeypatch.setenv("VERLITE_WARM", "1")
    monkeypatch.setattr(warm, "_address", f"\0verlite-warm-test-{os.getpid()}-nobody-listens")
    before = {s: signal.getsignal(s) for s in warm._FORWARDED}
    assert warm.run_in_helper(["sft"]) is None
    assert {s: signal.getsignal(s) for s in warm._FORWARDED} == before  # handlers given back


def test_the_environment_name_ignores_bytecode_folders_but_not_installs(tmp_path, monkeypatch):
    """A first launch writing site-packages/__pycache__ (a top-level module's bytecode) must not
    give the next launch another environment (and so no helper); installing a package must."""
    from verlite import warm

    site = tmp_path / "lib" / "site-packages"
    (site / "torch").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "project"), str(site)])
    before = warm._path_stamp()
    (site / "__pycache__").mkdir()
    (site / "__pycache__" / "six.cpython-311.pyc").write_bytes(b"x")
    assert warm._path_stamp() == before
    (site / "liger_kernel-0.8.5.dist-info").mkdir()
    assert warm._path_stamp() != before
