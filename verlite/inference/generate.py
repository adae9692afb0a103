"""Generation with the exact prompt formatting used in training (data/formatting.py)."""

from __future__ import annotations

from typing import Union

import torch

from verlite.data.formatting import encode_prompt


def stop_token_ids(model, tokenizer) -> list[int]:
    """eos from the tokenizer and the generation config (chat models end turns with their own token)."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, prompts: Union[str, list], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, batch_size: int = 16, **kwargs) -> Union[str, list[str]]:
    """New text for a prompt (str) or for each of a list of prompts (str or chat messages).

    temperature 0 is greedy. Prompts are left-padded and batched; only the generated text
    comes back, without the prompt and without the end-of-turn token.
    """
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
    items = [prompts] if single else list(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    outputs: list[str] = []
    for start in range(0, len(items), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in items[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
            ids[row, width - len(e):] = torch.tensor(e)
            mask[row, width - len(e):] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad_id, **sampling, **kwargs)
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            outputs.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return outputs[0] if single else outputs
