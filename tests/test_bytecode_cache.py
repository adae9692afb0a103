"""Bytecode kept under the cache root where Python keeps none beside the sources
(verlite/bytecode_cache.py): real interpreters, with and without .pyc files beside a package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
from verlite import bytecode_cache
on = bytecode_cache.enable(("fakepkg",))
import fakepkg
print(on, sys.pycache_prefix)
"""


def _run(tmp: Path, **env) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "src"), str(root)]),
            "VERLITE_CACHE_DIR": str(tmp / "cache"), **env}
    full.pop("PYTHONPYCACHEPREFIX", None)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_bytecode_goes_to_the_cache_only_where_python_keeps_none(tmp_path):
    package = tmp_path / "src" / "fakepkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    # No .pyc beside the sources and Python told not to write any: every launch would recompile.
    on, prefix = _run(tmp_path, PYTHONDONTWRITEBYTECODE="1")
    assert on == "True" and prefix == str(tmp_path / "cache" / "pycache")
    kept = list((tmp_path / "cache" / "pycache").rglob("fakepkg/__init__*.pyc"))
    assert len(kept) == 1 and not (package / "__pycache__").exists()  # nothing written beside the sources
    # Bytecode beside the sources (the usual install): nothing changes.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    assert _run(tmp_path, PYTHONDONTWRITEBYTECODE="1") == ["False", "None"]
    # Turned off.
    (package / "__pycache__" / kept[0].name).unlink()
    assert _run(tmp_path, PYTHONDONTWRITEBYTECODE="1", VERLITE_PYCACHE="0") == ["False", "None"]
