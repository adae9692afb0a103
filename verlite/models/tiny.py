"""Small real models built locally: a byte-level BPE tokenizer trained with `tokenizers`
(ChatML template, Qwen's special tokens) and a random-init Qwen2 from its config.

The quickstart uses them so it needs no download; tests use them as a real model folder
that the ordinary `from_pretrained` loading code reads.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int = 512, chat_template: bool = True):
    """A PreTrainedTokenizerFast trained on `texts`; digits are single tokens, so sums are learnable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    else:
        fast.eos_token = "<|endoftext|>"
    return fast


def build_qwen2(out_dir: str | Path, tokenizer, hidden_size: int = 128, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate_size: int | None = None, seed: int = 0, tie: bool = True) -> Path:
    """Save a random-init Qwen2 and `tokenizer` into `out_dir` as a normal HF model folder."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate_size or 3 * hidden_size, max_position_embeddings=4096,
                         tie_word_embeddings=tie, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
