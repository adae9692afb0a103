"""Checkpoints that do not stall training: copy the state to host memory on the training
thread (the only pause), then write it on a background thread while the next steps run.

The write is checkpoint.py's atomic scheme: `global_step_N.tmp`, fsync, rename, then
`latest_checkpointed_iteration.txt`; a process killed mid-write leaves a `.tmp` folder that
nothing reads, and every earlier checkpoint whole. The synchronous `save_checkpoint` runs
the same two halves back to back, so both produce the same bytes.

With several ranks, gathering the full tensors is collective and stays on the training
thread; only rank 0 writes. Whether rank 0's write succeeded is agreed (a broadcast) when
the next save or the end of the run waits for it, also on the training thread.

Host copies go into pinned buffers kept across saves (device-to-host at full speed, no
allocation per save) when the state is at most PIN_FRACTION of the machine's memory;
otherwise into ordinary memory freed after each write.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from verlite.trainer import checkpoint as ckpt

log = logging.getLogger("verlite.checkpoint")

PIN_FRACTION = 0.25
# Devices on which a periodic checkpoint that comes due while the previous one is still being
# written is taken after that write instead of pausing training for it. On a GPU a 0.5B full
# fine-tune writes 6 GB per checkpoint, longer than 10 short steps take; on a CPU steps are
# slow and checkpoints stay exactly every save_freq steps.
DEFER_WHEN_BUSY_ON = ("cuda",)


@dataclass
class Snapshot:
    """Everything a checkpoint holds, already on the host, plus where it goes."""

    root: Path
    step: int
    hf_model: Any  # only its save_pretrained (config, PEFT adapter config) is used
    tokenizer: Any
    weights: dict[str, torch.Tensor]
    state: dict  # optimizer, scheduler, rng and the trainer's extra keys
    stall_s: float = 0.0

    @property
    def final(self) -> Path:
        return self.root / f"global_step_{self.step}"


class HostBuffers:
    """Pinned host tensors reused by every save, keyed by the state's names."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t.detach(), non_blocking=True)
        return buf


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def pinned_buffers_fit(model: torch.nn.Module, world_size: int) -> Optional[HostBuffers]:
    """Reusable pinned buffers when the state is small against host memory (one GPU only:
    with FSDP, rank 0's gathered copies come from torch's own CPU offload)."""
    if world_size > 1 or not torch.cuda.is_available():
        return None
    trained = [p for p in model.parameters() if p.requires_grad]
    # weights + AdamW's two moments (master dtype); frozen LoRA bases are not saved as state
    nbytes = sum(p.numel() * p.element_size() for p in trained) * 3
    return HostBuffers() if nbytes <= PIN_FRACTION * _host_memory_bytes() else None


def _to_host(value: Any, key: str, buffers: Optional[HostBuffers]) -> Any:
    """A host copy of a (nested) state: tensors copied, containers rebuilt, the rest deep-copied."""
    if isinstance(value, torch.Tensor):
        if buffers is not None and value.device.type == "cuda":
            return buffers.copy(key, value)
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v, f"{key}.{k}", buffers) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v, f"{key}.{i}", buffers) for i, v in enumerate(value))
    return copy.deepcopy(value)


def take_snapshot(root: str | Path, step: int, sft_model, tokenizer, optimizer, scheduler, extra: dict,
                  is_lora: bool, is_main: bool, buffers: Optional[HostBuffers] = None) -> Snapshot:
    """Copy the training state to the host. Every rank calls it (the gathers are collective);
    on return the training may change the model and optimizer freely."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    start = time.perf_counter()
    sharded = dist.is_initialized() and dist.get_world_size() > 1
    weights = {}
    for name, p in sft_model.named_parameters():
        if is_lora and not p.requires_grad:
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective for a DTensor
        if is_main:
            weights[name[len("hf."):] if name.startswith("hf.") else name] = _to_host(full, "w." + name, buffers)
    # With FSDP, torch gathers the full optimizer state onto rank 0's CPU itself.
    optim_sd = get_optimizer_state_dict(sft_model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=sharded))
    state = {"optimizer": _to_host(optim_sd, "o", buffers if not sharded else None) if is_main else {},
             "scheduler": copy.deepcopy(scheduler.state_dict()), "rng": ckpt.rng_state(), **copy.deepcopy(extra)}
    if buffers is not None:
        torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed
    return Snapshot(Path(root), step, sft_model.hf, tokenizer, weights, state, time.perf_counter() - start)


def weights_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


def write_snapshot(snap: Snapshot) -> Optional[Path]:
    """Rank 0: write the snapshot atomically; returns its folder, or None (reported) on failure."""
    root, final = snap.root, snap.final
    if not weights_finite(snap.weights):
        log.error("step %d: weights hold NaN/inf; checkpoint not written", snap.step)
        return None
    tmp = root / f"global_step_{snap.step}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        snap.hf_model.save_pretrained(tmp / ckpt.HF_DIR, state_dict=snap.weights, safe_serialization=True)
        snap.tokenizer.save_pretrained(tmp / ckpt.HF_DIR)
        torch.save(snap.state, tmp / ckpt.STATE)
        ckpt._fsync_tree(tmp)
        ckpt._replace_dir(tmp, final)
        ckpt._write_atomic(root / ckpt.LATEST, str(snap.step))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = ckpt.latest_checkpoint(root)
        log.error("could not save checkpoint %s: %s; %s", final, e.strerror or e,
                  f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists")
        return None
    return final


def agree(ok: bool) -> bool:
    """Rank 0's outcome, on every rank (collective when there are several)."""
    flag = torch.tensor([1.0 if ok else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flag = flag.to("cuda")
        dist.broadcast(flag, src=0)
    return flag.item() > 0


@dataclass
class SaveTimes:
    saves: int = 0
    stall_s: float = 0.0  # training thread: waiting for the previous write + copying to the host
    write_s: float = 0.0  # writer: serializing, fsync, rename (in the background when async)
    stalls: list[float] = field(default_factory=list)


class Checkpointer:
    """Saves one checkpoint at a time; with `background`, the write overlaps training.
    On DEFER_WHEN_BUSY_ON devices the trainer asks `busy()` before a periodic save and takes
    it a few steps later rather than wait for the disk.

    `on_saved(path, paused_s, write_s)` runs on rank 0 after a checkpoint is in place
    (logging, pruning); paused_s is what the save cost the training thread."""

    def __init__(self, background: bool, is_main: bool, buffers: Optional[HostBuffers],
                 on_saved: Callable[[Path, float, float], None]):
        self.background = background
        self.is_main = is_main
        self.buffers = buffers
        self.on_saved = on_saved
        self.times = SaveTimes()
        self._thread: Optional[threading.Thread] = None
        self._result: Optional[Path] = None
        self._pending: Optional[Snapshot] = None

    def save(self, root: Path, step: int, sft_model, tokenizer, optimizer, scheduler, extra: dict,
             is_lora: bool) -> None:
        """Snapshot now; write now or in the background. Collective: every rank calls it."""
        start = time.perf_counter()
        self.wait()  # one write at a time: the buffers and the latest pointer are shared
        snap = take_snapshot(root, step, sft_model, tokenizer, optimizer, scheduler, extra, is_lora, self.is_main,
                             self.buffers)
        self._pending = snap
        paused = time.perf_counter() - start
        if self.is_main and self.background:
            self._thread = threading.Thread(target=self._write, args=(snap, paused), name="verlite-checkpoint",
                                            daemon=True)
            self._thread.start()
        elif self.is_main:
            self._write(snap, paused)
        stall = time.perf_counter() - start  # in line, the write is part of the pause
        self.times.saves += 1
        self.times.stall_s += stall
        self.times.stalls.append(stall)

    def _write(self, snap: Snapshot, paused: float) -> None:
        start = time.perf_counter()
        self._result = write_snapshot(snap)
        took = time.perf_counter() - start
        self.times.write_s += took
        if self._result is not None:
            self.on_saved(self._result, paused if self.background else paused + took, took)

    def busy(self) -> bool:
        """Is the previous checkpoint still being written? Rank 0's answer on every rank
        (collective when there are several)."""
        alive = self._thread is not None and self._thread.is_alive()
        if dist.is_initialized() and dist.get_world_size() > 1:
            return agree(alive)
        return alive

    def wait(self) -> Optional[Path]:
        """Wait for the last save to be on disk; its folder, or None when it failed (every rank
        gets rank 0's answer). Collective when a save is pending."""
        snap, self._pending = self._pending, None
        if snap is None:
            return None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        ok = agree(self._result is not None) if self.is_main else agree(False)
        self._result = None
        return snap.final if ok else None

    def close(self) -> None:
        """After an error: let a running write finish (no collective: other ranks may be gone)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._pending = None
