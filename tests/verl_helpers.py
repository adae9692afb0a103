"""What a verl user has on disk: parquet files in the layouts verl's preprocess scripts write
(examples/data_preprocess/gsm8k.py, gsm8k_multiturn_sft.py, a tool-calling conversation), a
Qwen-style chat template that renders tools, and a hub cache holding a model under a hub id."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'

# A Qwen2.5-style template written for these tests: tools go into the system turn, assistant
# tool calls are rendered as <tool_call> JSON, tool results as a user turn of <tool_response>.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{%- else %}You are a helpful assistant."
    "{%- endif %}\n\n# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{%- if not tools %}<|im_start|>system\n{{ message['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['role'] == 'assistant' and enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{%- endif %}{{ message['content'] or '' }}"
    "{%- if message['tool_calls'] %}{%- for call in message['tool_calls'] %}\n<tool_call>\n"
    "{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": {{ call['function']['arguments'] }}}\n"
    "</tool_call>{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def gsm8k_like(n: int, offset: int = 0) -> list[tuple[str, str]]:
    """GSM8K-shaped pairs: a word problem and a worked answer ending in `#### N`."""
    out = []
    for i in range(offset, offset + n):
        a, b = i % 17 + 1, i % 7 + 2
        out.append((f"Tom has {a} apples and buys {b} more. How many apples?",
                    f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"))
    return out


def _write(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _splits(n_train: int, n_test: int, pairs: dict | None):
    """(split, [(question, answer), ...]): GSM8K-like pairs, or the given ones."""
    if pairs:
        return [(split, pairs[split]) for split in ("train", "test")]
    return [("train", gsm8k_like(n_train, 0)), ("test", gsm8k_like(n_test, 1000))]


def write_gsm8k(folder: Path, n_train: int, n_test: int, pairs: dict | None = None) -> Path:
    """The columns examples/data_preprocess/gsm8k.py writes."""
    for split, split_pairs in _splits(n_train, n_test, pairs):
        rows = []
        for index, (question, answer) in enumerate(split_pairs):
            rows.append({"data_source": "openai/gsm8k",
                         "prompt": [{"role": "user", "content": question + " " + INSTRUCTION}],
                         "ability": "math",
                         "reward_model": {"style": "rule", "ground_truth": answer.split("#### ")[1]},
                         "extra_info": {"split": split, "index": index, "answer": answer, "question": question}})
        _write(rows, folder / f"{split}.parquet")
    return folder


def write_multiturn(folder: Path, n_train: int, n_test: int, pairs: dict | None = None) -> Path:
    """The `messages` column examples/data_preprocess/gsm8k_multiturn_sft.py writes."""
    for split, split_pairs in _splits(n_train, n_test, pairs):
        rows = [{"messages": [{"role": "user", "content": q + " " + INSTRUCTION}, {"role": "assistant", "content": a}]}
                for q, a in split_pairs]
        _write(rows, folder / f"{split}.parquet")
    return folder


TOOLS = [{"type": "function", "function": {"name": "calc", "description": "evaluate an arithmetic expression",
                                           "parameters": {"type": "object",
                                                          "properties": {"expr": {"type": "string"}},
                                                          "required": ["expr"]}}}]


def tool_conversation(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": f'{{"expr": "{a}+{b}"}}'}}]},
            {"role": "tool", "content": str(a + b)},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]


def write_tools(path: Path, n: int) -> Path:
    return _write([{"messages": tool_conversation(i, i + 2), "tools": TOOLS, "enable_thinking": bool(i % 2)}
                   for i in range(n)], path)


def fake_hub(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face hub cache holding `model_dir` under `repo_id`, so `from_pretrained(repo_id)`
    resolves offline (HF_HUB_OFFLINE=1, HF_HUB_CACHE=cache) as on a machine that downloaded it."""
    commit = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in Path(model_dir).iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    return cache


def verl_env(home: Path, hub: Path | None = None) -> dict:
    env = dict(os.environ, HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if hub is not None:
        env["HF_HUB_CACHE"] = str(hub)
    return env
