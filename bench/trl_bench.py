"""The peer side of bench/bench.py: TRL's SFTTrainer on the same model, data and global batch.

    python bench/trl_bench.py --model /tmp/bench_models/qwen0.5b --case full --batch 32
    python bench/trl_bench.py --model ... --case lora --batch 32 --lora --liger
    python bench/trl_bench.py --model ... --case gsm8k_cli --batch 32 --gsm8k train.jsonl   # one epoch, saved
    python bench/trl_bench.py --model ... --case qlora7b_12g --batch 8 --lora --qlora --ckpt --liger --mem_cap_gib 12
    python bench/trl_bench.py --model ... --case full1.5b_12g --batch 8 --dtype bfloat16 --optim paged_adamw_8bit ...

Prints one JSON line in the shape bench.py's table reads. The samples are the same
pre-tokenized pairs verlite trains on (bench/workload.py), handed to TRL as `input_ids` +
`labels` (-100 on the prompt), which SFTTrainer uses as they are. Global batch =
per-device batch, no accumulation, as benchmark.md's peer settings. A step's time is the
wall time between consecutive ends of optimizer steps, each ending in a device sync, so it
includes TRL's own data collation, as a TRL user gets it. Needs trl, datasets (and
liger-kernel for --liger, bitsandbytes for --qlora and the 8-bit --optim choices):
bench/wheels.sh fetches them for the GPU machine.

With --gsm8k the samples are GSM8K's text as prompt/completion conversations, tokenized by
TRL itself with the model's chat template (completion-only loss), for one epoch unless
--steps is given, and the run ends with a full checkpoint (weights + optimizer) as
verlite's does; bench/gsm8k_cli.py times the process from launch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import PEAK_FLOPS  # noqa: E402
from workload import long_samples, synthetic_samples  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--lora", action="store_true", help="r 8, alpha 16 on q_proj/v_proj (the article's adapter)")
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--liger", action="store_true", help="use_liger_kernel + padding_free")
    p.add_argument("--long", action="store_true", help="long-context samples (responses max_length/2..max_length)")
    p.add_argument("--mem_cap_gib", type=float, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weights (and so AdamW state) dtype; default fp32 for full FT, bf16 base for LoRA")
    p.add_argument("--qlora", action="store_true",
                   help="QLoRA as TRL users set it: bitsandbytes 4-bit NF4 base, double quant, bf16 compute")
    p.add_argument("--optim", default="adamw_torch_fused",
                   help="transformers' optim name, e.g. paged_adamw_8bit (bitsandbytes) for low-memory full FT")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; with --gsm8k one epoch)")
    p.add_argument("--gsm8k", default=None, help="GSM8K train.jsonl: real text, TRL tokenizes, one epoch, final save")
    a = p.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)  # CPU only for a smoke test of this script
    if a.mem_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.mem_cap_gib * 2**30 / total))
    result = {"impl": "trl", "case": a.case, "global_batch": a.batch, "max_length": a.max_length, "world": 1,
              "setting": f"batch {a.batch}" + (", ckpt" if a.ckpt else "") + (", Liger+pf" if a.liger else ", padded")
              + (", bf16 weights" if a.dtype == "bfloat16" and not a.lora else "")
              + (", QLoRA nf4+dq" if a.qlora else "") + (f", {a.optim}" if a.optim != "adamw_torch_fused" else "")}
    dtype = a.dtype or ("bfloat16" if a.lora else "float32")
    result["master_dtype"] = ("NF4 base (frozen, double quant) + fp32 LoRA" if a.qlora else
                              "bf16 base (frozen) + fp32 LoRA" if a.lora else
                              f"{'fp32' if dtype == 'float32' else 'bf16'} weights, {a.optim} state, bf16 autocast")

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    # By default the dtypes of verlite's runs: fp32 master weights for full FT, a bf16 frozen base for LoRA.
    quant = {}
    if a.qlora:
        from transformers import BitsAndBytesConfig

        quant["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa", **quant)
    vocab = model.config.vocab_size
    if a.gsm8k:
        dataset = gsm8k_dataset(Dataset, a.gsm8k)
    else:
        a.steps = a.steps or 10
        n = a.batch * (a.warmup + a.steps)
        samples = (long_samples if a.long else synthetic_samples)(n, vocab, a.max_length)
        rows = {"input_ids": [s.input_ids for s in samples],
                "labels": [[-100] * len(s.prompt) + s.response for s in samples]}
        dataset = Dataset.from_dict(rows)

    counts: list[int] = []  # real tokens of each collated batch, in the order the steps consume them

    class CountingCollator:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, examples):
            counts.append(sum(len(e["input_ids"]) for e in examples))
            return self.inner(examples)

    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
    # GSM8K: one epoch (or --steps), then one full checkpoint at the end (save_steps past the run).
    max_steps = (a.warmup + a.steps) if a.steps else -1
    save = dict(save_strategy="steps", save_steps=10**9) if a.gsm8k else dict(save_strategy="no")
    args = SFTConfig(output_dir="/tmp/trl_bench_out", per_device_train_batch_size=a.batch,
                     gradient_accumulation_steps=1, max_steps=max_steps, num_train_epochs=1, learning_rate=1e-5,
                     bf16=cuda, use_cpu=not cuda, gradient_checkpointing=a.ckpt, use_liger_kernel=a.liger, padding_free=a.liger,
                     # padding-free without packing refuses a max_length; the samples are already truncated
                     max_length=None if a.liger else a.max_length, optim=a.optim, lr_scheduler_type="constant",
                     logging_steps=10**6, report_to="none", dataloader_num_workers=0, **save,
                     seed=0, disable_tqdm=True)
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[StepTimer()])
        trainer.data_collator = CountingCollator(trainer.data_collator)
        if not a.gsm8k:  # step k trains samples k*batch.., as bench.py's verlite side does (same samples timed)
            from torch.utils.data import SequentialSampler

            trainer._get_train_sampler = lambda dataset=None, *args, **kwargs: SequentialSampler(
                dataset if dataset is not None else trainer.train_dataset)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        out = trainer.train()
        timed = (len(ends) - 1 - a.warmup) if not a.steps else a.steps
        steps = [ends[i + 1] - ends[i] for i in range(a.warmup, a.warmup + timed)]
        tokens = sum(counts[a.warmup:a.warmup + timed])
        tps = tokens / sum(steps)
        n_params = sum(p.numel() for name, p in trainer.model.named_parameters() if "lora_" not in name)
        result.update(ok=True, tokens_per_s=round(tps), step_s=round(sum(steps) / len(steps), 4),
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                      mfu=round((4 if a.lora else 6) * n_params * tps / PEAK_FLOPS, 3), params=n_params,
                      train_loss=round(out.training_loss, 4))
    except torch.OutOfMemoryError as e:
        result.update(ok=False, error="OOM: " + str(e).split("\n")[0][:160],
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    print(json.dumps(result), flush=True)


def gsm8k_dataset(Dataset, path: str):
    """GSM8K rows as TRL's conversational prompt/completion: TRL applies the chat template."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": r["question"]}] for r in rows],
                              "completion": [[{"role": "assistant", "content": r["answer"]}] for r in rows]})


if __name__ == "__main__":
    main()
