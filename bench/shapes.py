"""The benchmark's model shapes (../shared/docs/benchmark.md), built random-init from a
config and saved with a locally trained tokenizer, so nothing is downloaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = {
    "qwen0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=True),
    "qwen1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                     tie_word_embeddings=True),
    "qwen7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                   tie_word_embeddings=False),
    # bench.py --smoke only (CPU): the code paths of every case in seconds.
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
}


def qwen2_config(shape: str, max_position_embeddings: int = 32768):
    from transformers import Qwen2Config

    return Qwen2Config(max_position_embeddings=max_position_embeddings, **SHAPES[shape])


def corpus_texts(gsm8k: Path | None) -> list[str]:
    from verlite.quickstart import article_samples

    texts = [s["question"] + " " + s["answer"] for s in article_samples()]
    if gsm8k and gsm8k.is_file():
        for line in gsm8k.read_text(encoding="utf-8").splitlines()[:3000]:
            row = json.loads(line)
            texts.append(row["question"] + " " + row["answer"])
    return texts


def build(shape: str, out: Path, gsm8k: Path | None = None, dtype: str = "bfloat16") -> Path:
    """A random-init model of `shape` with a BPE tokenizer (ids beyond it are simply unused)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from verlite.models.tiny import train_tokenizer

    tok = train_tokenizer(corpus_texts(gsm8k), vocab_size=4096)
    config = qwen2_config(shape)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tok.eos_token_id, tok.pad_token_id, None
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    p.add_argument("--gsm8k", default=None, help="GSM8K train.jsonl, to train the tokenizer on real text")
    a = p.parse_args()
    print(build(a.shape, Path(a.out), Path(a.gsm8k) if a.gsm8k else None))
