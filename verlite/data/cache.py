"""Tokenized samples kept on disk, so a second run of the same data skips tokenization.

One entry per data file, keyed by everything that changes its tokens:
- the file's content (sha256; a file whose size, mtime and inode match the last hash taken,
  and was not modified within RACY_S of it, is not read again),
- the tokenizer (its serialized form: vocabulary, merges, normalizer, added tokens) and the
  chat template in force (after data.chat_template),
- every DataConfig field except the ones that only group samples (NOT_TOKEN_KEYS): new data
  keys are part of the key unless listed there,
- the source of the modules that turn rows into tokens (a code change invalidates).

Entries are safetensors files (no pickle) of three arrays: all token ids (int32), all
loss-mask bytes (uint8) and the sample offsets (int64), written to a temporary name and
renamed, so a killed run never leaves half an entry. Location: data.token_cache (a folder),
else $VERLITE_CACHE_DIR/tokens, else ~/.cache/verlite/tokens; data.token_cache=false turns
it off. Nothing is evicted: delete the folder to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import time
import weakref
from pathlib import Path
from typing import Optional

import numpy as np

from verlite.cache_dir import cache_root
from verlite.config.schema import DataConfig

log = logging.getLogger("verlite.data")

CACHE_VERSION = 1
# DataConfig fields that decide how samples are grouped or where they come from, not their tokens.
NOT_TOKEN_KEYS = {"train_files", "val_files", "micro_batch_size_per_gpu", "train_batch_size", "packing",
                  "max_token_len_per_gpu", "num_workers", "token_cache"}
# The modules whose code turns rows into tokens.
CODE_MODULES = ("verlite.data.formatting", "verlite.data.readers", "verlite.data.dataset")
RACY_S = 2.0  # a file changed this close to its last hash could change again unseen by mtime


@dataclasses.dataclass
class FileTokens:
    """One file's samples, flat: sample i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len = samples + 1
    truncated: int = 0
    dropped: int = 0

    @classmethod
    def from_lists(cls, ids: list[np.ndarray], masks: list[np.ndarray], truncated: int, dropped: int) -> "FileTokens":
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        flat_ids = np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)
        flat_mask = np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8)
        return cls(flat_ids, flat_mask, offsets, truncated, dropped)

    @property
    def rows(self) -> int:
        """Rows of the file these came from: samples kept plus rows dropped."""
        return len(self.offsets) - 1 + self.dropped

    def samples(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        bounds = self.offsets.tolist()  # slicing with Python ints: 3x faster than np.split's views
        ids, mask = self.ids, self.mask
        return ([ids[a:b] for a, b in zip(bounds, bounds[1:])], [mask[a:b] for a, b in zip(bounds, bounds[1:])])


def cache_folder(cfg: DataConfig) -> Optional[Path]:
    setting = cfg.token_cache
    if isinstance(setting, str) and setting.lower() in ("true", "false"):
        setting = setting.lower() == "true"
    if setting is False:
        return None
    if isinstance(setting, str) and setting:
        return Path(os.path.expandvars(setting)).expanduser()
    return cache_root() / "tokens"


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """Kept per tokenizer object and chat template: serializing a 150k-word vocabulary
    costs a fraction of a second, and train and val files share one tokenizer."""
    template = getattr(tokenizer, "chat_template", None)
    try:
        known = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        known = None
    state = (template, len(tokenizer), str(tokenizer.special_tokens_map))
    if known is not None and known[0] == state:
        return known[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = {"class": type(tokenizer).__name__, "chat_template": template,
             "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
             "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id,
             "add_bos": getattr(tokenizer, "add_bos_token", None), "add_eos": getattr(tokenizer, "add_eos_token", None)}
    digest = _sha(body + json.dumps(extra, sort_keys=True, default=str))
    try:
        _FINGERPRINTS[tokenizer] = (state, digest)
    except TypeError:
        pass
    return digest


def _code_fingerprint() -> str:
    import importlib

    h = hashlib.sha256()
    for name in CODE_MODULES:
        with open(importlib.import_module(name).__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def settings_key(cfg: DataConfig, tokenizer) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TOKEN_KEYS}
    return _sha(json.dumps({"version": CACHE_VERSION, "data": fields, "tokenizer": tokenizer_fingerprint(tokenizer),
                            "code": _code_fingerprint()}, sort_keys=True, default=str))


def file_digest(path: str, folder: Path) -> str:
    """sha256 of the file's bytes, remembered by (size, mtime, inode) in `folder`/files/."""
    st = os.stat(path)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    index = folder / "files" / (_sha(os.path.abspath(path))[:32] + ".json")
    try:
        known = json.loads(index.read_text())
        if {k: known.get(k) for k in stamp} == stamp and known["hashed_at"] - st.st_mtime_ns / 1e9 > RACY_S:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hashed_at = time.time()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    _write_atomic_text(index, json.dumps({**stamp, "hashed_at": hashed_at, "sha256": digest}))
    return digest


def _write_atomic_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("token cache: could not write %s: %s", path, e)


class TokenCache:
    def __init__(self, folder: Path, cfg: DataConfig, tokenizer):
        self.folder = folder
        self.settings = settings_key(cfg, tokenizer)

    @classmethod
    def for_config(cls, cfg: DataConfig, tokenizer) -> Optional["TokenCache"]:
        folder = cache_folder(cfg)
        return cls(folder, cfg, tokenizer) if folder is not None else None

    def entry(self, path: str, limit: Optional[int] = None) -> Path:
        """`limit`: only the file's first rows were read (data.train_max_samples)."""
        key = self.settings + file_digest(path, self.folder) + ("" if limit is None else f"|rows<={limit}")
        return self.folder / (_sha(key)[:40] + ".safetensors")

    def entry_for(self, path: str, limit: Optional[int] = None) -> Optional[Path]:
        """The entry's name (the file is hashed once, for both load and store), or None
        when the file cannot be read to hash it (reading it for tokens reports why)."""
        try:
            return self.entry(path, limit)
        except OSError:
            return None

    def load(self, entry: Path) -> Optional[FileTokens]:
        """The entry's arrays, memory-mapped (safetensors' numpy loader reads into memory;
        a cache hit should cost no more than the pages the samples touch)."""
        if not entry.is_file():
            return None
        try:
            arrays, meta = _map_safetensors(entry)
            return FileTokens(arrays["ids"], arrays["mask"], arrays["offsets"], int(meta.get("truncated", 0)),
                              int(meta.get("dropped", 0)))
        except Exception as e:  # a damaged entry is a miss, and is replaced below
            log.warning("token cache entry %s is unreadable (%s); tokenizing again", entry, e)
            return None

    def store(self, entry: Path, path: str, tokens: FileTokens) -> None:
        from safetensors.numpy import save_file

        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
            save_file({"ids": tokens.ids, "mask": tokens.mask, "offsets": tokens.offsets}, str(tmp),
                      metadata={"source": os.path.abspath(path), "truncated": str(tokens.truncated),
                                "dropped": str(tokens.dropped), "samples": str(len(tokens.offsets) - 1)})
            os.replace(tmp, entry)
        except OSError as e:
            log.warning("token cache: could not write under %s (%s); the next run tokenizes again "
                        "(set data.token_cache to a writable folder, or false)", self.folder, e.strerror or e)


_DTYPES = {"I32": np.int32, "U8": np.uint8, "I64": np.int64}


def _map_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """A safetensors file (8-byte little-endian header size, JSON header, data) as read-only
    arrays over one memory map of the file."""
    with open(path, "rb") as f:
        data = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    size = int(data[:8].view("<u8")[0])
    header = json.loads(bytes(data[8:8 + size]))
    meta = header.pop("__metadata__", None) or {}
    base = 8 + size
    arrays = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        arrays[name] = data[base + start:base + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    ids, mask, offsets = arrays["ids"], arrays["mask"], arrays["offsets"]
    if len(ids) != len(mask) or len(offsets) < 1 or int(offsets[-1]) != len(ids):
        raise ValueError("its arrays disagree in length")
    return arrays, meta
