"""Give every bench process compiled bytecode, as a normal install has.

`pip install` writes .pyc files beside each package's sources, so a user's first launch
compiles nothing. The GPU machine's image has none and a read-only site-packages, so there
every Python process compiles what it imports from source, TRL's as much as verlite's (verlite
keeps bytecode under its cache folder, but the bench gives each invocation a fresh one, and
its first launch recompiled ~1,800 modules while timed). With PYTHONPYCACHEPREFIX exported
by the caller, this compiles the packages both sides import into that prefix, untimed, as
pip's install would have; every later process reads it from there. Prints what it did.

    export PYTHONPYCACHEPREFIX=/tmp/pycache_env && python bench/compile_env.py
"""

from __future__ import annotations

import compileall
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from verlite.bytecode_cache import PRECOMPILE, skip_pattern  # noqa: E402

# What `verlite sft` imports (PRECOMPILE) plus what TRL's SFTTrainer and Liger bring.
PACKAGES = (*PRECOMPILE, "liger_kernel", "triton", "trl", "datasets", "pyarrow", "pandas", "dill", "multiprocess",
            "xxhash", "aiohttp", "requests", "urllib3", "verlite")


def main() -> None:
    if not sys.pycache_prefix:
        sys.exit("compile_env.py: export PYTHONPYCACHEPREFIX first (the folder every bench process reads)")
    folders = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            locations = list(spec.submodule_search_locations or [])
            folders.append(locations[0] if locations else spec.origin)
    start = time.perf_counter()
    ok = True
    import re

    skip = re.compile(skip_pattern(folders))
    for folder in folders:
        if os.path.isdir(folder):
            ok &= bool(compileall.compile_dir(folder, quiet=2, workers=os.cpu_count() or 1, rx=skip))
        else:
            ok &= bool(compileall.compile_file(folder, quiet=2))
    print(json.dumps({"pycache_prefix": sys.pycache_prefix, "packages": len(folders), "ok": ok,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
