"""At which steps the default GSM8K run meets its CUDA-graph shapes and captures them, worked
out on the CPU from the plan: the trainer's data, step plan, collate and the graph runner's
padding, with engine/graph_step.py's rules (the first step runs eagerly; a shape is captured
the first time it comes once its kernel class is warm, else the next time it comes).

    python bench/graph_shapes.py --gsm8k ../shared/data/gsm8k/train.jsonl

Uses the bench's GSM8K-trained tokenizer (shapes.py; built into --model if missing). Prints the
new shapes and the captures per logging interval: what a GPU run's per-interval tokens/s dips
come from besides checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gsm8k", required=True)
    p.add_argument("--model", default="/tmp/bench_models/tiny_gsm8k_tokenizer",
                   help="a folder with the bench tokenizer (built here with a tiny model if missing)")
    p.add_argument("--micro_batch", type=int, default=32)
    p.add_argument("--interval", type=int, default=10, help="the log interval the dips are read in")
    args = p.parse_args()

    model = Path(args.model)
    if not (model / "tokenizer.json").is_file():
        from shapes import build

        build("tiny", model, gsm8k=Path(args.gsm8k))
    from verlite.config.load import load_config
    from verlite.data.batching import StepPlan, collate
    from verlite.data.dataset import load_dataset
    from verlite.engine.graph_step import GraphedSteps, kernel_class, shape_key
    from verlite.models.load import load_tokenizer

    cfg = load_config(None, [f"data.train_files={args.gsm8k}", f"model.partial_pretrain={model}",
                             f"data.micro_batch_size_per_gpu={args.micro_batch}"])
    tok = load_tokenizer(str(model), False)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ds = load_dataset(cfg.data.train_files, cfg.data, tok, cache=None)
    plan = StepPlan(ds.lengths, cfg.data.train_batch_size or args.micro_batch, 1, cfg.trainer.seed,
                    args.micro_batch, None, packed=cfg.data.packing)
    runner = GraphedSteps.__new__(GraphedSteps)  # pad() only: no GPU state
    runner.max_length, runner.varying_counts, runner.pad_id = cfg.data.max_length, False, pad_id

    seen: Counter = Counter()
    warm, captured = set(), set()
    captures: Counter = Counter()  # per logging interval
    for step in range(plan.steps_per_epoch):
        for indices, placeholder in plan.rank_micro_batches(step, 0):
            key = shape_key(runner.pad(collate(ds, indices, True, pad_id, placeholder)))
            seen[key] += 1
            if seen[key] == 1:
                print(f"step {step + 1}: new shape {key}" + (" (kernel class warm)" if kernel_class(key) in warm else ""))
            capture = step >= 1 and key not in captured and (seen[key] > 1 or kernel_class(key) in warm)
            if capture:
                captured.add(key)
                warm.add(kernel_class(key))
                captures[step // args.interval] += 1
    print(f"{len(seen)} shapes over {plan.steps_per_epoch} steps; micro-batch captures per {args.interval} steps: "
          + ", ".join(f"{i * args.interval + 1}-{(i + 1) * args.interval}: {n}" for i, n in sorted(captures.items())))


if __name__ == "__main__":
    main()
