"""The benchmark workload of ../shared/docs/benchmark.md: pre-tokenized synthetic
prompt/response pairs, identical for verlite and TRL.

random.Random(0); prompt length uniform in 32..256, response length uniform in 16..768,
token ids uniform in [10, vocab-10), truncated to max_length (mean about 531 tokens at 1024).
Loss on the response only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Sample:
    prompt: list[int]
    response: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt + self.response

    @property
    def loss_mask(self) -> list[int]:
        return [0] * len(self.prompt) + [1] * len(self.response)


def synthetic_samples(n: int, vocab: int, max_length: int = 1024, prompt=(32, 256), response=(16, 768),
                      seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(10, vocab - 10) for _ in range(rng.randint(*prompt))]
        r = [rng.randrange(10, vocab - 10) for _ in range(rng.randint(*response))]
        keep_p = min(len(p), max_length - 1)  # truncate from the right, keeping at least one response token
        p, r = p[:keep_p], r[:max_length - keep_p]
        out.append(Sample(p, r))
    return out


def long_samples(n: int, vocab: int, max_length: int, seed: int = 0) -> list[Sample]:
    """The long-context case: responses of max_length/2..max_length tokens (4k-8k at 8192)."""
    return synthetic_samples(n, vocab, max_length, prompt=(32, 256), response=(max_length // 2, max_length), seed=seed)
