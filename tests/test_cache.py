"""The on-disk token cache: a hit gives the same samples, and anything that changes tokens misses."""

import dataclasses

import numpy as np
import pytest

from conftest import write_jsonl
from verlite.config.schema import DataConfig
from verlite.data import dataset as dataset_mod
from verlite.data.cache import NOT_TOKEN_KEYS, TokenCache
from verlite.data.dataset import load_dataset
from verlite.errors import VerliteError

ROWS = [{"question": f"What is {i} times {i + 2}? Show the steps.", "answer": f"{i} x {i + 2} = {i * (i + 2)}. #### {i * (i + 2)}"}
        for i in range(40)]
OTHER_TEMPLATE = ("{%- for m in messages %}{{- '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                  "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant: ' }}{%- endif %}")


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a.input_ids, b.input_ids)) and \
        all(np.array_equal(x, y) for x, y in zip(a.loss_mask, b.loss_mask))


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", ROWS)


def load(path, tokenizer, cache_dir, **data_keys):
    import copy

    tok = copy.deepcopy(tokenizer)  # a chat_template override must not leak into the session fixture
    cfg = DataConfig(token_cache=str(cache_dir), **data_keys)
    from verlite.data.formatting import apply_chat_template_override

    apply_chat_template_override(tok, cfg.chat_template)
    return load_dataset(str(path), cfg, tok)


def test_hit_gives_the_same_samples_and_only_token_settings_miss(tmp_path, data, tokenizer_chat, tokenizer_plain):
    cache = tmp_path / "cache"
    first = load(data, tokenizer_chat, cache)
    assert first.cache == "token cache miss"
    again = load(data, tokenizer_chat, cache)
    assert again.cache == "token cache hit" and same(first, again)
    uncached = load_dataset(str(data), DataConfig(token_cache=False), tokenizer_chat)
    assert uncached.cache == "token cache off" and same(first, uncached)
    # Settings that only group samples share the entry.
    assert load(data, tokenizer_chat, cache, micro_batch_size_per_gpu=8, packing=True).cache == "token cache hit"
    # Everything that changes tokens misses.
    assert load(data, tokenizer_plain, cache).cache == "token cache miss"  # tokenizer (and no template)
    assert load(data, tokenizer_chat, cache, chat_template=OTHER_TEMPLATE).cache == "token cache miss"
    n = int(first.lengths.min()) - 2  # every sample is cut, each keeps some response
    assert load(data, tokenizer_chat, cache, max_length=n, truncation="right").cache == "token cache miss"
    assert load(data, tokenizer_chat, cache, max_length=n, truncation="left").cache == "token cache miss"
    short = load(data, tokenizer_chat, cache, max_length=n, truncation="left")
    assert short.cache == "token cache hit" and short.truncated == len(ROWS) and max(short.lengths) == n


def test_file_content_change_misses(tmp_path, data, tokenizer_chat):
    cache = tmp_path / "cache"
    load(data, tokenizer_chat, cache)
    rows = [dict(r) for r in ROWS]
    rows[7]["answer"] = "a different answer"
    write_jsonl(data, rows)  # same path, rewritten at once: mtime alone may not tell
    changed = load(data, tokenizer_chat, cache)
    assert changed.cache == "token cache miss"
    assert load(data, tokenizer_chat, cache).cache == "token cache hit"
    fresh = load_dataset(str(data), DataConfig(token_cache=False), tokenizer_chat)
    assert same(changed, fresh)


def test_every_data_key_is_in_the_key_unless_it_only_groups_samples(tokenizer_chat, tmp_path):
    """A data key added later (e.g. by the verl layouts) changes the cache key by default."""
    base = TokenCache(tmp_path, DataConfig(), tokenizer_chat).settings
    for f in dataclasses.fields(DataConfig):
        if f.name in NOT_TOKEN_KEYS or f.name in ("multiturn",):
            continue
        value = getattr(DataConfig(), f.name)
        changed = {str: "x", int: 7, bool: not value}.get(type(value), "x") if value is not None else "x"
        other = dataclasses.replace(DataConfig(), **{f.name: changed})
        assert TokenCache(tmp_path, other, tokenizer_chat).settings != base, f.name


def test_worker_processes_give_the_serial_result(tmp_path, tokenizer_chat, monkeypatch):
    rows = ROWS * 3
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    monkeypatch.setattr(dataset_mod, "PARALLEL_MIN_ROWS", 10)
    cfg = DataConfig(token_cache=False)
    serial = load_dataset(str(path), cfg, tokenizer_chat, workers=1)
    parallel = load_dataset(str(path), cfg, tokenizer_chat, workers=2)
    assert same(serial, parallel)
    # A bad row still fails with its own location.
    bad = [dict(r) for r in rows]
    bad[100] = {"question": "q"}
    write_jsonl(path, bad)
    with pytest.raises(VerliteError, match=r"big.jsonl:101: missing key 'answer'"):
        load_dataset(str(path), cfg, tokenizer_chat, workers=2)
