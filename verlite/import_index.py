"""transformers' export index, kept on disk between launches.

`import transformers` (5.x) lists what every model exports by reading all ~3,400 source files
under `transformers/models` (`utils.import_utils.create_import_structure_from_path`, and a
second time for `transformers.models`, whose lru_cache key differs): 2.1 s of a 3.4 s import
on a laptop-class CPU, more where file reads are slow (bench/RESULTS.md, "transformers'
import index"). The answer depends only on the installed files, so the first launch keeps it
under the cache root and later launches read it back (a few milliseconds).

How: a one-shot meta-path finder wraps the loader of `transformers.utils.import_utils`; right
after that module runs, and before `transformers/__init__` calls it, its
`create_import_structure_from_path` is replaced by one that answers top-level calls from the
file (nested calls, made while computing a missing entry, go to transformers' own code). A
folder and its `__init__.py` share one entry.

When the file is trusted: transformers' version, its folder, its install record
(`transformers-<version>.dist-info/RECORD`, which pip and uv rewrite on every install) and
`import_utils.py` must all match. The file is JSON (nothing in verlite unpickles). Only
folders inside transformers are served. A transformers that is not installed in a site-packages folder (an editable checkout
whose files change in place) is never indexed. The file is written atomically; any failure
to read or write it only costs the next launch the scan. `VERLITE_IMPORT_INDEX=0` turns it off.

The package -> distribution map, too: transformers 5.17's import_utils builds
`importlib.metadata.packages_distributions()` as it runs, reading every installed
distribution's top_level.txt, or its RECORD where it ships none (torch's wheels): 2.1 s of a
cold launch on the H100 machine (bench/results/2026-12-07-h100-cold-launch-cprofile.txt),
0.8 s warm on a 2-core box. It depends only on which distributions are installed where, so
while import_utils runs the call is answered from a file stamped with the search path's
folders and the modification times of their *.dist-info / *.egg-info folders (installing,
upgrading or removing a distribution replaces its folder). Later transformers versions build
the map lazily, outside that window, and keep their own call.

A first launch (no files yet) has both built by a side process while it imports torch
(build_in_background, started by the CLI; see the comment above it).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from verlite import machine
from verlite.cache_dir import cache_root

TARGET = "transformers.utils.import_utils"
FORMAT = 1  # bump when the file's layout changes


class _Index:
    """The entries of one transformers install, read once, written when one is added. Each
    entry is kept encoded as it was computed, so a caller changing the returned structure
    later never changes what the file holds."""

    def __init__(self, import_utils_file: str):
        self.package = Path(import_utils_file).resolve().parent.parent  # .../transformers
        # Folders transformers passes are built from its __file__, which may reach it through a
        # symlink (a venv's lib64): both spellings count as transformers' own.
        self.prefixes = tuple({str(self.package) + os.sep,
                               os.path.abspath(os.path.dirname(os.path.dirname(import_utils_file))) + os.sep})
        version = getattr(sys.modules.get("transformers"), "__version__", "unknown")
        self.stamp, self.path = _index_place(import_utils_file, version)
        self.entries: dict[str, str] | None = None  # folder -> its structure, encoded (JSON text)
        self.lock = threading.Lock()

    def get(self, key: str):
        with self.lock:
            if self.entries is None:
                self.entries = self._read()
            text = self.entries.get(key)
        return _decode(json.loads(text)) if text is not None else None

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data["entries"] if data["stamp"] == self.stamp else {}
        except Exception:  # noqa: BLE001 - missing, unreadable or from another layout: scan instead
            return {}

    def add(self, key: str, value: object) -> None:
        try:
            text = json.dumps(_encode(value))
        except (TypeError, ValueError):  # a structure of another shape: not kept
            return
        with self.lock:
            if self.entries is None:
                self.entries = self._read()
            self.entries[key] = text
            _write(self.path, {"stamp": self.stamp, "entries": self.entries})


def _index_place(import_utils_file: str, version: str) -> tuple[list, Path]:
    """The stamp an index of this transformers install carries, and its file."""
    package = Path(import_utils_file).resolve().parent.parent
    # pip and uv rewrite the install's RECORD on every install of any version.
    record = next(iter(package.parent.glob(f"transformers-{version}.dist-info/RECORD")), None)
    installed = _stat(record) if record is not None else _stat(package / "models")
    # As JSON gives it back (tuples become lists), so that a stamp read from the file compares equal.
    stamp = json.loads(json.dumps([FORMAT, version, str(package), installed, _stat(Path(import_utils_file))]))
    path = cache_root() / "imports" / f"transformers-{version}-{hashlib.sha1(str(package).encode()).hexdigest()[:12]}.json"
    return stamp, path


def _write(path: Path, data: dict) -> bool:
    """`data` as JSON at `path`, atomically; whether it was written. A cache, not a result: no
    fsync (a lost file costs one scan), and a read-only cache folder only costs later launches
    the scan."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except Exception:  # noqa: BLE001 - see above
        return False
    return True


def _distributions_stamp() -> list:
    """What packages_distributions() reads, in stat terms: the search-path folders that hold
    distributions, with their distribution folders and modification times (a folder holding
    none adds nothing to the map, so launching from another working folder changes nothing)."""
    stamp = []
    for entry in sys.path:
        folder = os.path.abspath(entry or ".")
        try:
            with os.scandir(folder) as it:
                infos = sorted([e.name, e.stat().st_mtime_ns] for e in it
                               if e.name.endswith((".dist-info", ".egg-info")))
        except NotADirectoryError:  # a zip on the path: its own stamp
            infos = [_stat(Path(folder))]
        except OSError:  # missing, unreadable, or an import hook's name (editable installs)
            continue
        if infos:
            stamp.append([folder, infos])
    return stamp


def _distributions_path() -> Path:
    return cache_root() / "imports" / f"distributions-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}.json"


def _served_packages_distributions(original):
    """packages_distributions answered from disk while its stamp holds (computed and kept
    otherwise). Lists come back as lists, as the original gives them."""
    path = _distributions_path()

    def packages_distributions():
        stamp = json.loads(json.dumps(_distributions_stamp()))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["stamp"] == stamp:
                return {k: list(v) for k, v in data["map"].items()}
        except Exception:  # noqa: BLE001 - missing, unreadable or another layout: compute it
            pass
        found = original()
        _write(path, {"stamp": stamp, "map": found})
        return found

    return packages_distributions


def _encode(value):
    """JSON for transformers' import structures: dicts (keys: names, or frozensets of backend
    names), sets of names and strings, each container tagged with its type."""
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {type(value).__name__: sorted(_encode(v) for v in value)}
    if isinstance(value, str):
        return value
    raise TypeError(f"unexpected {type(value).__name__} in an import structure")


def _decode(value):
    if isinstance(value, str):
        return value
    (tag, items), = value.items()
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in items}
    return (frozenset if tag == "frozenset" else set)(_decode(v) for v in items)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return -1, -1


def _installed(import_utils_file: str) -> bool:
    parts = Path(import_utils_file).resolve().parts
    return "site-packages" in parts or "dist-packages" in parts


def _patch(module) -> None:
    original = getattr(module, "create_import_structure_from_path", None)
    if original is None or not _installed(module.__file__):
        return  # another layout of transformers, or an editable checkout: leave it alone
    index = _Index(module.__file__)
    computing = threading.local()
    memo: dict[str, object] = {}

    def create_import_structure_from_path(module_path):
        if getattr(computing, "depth", 0):
            return original(module_path)  # inside a scan this process is making anyway
        folder = os.path.abspath(os.fspath(module_path))
        if os.path.isfile(folder):
            folder = os.path.dirname(folder)
        if not folder.startswith(index.prefixes):
            return original(module_path)  # another package's lazy module: not transformers' files
        if folder in memo:
            return memo[folder]
        found = index.get(folder)
        if found is None:
            computing.depth = 1
            try:
                found = original(module_path)
            finally:
                computing.depth = 0
            index.add(folder, found)
        memo[folder] = found
        return found

    create_import_structure_from_path.verlite_original = original  # transformers' own (lru-cached) scan
    module.create_import_structure_from_path = create_import_structure_from_path


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        await_builder()  # its files, if this launch started one, before anything is read or scanned
        original = importlib.metadata.packages_distributions
        importlib.metadata.packages_distributions = _served_packages_distributions(original)
        try:
            self.inner.exec_module(module)
        finally:  # only import_utils' own run is served
            importlib.metadata.packages_distributions = original
        try:
            _patch(module)
        except Exception:  # noqa: BLE001 - a speed-up only: transformers works as shipped without it
            pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        _remove()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


_finder = _Finder()


def _remove() -> None:
    try:
        sys.meta_path.remove(_finder)
    except ValueError:
        pass


def install() -> None:
    """Serve transformers' export index from disk for this process's `import transformers`
    (a no-op once transformers is imported, or with VERLITE_IMPORT_INDEX=0)."""
    if TARGET in sys.modules or _finder in sys.meta_path or not _enabled():
        return
    sys.meta_path.insert(0, _finder)


def _enabled() -> bool:
    return os.environ.get("VERLITE_IMPORT_INDEX", "1") != "0"


# The first launch on a machine (nothing under the cache root yet) would still scan and map
# everything itself, inside its "transformers import" (2.6-3.6 s of a fresh H200 machine's
# launch 1, call X, bench/RESULTS.md). Neither needs torch, which the launch imports first
# (1-2 s): so the command starts a side process that imports transformers alone with the index
# installed (0.7-0.9 s on the 2-core box), which writes both files while this process imports
# torch; this process waits for it right before its own import_utils runs, then reads them as
# a later launch would. A marker says a side process was started for these stamps, so later
# launches start none (the map alone cannot say: later transformers versions never ask for it).
# On the 2-core box it still takes ~0.3 s off launch 1's start-up with either transformers
# (bench/RESULTS.md "Fifteenth session"); with one core it would only take the CPU the launch
# imports torch on, so it is left out there.
MIN_CORES = 2
BUILDER_WAIT_S = 30.0  # past this, the side process is stopped and this process scans itself
_builder: Optional[subprocess.Popen] = None
waited_s = 0.0  # how long this process waited for the side process (bench, tests)


def _transformers_import_utils() -> Optional[str]:
    """transformers' import_utils.py, found without importing anything of transformers; None
    where it is not an installed package (then nothing is indexed)."""
    try:
        spec = importlib.util.find_spec("transformers")
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if not origin:
        return None
    path = os.path.join(os.path.dirname(origin), "utils", "import_utils.py")
    return path if os.path.isfile(path) and _installed(path) else None


def _marker_path() -> Path:
    distributions = _distributions_path()
    return distributions.with_name("built-" + distributions.name)


def _stamps() -> Optional[list]:
    """What the marker holds for the transformers installed here and these distributions;
    None where there is nothing to index (no installed transformers)."""
    import_utils_file = _transformers_import_utils()
    if import_utils_file is None:
        return None
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
    return json.loads(json.dumps([_index_place(import_utils_file, version)[0], _distributions_stamp()]))


def _read_marker():
    try:
        return json.loads(_marker_path().read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - missing or unreadable
        return None


def files_current() -> bool:
    """Was a side process started for this transformers install and these distributions (or
    is there nothing to build)?"""
    stamps = _stamps()
    return stamps is None or _read_marker() == stamps


def _builder_command() -> list[str]:
    # This process's search path exactly (the map and its stamp depend on it), set before
    # anything is imported: `sys` is built in, so no file of the working folder (which -c puts
    # first on the path) runs in its place.
    return [sys.executable, "-c", "import sys; sys.path[:] = sys.argv[1:]; "
            "from verlite.import_index import _build; _build()", *sys.path]


def build_in_background() -> bool:
    """Start the side process that builds the index and the map, unless they are current (or
    transformers is imported already, the index is off, or another local rank of a torchrun
    job does it). Returns whether one started."""
    global _builder
    if _builder is not None or TARGET in sys.modules or not _enabled() or os.environ.get("LOCAL_RANK", "0") != "0":
        return False
    if machine.cores() < MIN_CORES or os.environ.get("VERLITE_INDEX_BUILDER") == "0":  # 0: a bench knob
        return False
    stamps = _stamps()
    if stamps is None or _read_marker() == stamps:
        return False
    # Marked before it starts: one try per install and set of distributions. A side process
    # that fails leaves this launch to scan as before, and its files serve the next ones; a
    # cache folder where the marker cannot be written could keep no file either.
    if not _write(_marker_path(), stamps):
        return False
    try:
        _builder = subprocess.Popen(_builder_command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def await_builder() -> None:
    """Wait for the side process this process started, if any (at most BUILDER_WAIT_S; then it
    is stopped: its files are written atomically, so a stopped one leaves none half-written)."""
    global _builder, waited_s
    builder, _builder = _builder, None
    if builder is None:
        return
    start = time.perf_counter()
    try:
        builder.wait(timeout=BUILDER_WAIT_S)
    except subprocess.TimeoutExpired:
        builder.kill()
        builder.wait()
    waited_s = time.perf_counter() - start


def _build() -> None:
    """The side process: import transformers (not torch) as a launch does, which writes the
    index and the map."""
    import_utils_file = _transformers_import_utils()
    if import_utils_file is None:
        return
    install()
    import transformers.models.auto  # noqa: F401 -- the folders every launch's AutoTokenizer scans
    import transformers.models.encoder_decoder  # noqa: F401

