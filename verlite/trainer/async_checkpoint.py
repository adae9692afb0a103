"""Checkpoints that do not stall training: copy the state to host memory on the training
thread (the only pause), then write it on a background thread while the next steps run.

The write is atomic: `global_step_N.tmp`, fsync, rename, then `latest_checkpointed_iteration.txt`;
a process killed mid-write leaves a `.tmp` folder that nothing reads, and every earlier
checkpoint whole. The final save of a finished run skips the fsyncs (Snapshot.durable) and
leaves them to a detached process (checkpoint.hand_off), as the run's last act: they are
the disk's time (2.6 s of a 3.1 s final save for 6 GB on the H100), and the files are
complete and in place for every reader meanwhile; an earlier, flushed checkpoint stays until
that flush is done. A save written in line (the final one, one before an exit, or
`Checkpointer(background=False)`) runs the same two halves back to back: the same bytes.

The writer stays out of the way of the training loop, which on a GPU is bound by Python
launching kernels: tensor bytes go to disk through os.pwrite straight from memory
(checkpoint.write_tensor_file: no pickling of big tensors, no copies into bytes objects, the
GIL released for every write; safetensors before 0.6 held it while copying), the weights file
and the optimizer's tensor file are written by parallel threads that fsync their own files,
and the writer threads run at a lower CPU priority, so that where cores are few the training
thread keeps its core (bench/ckpt_probe.py measures both effects). Only small things are
pickled (trainer_state.pt without its tensors).

Host copies. Measured on the H100 host for 6 GiB (a 0.5B full fine-tune's weights + AdamW
moments): `torch.empty(pin_memory=True)` 4.85 s, then the D2H copy into it 0.13 s; a fresh
pageable `torch.empty` 0.00 s but the first D2H into it 4.70 s (first-touch page faults), the
second 0.46 s. Neither kind of fresh buffer is cheap; a reused pinned one is. So:
- periodic background saves copy into reusable pinned buffers (HostBuffers) that a helper
  thread allocates while training runs (from the trainable parameters' shapes when the trainer
  starts, then from what each snapshot actually held); a tensor whose buffer is not ready yet
  is copied to fresh memory, so a save never waits for pinning. Buffers of 1 MiB and more are
  page-locked one by one with cudaHostRegister (exact size: torch's pinned allocator rounds
  each block up to a power of two); when pinning fails they stay pageable, only slower;
- a save written in line (nothing trains until it is on disk) makes no host copy of the
  state: ready buffers are used if there are any, every other device tensor is streamed to
  disk through a 64 MiB pinned staging buffer per writer thread, host tensors are written
  where they are. On a GPU it cancels a periodic write still in flight rather than wait for
  it (that checkpoint is older; the one before it stays the latest until the new one lands).
Pinned buffers are used only on one GPU and when the state is at most PIN_FRACTION of the
machine's memory.

With several ranks, gathering the full tensors is collective and stays on the training
thread; only rank 0 writes. Whether rank 0's write succeeded is agreed (a broadcast) when
the next save or the end of the run waits for it, also on the training thread. The NaN/inf
check of the weights runs once per save, on the device before any copy (an all-reduce across
ranks), so every rank agrees to skip a save with broken weights.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from verlite.engine.distributed import all_reduce_sum
from verlite.trainer import checkpoint as ckpt

log = logging.getLogger("verlite.checkpoint")

PIN_FRACTION = 0.25
# Devices on which a periodic checkpoint that comes due while the previous one is still being
# written is taken after that write instead of pausing training for it. On a GPU a 0.5B full
# fine-tune writes 6 GB per checkpoint, longer than 10 short steps take; on a CPU steps are
# slow and checkpoints stay exactly every save_freq steps.
DEFER_WHEN_BUSY_ON = ("cuda",)
# Threads writing tensor bytes (os.pwrite releases the GIL; page-cache copies scale with cores),
# leaving most cores to the training process.
WRITE_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
WRITER_NICENESS = 10
# Buffers at least this large are page-locked one by one (each on pages of its own: cudaHostRegister
# works on whole pages); smaller ones stay ordinary memory (copied in microseconds).
PIN_MIN_BYTES = 1 << 20

Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass
class Snapshot:
    """Everything a checkpoint holds, already on the host, plus where it goes."""

    root: Path
    step: int
    hf_model: Any  # full model: its config and generation config; LoRA: PEFT's save_pretrained
    tokenizer: Any
    weights: dict[str, torch.Tensor]
    state: dict  # optimizer, scheduler, rng and the trainer's extra keys
    is_lora: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)  # set: a newer save supersedes it
    # False: no fsync; the files are complete and renamed into place, the flush is left to
    # checkpoint.hand_off (the final save of a finished run: nothing trains after it).
    durable: bool = True

    @property
    def final(self) -> Path:
        return self.root / f"global_step_{self.step}"


def _spec(t: torch.Tensor) -> Spec:
    return tuple(t.shape), t.dtype


_PAGE = 4096


def _page_aligned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose memory starts on a page and owns every page it touches, so that
    registering it never overlaps another allocation."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(_round_up(nbytes) + _PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)  # the view keeps `raw` alive


def _round_up(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


def _pin(buf: torch.Tensor) -> bool:
    """Page-lock `buf` in place (exact size, unlike torch's pinned allocator); best effort:
    unpinned, copies into it are only slower."""
    if buf.numel() * buf.element_size() < PIN_MIN_BYTES:
        return False
    try:  # portable: pinned for every device's context, whichever this thread would pick
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), _round_up(buf.numel() * buf.element_size()), 1)
        if int(getattr(err, "value", err)) == 0:
            return True
        log.debug("cudaHostRegister failed (%s); this checkpoint buffer stays pageable", err)
    except Exception as e:  # noqa: BLE001 - no CUDA runtime here: the buffer stays pageable
        log.debug("cannot pin a checkpoint buffer (%s); it stays pageable", e)
    return False


def _unpin(buf: torch.Tensor) -> None:
    """Before the memory can be freed (it stays valid, merely pageable, for whoever still reads it)."""
    try:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    except Exception as e:  # noqa: BLE001 - best effort, as the registration
        log.debug("cannot unpin a checkpoint buffer (%s)", e)


class HostBuffers:
    """Host tensors reused by every background save, matched to the state by shape and dtype.

    A helper thread allocates (and pins, with `pin`) the buffers `want` asks for while training
    runs; `lease` hands a snapshot those ready now. Buffers are never resized: a save whose
    tensor has no ready buffer copies it to fresh memory, and its shapes become the next target.
    """

    on_device = False

    def __init__(self, pin: bool):
        self.pin = pin
        self._lock = threading.Lock()
        self._ready: dict[Spec, list[torch.Tensor]] = {}
        self._target: Counter = Counter()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._pinned: set[int] = set()  # data_ptr of the buffers page-locked here

    def want(self, specs: list[Spec]) -> None:
        """Hold exactly these buffers: excess ones are dropped now, missing ones allocated in the background."""
        with self._lock:
            self._target = Counter(specs)
            for spec, bufs in self._ready.items():
                for buf in bufs[self._target[spec]:]:
                    self._drop(buf)
                del bufs[self._target[spec]:]
            if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            if any(len(self._ready.get(s, ())) < n for s, n in self._target.items()):
                self._thread = threading.Thread(target=self._allocate, name="verlite-ckpt-buffers", daemon=True)
                self._thread.start()

    def _next_missing(self) -> Optional[Spec]:
        with self._lock:
            return next((s for s, n in self._target.items() if len(self._ready.get(s, ())) < n), None)

    def _allocate(self) -> None:
        while not self._stop.is_set():
            spec = self._next_missing()
            if spec is None:
                return
            size = torch.Size(spec[0]).numel() * torch.empty((), dtype=spec[1]).element_size()
            big = self.pin and size >= PIN_MIN_BYTES
            buf = _page_aligned_empty(*spec) if big else torch.empty(spec[0], dtype=spec[1])
            pinned = big and _pin(buf)
            if not pinned and buf.numel():  # touch every page here, not in the first snapshot's copy (faults: seconds)
                buf.view(-1).view(torch.uint8).zero_()
            with self._lock:
                if pinned:
                    self._pinned.add(buf.data_ptr())
                held = self._ready.setdefault(spec, [])
                if len(held) < self._target[spec] and not self._stop.is_set():
                    held.append(buf)
                else:
                    self._drop(buf)

    def _drop(self, buf: torch.Tensor) -> None:
        if buf.data_ptr() in self._pinned:
            self._pinned.discard(buf.data_ptr())
            _unpin(buf)

    def lease(self) -> dict[Spec, list[torch.Tensor]]:
        """The buffers ready now, for one snapshot to take from (pop)."""
        with self._lock:
            return {s: list(bufs) for s, bufs in self._ready.items() if bufs}

    def ready(self) -> bool:
        """Is every wanted buffer allocated?"""
        return self._next_missing() is None

    def close(self) -> None:
        """Stop allocating (waits for at most the one allocation in progress) and let every
        buffer go (call it when no save will use them again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for bufs in self._ready.values():
                for buf in bufs:
                    self._drop(buf)
            self._ready.clear()


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _host_buffers(specs: list[Spec]) -> Optional[HostBuffers]:
    """Reusable host buffers for these tensors when they are small against host memory (at most
    PIN_FRACTION of it), pinned and allocated from now on in the background; else None (every
    save copies to fresh memory). VERLITE_CKPT_PIN=0: pageable buffers (bench: whether pinning
    6 GB beside the first steps slows them)."""
    if not specs or sum(_nbytes(s) for s in specs) > PIN_FRACTION * _host_memory_bytes():
        return None
    buffers = HostBuffers(pin=os.environ.get("VERLITE_CKPT_PIN", "1") != "0")
    buffers.want(specs)
    return buffers


def _nbytes(spec: Spec, count: int = 1) -> int:
    return torch.Size(spec[0]).numel() * torch.empty((), dtype=spec[1]).element_size() * count


class _NoBuffers:
    """No reusable buffers: every save copies to fresh host memory."""

    on_device = False

    def want(self, specs: list[Spec]) -> None:
        pass

    def lease(self) -> dict[Spec, list[torch.Tensor]]:
        return {}

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


class DeviceStaging:
    """Spare copies of the trained state on the GPU itself, for background saves where the GPU
    has room: a snapshot is then a device-to-device copy (milliseconds for 6 GB), and no host
    memory is pinned. Pinning 6 GB of host buffers beside the first training steps made step 1
    of GSM8K's 0.5B run 1.2-3 s slower (H200 and H100 calls, bench/RESULTS.md, seventh and
    eighth sessions), and copying into pageable memory pauses training for seconds. The background writer streams these copies to disk
    through its small pinned staging buffers, on a CUDA stream of its own
    (checkpoint.write_tensor_file), so training kernels neither wait for it nor hold it up.

    The buffers are allocated at the first snapshot, when the steps' memory peak is known, and
    only if the peak plus the buffers stay under (1 - ROOM_MARGIN) of the GPU's capacity
    (trainer.gpu_mem_gb, else the card) and fit in its free memory; otherwise this and every later
    save use host buffers (HostBuffers, pinned) as before, which is logged. Same interface as
    HostBuffers (want / lease / ready / close)."""

    ROOM_MARGIN = 0.2

    def __init__(self, device: torch.device, capacity_bytes: float):
        self.device = device
        self.capacity = capacity_bytes
        self._target: Counter = Counter()
        self._ready: dict[Spec, list[torch.Tensor]] = {}
        self.host: Optional[HostBuffers] = None  # set once the GPU has no room: host buffers from then on

    @property
    def on_device(self) -> bool:
        return self.host is None

    def want(self, specs: list[Spec]) -> None:
        if self.host is not None:
            return self.host.want(specs)
        self._target = Counter(specs)
        for spec, bufs in self._ready.items():
            del bufs[self._target[spec]:]

    def _room_for(self, nbytes: int) -> bool:
        peak = torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else 0
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else nbytes
        return peak + nbytes <= (1 - self.ROOM_MARGIN) * self.capacity and nbytes <= free

    def lease(self) -> dict[Spec, list[torch.Tensor]]:
        if self.host is not None:
            return self.host.lease()
        missing = {s: n - len(self._ready.get(s, ())) for s, n in self._target.items()}
        need = sum(_nbytes(s, k) for s, k in missing.items() if k > 0)
        if need and not self._room_for(need):
            log.info("checkpoint copies: no room for %.1f GiB more on the GPU; host buffers from now on",
                     need / (1 << 30))
            self.to_host()
            return {}
        try:
            for spec, k in missing.items():
                self._ready.setdefault(spec, []).extend(
                    torch.empty(spec[0], dtype=spec[1], device=self.device) for _ in range(max(0, k)))
        except torch.OutOfMemoryError:  # the free memory measured was not all usable (fragments, other processes)
            failed = True
        else:
            failed = False
        if failed:  # outside the except block: the failed allocation's frames are gone
            log.info("checkpoint copies: out of GPU memory while allocating them; host buffers from now on")
            self.to_host()
            return {}
        return {s: list(bufs) for s, bufs in self._ready.items() if bufs}

    def ready(self) -> bool:
        return self.host.ready() if self.host is not None else True

    def lease_held(self) -> bool:
        """Are copies allocated on the GPU now?"""
        return self.host is None and any(self._ready.values())

    def to_host(self) -> None:
        """Host buffers from now on, as a run without room on the GPU gets them (_host_buffers:
        pinned in the background where the state is small against host memory, else none:
        fresh copies); the GPU copies are let go."""
        if self.host is None:
            self._ready.clear()
            self.host = _host_buffers(list(self._target.elements())) or _NoBuffers()

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
        self._ready.clear()


def checkpoint_buffers(model: torch.nn.Module, world_size: int, capacity_bytes: float):
    """Where background saves copy the state, guessed as the weights plus two AdamW moments per
    trained parameter (the first snapshot corrects the guess: another optimizer, an offloaded
    state): on the GPU itself when that is small against its capacity (DeviceStaging; at most
    1/8 of it, confirmed at the first snapshot), else reusable host buffers when they fit
    (_host_buffers), else nowhere (fresh copies). One GPU only: with FSDP, rank 0's gathered
    copies come from torch's own CPU offload. VERLITE_CKPT_STAGING=host skips the GPU (bench:
    the host copies, as before DeviceStaging)."""
    if world_size > 1 or not torch.cuda.is_available():
        return None
    trained = [p for p in model.parameters() if p.requires_grad and p.device.type == "cuda"]
    specs = [_spec(p) for p in trained for _ in range(3)]
    if specs and capacity_bytes and sum(_nbytes(s) for s in specs) <= capacity_bytes / 8 \
            and os.environ.get("VERLITE_CKPT_STAGING") != "host":
        staging = DeviceStaging(trained[0].device, capacity_bytes)
        staging.want(specs)
        return staging
    return _host_buffers(specs)


def _copy_subclass(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a tensor subclass (torchao's 8-/4-bit optimizer states) that shares no
    memory with it: their `.to(copy=True)` returns the same inner tensors, which the next
    optimizer step would change under a background write."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if type(t) is torch.Tensor or flatten is None:
        return t.to("cpu", copy=True)
    names, ctx = flatten()
    inner = {n: _copy_subclass(getattr(t, n)) for n in names}
    return type(t).__tensor_unflatten__(inner, ctx, t.size(), t.stride())


class _Copier:
    """Copies one snapshot's tensors to the host: into leased buffers where one fits, else
    into fresh memory; in line, host tensors (and with `device_refs` device tensors) are not
    copied at all."""

    def __init__(self, buffers: Optional[HostBuffers], in_line: bool, device_refs: bool):
        self.buffers = buffers
        self.in_line = in_line
        self.device_refs = device_refs
        self.lease = buffers.lease() if buffers is not None else {}
        self.specs: list[Spec] = []  # what the buffers should hold next time
        self.async_copies = False

    def __call__(self, value: Any) -> Any:
        """A host copy of a (nested) state: tensors copied, containers rebuilt, the rest deep-copied."""
        if isinstance(value, torch.Tensor):
            return self._tensor(value.detach())
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self(v) for v in value)
        return copy.deepcopy(value)

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        plain = ckpt.is_plain_tensor(t)
        if plain and self.buffers is not None:
            self.specs.append(_spec(t))
            free = self.lease.get(_spec(t))
            if free:
                buf = free.pop()
                on_gpu = t.device.type == "cuda"
                buf.copy_(t, non_blocking=on_gpu)
                self.async_copies |= on_gpu
                return buf
        if self.in_line and (t.device.type == "cpu" or (plain and self.device_refs)):
            # Nothing changes it before the write ends; a device tensor is streamed to disk
            # through a small staging buffer (checkpoint.write_tensor_file).
            return t.contiguous() if plain else t
        return t.to("cpu", copy=True).contiguous() if plain else _copy_subclass(t)

    def done(self) -> None:
        if self.async_copies:
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed
        if self.buffers is not None and not self.in_line:
            self.buffers.want(self.specs)  # in line (the final save) nothing follows to use them


def _device_type(sft_model) -> str:
    p = next(iter(sft_model.parameters()), None)
    return p.device.type if p is not None else "cpu"


def weights_finite(sft_model, is_lora: bool) -> bool:
    """No NaN/inf in the weights a checkpoint holds, checked on the device (every rank's shard;
    collective when there are several)."""
    params = [p for p in sft_model.parameters() if p.requires_grad or not is_lora]
    device = params[0].device if params else torch.device("cpu")
    if dist.is_initialized() and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())  # parameters may be offloaded
    bad = torch.zeros(1, device=device)
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.is_floating_point():
            bad += (~torch.isfinite(local)).any().to(bad.device, torch.float32)
    return all_reduce_sum(bad).item() == 0


def take_snapshot(root: str | Path, step: int, sft_model, tokenizer, optimizer, scheduler, extra: dict,
                  is_lora: bool, is_main: bool, buffers: Optional[HostBuffers] = None,
                  in_line: bool = False) -> Snapshot:
    """Copy the training state to the host. Every rank calls it (the gathers are collective);
    on return the training may change the model and optimizer freely (unless `in_line`: then
    host tensors are referenced, not copied, and the write must come before the next step)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sharded = dist.is_initialized() and dist.get_world_size() > 1
    # Gathered full tensors are fresh device memory: referencing them all would hold the whole
    # model on one device, so with several ranks they are copied to the host one by one.
    # An in-line save streams device tensors straight to disk: a copy on the GPU would add nothing.
    staged = buffers if not sharded and not (in_line and buffers is not None and buffers.on_device) else None
    copier = _Copier(staged, in_line, device_refs=not sharded)
    weights = {}
    for name, p in sft_model.named_parameters():
        if is_lora and not p.requires_grad:
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # collective for a DTensor
        if is_main:
            weights[name[len("hf."):] if name.startswith("hf.") else name] = copier(full)
    # With FSDP, torch gathers the full optimizer state onto rank 0's CPU itself.
    optim_sd = get_optimizer_state_dict(sft_model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=sharded))
    state = {"optimizer": copier(optim_sd) if is_main else {},
             "scheduler": copy.deepcopy(scheduler.state_dict()), "rng": ckpt.rng_state(), **copy.deepcopy(extra)}
    copier.done()
    return Snapshot(Path(root), step, sft_model.hf, tokenizer, weights, state, is_lora)


_said: dict[str, bool] = {}


def _plain_layout(model, names) -> bool:
    """Does save_pretrained store these weights under their own names, with nothing else to do
    (no renaming/fusing conversions, quantizer, remote code)? Then the weights file is written
    here; otherwise save_pretrained writes it (slower, same result)."""
    import transformers.modeling_utils as mu

    revert = getattr(mu, "revert_weight_conversion", None)
    if revert is None:
        try:
            from transformers.core_model_loading import revert_weight_conversion as revert
        except ImportError:
            if not _said.get("no_revert"):
                _said["no_revert"] = True
                log.info("this transformers version cannot tell whether it renames weights on saving; "
                         "checkpoint weights are written by save_pretrained")
            return False
    probe = {name: torch.empty(0) for name in names}
    try:
        out = revert(model, probe)
    except Exception:  # noqa: BLE001 - a conversion that needs real tensors: not plain
        return False
    if out.keys() != probe.keys() or any(out[k] is not probe[k] for k in out):
        return False
    remote = getattr(model, "is_remote_code", lambda: False)()
    return not remote and getattr(model, "hf_quantizer", None) is None and not model._keys_to_ignore_on_save


def _write_hf(snap: Snapshot, folder: Path, pool: ThreadPoolExecutor) -> None:
    folder.mkdir(parents=True)
    model = snap.hf_model
    own_weights = not snap.is_lora and _plain_layout(model, snap.weights)
    if own_weights:  # save_pretrained's small files, as it writes them
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
        model.config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
    else:  # PEFT names and configures the adapter (small); unusual full models keep transformers' writer
        # An in-line save may hold device tensors, a background one its copies on the GPU.
        host = {}
        for k, v in snap.weights.items():
            with ckpt.copy_context(v.device):
                host[k] = v.cpu()
        model.save_pretrained(folder, state_dict=host, safe_serialization=True)
    snap.tokenizer.save_pretrained(folder)
    if snap.durable:
        ckpt.fsync_files(folder.rglob("*"))
    if own_weights:
        ckpt.write_tensor_file(folder / "model.safetensors", snap.weights, {"format": "pt"}, pool, cancel=snap.cancel,
                               durable=snap.durable)


def _write_state(snap: Snapshot, folder: Path, pool: ThreadPoolExecutor) -> None:
    data, tensors = ckpt.split_tensors(snap.state)
    ckpt.write_tensor_file(folder / ckpt.STATE_TENSORS, tensors, None, pool, cancel=snap.cancel, durable=snap.durable)
    torch.save(data, folder / ckpt.STATE)  # small: no tensor bigger than a few bytes remains
    if snap.durable:
        ckpt.fsync_files([folder / ckpt.STATE])


def _background_writer() -> None:
    """A writer thread yields the CPU to the training thread when cores are short (Linux:
    niceness is per thread), and copies device tensors on a CUDA stream of its own."""
    ckpt.copy_on_own_stream()
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):
        pass


def write_snapshot(snap: Snapshot, background: bool = False) -> Optional[Path]:
    """Rank 0: write the snapshot atomically; returns its folder, or None (reported) on failure.
    `background`: training runs meanwhile, so the writer threads take a lower CPU priority."""
    root, final = snap.root, snap.final
    tmp = root / f"global_step_{snap.step}.tmp"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        # Two file writers (weights; optimizer + the rest) in parallel, their tensor bytes spread
        # over a shared pool of threads that only ever run os.pwrite.
        nice = _background_writer if background else None
        # More threads for the final (in-line) write measured no faster on the H200 (2026-12-01:
        # 9.2-10.5 s with 8 threads against 8.3-8.6 s with 4 for 6 GB): the disk is the limit.
        # Without fsync too (the final save), 8 threads wrote its 6 GB no faster than 4 (2.1-2.3 s
        # against 1.8-1.9 s on the H100 host, bench/RESULTS.md eleventh session).
        with ThreadPoolExecutor(WRITE_THREADS, "verlite-ckpt-io", initializer=nice) as pool, \
                ThreadPoolExecutor(2, "verlite-ckpt-file", initializer=nice) as files:
            jobs = [files.submit(_write_hf, snap, tmp / ckpt.HF_DIR, pool), files.submit(_write_state, snap, tmp, pool)]
            for job in jobs:
                job.result()
        if snap.cancel.is_set():
            raise ckpt.WriteCancelled()
        if snap.durable:
            ckpt._fsync_dir(tmp / ckpt.HF_DIR)
            ckpt._fsync_dir(tmp)
        ckpt._replace_dir(tmp, final, snap.durable)
        ckpt._write_atomic(root / ckpt.LATEST, str(snap.step), snap.durable)
    except ckpt.WriteCancelled:
        ckpt.discard(tmp)  # deleting a partial 6 GB folder takes seconds: not on the final save's path
        log.info("step %d: checkpoint superseded by a newer one before it was written; not kept", snap.step)
        return None
    except Exception as e:  # noqa: BLE001 - a failed save is reported; training keeps the previous one
        shutil.rmtree(tmp, ignore_errors=True)
        prev = ckpt.latest_checkpoint(root)
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        log.error("could not save checkpoint %s: %s; %s", final, reason,
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
    saves: int = 0  # the training thread's pauses are timed by the trainer (trainer/timeline.py)
    write_s: float = 0.0  # writer: serializing, fsync, rename (in the background when async)


class Checkpointer:
    """Saves one checkpoint at a time; with `background`, the write overlaps training.
    On DEFER_WHEN_BUSY_ON devices the trainer asks `busy()` before a periodic save and takes
    it a few steps later rather than wait for the disk.

    `on_saved(path, paused_s, write_s)` runs on rank 0 after a checkpoint is in place
    (logging, pruning); paused_s is what the save cost the training thread (for a save
    written in line by a background checkpointer, the copy; the write is in write_s)."""

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
             is_lora: bool, in_line: bool = False, before_write: Optional[Callable[[], None]] = None,
             durable: bool = True) -> bool:
        """Snapshot now; write now (`in_line`, or not `background`) or in the background;
        not `durable`: without fsync (Snapshot.durable).
        False (reported) when the weights hold NaN/inf: nothing is written, and the previous
        checkpoint has landed. Collective: every rank calls it. `before_write` (rank 0) runs once
        the previous save is settled and this one's snapshot is taken, just before its write."""
        start = time.perf_counter()
        finite = weights_finite(sft_model, is_lora)
        in_line = in_line or not self.background
        if finite and in_line and self._pending is not None and _device_type(sft_model) in DEFER_WHEN_BUSY_ON:
            # Where periodic saves already yield to the disk (GPUs), the final (or exit) save
            # supersedes one still being written: give that up rather than wait for it (the
            # checkpoint before it stays the latest meanwhile). On a CPU every save_freq step
            # keeps its checkpoint.
            self._pending.cancel.set()
        self.wait()  # one write at a time: the buffers and the latest pointer are shared
        if not finite:
            log.error("step %d: weights hold NaN/inf; checkpoint not written", step)
            return False
        snap = take_snapshot(root, step, sft_model, tokenizer, optimizer, scheduler, extra, is_lora, self.is_main,
                             self.buffers, in_line)
        snap.durable = durable
        self._pending = snap
        paused = time.perf_counter() - start
        if before_write is not None and self.is_main:
            before_write()
        if self.is_main and not in_line:
            self._thread = threading.Thread(target=self._write, args=(snap, paused, False, True),
                                            name="verlite-checkpoint", daemon=True)
            self._thread.start()
        elif self.is_main:
            self._write(snap, paused, not self.background)
        self.times.saves += 1
        return True

    def _write(self, snap: Snapshot, paused: float, write_is_pause: bool, background: bool = False) -> None:
        start = time.perf_counter()
        self._result = write_snapshot(snap, background)
        took = time.perf_counter() - start
        self.times.write_s += took
        if self._result is not None:
            self.on_saved(self._result, paused + took if write_is_pause else paused, took)

    def release_device_copies(self) -> bool:
        """Free the state copies kept on the GPU for background saves (training ran out of GPU
        memory): once the write in flight, if any, is done, later saves copy to host buffers.
        False when none were held."""
        staging = self.buffers
        if not isinstance(staging, DeviceStaging) or not staging.on_device or not staging.lease_held():
            return False
        self.wait()
        staging.to_host()
        log.warning("out of GPU memory: the checkpoint copies kept on the GPU are freed; later checkpoints "
                    "copy to host memory")
        return True

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
        """At the end, or after an error: let a running write finish (no collective: other
        ranks may be gone) and stop allocating buffers."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._pending = None
        if self.buffers is not None:
            self.buffers.close()
