"""Per-request sampling settings, the batched sampler, and stop-string handling for text
that is streamed token by token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy, as `verlite generate`
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    ignore_eos: bool = False  # keep going past the end-of-turn token (benchmarks force a length)


def sample(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
           generators: list[Optional[torch.Generator]]) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab], on its device (no host sync): argmax where
    the temperature is 0, else nucleus sampling, with the row's own generator when the request
    gave a seed."""
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled:
        device = logits.device
        rows = _on(sampled, device)
        temps = _on([temperatures[i] for i in sampled], device, torch.float32)[:, None]
        probs = torch.softmax(logits.index_select(0, rows).float() / temps, dim=-1)
        if any(top_ps[i] < 1 for i in sampled):
            probs = top_p_filter(probs, _on([top_ps[i] for i in sampled], device, torch.float32))
        free = [j for j, i in enumerate(sampled) if generators[i] is None]
        if free:
            at = _on(free, device)
            chosen.index_copy_(0, rows.index_select(0, at), torch.multinomial(probs.index_select(0, at), 1)[:, 0])
        for j, i in enumerate(sampled):
            if generators[i] is not None:
                chosen[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return chosen


def _on(values: list, device: torch.device, dtype=torch.long) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the tokens ranked above
    ordered = ordered.masked_fill(before >= top_p[:, None], 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum(dim=-1, keepdim=True)


class TextStream:
    """The text of one generated sequence, released in pieces that are safe to send: never
    half a UTF-8 character, never the start of a stop string that may still complete.

    Decoding is incremental (each step decodes the last few tokens, not the whole sequence),
    with one committed token of context so tokenizers that drop a leading space see it.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.decode, self.stop = text_decoder(tokenizer), [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # committed: complete characters only
        self.sent = ""
        self.prefix = self.read = 0  # ids[prefix:read] is context already in text

    def add(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the sequence)."""
        self.ids.append(token)
        self._commit(final=False)
        text = self.text
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            return self._release(text[:min(hits)]), True
        hold = 0
        for s in self.stop:  # a suffix that could grow into a stop string waits
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return self._release(text[:len(text) - hold]), False

    def flush(self) -> str:
        """Whatever was held back, once the sequence ends for another reason."""
        self._commit(final=True)
        return self._release(self.text)

    def _commit(self, final: bool) -> None:
        known = self.decode(self.ids[self.prefix:self.read])
        new = self.decode(self.ids[self.prefix:])
        if len(new) > len(known) and (final or not new.endswith("\ufffd")):
            self.text += new[len(known):]
            self.prefix, self.read = self.read, len(self.ids)

    def _release(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        if delta:
            self.sent = text
        return delta


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text as `tokenizer.decode(ids, skip_special_tokens=True)` gives it. A fast
    tokenizer's Rust decoder directly when transformers would add nothing to it (no clean-up
    of spaces): its Python wrapper costs ~10x the decode itself, twice per token."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
