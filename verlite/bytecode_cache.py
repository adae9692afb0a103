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

Where `.pyc` files sit beside torch's and transformers' sources, or Python can write them
there itself, nothing changes. A PYTHONPYCACHEPREFIX the user set is kept;
`VERLITE_PYCACHE=0` turns this off.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from verlite.cache_dir import cache_root

PACKAGES = ("torch", "transformers", "omegaconf", "hydra")  # what a launch spends its imports on


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


def enable(packages: tuple[str, ...] = PACKAGES) -> bool:
    """Keep bytecode under the cache root when `packages` get none beside their sources; call
    before importing them. True when it did."""
    if os.environ.get("VERLITE_PYCACHE", "1") == "0" or sys.pycache_prefix is not None:
        return False
    if not any(_recompiled_every_launch(name) for name in packages):
        return False
    prefix = str(cache_root() / "pycache")
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return True
