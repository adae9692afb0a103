"""The memory plan against measured peaks, offline: for each verlite row of a bench.py
results file, the plan (verlite/engine/memory.py, as it is now) for the largest micro-batch
that run formed, next to the peak the GPU measured. No GPU needed.

    python bench/plan_check.py bench/results/2026-11-25b-h100-smallcards.jsonl --warmup 2 --steps 4
    python bench/plan_check.py bench/results/2026-11-25-h100-smallcards.jsonl --warmup 2 --steps 6 \
        --case_steps qlora7b_long32k_24g=1,3 --case_steps qlora7b_longest_24g=1,3

A row that ran out of memory is re-planned at its smallest possible micro-batch (one sample):
the plan must then exceed the case's cap, i.e. the planner now refuses what failed.

The bench's samples are a pure function of (case, count) and step k trains samples
k*batch .. (k+1)*batch-1 (bench.py's in_plan_order), so the micro-batch sizes of a past run
can be rebuilt here; `--warmup` and `--steps` must be the ones that run used. The row's own
budget, recomputed layers and memory switches are applied as it ran (newer bench.py rows
also carry `predicted_run_gib`, the plan made when they ran). The issue's bound: the plan
within +25 % / -0 % of the measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import CASES  # noqa: E402
from shapes import SHAPES  # noqa: E402
from workload import long_samples, synthetic_samples  # noqa: E402

SWITCH_KEYS = {"act offload": "model.enable_activation_offload=true", "tiled MLP": "model.tiled_mlp=true",
               "opt offload": "model.fsdp_config.optimizer_offload=true"}


def sample_tokens(row: dict, n: int) -> list[int]:
    """Token counts of the first `n` samples the row's case trains (bench.py's workload)."""
    case, length = row["case"], row["max_length"]
    vocab = SHAPES[CASES[case][0]]["vocab_size"]
    samples = long_samples(n, vocab, length) if "long" in case else synthetic_samples(n, vocab, length)
    return [len(s.prompt) + len(s.response) for s in samples]


def largest_micro_batch(row: dict, warmup: int, steps: int) -> int:
    """Tokens of the largest micro-batch the row's run formed (a step is one micro-batch when
    it fits the budget, else the budget bounds it)."""
    batch = row["global_batch"]
    sizes = sample_tokens(row, batch * (warmup + steps))
    steps_tokens = [sum(sizes[k * batch:(k + 1) * batch]) for k in range(warmup + steps)]
    return min(max(steps_tokens), row.get("token_budget") or max(steps_tokens))


def plan_for(row: dict, config_dir: Path, tokens: int) -> float:
    from verlite.config import load_config
    from verlite.engine.memory import GIB, estimate, model_shape

    shape_name, lora, batch, length, overrides, _cap = CASES[row["case"]]
    # bench.py compiles every GPU case (a row's own setting may say otherwise, applied below)
    over = [f"model.partial_pretrain={config_dir}", f"data.train_batch_size={batch}",
            f"data.max_length={row['max_length']}", "data.packing=true", "data.micro_batch_size_per_gpu=1",
            "model.compile=true"]
    if lora:
        over += ["model.lora_rank=8", "model.lora_alpha=16", "model.target_modules=[q_proj,v_proj]"]
    over += [o for o in overrides if "micro_batch_size_per_gpu" not in o and "max_token_len" not in o]
    over += [o for o in (row.get("setting") or "").split() if "=" in o]  # overrides, not notes like "one-sample rows"
    over += [SWITCH_KEYS[s.strip()] for s in (row.get("switches") or "").split(",") if s.strip()]
    if "fused_backward" in row:  # as it ran (rows before 2026-12-01 record no failed run's switches)
        fused = row["fused_backward"]
        over.append(f"optim.fused_backward={str(fused).lower() if isinstance(fused, bool) else fused}")
    cfg = load_config(None, over)
    shape = model_shape(cfg)
    layers = row.get("checkpoint_layers") or (shape.layers if row.get("checkpointing") else 0)
    budget = row.get("token_budget") or batch * length
    est = estimate(cfg, shape, tokens, 1, layers > 0, layers, keep_attention=row.get("keep_attention_layers") or 0,
                   one_micro_batch=budget >= batch * length)
    return est.total / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a bench.py JSON-lines file")
    p.add_argument("--warmup", type=int, required=True, help="the --warmup of the run that wrote it")
    p.add_argument("--steps", type=int, required=True, help="the --steps of the run that wrote it")
    p.add_argument("--case_steps", action="append", default=[], metavar="CASE=WARMUP,STEPS",
                   help="another warm-up/steps for one case (a file written by two bench calls); repeatable")
    p.add_argument("--models", default="/tmp/bench_plan_check", help="where config-only model folders go")
    a = p.parse_args()
    per_case = {c: tuple(map(int, v.split(","))) for c, v in (x.split("=", 1) for x in a.case_steps)}
    from shapes import qwen2_config

    from verlite.errors import VerliteError

    print(f"{'case':<22}{'setting':<44}{'tokens':>8}{'plan':>8}{'peak':>8}{'error':>8}")
    worst = []
    for line in Path(a.results).read_text().splitlines():
        row = json.loads(line)
        oom = row.get("impl") == "verlite" and not row.get("ok") and "OOM" in str(row.get("error"))
        if row.get("impl") != "verlite" or not (row.get("ok") or oom) or row.get("peak_gib") is None:
            continue
        shape_name = CASES[row["case"]][0]
        folder = Path(a.models) / shape_name
        if not (folder / "config.json").is_file():  # the plan needs the config only
            qwen2_config(shape_name, max_position_embeddings=262144).save_pretrained(folder)
        if oom:
            cap = CASES[row["case"]][5]
            smallest = min(sample_tokens(row, row["global_batch"]))  # one sample: the smallest micro-batch
            plan = plan_for(dict(row, checkpointing=True), folder, smallest)
            verdict = "refused now" if plan > cap else "STILL PLANNED TO FIT"
            print(f"{row['case']:<22}{(row.get('setting') or '-')[:43]:<44}{smallest:>8}{plan:>8.2f}"
                  f"{'OOM':>8}  ran out of memory under {cap} GiB: {verdict}")
            continue
        tokens = largest_micro_batch(row, *per_case.get(row["case"], (a.warmup, a.steps)))
        try:
            plan = plan_for(row, folder, tokens)
        except VerliteError as e:  # e.g. bitsandbytes rows where it is not installed
            print(f"{row['case']:<22}skipped: {e}")
            continue
        error = plan / row["peak_gib"] - 1
        worst.append(error)
        print(f"{row['case']:<22}{(row.get('setting') or row.get('switches') or '-')[:43]:<44}{tokens:>8}"
              f"{plan:>8.2f}{row['peak_gib']:>8.2f}{error:>+8.1%}")
    if worst:
        print(f"range {min(worst):+.1%} .. {max(worst):+.1%} (asked: -0 % .. +25 %)")


if __name__ == "__main__":
    main()
