"""transformers' export index from disk (verlite/import_index.py): real subprocesses, each a
fresh interpreter importing transformers the way a launch does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from verlite import import_index
import_index.install()
import transformers
from transformers import AutoTokenizer, Qwen2Config
import transformers.models as models
import os, tempfile
other = tempfile.mkdtemp()  # another package's lazy module: transformers' scan, not the index
open(os.path.join(other, "mod.py"), "w").write('__all__ = ["A"]')
transformers.utils.import_utils.create_import_structure_from_path(other)
scan = transformers.utils.import_utils.create_import_structure_from_path
original = getattr(scan, "verlite_original", scan)
print(json.dumps({"names": sorted(dir(transformers)), "models": sorted(dir(models)),
                  "scanned": original.cache_info().misses, "patched": hasattr(scan, "verlite_original"),
                  "model": Qwen2Config.__name__}))
"""


def probe(cache, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VERLITE_CACHE_DIR": str(cache), **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def index_file(cache):
    files = list((cache / "imports").glob("transformers-*.json"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    first = probe(cache)
    second = probe(cache)
    plain = probe(tmp_path_factory.mktemp("unused"), VERLITE_IMPORT_INDEX="0")
    return cache, first, second, plain


def test_second_import_reads_the_index_and_sees_the_same_exports(runs):
    cache, first, second, plain = runs
    assert first["patched"] and second["patched"] and not plain["patched"]
    assert first["scanned"] > 500  # the first launch scans every model folder, as transformers does
    assert second["scanned"] < 10  # later ones only folders not indexed yet (none of the models tree)
    for run in (first, second):
        assert run["names"] == plain["names"] and run["models"] == plain["models"]
        assert run["model"] == "Qwen2Config"
    assert index_file(cache).stat().st_size > 10_000
    entries = json.loads(index_file(cache).read_text())["entries"]
    package = os.path.dirname(os.path.dirname(min(entries, key=len)))  # .../transformers/models -> site-packages
    assert entries and all(key.startswith(os.path.join(package, "transformers") + os.sep) for key in entries)


@pytest.mark.slow  # ~12 s: three cold transformers imports
def test_a_stale_or_broken_index_is_rebuilt(runs, tmp_path):
    cache, _, _, plain = runs
    path = index_file(cache)
    data = json.loads(path.read_text())
    moved = tmp_path / "cache"
    (moved / "imports").mkdir(parents=True)
    stale = moved / "imports" / path.name
    # Another transformers install (version, folder or install record): the stamp differs, the file is ignored.
    stamp = data["stamp"]
    stale.write_text(json.dumps({"stamp": [*stamp[:-1], [stamp[-1][0] + 1, stamp[-1][1]]],
                                 "entries": {k: json.dumps({"dict": []}) for k in data["entries"]}}))
    again = probe(moved)
    assert again["scanned"] > 500 and again["names"] == plain["names"]
    assert json.loads(stale.read_text())["stamp"] == stamp  # rewritten for this install
    stale.write_text("not json")
    broken = probe(moved)
    assert broken["scanned"] > 500 and broken["names"] == plain["names"]


# transformers 5.17 builds the package -> distribution map as import_utils runs; later versions
# build it lazily. A stand-in transformers of that layout (first on the path) makes the call.
FAKE_IMPORT_UTILS = "import importlib.metadata\nPACKAGE_DISTRIBUTION_MAPPING = importlib.metadata.packages_distributions()\n"
MAP_PROBE = """
import importlib.metadata, json
real = importlib.metadata.packages_distributions
calls = []
def counted():
    calls.append(1)
    return real()
importlib.metadata.packages_distributions = counted
from verlite import import_index
import_index.install()
import transformers.utils.import_utils as iu
assert importlib.metadata.packages_distributions is counted  # put back once import_utils has run
print(json.dumps({"computed": len(calls), "served": iu.PACKAGE_DISTRIBUTION_MAPPING, "real": real()}))
"""


def test_distribution_map_is_kept_until_a_distribution_changes(tmp_path):
    fake = tmp_path / "fake"
    (fake / "transformers" / "utils").mkdir(parents=True)
    (fake / "transformers" / "__init__.py").write_text("")
    (fake / "transformers" / "utils" / "__init__.py").write_text("")
    (fake / "transformers" / "utils" / "import_utils.py").write_text(FAKE_IMPORT_UTILS)
    extra = tmp_path / "extra"  # a search-path folder where a distribution gets installed
    extra.mkdir()
    cache = tmp_path / "cache"

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", MAP_PROBE], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "VERLITE_CACHE_DIR": str(cache),
                                  "PYTHONPATH": os.pathsep.join([str(fake), str(extra), os.environ.get("PYTHONPATH", "")])})
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["computed"] == 1 and second["computed"] == 0  # the second launch reads it from disk
    for r in (first, second):
        assert r["served"] == r["real"] and "pytest" in r["served"]
    # A distribution installed since: the stamp differs, the map is computed again and names it.
    info = extra / "verlite_probe_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: verlite-probe-dist\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("verlite_probe_mod\n")
    third = run()
    assert third["computed"] == 1 and third["served"]["verlite_probe_mod"] == ["verlite-probe-dist"]
    assert third["served"] == third["real"]
    assert run()["computed"] == 0  # the file was rewritten for the new stamp
