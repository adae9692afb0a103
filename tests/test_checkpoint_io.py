"""Checkpoint writes (issue 14): the tensor-file writer, the state split into
trainer_state.safetensors + a data-only trainer_state.pt, background saves byte-identical to
in-line ones (with and without reusable host buffers), exact resume from new and old formats,
NaN weights refused, a kill mid-write."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from verlite.trainer import async_checkpoint as ac
from test_fast import sft_args as fast_sft_args
from verlite.trainer import checkpoint as ckpt

# Not test_fast.py's rows: its CLI test expects a token-cache miss in the session's shared cache.
ROWS = [{"question": f"Add {i} and {i + 1}.", "answer": f"{i} + {i + 1} = {2 * i + 1}, so the sum is {2 * i + 1}."}
        for i in range(16)]
LORA = ("model.lora_rank=4", "model.target_modules=[q_proj,v_proj]")


def sft_args(tmp: Path, model: Path, steps: int, *extra: str) -> list[str]:
    return fast_sft_args(tmp, model, steps, *extra, rows=ROWS)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the tensor file and the state split -------------------------------------------------

def test_tensor_file_is_byte_identical_to_safetensors_save_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "step": torch.tensor(7.0),
               "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "mask": torch.tensor([True, False]),
               "i32": torch.ones(3, dtype=torch.int32), "f16": torch.randn(4, dtype=torch.float16),
               "bytes": torch.arange(5, dtype=torch.uint8), "empty": torch.empty(0, 4)}
    for metadata in (None, {"format": "pt"}):
        save_file(tensors, str(tmp_path / "lib.safetensors"), metadata=metadata)
        ckpt.write_tensor_file(tmp_path / "ours.safetensors", tensors, metadata)
        with ThreadPoolExecutor(3) as pool:
            ckpt.write_tensor_file(tmp_path / "pool.safetensors", tensors, metadata, pool)
        # Device tensors go through a small staging buffer, chunk by chunk (forced here for host ones).
        monkeypatch.setattr(ckpt, "STAGE_BYTES", 8)
        with ThreadPoolExecutor(2) as pool:
            ckpt.write_tensor_file(tmp_path / "staged.safetensors", tensors, metadata, pool, staged=True)
        lib = (tmp_path / "lib.safetensors").read_bytes()
        for name in ("ours", "pool", "staged"):
            assert (tmp_path / f"{name}.safetensors").read_bytes() == lib, name


def test_state_split_round_trips_and_leaves_only_data():
    state = {"optimizer": {"state": {"a.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}},
                           "param_groups": [{"lr": 1e-3, "params": ["a.weight"]}]},
             "rng": {"python": (3, (1, 2), None), "torch": torch.randint(0, 255, (16,), dtype=torch.uint8)},
             "global_step": 3, "pair": (torch.ones(2), "x")}
    data, tensors = ckpt.split_tensors(state)
    assert len(tensors) == 4 and not any(isinstance(v, torch.Tensor) for v in _leaves(data))
    back = ckpt.join_tensors(data, tensors, Path("x"))
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"] and back["global_step"] == 3
    assert torch.equal(back["optimizer"]["state"]["a.weight"]["exp_avg"], state["optimizer"]["state"]["a.weight"]["exp_avg"])
    assert isinstance(back["pair"], tuple) and torch.equal(back["pair"][0], torch.ones(2))


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_host_buffers_fill_in_the_background_and_follow_the_state():
    buffers = ac.HostBuffers(pin=False)
    a, b = ((4, 2), torch.float32), ((3,), torch.bfloat16)
    buffers.want([a, a, b])
    deadline = time.time() + 30
    while not buffers.ready() and time.time() < deadline:
        time.sleep(0.01)
    lease = buffers.lease()
    assert len(lease[a]) == 2 and len(lease[b]) == 1 and lease[b][0].dtype == torch.bfloat16
    buffers.want([a])  # the state changed: the excess goes at once
    assert len(buffers.lease()[a]) == 1 and b not in buffers.lease()
    buffers.close()
    buffers.want([a, b])  # closed: nothing more is allocated
    assert not buffers.ready()
    # Buffers to be page-locked start on a page of their own (no CUDA here: they stay pageable).
    big = ((512, 1024), torch.float32)
    pinned = ac.HostBuffers(pin=True)
    pinned.want([big, a])
    while not pinned.ready() and time.time() < deadline:
        time.sleep(0.01)
    held = pinned.lease()
    assert held[big][0].data_ptr() % 4096 == 0 and held[big][0].shape == (512, 1024) and len(held[a]) == 1
    pinned.close()


# ---- saves from a real trainer -----------------------------------------------------------

def _trainer(tmp: Path, model: Path, steps: int, *extra: str):
    from verlite.config import load_config
    from verlite.engine.distributed import init_distributed
    from verlite.trainer.sft_trainer import Trainer

    cfg = load_config(None, sft_args(tmp, model, steps, *extra))
    return Trainer(cfg, init_distributed("cpu"))


def _training_state(t):
    import copy

    return ([p.detach().clone() for p in t.params], copy.deepcopy(t.optimizer.state_dict()),
            copy.deepcopy(t.scheduler.state_dict()), ckpt.rng_state())


def _restore_training_state(t, state) -> None:
    import copy

    params, optim, sched, rng = state
    with torch.no_grad():
        for p, a in zip(t.params, params):
            p.copy_(a)
    t.optimizer.load_state_dict(copy.deepcopy(optim))
    t.scheduler.load_state_dict(sched)
    ckpt.set_rng_state(rng)


@pytest.mark.parametrize("lora", [False, True])
def test_background_checkpoint_is_byte_identical_to_synchronous(tmp_path, tiny_model, lora):
    from transformers import AutoModelForCausalLM

    from verlite.engine.distributed import shutdown

    t = _trainer(tmp_path, tiny_model, 6, *(LORA if lora else ()))
    saved = []
    try:
        for step in range(3):  # real optimizer state: AdamW moments and step counts
            t._step(t._micro_batches(step))
        args = (t.model, t.tokenizer, t.optimizer, t.scheduler, {"global_step": 3}, t.is_lora)
        sync = ac.Checkpointer(background=False, is_main=True, buffers=None, on_saved=lambda *a: None)
        assert sync.save(tmp_path / "sync", 3, *args)
        sync_path = sync.wait()
        # Background saves: without buffers, with buffers not yet allocated (fresh copies), then
        # with every buffer ready (copies into reused memory); and an in-line save.
        buffers = ac.HostBuffers(pin=False)
        # Copies kept on the device (here the CPU stands in for the GPU), and a device with no
        # room for them: host buffers from the first snapshot on.
        staged, no_room = ac.DeviceStaging(torch.device("cpu"), 1 << 40), ac.DeviceStaging(torch.device("cpu"), 1)
        for staging in (staged, no_room):
            staging.want([ac._spec(p) for p in t.params for _ in range(3)])
        paths = []
        # The final save's write without fsync (its flush is left to a detached process): same bytes.
        for name, pool in (("plain", None), ("cold", buffers), ("warm", buffers), ("in_line", buffers),
                           ("unflushed", buffers), ("staged", staged), ("staged_again", staged), ("no_room", no_room)):
            if name == "warm":
                while not buffers.ready():
                    time.sleep(0.01)
            saver = ac.Checkpointer(background=True, is_main=True, buffers=pool,
                                    on_saved=lambda path, *times: saved.append(path))
            in_line = name in ("in_line", "unflushed")
            assert saver.save(tmp_path / name, 3, *args, in_line=in_line, durable=name != "unflushed")
            if not in_line:  # training goes on while the writer runs; the snapshot must not see it
                before = _training_state(t)
                t._step(t._micro_batches(3))
                assert any(not torch.equal(a, p) for a, p in zip(before[0], t.params))
            paths.append(saver.wait())
            if not in_line:  # back to step 3 for the next save
                _restore_training_state(t, before)
        assert staged.on_device and staged.lease_held() and not no_room.on_device
        for pool in (buffers, staged, no_room):
            pool.close()
    finally:
        shutdown()
    assert sync_path == tmp_path / "sync" / "global_step_3" and saved == paths
    a = _files(sync_path)
    assert {"trainer_state.pt", "trainer_state.safetensors"} <= set(a)
    for path in paths:
        b = _files(path)
        assert sorted(a) == sorted(b), path
        for name in a:
            assert a[name] == b[name], (path, name)
        assert (path.parent / ckpt.LATEST).read_text() == "3"
    # trainer_state.pt holds no tensor but the tiniest (its data-only part); the HF folder loads.
    data = torch.load(sync_path / ckpt.STATE, weights_only=True)
    assert not any(isinstance(v, torch.Tensor) for v in _leaves(data))
    if not lora:
        AutoModelForCausalLM.from_pretrained(sync_path / "huggingface")


def test_full_model_folder_matches_save_pretrained(tmp_path, tiny_model):
    """The weights file written here is the one transformers writes, and so are its configs."""
    from verlite.engine.distributed import shutdown

    t = _trainer(tmp_path, tiny_model, 1)
    try:
        t._step(t._micro_batches(0))
        saver = ac.Checkpointer(background=False, is_main=True, buffers=None, on_saved=lambda *a: None)
        assert saver.save(tmp_path / "ours", 1, t.model, t.tokenizer, t.optimizer, t.scheduler, {"global_step": 1},
                          False)
        weights = {n.removeprefix("hf."): p.detach() for n, p in t.model.named_parameters()}
        assert ac._plain_layout(t.model.hf, weights)  # written here, not by save_pretrained
        t.model.hf.save_pretrained(tmp_path / "theirs", state_dict=weights, safe_serialization=True)
    finally:
        shutdown()
    ours, theirs = tmp_path / "ours" / "global_step_1" / "huggingface", tmp_path / "theirs"
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_nan_weights_are_refused_and_the_previous_checkpoint_stays(tmp_path, tiny_model, caplog):
    from verlite.engine.distributed import shutdown

    t = _trainer(tmp_path, tiny_model, 2)
    try:
        t._step(t._micro_batches(0))
        args = (t.model, t.tokenizer, t.optimizer, t.scheduler)
        saver = ac.Checkpointer(background=True, is_main=True, buffers=None, on_saved=lambda *a: None)
        assert saver.save(tmp_path / "run", 1, *args, {"global_step": 1}, False)
        with torch.no_grad():
            t.params[0][0] = float("nan")
        assert not saver.save(tmp_path / "run", 2, *args, {"global_step": 2}, False)
        assert saver.wait() is None
    finally:
        shutdown()
    assert "weights hold NaN/inf; checkpoint not written" in caplog.text
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "run")] == [1]
    assert not (tmp_path / "run" / "global_step_2.tmp").exists()


def test_final_save_gives_up_a_periodic_write_still_in_flight(tmp_path, tiny_model, monkeypatch, caplog):
    from verlite.engine.distributed import shutdown

    real = ckpt.write_tensor_file

    def slow_first(path, *a, **k):  # the periodic save's files are still being written
        if "global_step_1.tmp" in str(path):
            time.sleep(0.5)
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt, "write_tensor_file", slow_first)
    monkeypatch.setattr(ac, "DEFER_WHEN_BUSY_ON", ("cuda", "cpu"))  # as on a GPU (on a CPU every save is kept)
    caplog.set_level("INFO", logger="verlite.checkpoint")
    t = _trainer(tmp_path, tiny_model, 2)
    saved = []
    try:
        t._step(t._micro_batches(0))
        args = (t.model, t.tokenizer, t.optimizer, t.scheduler)
        saver = ac.Checkpointer(background=True, is_main=True, buffers=None,
                                on_saved=lambda path, *times: saved.append(path.name))
        assert saver.save(tmp_path / "run", 1, *args, {"global_step": 1}, False)
        t._step(t._micro_batches(1))
        assert saver.save(tmp_path / "run", 2, *args, {"global_step": 2}, False, in_line=True)
        assert saver.wait() == tmp_path / "run" / "global_step_2"
    finally:
        shutdown()
    assert saved == ["global_step_2"] and "step 1: checkpoint superseded" in caplog.text
    assert [s for s, _ in ckpt.step_dirs(tmp_path / "run")] == [2] and not list((tmp_path / "run").glob("*.tmp"))
    assert (tmp_path / "run" / ckpt.LATEST).read_text() == "2"
    ckpt.wait_for_discards()  # the given-up write's folder went aside, then away
    assert not list((tmp_path / "run").glob(ckpt.DISCARDED_PREFIX + "*"))


def test_discarded_folders_go_at_once_and_are_deleted_in_the_background(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2, 3):
        (root / f"global_step_{step}").mkdir(parents=True)
        (root / f"global_step_{step}" / ckpt.STATE).write_bytes(b"x" * 1000)
    ckpt.prune_checkpoints(root, 1)  # returns before the bytes are gone; the names are gone already
    assert [s for s, _ in ckpt.step_dirs(root)] == [3]
    ckpt.wait_for_discards()
    assert sorted(p.name for p in root.iterdir()) == ["global_step_3"]
    # A process killed while deleting leaves its folders aside: the next run in the folder deletes them.
    leftover = root / f"{ckpt.DISCARDED_PREFIX}global_step_2-123-1"
    (leftover / "huggingface").mkdir(parents=True)
    ckpt.discard_leftovers(root)
    ckpt.wait_for_discards()
    assert not leftover.exists() and (root / "global_step_3").is_dir()
    # Before a write of step 5: only older steps count, and never the one the latest file names
    # (a folder reused with resume_mode=disable may hold a later step of an earlier run).
    for step in (2, 4, 9):
        (root / f"global_step_{step}").mkdir()
        (root / f"global_step_{step}" / ckpt.STATE).write_bytes(b"x")
    (root / ckpt.LATEST).write_text("4")
    ckpt.prune_checkpoints(root, 1, below=5)
    ckpt.wait_for_discards()
    assert [s for s, _ in ckpt.step_dirs(root)] == [4, 9]


def test_final_save_prunes_while_it_writes_and_keeps_one_checkpoint_throughout(tmp_path, tiny_model, monkeypatch):
    """max_ckpt_to_keep=2: the oldest checkpoint goes before the final write starts (its deletion
    overlaps the write), the newest periodic one stays until the final lands."""
    from verlite.config import load_config
    from verlite.trainer.sft_trainer import run_sft

    seen = []
    real = ac.write_snapshot

    def watch(snap, background=False):
        seen.append((snap.step, [s for s, _ in ckpt.step_dirs(snap.root)]))
        return real(snap, background)

    monkeypatch.setattr(ac, "write_snapshot", watch)
    handed = len(ckpt._handed)
    run_sft(load_config(None, sft_args(tmp_path, tiny_model, 5, "trainer.save_freq=2", "trainer.max_ckpt_to_keep=2")))
    run = tmp_path / "run"
    assert seen[-1] == (5, [4])  # 2 went aside before the final write; 4 stayed
    # The folder set aside is deleted by the detached process that flushes the final checkpoint.
    assert len(ckpt._handed) == handed + 1
    args = ckpt._handed[-1].args
    assert args[args.index("--") - 1] == str(run / "global_step_5")
    assert [Path(a).name.startswith(ckpt.DISCARDED_PREFIX + "global_step_2-") for a in args[args.index("--") + 1:]] == [True]
    assert [s for s, _ in ckpt.step_dirs(run)] == [4, 5]
    assert not list(run.glob("*.tmp"))
    # A deletion still going when the run ended was handed to a detached process: it finishes.
    deadline = time.monotonic() + 30
    while list(run.glob(ckpt.DISCARDED_PREFIX + "*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(run.glob(ckpt.DISCARDED_PREFIX + "*"))


def test_final_checkpoint_is_flushed_by_a_detached_process_and_keep_one_waits_for_it(tmp_path, tiny_model,
                                                                                      monkeypatch):
    """The final save is written without fsync, complete and in place; a detached process
    flushes it, and only then deletes the checkpoint before it (max_ckpt_to_keep=1), so a
    flushed checkpoint exists throughout. Periodic saves stay flushed in line."""
    from verlite.config import load_config
    from verlite.trainer.sft_trainer import run_sft

    fsyncs, per_step = [0], {}
    real_fsync, real_write = os.fsync, ac.write_snapshot

    def counting_fsync(fd):
        fsyncs[0] += 1
        return real_fsync(fd)

    def watch(snap, background=False):
        before = fsyncs[0]
        out = real_write(snap, background)
        per_step[snap.step] = (snap.durable, fsyncs[0] - before)
        return out

    monkeypatch.setattr(os, "fsync", counting_fsync)
    monkeypatch.setattr(ac, "write_snapshot", watch)
    handed = len(ckpt._handed)
    run_sft(load_config(None, sft_args(tmp_path, tiny_model, 5, "trainer.save_freq=2", "trainer.max_ckpt_to_keep=1")))
    run = tmp_path / "run"
    assert per_step[5] == (False, 0) and all(d and n > 0 for d, n in (per_step[2], per_step[4])), per_step
    # Complete and in place before the run returns; the flush goes on in its own process.
    assert (run / ckpt.LATEST).read_text() == "5" and ckpt.load_trainer_state(run / "global_step_5")["global_step"] == 5
    assert len(ckpt._handed) == handed + 1
    proc = ckpt._handed[-1]
    args = proc.args[proc.args.index("-c") + 2:]
    assert args == [str(run / "global_step_5"), "--", str(run / "global_step_4")]
    assert proc.wait(60) == 0
    assert [s for s, _ in ckpt.step_dirs(run)] == [5] and not list(run.glob(ckpt.DISCARDED_PREFIX + "*"))
    assert ckpt.load_trainer_state(run / "global_step_5")["global_step"] == 5
    # trainer.async_save=false: every save in line and fsynced, the final one too; nothing handed over.
    per_step.clear()
    handed = len(ckpt._handed)
    run_sft(load_config(None, sft_args(tmp_path / "sync", tiny_model, 3, "trainer.save_freq=2",
                                       "trainer.async_save=false")))
    assert per_step[3][0] is True and per_step[3][1] > 0 and len(ckpt._handed) == handed


def test_deletions_still_going_at_the_end_are_finished_by_a_detached_process(tmp_path, monkeypatch):
    root = tmp_path / "run"
    big = root / "global_step_1"
    (big / "huggingface").mkdir(parents=True)
    for i in range(50):
        (big / "huggingface" / f"part{i}.bin").write_bytes(b"x" * 1000)
    started, stopped = threading.Event(), threading.Event()

    def slow_remove(path, stop):  # this process's deletion gets nowhere before it "ends"
        started.set()
        if stop.wait(60):  # hand_off tells it to stop: the detached process takes over
            stopped.set()

    monkeypatch.setattr(ckpt, "_remove_tree", slow_remove)
    ckpt.discard(big)
    assert started.wait(10) and not big.exists()
    ckpt.hand_off()
    assert stopped.wait(10)
    deadline = time.monotonic() + 30
    while list(root.glob(ckpt.DISCARDED_PREFIX + "*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(root.glob(ckpt.DISCARDED_PREFIX + "*"))
    ckpt.wait_for_discards()  # nothing left to wait for here


def test_an_in_process_deletion_stops_between_files(tmp_path):
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.bin").write_bytes(b"x")
    stop = threading.Event()
    stop.set()
    ckpt._remove_tree(tmp_path / "a", stop)
    assert len(list(folder.iterdir())) == 3  # stopped before the first file
    ckpt._remove_tree(tmp_path / "a", threading.Event())
    assert not (tmp_path / "a").exists()


# ---- resume ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model) -> Path:
    """6 steps with background checkpoints at 3 and 6."""
    from verlite.config import load_config
    from verlite.trainer.sft_trainer import run_sft

    tmp = tmp_path_factory.mktemp("ref")
    run_sft(load_config(None, sft_args(tmp, tiny_model, 6, "trainer.save_freq=3")))
    return tmp / "run"


def _resume_from(tmp: Path, model: Path, checkpoint: Path) -> Path:
    from verlite.config import load_config
    from verlite.trainer.sft_trainer import run_sft

    cut = tmp / "run"
    cut.mkdir(parents=True)
    shutil.copytree(checkpoint, cut / checkpoint.name)
    summary = run_sft(load_config(None, sft_args(tmp, model, 6, "trainer.save_freq=3")))
    assert summary["start_step"] == 3
    return cut


def test_resume_from_background_checkpoint_is_exact(tmp_path, tiny_model, reference_run):
    cut = _resume_from(tmp_path, tiny_model, reference_run / "global_step_3")
    name = "global_step_6/huggingface/model.safetensors"
    assert (reference_run / name).read_bytes() == (cut / name).read_bytes()
    assert _files(reference_run / "global_step_6")["trainer_state.safetensors"] == \
        _files(cut / "global_step_6")["trainer_state.safetensors"]


def test_checkpoint_with_tensors_inside_trainer_state_pt_still_resumes_exactly(tmp_path, tiny_model, reference_run):
    """The format before the split: every tensor pickled inside trainer_state.pt."""
    old = tmp_path / "old" / "global_step_3"
    shutil.copytree(reference_run / "global_step_3", old)
    torch.save(ckpt.load_trainer_state(old), old / ckpt.STATE)
    (old / ckpt.STATE_TENSORS).unlink()
    assert isinstance(torch.load(old / ckpt.STATE, weights_only=True)["rng"]["torch"], torch.Tensor)
    cut = _resume_from(tmp_path / "resumed", tiny_model, old)
    name = "global_step_6/huggingface/model.safetensors"
    assert (reference_run / name).read_bytes() == (cut / name).read_bytes()


def test_a_missing_state_tensor_file_is_one_clear_error(tmp_path, reference_run):
    from verlite.errors import VerliteError

    broken = Path(shutil.copytree(reference_run / "global_step_3", tmp_path / "global_step_3"))
    (broken / ckpt.STATE_TENSORS).unlink()
    with pytest.raises(VerliteError, match=r"trainer_state.safetensors cannot be read .*resume_mode=disable"):
        ckpt.load_trainer_state(broken)


# ---- a kill mid-write --------------------------------------------------------------------

SLOW_WRITER = """
import sys, time
from pathlib import Path
from verlite.trainer import checkpoint as ckpt
real = ckpt._replace_dir
def slow(tmp, final, durable=True):
    if ckpt.latest_checkpoint(tmp.parent) is not None:  # the second checkpoint: written, not yet renamed
        Path(sys.argv[1]).write_text(tmp.name)
        time.sleep(300)
    real(tmp, final, durable)
ckpt._replace_dir = slow
from verlite.trainer import async_checkpoint
async_checkpoint.DEFER_WHEN_BUSY_ON = ("cuda", "cpu")  # as on a GPU: a save due meanwhile is put off
from verlite.cli import main
sys.exit(main(["sft", *sys.argv[2:]]))
"""


def test_kill_during_background_save_keeps_previous_checkpoint(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    marker = tmp_path / "writing"
    args = sft_args(tmp_path, tiny_model, 10_000, "trainer.save_freq=2")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(marker), *args],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def last_step() -> int:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        try:
            return json.loads(lines[-1])["step"] if lines else 0
        except ValueError:  # a line being written
            return 0

    deadline = time.time() + 240
    try:
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        writing = marker.read_text() if marker.exists() else None
        # Training goes on while that checkpoint is being written, past two more due saves (put off).
        step = int(writing.split("_")[-1].split(".")[0]) if writing else 0
        while writing and last_step() < step + 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        reached = last_step()
    finally:
        proc.kill()  # SIGKILL: no clean-up runs
        _, err = proc.communicate()
    assert writing, f"no second checkpoint was being written: {err[-2000:]}"
    assert reached >= step + 4, f"training stopped at step {reached} while step {step} was written: {err[-2000:]}"
    run = tmp_path / "run"
    assert (run / writing).is_dir() and (run / writing / ckpt.STATE_TENSORS).is_file()
    previous = ckpt.latest_checkpoint(run)
    assert previous is not None and previous.name != writing.removesuffix(".tmp")
    assert len(ckpt.step_dirs(run)) == 1 and (run / ckpt.LATEST).read_text() == previous.name.split("_")[-1]
    AutoModelForCausalLM.from_pretrained(previous / "huggingface")
    assert ckpt.load_trainer_state(previous)["global_step"] == int(previous.name.split("_")[-1])


@pytest.mark.slow  # a bench smoke run
def test_ckpt_probe_smoke():
    """bench/ckpt_probe.py --smoke: every writer writes, and the loop rates are reported."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ckpt_probe.py"), "--smoke"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows[0]["state_gb"] > 0
    assert [x["writer"] for x in rows[1:]] == ["old", "new", "torch.save", "safetensors.save_file",
                                               "write_tensor_file"]
    assert all(x["loop_alone"] > 0 and x["loop_during"] > 0 and x["write_s"] >= 0 for x in rows[1:])


def test_background_copy_of_torchao_8bit_state_shares_no_memory(monkeypatch):
    """torchao's OptimState8bit.to(copy=True) hands back the live codes; a background write
    of them would see the next steps' values (found by test_optim_lowmem's resume)."""
    pytest.importorskip("torchao.optim")
    # AdamW8bit compiles its step with torch.compile: 25 s of inductor on CPU for what this
    # test checks (the copy's memory), which is the same eagerly.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    from torchao.optim import AdamW8bit

    p = torch.nn.Parameter(torch.randn(256, 256))
    opt = AdamW8bit([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    live = opt.state[p]["exp_avg"]
    copier = ac._Copier(None, in_line=False, device_refs=False)
    snap = copier({"exp_avg": live})["exp_avg"]
    before = snap.dequantize().clone()
    assert type(snap) is type(live) and torch.equal(before, live.dequantize())
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(live.dequantize(), before) and torch.equal(snap.dequantize(), before)


def test_without_a_detached_process_the_hand_off_finishes_in_line(tmp_path, monkeypatch):
    root = tmp_path / "run"
    new, old = root / "global_step_2", root / "global_step_1"
    for folder in (new, old):
        (folder / ckpt.HF_DIR).mkdir(parents=True)
        (folder / ckpt.STATE).write_bytes(b"x")
    (root / ckpt.LATEST).write_text("2")
    synced = []
    real = ckpt._fsync_file
    monkeypatch.setattr(ckpt, "_fsync_file", lambda path: (synced.append(path), real(path)))

    def no_process(*args, **kwargs):
        raise OSError("no process here")

    monkeypatch.setattr(ckpt.subprocess, "Popen", no_process)
    handed = len(ckpt._handed)
    ckpt.hand_off(new, [old])
    assert len(ckpt._handed) == handed and not old.exists() and (new / ckpt.STATE).is_file()
    assert {new / ckpt.STATE, root / ckpt.LATEST} <= set(synced)
