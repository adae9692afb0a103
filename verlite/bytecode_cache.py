"""Compiled bytecode kept under the cache root where Python keeps none beside the sources.

Python compiles each module it imports from source unless a current `.pyc` file sits beside
it. Environments installed without them (`pip install --no-compile`, images built with
`PYTHONDONTWRITEBYTECODE=1`, which also stops Python from writing them later) or with a
read-only site-packages recompile everything they import at every launch: on the GPU machine a
cold `verlite sft` compiled 1,830 modules from source, 5.9 s of its start-up (a cProfile of the
launch, bench/RESULTS.md "Where a cold launch's seconds go"). There verlite points Python's own
`sys.pycache_prefix` at `<cache root>/pycache` and lets Python write there, and only there
(nothing is written beside the sources), so from the second launch on the bytecode is read
back. It also sets PYTHONPYCACHEPREFIX for the processes a run starts (tokenizing workers,
the warm-start helper).

The first launch that finds the cache empty would still compile everything itself, one module
after the other as it imports them. Where the machine has cores to spare (8 or more), it
starts Python's own `compileall` on the side, detached and niced, over the packages a run
imports (PRECOMPILE, their tests and transformers' model folders other than `auto` left out),
with one worker per spare core (at most 16): ~4,000 files in parallel while the launch imports,
which then finds most of its modules compiled already. Once per cache (a marker file), and
under torchrun only from local rank 0. `VERLITE_PRECOMPILE_WORKERS=N` sets the workers (0: none).

Where `.pyc` files sit beside torch's and transformers' sources, or Python can write them
there itself, nothing changes. A PYTHONPYCACHEPREFIX the user set is kept;
`VERLITE_PYCACHE=0` turns this off.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

from verlite import machine
from verlite.cache_dir import cache_root

PACKAGES = ("torch", "transformers", "omegaconf", "hydra")  # what a launch spends its imports on
# What `verlite sft` imports, in about the order it does (compileall takes its folders in turn).
PRECOMPILE = ("torch", "numpy", "sympy", "mpmath", "networkx", "jinja2", "transformers", "huggingface_hub",
              "tokenizers", "safetensors", "omegaconf", "hydra", "yaml", "antlr4", "fsspec", "filelock",
              "packaging", "tqdm", "regex", "peft", "accelerate", "psutil", "typing_extensions")
MIN_CORES = 8
MAX_WORKERS = 16


def _recompiled_every_launch(name: str) -> bool:
    """Does Python have no bytecode for this package's __init__, and no way to keep one?"""
    try:
        spec = importlib.util.find_spec(name)  # finds a top-level package without importing it
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin or not origin.endswith(".py"):
        return False
    cached = importlib.util.cache_from_source(origin)
    if os.path.exists(cached):
        return False
    folder = os.path.dirname(cached)
    writable = os.access(folder if os.path.isdir(folder) else os.path.dirname(folder), os.W_OK)
    return sys.dont_write_bytecode or not writable


def _source_folder(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    locations = list(spec.submodule_search_locations or [])
    return locations[0] if locations else spec.origin


def _precompile_workers() -> int:
    setting = os.environ.get("VERLITE_PRECOMPILE_WORKERS")
    if setting is not None:
        return max(0, int(setting)) if setting.strip().isdigit() else 0
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return 0  # under torchrun one process per machine compiles; the others read what it wrote
    cores = machine.cores()
    return min(MAX_WORKERS, cores - 2) if cores >= MIN_CORES else 0  # the launch and its tokenizer keep two


def skip_pattern(folders: list[str]) -> str:
    """What no run imports, inside `folders` only (compileall matches it against whole paths):
    test folders, and the ~400 model families of transformers but its auto classes (the one a
    run loads is compiled by the run itself: a few files)."""
    sep = r"[/\\]"
    parts = []
    for folder in folders:
        root = re.escape(folder.rstrip("/\\"))
        parts.append(rf"^{root}{sep}(?:[^/\\]+{sep})*?(?:tests?|benchmarks?){sep}")
        if os.path.basename(folder.rstrip("/\\")) == "transformers":
            parts.append(rf"^{root}{sep}models{sep}(?!auto{sep})[^/\\]+{sep}")
    return "|".join(parts)


_started: list[subprocess.Popen] = []  # kept: a dropped Popen of a running process warns


def _precompile_in_background(folders: list[str], prefix: str) -> None:
    """Start compileall over `folders` into `prefix`: once per cache (a marker file taken with
    O_EXCL keeps concurrent first launches from each starting one), niced, detached."""
    workers = _precompile_workers()
    if workers < 1 or not folders:
        return
    try:
        os.makedirs(prefix, exist_ok=True)
        os.close(os.open(os.path.join(prefix, ".precompile-started"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:
        return  # started by another launch already, or the cache cannot be written
    # -I: not this folder's modules first on the path, nor the environment's settings; the
    # prefix goes explicitly.
    cmd = [sys.executable, "-I", "-X", f"pycache_prefix={prefix}", "-m", "compileall", "-q", "-j", str(workers),
           "-x", skip_pattern(folders), *folders]
    nice = shutil.which("nice")
    try:
        _started.append(subprocess.Popen([nice, "-n", "5", *cmd] if nice else cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True))  # outlives a short launch; no terminal signals
    except (OSError, subprocess.SubprocessError):
        pass


def enable(packages: tuple[str, ...] = PACKAGES, precompile: tuple[str, ...] = PRECOMPILE) -> bool:
    """Keep bytecode under the cache root when `packages` get none beside their sources; call
    before importing them. True when it did. Where the cache holds no bytecode of the first of
    `packages` yet, `precompile`'s packages are compiled into it on the side."""
    if os.environ.get("VERLITE_PYCACHE", "1") == "0" or sys.pycache_prefix is not None:
        return False
    if not any(_recompiled_every_launch(name) for name in packages):
        return False
    # Which packages get no bytecode of their own: decided before the prefix changes the answer.
    folders = [f for f in (_source_folder(n) for n in precompile if _recompiled_every_launch(n)) if f]
    prefix = str(cache_root() / "pycache")
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    first = _source_folder(packages[0])
    init = os.path.join(first, "__init__.py") if first and os.path.isdir(first) else first
    if init and not os.path.exists(importlib.util.cache_from_source(init)):  # an empty cache: its first launch
        _precompile_in_background(folders, prefix)
    return True
