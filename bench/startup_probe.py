"""Where a launch's fixed seconds go on this machine, before any training: Python imports
(sequential or on two threads), whether importing verlite's training modules touches CUDA (a
process that never did can fork children that use the GPU), and what fsync adds to writing a
checkpoint-sized file set.

    python bench/startup_probe.py --gib 6            # GPU machine: prints JSON lines
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from verlite.trainer.checkpoint import start_writeback  # noqa: E402

SEQUENTIAL = "import time; t=time.perf_counter(); {body}; print(round(time.perf_counter()-t, 2))"
TRAINING_IMPORTS = ("import torch; import transformers; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                    "import verlite.trainer.sft_trainer, verlite.models.load, verlite.engine.graph_step, "
                    "verlite.models.attention, verlite.models.loss")


def timed_python(body: str) -> float:
    out = subprocess.run([sys.executable, "-c", SEQUENTIAL.format(body=body)], capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def imports() -> dict:
    r = {"python_bare": timed_python("pass")}
    for name, body in (("torch", "import torch"), ("torch_again", "import torch"),
                       ("training_imports", TRAINING_IMPORTS), ("training_imports_again", TRAINING_IMPORTS)):
        r[name] = timed_python(body)
    two = ("import threading; "
           "a=threading.Thread(target=lambda: __import__('torch')); "
           "b=threading.Thread(target=lambda: [__import__(m) for m in ('numpy','jinja2','huggingface_hub','tokenizers','safetensors','yaml','regex','PIL.Image')]); "
           "a.start(); b.start(); a.join(); b.join(); " + TRAINING_IMPORTS)
    r["training_imports_two_threads"] = timed_python(two)
    return r


def cuda_after_imports() -> dict:
    """Import what `verlite sft` imports, then check CUDA is untouched and a forked child can use it."""
    code = TRAINING_IMPORTS + """
import os, threading, torch
print('initialized', torch.cuda.is_initialized(), 'threads', threading.active_count(),
      'tasks', len(os.listdir('/proc/self/task')))
pid = os.fork()
if pid == 0:
    x = torch.ones(1024, 1024, device='cuda'); print('child ok', float((x @ x).sum())); os._exit(0)
_, status = os.waitpid(pid, 0); print('child status', status)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return {"stdout": out.stdout.strip(), "rc": out.returncode, "stderr_tail": out.stderr[-400:]}


def write_files(folder: Path, gib: float, files: int, sync: bool, writeback: bool = False) -> dict:
    chunk = bytes(64 << 20)
    per_file = int(gib * (1 << 30) / files)
    t0 = time.perf_counter()
    times = {}

    def one(i: int) -> None:
        path = folder / f"part{i}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = per_file
            offset = 0
            while left > 0:
                n = os.write(fd, chunk[:min(left, len(chunk))])
                if writeback:  # what checkpoint.write_tensor_file does after every chunk
                    start_writeback(fd, offset, n)
                left, offset = left - n, offset + n
            w = time.perf_counter()
            if sync:
                os.fsync(fd)
            times[i] = (w - t0, time.perf_counter() - t0)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(files)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    return {"gib": gib, "files": files, "fsync": sync, "writeback": writeback, "total_s": round(total, 2),
            "writes_done_s": round(max(w for w, _ in times.values()), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=6.0)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--writes_only", action="store_true", help="only the checkpoint-sized writes")
    a = p.parse_args()
    if not a.writes_only:
        print(json.dumps({"imports_s": imports()}), flush=True)
        print(json.dumps({"cuda_after_imports": cuda_after_imports()}), flush=True)
    for sync, writeback in ((True, False), (False, False), (True, True), (True, False), (True, True)):
        with tempfile.TemporaryDirectory(dir=a.dir) as d:
            print(json.dumps(write_files(Path(d), a.gib, 4, sync, writeback)), flush=True)


if __name__ == "__main__":
    main()
