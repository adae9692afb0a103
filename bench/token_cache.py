"""Issue 14's data target: a 200k-sample JSONL (GSM8K train repeated) ready to train in
<= 30 s the first time (16 cores) and <= 3 s the second (token cache hit).

    python bench/token_cache.py --gsm8k ../shared/data/gsm8k/train.jsonl            # 200k samples
    python bench/token_cache.py --gsm8k ../shared/data/gsm8k/train.jsonl --smoke    # 2k samples

Times `load_dataset` as the trainer calls it (read, tokenize in worker processes, cache),
with the bench's GSM8K-trained BPE tokenizer and ChatML template, into a fresh cache folder,
twice. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gsm8k", required=True)
    p.add_argument("--samples", type=int, default=200_000)
    p.add_argument("--smoke", action="store_true", help="2,000 samples")
    a = p.parse_args()
    n = 2000 if a.smoke else a.samples
    from shapes import corpus_texts

    from verlite.config.schema import DataConfig
    from verlite.data.dataset import available_cores, load_dataset
    from verlite.models.tiny import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="token_cache_"))
    lines = Path(a.gsm8k).read_text(encoding="utf-8").splitlines(keepends=True)
    big = work / "train.jsonl"
    big.write_text("".join((lines * (n // len(lines) + 1))[:n]), encoding="utf-8")
    tokenizer = train_tokenizer(corpus_texts(Path(a.gsm8k)), vocab_size=4096)
    cfg = DataConfig(token_cache=str(work / "cache"))
    result = {"case": "token_cache", "samples": n, "cores": available_cores()}
    for name in ("first_s", "second_s"):
        start = time.perf_counter()
        ds = load_dataset(str(big), cfg, tokenizer)
        result[name] = round(time.perf_counter() - start, 2)
        result[name.replace("_s", "_cache")] = ds.cache
    result["mean_tokens"] = round(float(ds.lengths.mean()), 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
