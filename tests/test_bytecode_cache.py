"""Bytecode kept under the cache root where Python keeps none beside the sources
(verlite/bytecode_cache.py): real interpreters, with and without .pyc files beside a package."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PROBE = """
import sys
from verlite import bytecode_cache
on = bytecode_cache.enable(("fakepkg",), ("fakepkg",))
import fakepkg
print(on, sys.pycache_prefix)
"""


def _run(tmp: Path, **env) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "src"), str(root)]),
            "VERLITE_CACHE_DIR": str(tmp / "cache"), "VERLITE_PRECOMPILE_WORKERS": "0", **env}
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


def test_the_first_launch_compiles_the_packages_on_the_side(tmp_path):
    """An empty cache: compileall, started on the side, compiles the modules the launch never
    imported too (not the tests); a launch that finds the cache filled starts none."""
    package = tmp_path / "src" / "fakepkg"
    (package / "tests").mkdir(parents=True)
    (package / "__init__.py").write_text("VALUE = 1\n")
    for name in ("alpha", "beta", "gamma"):
        (package / f"{name}.py").write_text(f"NAME = {name!r}\n")
    (package / "tests" / "test_x.py").write_text("X = 1\n")
    assert _run(tmp_path, PYTHONDONTWRITEBYTECODE="1", VERLITE_PRECOMPILE_WORKERS="2")[0] == "True"
    cache = tmp_path / "cache" / "pycache"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(cache.rglob("fakepkg/*.pyc"))) < 4:
        time.sleep(0.2)
    assert sorted(p.name.split(".")[0] for p in cache.rglob("fakepkg/*.pyc")) == ["__init__", "alpha", "beta", "gamma"]
    assert not list(cache.rglob("test_x*.pyc")) and not (package / "__pycache__").exists()
    # The second launch finds the cache filled: nothing started (a new module stays uncompiled).
    (package / "delta.py").write_text("NAME = 'delta'\n")
    assert _run(tmp_path, PYTHONDONTWRITEBYTECODE="1", VERLITE_PRECOMPILE_WORKERS="2")[0] == "True"
    time.sleep(2)
    assert not list(cache.rglob("delta*.pyc"))
