"""Shared fixtures: a tiny real Qwen2 model folder and tokenizers trained locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from verlite.quickstart import article_samples

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No hub is reachable from CI: fail hub look-ups at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Token and compile caches of the test runs stay out of the user's ~/.cache/verlite.
os.environ.setdefault("VERLITE_CACHE_DIR", tempfile.mkdtemp(prefix="verlite-test-cache-"))


def corpus() -> list[str]:
    texts = [s["question"] + " " + s["answer"] for s in article_samples()]
    return texts + ["hello world, the quick brown fox jumps over the lazy dog. user assistant system"]


@pytest.fixture(scope="session")
def tokenizer_chat():
    from verlite.models.tiny import train_tokenizer

    return train_tokenizer(corpus(), vocab_size=320)


@pytest.fixture(scope="session")
def tokenizer_plain():
    from verlite.models.tiny import train_tokenizer

    return train_tokenizer(corpus(), vocab_size=320, chat_template=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_chat) -> Path:
    """A 2-layer Qwen2 with a chat template, saved as a normal HF model folder."""
    from verlite.models.tiny import build_qwen2

    return build_qwen2(tmp_path_factory.mktemp("tiny") / "qwen2", tokenizer_chat, hidden_size=64, layers=2,
                       heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def tiny_model_plain(tmp_path_factory, tokenizer_plain) -> Path:
    from verlite.models.tiny import build_qwen2

    return build_qwen2(tmp_path_factory.mktemp("tiny_plain") / "qwen2", tokenizer_plain, hidden_size=64, layers=2,
                       heads=4, kv_heads=2, seed=0)


@pytest.fixture
def article_data(tmp_path) -> Path:
    path = tmp_path / "data" / "sft-test" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(article_samples(), ensure_ascii=False), encoding="utf-8")
    return path


def shape_config(folder: Path, shape: str, max_position_embeddings: int) -> Path:
    """A bench shape (bench/shapes.py) as a config-only model folder: enough for the planner."""
    from transformers import Qwen2Config

    sys.path.insert(0, str(ROOT / "bench"))
    from shapes import SHAPES

    path = folder / shape
    Qwen2Config(max_position_embeddings=max_position_embeddings, **SHAPES[shape]).save_pretrained(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input (data, settings) must stop the run before its model is taken: the weights may
    be read beside the data (models/early_read.py), but a read that fails there surfaces only
    when the trainer takes the model, after every check."""
    import verlite.trainer.sft_trainer as trainer

    def fail(*a, **k):
        raise AssertionError("the model was taken before the input was checked")

    monkeypatch.setattr(trainer, "read_model", fail)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """`verlite ...` in a subprocess, as a user runs it."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "verlite.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _reset_verlite_logging():
    """cli.main() run in-process installs verlite's console handler and stops propagation;
    undo that so later tests' caplog sees verlite's records."""
    yield
    import logging

    logger = logging.getLogger("verlite")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
