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
# Counts the calls of packages_distributions this process makes itself.
COUNTED_MAP = """
import importlib.metadata, json
real = importlib.metadata.packages_distributions
calls = []
def counted():
    calls.append(1)
    return real()
importlib.metadata.packages_distributions = counted
from verlite import import_index
"""
MAP_PROBE = COUNTED_MAP + """
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


# A first launch (empty cache folder) builds the index and the map in a side process while it
# imports torch (import_index.build_in_background), then reads them as a later launch would.
BUILD_PROBE = """
import json, sys
from verlite import import_index
import_index.MIN_CORES = 1  # this box may have fewer cores than the side process is started with
mode = sys.argv[1]
if mode == "fail":
    import_index._builder_command = lambda: [sys.executable, "-c", "import sys; sys.exit(3)"]
elif mode == "hang":
    import_index._builder_command = lambda: [sys.executable, "-c", "import time; time.sleep(120)"]
    import_index.BUILDER_WAIT_S = 1.0
elif mode == "slow":  # still building when this process's import comes: it must wait, then read
    slow = ("import sys, time; time.sleep(3); sys.path[:] = sys.argv[1:]; "
            "from verlite.import_index import _build; _build()")
    import_index._builder_command = lambda: [sys.executable, "-c", slow, *sys.path]
started = import_index.build_in_background()
builder = import_index._builder
import torch  # what the launch imports meanwhile
import_index.install()
import transformers
from transformers import AutoTokenizer
import transformers.models as models
scan = transformers.utils.import_utils.create_import_structure_from_path
original = getattr(scan, "verlite_original", scan)
print(json.dumps({"started": started, "scanned": original.cache_info().misses, "names": sorted(dir(transformers)),
                  "models": sorted(dir(models)), "waited": import_index.waited_s,
                  "builder_rc": builder.poll() if builder is not None else None,
                  "current": import_index.files_current()}))
"""


def build_probe(cache, mode="ok", **env) -> dict:
    out = subprocess.run([sys.executable, "-c", BUILD_PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VERLITE_CACHE_DIR": str(cache), **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_first_launch_reads_the_index_its_side_process_built(runs, tmp_path):
    plain = runs[3]
    first = build_probe(tmp_path / "cache")
    assert first["started"] and first["builder_rc"] == 0
    assert first["scanned"] < 10  # the models tree came from the side process's files
    assert first["names"] == plain["names"] and first["models"] == plain["models"]
    assert first["current"] and (tmp_path / "cache" / "imports").is_dir()
    second = build_probe(tmp_path / "cache")
    assert not second["started"] and second["builder_rc"] is None and second["scanned"] < 10
    off = build_probe(tmp_path / "off", VERLITE_INDEX_BUILDER="0")
    assert not off["started"] and off["scanned"] > 500


def test_a_launch_waits_for_a_side_process_still_building(runs, tmp_path):
    slow = build_probe(tmp_path / "cache", "slow")
    assert slow["started"] and slow["builder_rc"] == 0 and slow["waited"] >= 0.5
    assert slow["scanned"] < 10 and slow["names"] == runs[3]["names"]


def test_a_failed_or_stuck_side_process_costs_only_the_scan(runs, tmp_path):
    plain = runs[3]
    failed = build_probe(tmp_path / "failed", "fail")
    assert failed["started"] and failed["builder_rc"] == 3
    assert failed["scanned"] > 500 and failed["names"] == plain["names"]
    # One try per install: the next launch starts none and reads what this launch's scan kept.
    after = build_probe(tmp_path / "failed")
    assert not after["started"] and after["scanned"] < 10
    stuck = build_probe(tmp_path / "stuck", "hang")
    assert stuck["started"] and stuck["builder_rc"] is not None and stuck["builder_rc"] < 0  # stopped
    assert 1.0 <= stuck["waited"] < 30
    assert stuck["scanned"] > 500 and stuck["names"] == plain["names"]


def test_the_marker_goes_stale_when_a_distribution_is_installed(tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(extra), os.environ.get("PYTHONPATH", "")])}
    assert build_probe(tmp_path / "cache", **env)["current"]
    info = extra / "verlite_probe_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: verlite-probe-dist\nVersion: 1.0\n")
    again = build_probe(tmp_path / "cache", **env)
    assert again["started"] and again["current"]  # built again for the new stamp


def test_no_side_process_where_the_cache_folder_cannot_be_written(tmp_path):
    # A cache root below a file can never be made (for root as well as anyone): the launch
    # scans as it must, and starts no side process whose files could not be kept.
    (tmp_path / "a-file").write_text("")
    r = build_probe(tmp_path / "a-file" / "cache")
    assert not r["started"] and r["scanned"] > 500


def test_the_cli_starts_it_once_its_config_is_read(tmp_path, tiny_model):
    env = {**os.environ, "VERLITE_CACHE_DIR": str(tmp_path / "cache"), "VERLITE_WARM": "0"}
    bad = subprocess.run([sys.executable, "-m", "verlite.cli", "sft", "data.nonsense_key=1"], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "nonsense_key" in bad.stderr
    assert not (tmp_path / "cache" / "imports").exists()  # a config error starts nothing
    plan = subprocess.run([sys.executable, "-m", "verlite.cli", "plan", f"model.partial_pretrain={tiny_model}",
                           "--gpu_mem_gb", "12"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    built = {f.name.split("-")[0] for f in (tmp_path / "cache" / "imports").glob("*.json")}
    assert {"built", "transformers"} <= built, built


BUILT_MAP_PROBE = COUNTED_MAP + """
import_index.MIN_CORES = 1
started = import_index.build_in_background()
import_index.install()
import transformers.utils.import_utils as iu
print(json.dumps({"started": started, "computed": len(calls), "served": iu.PACKAGE_DISTRIBUTION_MAPPING,
                  "real": real()}))
"""


def test_the_side_process_builds_the_distribution_map_of_transformers_5_17(tmp_path):
    # An installed stand-in of 5.17's layout: import_utils asks for the map as it runs.
    site = tmp_path / "site-packages"
    package = site / "transformers"
    for sub in ("utils", "models/auto", "models/encoder_decoder"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from .utils import import_utils\n")
    (package / "models" / "__init__.py").write_text("")
    (package / "utils" / "import_utils.py").write_text(FAKE_IMPORT_UTILS)
    info = site / "transformers-5.17.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.17.0\n")
    (info / "RECORD").write_text("")
    env = {**os.environ, "VERLITE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", BUILT_MAP_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["started"] and r["computed"] == 0  # the side process made it; this launch read it
    assert r["served"] == r["real"] and r["served"]["transformers"] == ["transformers"]
