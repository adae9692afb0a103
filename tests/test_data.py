import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from verlite.config.schema import DataConfig
from verlite.data.dataset import load_dataset
from verlite.data.formatting import encode_prompt
from verlite.data.readers import read_rows
from verlite.errors import VerliteError

ROWS = [{"question": "计算 1 + 2 的结果是多少?", "answer": "1 + 2 = 3。答案是3。"},
        {"question": "hello", "answer": "world"}]


def test_formats_read_the_same_rows(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")  # object per line
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ("a.json", "b.json", "c.jsonl", "d.parquet"):
        assert [r.data for r in read_rows(str(tmp_path / name))] == ROWS, name
    assert read_rows(str(tmp_path / "c.jsonl"))[1].where.endswith("c.jsonl:2")
    assert read_rows(str(tmp_path / "d.parquet"))[1].where.endswith("d.parquet row 1")


def test_list_of_files_and_home_expansion(tmp_path, monkeypatch, tokenizer_chat):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "b.jsonl", ROWS[:1])
    ds = load_dataset(["~/a.jsonl", "$HOME/b.jsonl"], DataConfig(), tokenizer_chat)
    assert len(ds) == 3


def test_loss_mask_follows_chat_template_token_by_token(tmp_path, tokenizer_chat):
    write_jsonl(tmp_path / "t.jsonl", ROWS[:1])
    ds = load_dataset(str(tmp_path / "t.jsonl"), DataConfig(), tokenizer_chat)
    ids, mask = ds.input_ids[0].tolist(), ds.loss_mask[0].tolist()
    full = tokenizer_chat.apply_chat_template([{"role": "user", "content": ROWS[0]["question"]},
                                               {"role": "assistant", "content": ROWS[0]["answer"]}], tokenize=False)
    assert tokenizer_chat.decode(ids) == full
    prompt_ids = encode_prompt(tokenizer_chat, ROWS[0]["question"])
    assert ids[:len(prompt_ids)] == prompt_ids  # generation sees exactly the training prefix
    assert mask[:len(prompt_ids)] == [0] * len(prompt_ids)
    response = ids[len(prompt_ids):]
    # The response is the answer and its end-of-turn token; the template's newline after it
    # (never generated) follows as context.
    assert mask[len(prompt_ids):] == [1] * (len(response) - 1) + [0]
    assert tokenizer_chat.decode(response[:-1]) == ROWS[0]["answer"] + "<|im_end|>"
    assert tokenizer_chat.convert_tokens_to_ids("<|im_end|>") in response


def test_no_template_is_prompt_response_eos(tmp_path, tokenizer_plain):
    write_jsonl(tmp_path / "t.jsonl", ROWS[1:])
    ds = load_dataset(str(tmp_path / "t.jsonl"), DataConfig(), tokenizer_plain)
    ids, mask = ds.input_ids[0].tolist(), ds.loss_mask[0].tolist()
    p = tokenizer_plain("hello")["input_ids"]
    r = tokenizer_plain("world", add_special_tokens=False)["input_ids"]
    assert ids == p + r + [tokenizer_plain.eos_token_id]
    assert mask == [0] * len(p) + [1] * (len(r) + 1)


def test_multiturn_loss_only_on_assistant_turns(tmp_path, tokenizer_chat):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1 + 2"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "2 + 2"},
            {"role": "assistant", "content": "4"}]
    write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}])
    cfg = DataConfig()
    cfg.multiturn.enable = True
    ds = load_dataset(str(tmp_path / "m.jsonl"), cfg, tokenizer_chat)
    ids, mask = ds.input_ids[0], ds.loss_mask[0]
    learned = tokenizer_chat.decode(ids[mask == 1].tolist())
    assert learned == "3<|im_end|>4<|im_end|>"
    assert tokenizer_chat.decode(ids.tolist()) == tokenizer_chat.apply_chat_template(conv, tokenize=False)


@pytest.mark.parametrize("mode", ["left", "right", "drop", "error"])
def test_truncation_modes(tmp_path, tokenizer_chat, mode, caplog):
    long = {"question": "hi", "answer": "a " * 40}
    write_jsonl(tmp_path / "t.jsonl", [long, ROWS[1]])
    cfg = DataConfig(max_length=30, truncation=mode)
    if mode == "error":
        with pytest.raises(VerliteError, match=r"t.jsonl:1: sample has \d+ tokens, more than data.max_length=30"):
            load_dataset(str(tmp_path / "t.jsonl"), cfg, tokenizer_chat)
        return
    ds = load_dataset(str(tmp_path / "t.jsonl"), cfg, tokenizer_chat)
    full = load_dataset(str(tmp_path / "t.jsonl"), DataConfig(max_length=1000), tokenizer_chat)
    if mode == "drop":
        assert len(ds) == 1 and ds.dropped == 1
    else:
        assert len(ds) == 2 and ds.truncated == 1 and len(ds.input_ids[0]) == 30
        kept = full.input_ids[0][-30:] if mode == "left" else full.input_ids[0][:30]
        assert np.array_equal(ds.input_ids[0], kept)
    assert "max_length=30" in caplog.text


def test_truncation_that_leaves_no_response_is_an_error(tmp_path, tokenizer_chat):
    write_jsonl(tmp_path / "t.jsonl", [{"question": "q " * 50, "answer": "a"}])
    with pytest.raises(VerliteError, match="no response token is left"):
        load_dataset(str(tmp_path / "t.jsonl"), DataConfig(max_length=20, truncation="right"), tokenizer_chat)
