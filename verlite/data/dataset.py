"""SFT samples: rows read from files, checked, tokenized and truncated, held in memory.

Tokenizing goes through the on-disk cache (data/cache.py) and, for large files, runs in
worker processes over chunks of rows (forked, as DataLoader workers are; they never touch CUDA):
a GSM8K sample (~207 tokens, chat template) takes ~0.45 ms of one core (about 2,200 a
second: half in the tokenizer's Rust encode, a third in rendering the template), so a
200k-sample file needs the cores of the machine the first time (61 s on 2 cores,
bench/token_cache.py), and no tokenizing the second (0.2 s).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from verlite import machine
from verlite.config.schema import DataConfig
from verlite.data.cache import FileTokens, TokenCache
from verlite.data.formatting import Encoded, encode_messages, encode_pair
from verlite.data.readers import Row, field_value, read_rows, resolve_files
from verlite.errors import VerliteError

log = logging.getLogger("verlite.data")

PARALLEL_MIN_ROWS = 4000  # below this a worker pool costs more than it saves
MAX_WORKERS = 32


class Beside(Protocol):
    """Work another thread of this process does while the data loads, kept clear of the forks
    of the tokenizing workers (a forked child inherits the locks other threads hold); the
    trainer's model read (models/early_read.py) is one."""

    def before_fork(self) -> None:
        """A worker pool is about to be forked: the work must not be running."""

    def may_run(self) -> None:
        """No fork is under way (the workers exist, or none are needed): the work may run."""


@dataclass
class SFTDataset:
    input_ids: list[np.ndarray] = field(default_factory=list)  # int32 token ids per sample
    loss_mask: list[np.ndarray] = field(default_factory=list)  # uint8, 1 = token carries loss
    truncated: int = 0
    dropped: int = 0
    cache: str = ""  # how the samples were obtained, for the run summary ("token cache hit", ...)
    _lengths: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample; read every step, so kept until samples are added."""
        if self._lengths is None or len(self._lengths) != len(self):
            self._lengths = np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))
        return self._lengths

    def append(self, enc: Encoded) -> None:
        self.input_ids.append(np.asarray(enc.input_ids, dtype=np.int32))
        self.loss_mask.append(np.asarray(enc.loss_mask, dtype=np.uint8))

    def add(self, full: Encoded, cfg: DataConfig, where: str) -> None:
        """One sample as tokenized, with data.truncation applied, checked and counted."""
        enc = truncate(full, cfg.max_length, cfg.truncation, where)
        if enc is None:
            self.dropped += 1
            return
        if not any(enc.loss_mask):
            if not any(full.loss_mask):
                raise VerliteError(f"{where}: no token carries loss (loss_mask is all zero)")
            raise VerliteError(f"{where}: no response token is left after truncation to "
                               f"data.max_length={cfg.max_length}; raise max_length or set data.truncation=drop")
        self.truncated += len(enc.input_ids) < len(full.input_ids)
        self.append(enc)

    def extend(self, tokens: FileTokens) -> None:
        ids, masks = tokens.samples()
        self.input_ids.extend(ids)
        self.loss_mask.extend(masks)
        self.truncated += tokens.truncated
        self.dropped += tokens.dropped


def load_dataset(files, cfg: DataConfig, tokenizer, key: str = "data.train_files", workers: int | None = None,
                 cache: TokenCache | None | bool = True, beside: Optional[Beside] = None) -> SFTDataset:
    """`cache`: a TokenCache built for this config and tokenizer (train and val share one),
    True to build it here, or None/False for none. `beside`: work to let run while the
    workers tokenize (and to hold before any fork)."""
    limit = cfg.val_max_samples if key == "data.val_files" else cfg.train_max_samples
    paths = resolve_files(files, key)
    if cfg.custom_cls.path:
        from verlite.data.custom import load_custom_dataset

        if beside is not None:  # the user's class may fork workers of its own
            beside.before_fork()
        return checked(load_custom_dataset(paths, cfg, tokenizer, limit), cfg, key)
    ds = SFTDataset()
    if cache is True:
        cache = TokenCache.for_config(cfg, tokenizer)
    hits = 0
    left = limit if limit is not None and limit >= 0 else None  # verl's *_max_samples: the first N rows
    for path in paths:
        if left == 0:
            break
        entry = cache.entry_for(path, left) if cache else None
        tokens = cache.load(entry) if entry is not None else None
        if tokens is None:
            tokens = tokenize_file(path, cfg, tokenizer, workers, left, beside)
            if entry is not None:
                cache.store(entry, path, tokens)
        else:
            hits += 1
            if beside is not None:
                beside.may_run()
        ds.extend(tokens)
        if left is not None:
            left -= tokens.rows
    if not cache:
        ds.cache = "token cache off"
    else:
        ds.cache = "token cache " + ("hit" if hits == len(paths) else "miss" if not hits else f"hit {hits}/{len(paths)} files")
    return checked(ds, cfg, key)


def checked(ds: SFTDataset, cfg: DataConfig, key: str) -> SFTDataset:
    if ds.truncated or ds.dropped:
        log.warning("%s: %d samples longer than max_length=%d were truncated (%s), %d dropped",
                    key, ds.truncated, cfg.max_length, cfg.truncation, ds.dropped)
    if not len(ds):
        raise VerliteError(f"{key}: every sample was dropped by data.truncation=drop; raise data.max_length")
    return ds


def tokenize_file(path: str, cfg: DataConfig, tokenizer, workers: int | None = None,
                  limit: int | None = None, beside: Optional[Beside] = None) -> FileTokens:
    rows = read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    workers = available_cores() if workers is None else workers
    if workers < 2 or len(rows) < PARALLEL_MIN_ROWS:
        if beside is not None:
            beside.may_run()
        return tokenize_rows(rows, cfg, tokenizer)
    workers = min(workers, MAX_WORKERS)
    chunk = -(-len(rows) // (workers * 4))  # a few chunks per worker evens out their speed
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    if beside is not None:
        beside.before_fork()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(_start_method()),
                             initializer=_init_worker, initargs=(cfg, tokenizer)) as pool:
        # With the fork start method the pool forks every worker at the first submit.
        futures = [pool.submit(_tokenize_chunk, rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
        if beside is not None:
            beside.may_run()
        parts = [f.result() for f in futures]  # in file order: the first bad row raises first
    return FileTokens(np.concatenate([p.ids for p in parts]), np.concatenate([p.mask for p in parts]),
                      _join_offsets([p.offsets for p in parts]), sum(p.truncated for p in parts),
                      sum(p.dropped for p in parts))


def available_cores() -> int:
    """This process's share of the cores: torchrun starts one process per GPU on the node."""
    return max(1, machine.cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _start_method() -> str:
    """fork: a worker starts in milliseconds with the tokenizer already loaded. Like
    DataLoader's workers it is safe after CUDA started, as long as the worker never uses CUDA."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _join_offsets(parts: list[np.ndarray]) -> np.ndarray:
    out, base = [np.zeros(1, dtype=np.int64)], 0
    for offsets in parts:
        out.append(offsets[1:] + base)
        base += int(offsets[-1])
    return np.concatenate(out)


_WORKER: dict = {}


def _init_worker(cfg: DataConfig, tokenizer) -> None:
    _WORKER.update(cfg=cfg, tokenizer=tokenizer)


def _tokenize_chunk(rows: list[Row]) -> FileTokens:
    return tokenize_rows(rows, _WORKER["cfg"], _WORKER["tokenizer"])


def tokenize_rows(rows: list[Row], cfg: DataConfig, tokenizer) -> FileTokens:
    ds = SFTDataset()
    for row in rows:
        ds.add(encode_row(row, cfg, tokenizer), cfg, row.where)
    return FileTokens.from_lists(ds.input_ids, ds.loss_mask, ds.truncated, ds.dropped)


def _text_field(row: Row, key: str, config_key: str, dict_keys: list[str] | None = None) -> str:
    value = field_value(row, key, dict_keys, config_key)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise VerliteError(f"{row.where}: key '{key}' must be text, got {type(value).__name__}")
    return str(value)


def _check_messages(row: Row, key: str, messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise VerliteError(f"{row.where}: key '{key}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str) or
                                              (m.get("content") is None and m.get("tool_calls")))
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not content_ok:
            raise VerliteError(f"{row.where}: {key}[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" and ((m.get("content") or "").strip() or m.get("tool_calls"))
               for m in messages):
        raise VerliteError(f"{row.where}: '{key}' has no non-empty assistant message to learn from")


def encode_row(row: Row, cfg: DataConfig, tokenizer) -> Encoded:
    kwargs = dict(cfg.apply_chat_template_kwargs or {})
    if cfg.multiturn.enable:
        mt = cfg.multiturn
        key = mt.messages_key
        if key not in row.data:
            raise VerliteError(f"{row.where}: missing key '{key}' (data.multiturn.messages_key)")
        messages = row.data[key]
        _check_messages(row, key, messages)
        tools = row.data.get(mt.tools_key)  # a column of tool definitions, when the file has one
        if row.data.get(mt.enable_thinking_key) is not None:
            kwargs["enable_thinking"] = bool(row.data[mt.enable_thinking_key])
        return encode_messages(tokenizer, messages, row.where, tools=tools or None, template_kwargs=kwargs,
                               ignore_mismatch=cfg.ignore_input_ids_mismatch,
                               loss_after_turn_end=cfg.response_end == "eos")
    prompt = field_value(row, cfg.prompt_key, cfg.prompt_dict_keys, "prompt_key")
    response = _text_field(row, cfg.response_key, "response_key", cfg.response_dict_keys)
    if not response.strip():
        raise VerliteError(f"{row.where}: key '{cfg.response_key}' is empty; every sample needs a response")
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        # a prompt already written as messages (the `prompt` column of verl's preprocess scripts)
        messages = prompt + [{"role": "assistant", "content": response}]
        _check_messages(row, cfg.prompt_key, messages)
        return encode_messages(tokenizer, messages, row.where, template_kwargs=kwargs)
    prompt = _text_field(row, cfg.prompt_key, "prompt_key", cfg.prompt_dict_keys)
    return encode_pair(tokenizer, prompt, response, row.where, cfg.response_end, kwargs)


def truncate(enc: Encoded, max_length: int, mode: str, where: str) -> Encoded | None:
    """Apply data.truncation; None means the sample is dropped."""
    n = len(enc.input_ids)
    if n <= max_length:
        return enc
    if mode == "error":
        raise VerliteError(f"{where}: sample has {n} tokens, more than data.max_length={max_length}; "
                           "raise max_length or set data.truncation to left, right or drop")
    if mode == "drop":
        return None
    keep = slice(n - max_length, n) if mode == "left" else slice(0, max_length)
    return Encoded(enc.input_ids[keep], enc.loss_mask[keep])
