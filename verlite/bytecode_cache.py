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
with one worker per spare core: ~4,000 files in parallel while the launch imports, which then
finds most of its modules compiled already (bench/RESULTS.md, ninth session).
`VERLITE_PRECOMPILE_WORKERS=N` sets the workers (0: none).

Where `.pyc` files sit beside torch's and transformers' sources, or Python can write them
there itself, nothing changes. A PYTHONPYCACHEPREFIX the user set is kept;
`VERLITE_PYCACHE=0` turns this off.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from verlite.cache_dir import cache_root

PACKAGES = ("torch", "transformers", "omegaconf", "hydra")  # what a launch spends its imports on
# What `verlite sft` imports, in about the order it does (compileall takes its folders in turn).
PRECOMPILE = ("torch", "numpy", "sympy", "mpmath", "networkx", "jinja2", "transformers", "huggingface_hub",
              "tokenizers", "safetensors", "omegaconf", "hydra", "yaml", "antlr4", "fsspec", "filelock",
              "packaging", "tqdm", "regex", "peft", "accelerate", "psutil", "typing_extensions")
# Folders no run imports: tests, and the ~400 model families of transformers but its auto classes
# (the one a run loads is compiled by the run itself: a few files).
SKIP = r"[/\\](tests?|testing|benchmarks?)[/\\]|[/\\]transformers[/\\]models[/\\](?!auto[/\\])[^/\\]+[/\\]"
MIN_CORES = 8


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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - 2 if cores >= MIN_CORES else 0  # the launch itself and its tokenizer keep two


def _precompile_in_background(packages: tuple[str, ...]) -> subprocess.Popen | None:
    """Start compileall over `packages` (those Python keeps no bytecode for) into the prefix."""
    workers = _precompile_workers()
    folders = [f for f in (_source_folder(n) for n in packages if _recompiled_every_launch(n)) if f]
    if workers < 1 or not folders:
        return None
    try:
        return subprocess.Popen([sys.executable, "-m", "compileall", "-q", "-j", str(workers), "-x", SKIP, *folders],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True,  # outlives a short launch; no terminal signals
                                preexec_fn=(lambda: os.nice(5)) if hasattr(os, "nice") else None)
    except OSError:
        return None


def enable(packages: tuple[str, ...] = PACKAGES, precompile: tuple[str, ...] = PRECOMPILE) -> bool:
    """Keep bytecode under the cache root when `packages` get none beside their sources; call
    before importing them. True when it did. Where the cache holds no bytecode of the first of
    `packages` yet, `precompile`'s packages are compiled into it on the side."""
    if os.environ.get("VERLITE_PYCACHE", "1") == "0" or sys.pycache_prefix is not None:
        return False
    if not any(_recompiled_every_launch(name) for name in packages):
        return False
    prefix = str(cache_root() / "pycache")
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    first = _source_folder(packages[0])
    init = os.path.join(first, "__init__.py") if first and os.path.isdir(first) else first
    if init and not os.path.exists(importlib.util.cache_from_source(init)):  # an empty cache: its first launch
        _precompile_in_background(precompile)
    return True
