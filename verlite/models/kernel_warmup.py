"""Liger's Triton kernels compiled by a side process while the trainer starts.

Triton compiles a kernel the first time a process calls it with a new specialisation and
keeps the result in its on-disk cache (~/.triton/cache or $TRITON_CACHE_DIR); later processes
load it from there. So the first run on a machine compiles Liger's RoPE and SwiGLU, forward
and backward, inside its first training step: on the H100, launch 1's first step took 4.6 s
against 1.2 s for launch 2, which found them cached (bench/RESULTS.md, eleventh session).

What a compiled kernel depends on is known before the model is read: the kernel's source,
the GPU, the dtypes of its tensors, the integers Liger passes as constexpr (head counts, head
size, intermediate size) and, for the integers it does not, whether they are 1 or multiples
of 16 (the packed row's length: both cases are compiled). So a process started at launch
calls the same two kernel modules on small tensors of the model's sizes, and fills the same
cache entries while the trainer imports, reads the data and loads the weights. It imports
torch, triton and those two modules only: Liger's package `__init__` imports
torch._dynamo, and its utils peft and with it transformers (seconds more).
When it is done it leaves a marker, so that later launches start nothing.

It never overlaps training: when the trainer is about to take its first step, a side process
that is compiling is waited for (its kernels are the step's: waiting beats compiling them a
second time), up to WAIT_S; one still importing, or still running after that, is stopped
(a CUDA context's memory is the run's again; Triton writes cache entries atomically) and the
trainer compiles what is missing, as without it. A side process that fails costs nothing but
its own log (beside the marker). Only the model types whose Liger patch applies these two
kernels as written here are warmed up.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger("verlite.models")

# Model types whose Liger patch (rope=True, swiglu=True) calls liger_rotary_pos_emb on
# (batch, heads, seq, head_dim) q/k and LigerSiLUMulFunction on gate/up projections.
WARMED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Packed-row lengths the side process runs: Triton specialises an int argument on whether
# it is a multiple of 16, so one of each covers every length.
SEQ_LENS = (32, 33)
# How long the trainer waits, at its first step, for a side process that is compiling; and
# how long a side process may live at all (a hung compile must not hold a GPU context).
WAIT_S = 20.0
LIFETIME_S = 300


def compiling_flag(marker: Path) -> Path:
    """Written by the side process once CUDA is up and it starts compiling."""
    return marker.with_suffix(".compiling")


def log_file(marker: Path) -> Path:
    """The side process's stderr."""
    return marker.with_suffix(".log")


@dataclass
class SideProcess:
    proc: subprocess.Popen
    marker: Path
    started: float

    @property
    def compiling(self) -> Path:
        return compiling_flag(self.marker)


def model_sizes(model_dir: str, overrides: Optional[dict] = None) -> Optional[dict]:
    """The sizes Liger's kernels specialise on, from a local model folder's config.json (with
    `model:` config overrides applied); None where the folder, the file or the model type is
    not one this module warms up."""
    path = Path(os.path.expandvars(os.path.expanduser(model_dir))) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config.update({k: v for k, v in (overrides or {}).items() if k in config})
    if config.get("model_type") not in WARMED_TYPES:
        return None
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
        partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
        return {"model_type": config["model_type"], "heads": heads,
                "kv_heads": int(config.get("num_key_value_heads") or heads), "head_dim": head_dim,
                "rotary_dim": int(head_dim * partial), "intermediate": int(config["intermediate_size"])}
    except (KeyError, TypeError, ValueError):
        return None


def spec_for(sizes: dict, kinds: tuple[str, ...], compute_dtype: str, stream_dtype: str, batch: int) -> dict:
    """What the side process runs: the kernels of `kinds` it knows (rope, swiglu), the dtype of
    the projections' outputs (`compute_dtype`) and of the residual stream that RoPE's cos/sin
    take (`stream_dtype`), and the rows in a micro-batch (1 for packed rows)."""
    return {"sizes": sizes, "kinds": sorted(k for k in kinds if k in ("rope", "swiglu")),
            "compute_dtype": compute_dtype, "stream_dtype": stream_dtype, "batch": int(batch),
            "seq_lens": list(SEQ_LENS)}


def start_for_run(model_cfg, kinds: tuple[str, ...], device, local_rank: int, fsdp: bool, packed: bool,
                  micro_batch: int, sp_size: int) -> Optional[SideProcess]:
    """The side process for a run (None where it does not apply): one per machine (local rank
    0), on a GPU, for Liger's rope/swiglu on a model type of WARMED_TYPES read from a local
    folder, without sequence parallelism (which splits the heads)."""
    if device.type != "cuda" or local_rank != 0 or sp_size != 1 or not set(kinds) & {"rope", "swiglu"}:
        return None
    if os.environ.get("VERLITE_KERNEL_WARMUP", "1").strip().lower() in ("0", "false", "off"):
        return None  # a bench knob: the first step compiling for itself, to measure against
    sizes = model_sizes(model_cfg.partial_pretrain, model_cfg.config_overrides)
    if sizes is None:
        return None
    import torch

    from verlite.models.compute_dtype import fp32_stream_requested
    from verlite.models.load import DTYPES, master_dtype

    def name(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    # One GPU: bf16 autocast (engine/step.py); FSDP: its param dtype ("bf16", "fp32", ...).
    compute = name(DTYPES[model_cfg.fsdp_config.mixed_precision.param_dtype]) if fsdp else "bfloat16"
    if fsdp or not fp32_stream_requested():
        stream = compute  # FSDP's weights, or models/compute_dtype.py's hook on the embedding
    else:
        stream = name(master_dtype(model_cfg, device))
    spec = spec_for(sizes, kinds, compute, stream, 1 if packed else micro_batch)
    return start(spec, device.index or 0, torch.cuda.get_device_name(device))


def triton_cache_dir() -> Path:
    explicit = os.environ.get("TRITON_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    return Path(home) / ".triton" / "cache"


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "triton", "liger-kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def marker_for(spec: dict, gpu: str) -> Path:
    """Where a finished warm-up of `spec` on this GPU, these packages and this Triton cache is
    recorded."""
    from verlite.cache_dir import cache_root

    key = json.dumps({"spec": spec, "gpu": gpu, "versions": _versions(), "triton_cache": str(triton_cache_dir())},
                     sort_keys=True)
    return cache_root() / "kernels" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.done"


def start(spec: Optional[dict], device_index: int, gpu: str) -> Optional[SideProcess]:
    """Start the side process for `spec` unless its marker says it ran (and the Triton cache
    it filled is still there); None when nothing was started."""
    if spec is None or not spec["kinds"]:
        return None
    marker = marker_for(spec, gpu)
    if marker.is_file() and triton_cache_dir().is_dir():
        log.debug("Liger kernel warm-up: done before (%s)", marker)
        return None
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        err = open(log_file(marker), "w")
    except OSError as e:
        log.debug("Liger kernel warm-up not started: %s", e)
        return None
    compiling_flag(marker).unlink(missing_ok=True)
    if not _hold_device(device_index):
        err.close()
        return None
    with err:
        proc = subprocess.Popen([sys.executable, "-m", "verlite.models.kernel_warmup", json.dumps(spec),
                                 str(device_index), str(marker)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    atexit.register(_stop, proc)  # a run that fails before its first step takes it along
    log.debug("Liger kernel warm-up started (pid %d): %s", proc.pid, spec)
    return SideProcess(proc, marker, time.perf_counter())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _hold_device(index: int) -> bool:
    """This process's CUDA context, created before the side process's: on a GPU in
    exclusive-process mode the side process is then the one refused (and fails harmlessly),
    never the run. False where it cannot be created (the run will say why itself)."""
    import torch

    try:
        torch.empty(0, device=torch.device("cuda", index))
        return True
    except Exception as e:  # noqa: BLE001 - the warm-up only saves time
        log.debug("Liger kernel warm-up not started: %s", e)
        return False


def finish(side: Optional[SideProcess]) -> None:
    """Before the first step: wait for a side process that is compiling (up to WAIT_S), stop
    one that is not done by then or has not started compiling, and log which."""
    if side is None:
        return
    arrived = time.perf_counter()
    code = side.proc.poll()
    if code is None and side.compiling.exists():
        try:
            code = side.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            pass
    waited = time.perf_counter() - arrived
    if code is None:
        compiling = side.compiling.exists()
        _stop(side.proc)
        state = f"stopped after {waited:.1f} s of waiting" if compiling else "stopped before it compiled anything"
    else:
        state = (f"done{f' after {waited:.1f} s of waiting' if waited >= 0.05 else ''}" if code == 0
                 else f"failed (exit {code}; its log: {log_file(side.marker)})")
    log.info("Liger kernel warm-up in a side process: %s at the first step (%.1f s after it started)",
             state, arrived - side.started)


# ---- the side process -----------------------------------------------------------------

def _import_kernel_modules():
    """Liger's rope and swiglu modules without its package __init__ (torch._dynamo) and
    without peft/transformers (liger_kernel.utils tries peft at import)."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("liger_kernel")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("liger-kernel is not installed")
    root = list(spec.submodule_search_locations)[0]
    for name, folder in (("liger_kernel", root), ("liger_kernel.ops", os.path.join(root, "ops"))):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [folder]
            sys.modules[name] = module
    for blocked in ("peft", "transformers"):
        sys.modules.setdefault(blocked, None)  # `import peft` raises ImportError, which liger expects
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerRopeFunction, LigerSiLUMulFunction


def _projection(bs: int, seq: int, width: int, dtype, device):
    """A tensor as a linear layer hands it on: fresh, contiguous, part of the autograd graph."""
    import torch

    leaf = torch.randn(bs, seq, width, device=device, dtype=dtype, requires_grad=True)
    return leaf * 1.0


def run(spec: dict, device_index: int, on_compiling=None) -> dict:
    """Call the kernels of `spec`, forward and backward, as the patched layers do; the seconds
    each part took. `on_compiling` is called once CUDA is up, before the first kernel."""
    import torch

    times = {}
    start = time.perf_counter()
    rope_fn, swiglu_fn = _import_kernel_modules()
    times["import"] = time.perf_counter() - start
    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    s = spec["sizes"]
    compute, stream = getattr(torch, spec["compute_dtype"]), getattr(torch, spec["stream_dtype"])
    bs = spec["batch"]
    torch.empty(1, device=device)  # the CUDA context
    times["cuda"] = time.perf_counter() - start - times["import"]
    if on_compiling is not None:
        on_compiling()
    for seq in spec["seq_lens"]:
        if "rope" in spec["kinds"]:
            t = time.perf_counter()
            # HF's attention: a projection's output (batch, seq, heads * head_dim) viewed as
            # (batch, heads, seq, head_dim); Liger rotates it in place.
            q, k = (_projection(bs, seq, n * s["head_dim"], compute, device).view(bs, seq, n, s["head_dim"])
                    for n in (s["heads"], s["kv_heads"]))
            cos = torch.randn(bs, seq, s["rotary_dim"], device=device, dtype=stream)
            sin = torch.randn(bs, seq, s["rotary_dim"], device=device, dtype=stream)
            qo, ko = rope_fn.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin, None, 1)
            torch.autograd.backward((qo, ko), (torch.randn_like(qo), torch.randn_like(ko)))
            times[f"rope_{seq}"] = time.perf_counter() - t
        if "swiglu" in spec["kinds"]:
            t = time.perf_counter()
            a, b = (_projection(bs, seq, s["intermediate"], compute, device) for _ in range(2))
            c = swiglu_fn.apply(a, b)
            c.backward(torch.randn_like(c))
            times[f"swiglu_{seq}"] = time.perf_counter() - t
    torch.cuda.synchronize(device)
    times["total"] = time.perf_counter() - start
    return times


def main(argv: list[str]) -> int:
    spec, device_index, marker = json.loads(argv[0]), int(argv[1]), Path(argv[2])
    import signal

    signal.alarm(LIFETIME_S)  # SIGALRM's default action ends the process
    times = run(spec, device_index, on_compiling=lambda: compiling_flag(marker).touch())
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec, "seconds": {k: round(v, 3) for k, v in times.items()}}))
    os.replace(tmp, marker)
    print(json.dumps({"seconds": {k: round(v, 3) for k, v in times.items()}}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
