"""How much of the big shared libraries a first launch loads is already in the page cache.

    python bench/page_cache_probe.py [more folders or files ...]

Asks the kernel (mincore on a read-only mapping: nothing is read) which pages of each file are
resident, per group: torch's own libraries, the NVIDIA wheels' (cuBLAS, cuDNN, NCCL, ...),
Triton's, and any folder given. On a fresh GPU machine this tells whether a first launch's
slow imports and first step wait on the disk or on the CPU (bench/RESULTS.md, twelfth session).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import sysconfig
from pathlib import Path

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def resident(path: Path) -> tuple[int, int]:
    """(resident bytes, size) of one file."""
    size = path.stat().st_size
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ, mmap.MAP_SHARED, fd, ctypes.c_long(0))
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return min(size, sum(PAGE for v in vec if v & 1)), size
        finally:
            _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def group(files: list[Path]) -> dict:
    got = total = 0
    for path in files:
        try:
            r, s = resident(path)
        except (OSError, ValueError):
            continue
        got, total = got + r, total + s
    return {"files": len(files), "mb": round(total / 2**20), "resident_pct": round(100 * got / total, 1) if total else None}


def main() -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    groups = {
        "torch/lib": sorted((site / "torch" / "lib").glob("*.so*")),
        "nvidia": sorted(p for p in (site / "nvidia").rglob("*.so*") if p.is_file()),
        "triton": sorted(p for p in (site / "triton").rglob("*.so*") if p.is_file()),
    }
    for extra in sys.argv[1:]:
        p = Path(extra)
        groups[extra] = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    print(json.dumps({name: group(files) for name, files in groups.items()}))


if __name__ == "__main__":
    main()
