"""Checkpoints: `global_step_N/` with `huggingface/` (model or PEFT adapter + tokenizer, the
only copy of the weights, kept at master precision so resuming is exact),
`trainer_state.safetensors` (the optimizer's tensors and the RNG state) and `trainer_state.pt`
(the rest: scheduler, step, settings, and the optimizer state with each tensor replaced by its
name in the safetensors file). Checkpoints from before the split keep every tensor inside
`trainer_state.pt` and still load. Both files load as data only (weights-only unpickling,
safetensors), so a checkpoint from someone else cannot run code here.

Tensor files are written here rather than by torch.save / safetensors.save_file: a background
writer must leave the training thread the GIL, and these write each tensor's bytes straight
from memory with os.pwrite (which releases it) in the standard safetensors layout (the bytes
safetensors' own writer produces; bench/RESULTS.md "Checkpoint writes" has the measurements).

A checkpoint is written into `global_step_N.tmp` and renamed into place, and
`latest_checkpointed_iteration.txt` moves only after that: a run killed at any moment
leaves every earlier checkpoint whole, and a folder named `global_step_N` is complete.
Weights are gathered to rank 0 one parameter at a time, so the format is the same for
any number of GPUs and a run can resume on a different number.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable, Optional

import torch

from verlite.errors import VerliteError
from verlite.layout import (DISCARDED_PREFIX, HF_DIR, LATEST, STATE, STATE_TENSORS,  # noqa: F401 (re-exported)
                            latest_checkpoint, step_dirs)
from verlite.outputs import replace_dir

log = logging.getLogger("verlite.checkpoint")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_dir(tmp: Path, final: Path, durable: bool = True) -> None:
    replace_dir(tmp, final)  # re-saving the same step (e.g. after a resume) swaps the old one out
    if durable:
        _fsync_dir(final.parent)


def _write_atomic(path: Path, text: str, durable: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- tensor files -------------------------------------------------------------------------
_TENSOR_REF = "__verlite_tensor__"  # {_TENSOR_REF: name}: where trainer_state.pt had a tensor
# safetensors' dtype names, in the order its writer sorts them (descending), so that every
# tensor starts aligned to its element size and the bytes equal the library's own output.
_ST_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
             "I64", "U64"]
_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
              torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64"}
for _name, _attr in (("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[getattr(torch, _attr)] = _name
_CHUNK = 256 << 20  # bytes per write call: the GIL is released for each, retaken between


def is_plain_tensor(value) -> bool:
    """A dense tensor of a dtype safetensors holds (not a subclass such as torchao's 8-bit
    optimizer states, which stay in trainer_state.pt)."""
    return type(value) is torch.Tensor and value.layout == torch.strided and value.dtype in _ST_DTYPES


def split_tensors(state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(state with every plain tensor replaced by {_TENSOR_REF: name}, {name: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path: str):
        if is_plain_tensor(value):
            name = path if path not in tensors else f"{path}#{len(tensors)}"
            tensors[name] = value
            return {_TENSOR_REF: name}
        if isinstance(value, dict):
            return {k: walk(v, f"{path}/{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v, f"{path}/{i}") for i, v in enumerate(value))
        return value

    return walk(state, ""), tensors


def join_tensors(state, tensors: dict[str, torch.Tensor], where: Path):
    """The inverse of split_tensors."""
    if isinstance(state, dict):
        if len(state) == 1 and _TENSOR_REF in state:
            name = state[_TENSOR_REF]
            if name not in tensors:
                raise VerliteError(f"{where} lacks the tensor {name!r} that {STATE} names; resume from another "
                                   "checkpoint or set trainer.resume_mode=disable")
            return tensors[name]
        return {k: join_tensors(v, tensors, where) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(join_tensors(v, tensors, where) for v in state)
    return state


def _has_refs(state) -> bool:
    if isinstance(state, dict):
        return (len(state) == 1 and _TENSOR_REF in state) or any(_has_refs(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_has_refs(v) for v in state)
    return False


def _byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (it must be a contiguous host tensor)."""
    flat = t.detach().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def safetensors_layout(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None
                       ) -> tuple[bytes, list[tuple[int, torch.Tensor]]]:
    """The file's header (length prefix included) and where each tensor's bytes go."""
    order = sorted(tensors.items(), key=lambda kv: (-_ST_ORDER.index(_ST_DTYPES[kv[1].dtype]), kv[0]))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    placed, offset = [], 0
    for name, t in order:
        if not t.is_contiguous():
            raise ValueError(f"{name}: tensor files are written from contiguous tensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        placed.append((offset, t))
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, [(start + off, t) for off, t in placed]


def _pwrite_all(fd: int, data: memoryview, offset: int, writeback: bool = True) -> None:
    while len(data):
        n = os.pwrite(fd, data[:_CHUNK], offset)
        if writeback:
            start_writeback(fd, offset, n)
        data, offset = data[n:], offset + n


def _sync_file_range():
    if sys.platform != "linux" or os.environ.get("VERLITE_CKPT_WRITEBACK", "1") == "0":
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_PAGE = 4096


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk now (Linux sync_file_range, which
    waits only when the disk's queue is full): the disk works while later bytes are still
    being copied, and the fsync that makes the file durable finds most of it written. Without
    it the kernel starts late and the fsync at the end waits for nearly everything
    (bench/startup_probe.py measures both). Only whole pages inside the range are asked for:
    a page shared with a neighbouring write (another thread's) would be written twice. Only a
    head start: durability still comes from that fsync."""
    start, end = -(-offset // _PAGE) * _PAGE, (offset + nbytes) // _PAGE * _PAGE
    if _SYNC_FILE_RANGE is not None and end > start:
        _SYNC_FILE_RANGE(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)


# A device tensor is written through a small pinned staging buffer per writer thread: no host
# copy of the whole state is made (a fresh 6 GiB host buffer, pinned or not, costs ~5 s on the
# H100 host before the first byte is copied).
STAGE_BYTES = 64 << 20
_stage = threading.local()


def _staging() -> torch.Tensor:
    buf = getattr(_stage, "buf", None)
    if buf is None or buf.numel() != STAGE_BYTES:
        buf = _stage.buf = torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    return buf


def copy_on_own_stream() -> None:
    """Make this (writer) thread copy device tensors on the writers' own CUDA stream: a
    background write reads copies the snapshot already synchronized, so its copies need not
    wait behind the training's kernels, nor hold them up, as they would on the shared default
    stream."""
    _stage.own_stream = True


_writer_streams: dict[torch.device, torch.cuda.Stream] = {}
_writer_streams_lock = threading.Lock()


def copy_context(device: torch.device):
    """Where this thread copies a tensor of `device` to the host: the writers' stream on a
    writer thread (copy_on_own_stream), else the current stream (in stream order after the
    training's kernels). One stream per device for the whole process, taken from torch's
    high-priority pool: torch.cuda.Stream() hands out 32 pooled streams per priority round
    robin, and a writer stream taken per thread and per save would sooner or later be the very
    stream the CUDA-graph steps capture on (graph_step.py takes a default-priority one); a copy
    there would queue behind the step's kernels, or break a capture in progress."""
    if device.type != "cuda" or not getattr(_stage, "own_stream", False):
        return contextlib.nullcontext()
    with _writer_streams_lock:
        stream = _writer_streams.get(device)
        if stream is None:
            stream = _writer_streams[device] = torch.cuda.Stream(device, priority=-1)
    return torch.cuda.stream(stream)


class WriteCancelled(Exception):
    """A background write given up because a newer checkpoint supersedes it."""


def _pwrite_tensor(fd: int, t: torch.Tensor, offset: int, staged: bool = False,
                   cancel: Optional[threading.Event] = None, durable: bool = True) -> None:
    if cancel is not None and cancel.is_set():
        raise WriteCancelled()
    if t.device.type == "cpu" and not staged:
        _pwrite_all(fd, _byte_view(t), offset, durable)
        return
    flat, stage = t.detach().reshape(-1).view(torch.uint8), _staging()
    with copy_context(t.device):
        for start in range(0, flat.numel(), STAGE_BYTES):
            part = flat[start:start + STAGE_BYTES]
            if cancel is not None and cancel.is_set():
                raise WriteCancelled()
            # On the default stream: after the training's kernels (an in-line save of live
            # weights); on a writer's own stream: at once. Either way the host waits for the copy.
            stage[:part.numel()].copy_(part)
            _pwrite_all(fd, _byte_view(stage[:part.numel()]), offset + start, durable)


def write_tensor_file(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None,
                      pool=None, staged: bool = False, cancel: Optional[threading.Event] = None,
                      durable: bool = True) -> None:
    """A safetensors file, fsynced (unless not `durable`: then left to the page cache, for a
    detached flush, hand_off). The bytes go out through os.pwrite, which releases the
    GIL; with `pool` (a concurrent.futures executor) tensors are written in parallel. Tensors
    may be on the host or a device (copied through a staging buffer; `staged` does that for
    host tensors too, for tests). Setting `cancel` stops it between tensors (WriteCancelled)."""
    if sys.byteorder != "little":  # safetensors is little-endian; a raw copy is only right here
        from safetensors.torch import save_file

        save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
        if durable:
            _fsync_file(path)
        return
    head, placed = safetensors_layout(tensors, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite_all(fd, memoryview(head), 0, durable)
        if pool is None:
            for offset, t in placed:
                _pwrite_tensor(fd, t, offset, staged, cancel, durable)
        else:
            for future in [pool.submit(_pwrite_tensor, fd, t, offset, staged, cancel, durable)
                           for offset, t in placed]:
                future.result()
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_files(paths: Iterable[Path]) -> None:
    for path in paths:
        if path.is_file():
            _fsync_file(path)


def prune_checkpoints(root: str | Path, keep: Optional[int], below: Optional[int] = None,
                      defer: bool = False) -> list[Path]:
    """Remove all but the newest `keep` checkpoints (renamed aside now, deleted in the background).
    `below`: only among steps before it (the one being written), and never the step that
    latest_checkpointed_iteration.txt names (a folder of an earlier run may hold later steps).
    `defer`: remove nothing yet, return the folders to remove (hand_off deletes them once the
    newest checkpoint is flushed to disk)."""
    if not keep or keep < 1:
        return []
    dirs, latest = step_dirs(root), None
    if below is not None:
        latest = _read_latest(Path(root))
        dirs = [(step, path) for step, path in dirs if step < below]
    surplus = [path for step, path in dirs[:-keep] if step != latest]
    if defer:
        return surplus
    for path in surplus:
        discard(path)
        log.info("removed old checkpoint %s (trainer.max_ckpt_to_keep=%d)", path, keep)
    return surplus


def _read_latest(root: Path) -> Optional[int]:
    try:
        return int((root / LATEST).read_text().strip())
    except (OSError, ValueError):
        return None


# Deleting a 6 GB checkpoint took 2 s on the H200 machine's disk (bench/RESULTS.md, seventh
# session), in the final checkpoint's time when pruning ran there. A folder to delete is renamed
# aside at once (one atomic rename: nothing reads it after that, and no reader can mistake it for
# a checkpoint), then deleted on a background thread while the run goes on. A run that ends
# while one is still going hands it to a detached process (hand_off: 0.7 s of the GPU
# launch's end, bench/RESULTS.md ninth session). Leftovers of a killed process are deleted by
# the next run in the same folder (discard_leftovers).
_discarding: list[tuple[threading.Thread, Path, threading.Event]] = []
_discard_lock = threading.Lock()
_discard_count = 0


def set_aside(path: str | Path) -> Path:
    """Rename the folder `path` aside (never read as a checkpoint again); its new path, or
    `path` itself where it cannot be renamed (gone already, or a file system without rename)."""
    global _discard_count
    path = Path(path)
    with _discard_lock:
        _discard_count += 1
        aside = path.with_name(f"{DISCARDED_PREFIX}{path.name}-{os.getpid()}-{_discard_count}")
    try:
        os.rename(path, aside)
    except OSError:
        return path
    return aside


def discard(path: str | Path) -> None:
    """Delete the folder `path` without waiting for it."""
    aside = set_aside(path)
    if aside == Path(path):  # not renamed: delete it here
        shutil.rmtree(path, ignore_errors=True)
        return
    _delete_in_background(aside)


def _remove_tree(path: Path, stop: threading.Event) -> None:
    """shutil.rmtree that gives up between files once `stop` is set (hand_off: a detached
    process finishes it). A thread still unlinking when the process exits holds the exit
    up until that unlink returns, and unlinking a big file waits for the disk."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            if stop.is_set():
                return
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _delete_in_background(path: Path) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=_remove_tree, args=(path, stop), name="verlite-discard", daemon=True)
    thread.start()
    with _discard_lock:
        _discarding.append((thread, path, stop))


def wait_for_discards() -> None:
    """Return once every folder discarded so far is deleted."""
    while True:
        with _discard_lock:
            if not _discarding:
                return
            thread, _, _ = _discarding.pop()
        thread.join()


# The detached process's whole program (`python -I -S`: no site packages, it starts in
# milliseconds). Arguments: checkpoint folders to flush, "--", folders to delete after that.
# A folder to flush: every file, then every folder bottom-up, then the run folder's pointer
# file and the run folder itself (what write_snapshot fsyncs when it writes durably). A folder
# to delete that still has its checkpoint name is renamed aside first (nothing reads it then).
_FINISH = """
import os, shutil, sys
args = sys.argv[1:]
flush, delete = args[:args.index("--")], args[args.index("--") + 1:]
def sync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
for top in flush:
    for folder, _, files in os.walk(top, topdown=False):
        for name in files:
            sync(os.path.join(folder, name))
        sync(folder)
    sync(os.path.join(os.path.dirname(top), "%s"))
    sync(os.path.dirname(top))
for path in delete:
    name = os.path.basename(path)
    if not name.startswith("%s"):
        aside = os.path.join(os.path.dirname(path), "%s" + name + "-" + str(os.getpid()))
        try:
            os.rename(path, aside)
            path = aside
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)
""" % (LATEST, DISCARDED_PREFIX, DISCARDED_PREFIX)


def hand_off(flush: Optional[Path] = None, delete_after: Iterable[Path] = ()) -> None:
    """Leave to a detached process what would otherwise keep this one from ending now: the
    fsync of `flush` (a checkpoint written with durable=False: complete and in place, its bytes
    still in the page cache), then the deletion of `delete_after` (checkpoints that must stay
    until then, or folders set aside) and of the discarded folders still being deleted
    (renamed aside already: nothing mistakes them for checkpoints meanwhile; this process's
    threads deleting them stop)."""
    with _discard_lock:
        pending = [path for thread, path, _ in _discarding if thread.is_alive()]
        for _, _, stop in _discarding:
            stop.set()  # this process's threads stop between files; the detached process finishes
        _discarding.clear()
    delete = [*delete_after, *pending]
    if flush is None and not delete:
        return
    try:
        _handed.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", _FINISH,
                                         *([str(flush)] if flush is not None else []), "--", *map(str, delete)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True))
    except (OSError, subprocess.SubprocessError):  # no process: finish here what _FINISH would
        if flush is not None:
            fsync_files([*flush.rglob("*"), flush.parent / LATEST])
            for folder in (*[p for p in flush.rglob("*") if p.is_dir()], flush, flush.parent):
                _fsync_dir(folder)
        for path in delete:
            shutil.rmtree(path, ignore_errors=True)
        return
    # A job scheduler that kills the whole job at its end may stop that process too: the kernel
    # still writes the page cache back on its own (within ~30 s on Linux defaults), and the next
    # run in this folder deletes what is left renamed aside (discard_leftovers).
    if flush is not None:
        log.info("final checkpoint in place; its fsync goes on in a detached process (pid %d)", _handed[-1].pid)
    if delete:
        log.info("still deleting %s in a detached process", ", ".join(p.name for p in delete))


_handed: list[subprocess.Popen] = []  # kept: a dropped Popen of a running process warns


def discard_leftovers(root: str | Path) -> None:
    """Start deleting what a killed run left renamed aside under `root`."""
    root = Path(root)
    if root.is_dir():
        for child in root.glob(DISCARDED_PREFIX + "*"):
            if child.is_dir():
                _delete_in_background(child)


def load_weights_into(model, ckpt: Path, is_lora: bool) -> None:
    """Put a checkpoint's weights into the freshly loaded (unsharded) HF or PEFT model."""
    from safetensors.torch import load_file

    hf_dir = ckpt / HF_DIR
    if is_lora:
        from peft import set_peft_model_state_dict

        path = hf_dir / "adapter_model.safetensors"
        if not path.is_file():
            raise VerliteError(f"{ckpt} holds no LoRA adapter ({path} missing) but model.lora_rank > 0; "
                               "resume with the same model settings or set trainer.resume_mode=disable")
        result = set_peft_model_state_dict(model, load_file(path))
        if getattr(result, "unexpected_keys", None):
            raise VerliteError(f"{path} does not match the LoRA settings (unexpected {result.unexpected_keys[:3]}); "
                               "resume with the same model.target_modules / lora_rank")
        return
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files or (hf_dir / "adapter_model.safetensors").exists():
        raise VerliteError(f"{ckpt} holds no full model weights (a LoRA checkpoint?) but model.lora_rank is 0; "
                           "resume with the same model settings or set trainer.resume_mode=disable")
    sd = {}
    for f in files:
        sd.update(load_file(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise VerliteError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); resume with the same model.partial_pretrain")


# Packages whose tensor types may sit in an optimizer state (torchao's low-bit AdamW states);
# importing them registers exactly those types with torch.load's weights-only unpickler.
_STATE_TYPE_PACKAGES = ("torchao.optim",)


def load_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt as data only (tensors, numbers, strings, lists, dicts), with the tensors
    of trainer_state.safetensors put back: nothing read runs code from the checkpoint."""
    path = ckpt / STATE
    for attempt in range(2):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:
            name = _refused_global(str(e))
            package = next((p for p in _STATE_TYPE_PACKAGES if name.startswith(p + ".")), None)
            if attempt == 0 and package and _import_quietly(package):
                continue
            raise VerliteError(f"{path} holds more than data (it names {name or 'a Python object'}, which loading "
                               "would run): refused; resume only from checkpoints you trust, or set "
                               "trainer.resume_mode=disable") from None
        except Exception as e:
            raise VerliteError(f"{path} cannot be read ({' '.join(str(e).split())[:200]}); resume from another "
                               "checkpoint or set trainer.resume_mode=disable") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "global_step"} <= set(state):
        raise VerliteError(f"{path} is not a verlite trainer state; resume from another checkpoint "
                           "or set trainer.resume_mode=disable")
    if _has_refs(state):  # written since the tensors moved to their own file
        tensors_path = ckpt / STATE_TENSORS
        try:
            from safetensors.torch import load_file

            tensors = load_file(tensors_path)
        except Exception as e:
            raise VerliteError(f"{tensors_path} cannot be read ({' '.join(str(e).split())[:200]}); resume from "
                               "another checkpoint or set trainer.resume_mode=disable") from None
        state = join_tensors(state, tensors, tensors_path)
    return state


def _refused_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else ""


def _import_quietly(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def restore_optimizer(sft_model, optimizer, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(sft_model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True))
