"""verlite vs TRL on the workload of ../shared/docs/benchmark.md, on the GPU machine.

    python bench/bench.py --cases full,lora,lora7b_24g,lora7b_long,offload1.5b --trl   # driver: one table
    python bench/bench.py --run verlite --case full                                    # one case, JSON line
    python bench/bench.py --cases full1.5b_12g,qlora7b_12g,qlora7b_long8k_8g,qlora7b_long32k_24g,qlora7b_longest_24g --trl
    python bench/bench.py --smoke --cases full1.5b_12g,qlora7b_12g     # CPU, a tiny model: the code paths only
    torchrun --nproc_per_node=2 bench/bench.py --run verlite --case full               # the same on 2 GPUs
    python bench/gsm8k_cli.py --gsm8k .../gsm8k/train.jsonl --trl                      # `verlite sft` end to end

Every case runs in its own process (clean GPU memory). verlite runs through its Trainer
(the same micro-batching, sharding and step as `verlite sft`), fed the pre-tokenized
synthetic samples directly. Tokens/s counts real tokens of the timed steps (after warm-up)
over their wall time, each step ending in a device sync; peak is max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from shapes import SHAPES, build  # noqa: E402
from workload import long_samples, synthetic_samples  # noqa: E402

PEAK_FLOPS = 800e12  # measured bf16 matmul rate of an H100 (benchmark.md)

# name: (shape, lora, global batch, max_length, extra verlite overrides, memory cap GiB)
CASES = {
    "full": ("qwen0.5b", False, 32, 1024, ["data.max_token_len_per_gpu=32768", "model.enable_gradient_checkpointing=false"], None),
    "lora": ("qwen0.5b", True, 32, 1024, ["data.max_token_len_per_gpu=32768", "model.enable_gradient_checkpointing=false"], None),
    "lora7b_24g": ("qwen7b", True, 8, 1024, ["data.micro_batch_size_per_gpu=auto"], 24),
    "lora7b_long": ("qwen7b", True, 1, 16384, ["data.max_token_len_per_gpu=16384", "model.enable_gradient_checkpointing=true"], 24),
    "lora7b_long32k": ("qwen7b", True, 1, 32768, ["data.max_token_len_per_gpu=32768", "model.enable_gradient_checkpointing=true",
                                                  "model.enable_activation_offload=true"], 24),
    "offload1.5b": ("qwen1.5b", False, 8, 1024, ["data.max_token_len_per_gpu=8192", "model.enable_gradient_checkpointing=true",
                                                   "model.fsdp_config.cpu_offload=true"], 12),
    "nooffload1.5b": ("qwen1.5b", False, 8, 1024, ["data.max_token_len_per_gpu=8192", "model.enable_gradient_checkpointing=true"], 12),
    # Small cards (issue 10): the planner (micro_batch_size_per_gpu=auto) picks the token budget and
    # any memory switch (activation offload, tiled MLP) under the cap; precision is set here.
    "full1.5b_12g": ("qwen1.5b", False, 8, 1024, ["data.micro_batch_size_per_gpu=auto", "optim.optimizer=AdamW8bit",
                                                    "optim.optimizer_impl=torchao.optim",
                                                    "model.fsdp_config.model_dtype=bf16"], 12),
    "qlora7b_12g": ("qwen7b", True, 8, 1024, ["data.micro_batch_size_per_gpu=auto", "model.quantization=nf4"], 12),
    "qlora7b_long8k_8g": ("qwen7b", True, 1, 8192, ["data.micro_batch_size_per_gpu=auto", "model.quantization=nf4"], 8),
    "qlora7b_long32k_24g": ("qwen7b", True, 1, 32768, ["data.micro_batch_size_per_gpu=auto",
                                                       "model.quantization=nf4"], 24),
    # The longest: 131072 by default; pass --max_length to push further (the plan says how far).
    "qlora7b_longest_24g": ("qwen7b", True, 1, 131072, ["data.micro_batch_size_per_gpu=auto",
                                                        "model.quantization=nf4"], 24),
}
# More verlite settings run beside a case's own (same case name, so the same TRL figures): their
# overrides come after the case's. full1.5b_12g: bitsandbytes' 8-bit AdamW (one CUDA kernel per
# weight; bf16 weights rounded to nearest, no stochastic rounding) against torchao's (SR kept);
# and the plain step (no fused backward) that fits 12 GiB: exact fp32 AdamW with its moments in
# host memory. With the moments on the GPU it fits neither in 8 bits (11.24 GiB measured at its
# update) nor in 4 (out of memory on 2026-12-01), so this is not a same-optimizer comparison.
VARIANTS = {"full1.5b_12g": [["optim.optimizer_impl=bitsandbytes.optim"],
                             ["optim.fused_backward=false", "optim.optimizer=AdamW", "optim.optimizer_impl=torch.optim",
                              "model.fsdp_config.optimizer_offload=true"]]}
# A tiny shape and short samples for --smoke (CPU): every case's code path in seconds.
SMOKE_LENGTH = {False: 128, True: 256}  # max_length of ordinary / long cases
# TRL's best setting for each case, as benchmark.md measured it (H100, TRL 1.16): tokens/s, peak GiB.
PEER = {"full": (36213, 49.0), "lora": (21505, 34.1), "lora7b_24g": (4761, 16.4), "lora7b_long": (8483, 17.1)}
# The TRL settings run beside each case (bench/trl_bench.py flags): benchmark.md's best one, and
# where it tells something, a variant (bf16 weights and optimizer state; twice the length).
TRL_ARGS = {"full": [["--batch", "32"], ["--batch", "32", "--dtype", "bfloat16"]],
            # TRL's fastest LoRA setting found so far is padded with gradient checkpointing (issue 14).
            "lora": [["--batch", "32", "--lora", "--liger"], ["--batch", "32", "--lora", "--ckpt"]],
            "lora7b_24g": [["--batch", "8", "--lora", "--ckpt", "--liger", "--mem_cap_gib", "24"]],
            "lora7b_long": [["--batch", "1", "--lora", "--ckpt", "--liger", "--mem_cap_gib", "24", "--long",
                             "--max_length", str(n)] for n in (8192, 16384)],
            "lora7b_long32k": [["--batch", "1", "--lora", "--ckpt", "--liger", "--mem_cap_gib", "24", "--long",
                                "--max_length", "32768"]],
            # TRL + bitsandbytes as a small-card user sets it up (issue 10's table).
            "full1.5b_12g": [["--batch", "8", "--dtype", "bfloat16", "--ckpt", "--liger", "--optim", "paged_adamw_8bit",
                              "--mem_cap_gib", "12"],
                             # padded, no Liger: the setting that measured 8,908 tokens/s (benchmark.md)
                             ["--batch", "8", "--dtype", "bfloat16", "--ckpt", "--optim", "paged_adamw_8bit",
                              "--mem_cap_gib", "12"]],
            "qlora7b_12g": [["--batch", "8", "--lora", "--qlora", "--ckpt", "--liger", "--mem_cap_gib", "12"],
                            # padded, no Liger: 2.8x faster than Liger + padding-free in the 1.5B case
                            # (2026-12-01), never run for QLoRA before
                            ["--batch", "8", "--lora", "--qlora", "--ckpt", "--mem_cap_gib", "12"]],
            "qlora7b_long8k_8g": [["--batch", "1", "--lora", "--qlora", "--ckpt", "--liger", "--mem_cap_gib", "8",
                                   "--long", "--max_length", str(n)] for n in (2048, 8192)],
            "qlora7b_long32k_24g": [["--batch", "1", "--lora", "--qlora", "--ckpt", "--liger", "--mem_cap_gib", "24",
                                     "--long", "--max_length", "32768"]]}


def model_dir(root: Path, shape: str) -> Path:
    path = root / shape
    if not (path / "config.json").is_file():
        build(shape, path, gsm8k=None)
    return path


def run_verlite(case: str, model: Path, warmup: int, steps: int, max_length: int | None, extra: list[str],
                smoke: bool = False) -> dict:
    import torch

    from verlite.config import load_config
    from verlite.data.dataset import SFTDataset
    from verlite.data.formatting import Encoded
    from verlite.engine.distributed import init_distributed, shutdown
    from verlite.engine.prefetch import prefetch
    from verlite.logs import setup_logging
    from verlite.trainer.sft_trainer import Trainer

    shape, lora, batch, length, overrides, cap = CASES[case]
    long = "long" in case
    length = max_length or (SMOKE_LENGTH[long] if smoke else length)
    setup_logging("WARNING")
    device = "cpu" if smoke else "cuda"
    dist = init_distributed(device)
    cuda = dist.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg_over = [f"model.partial_pretrain={model}", f"data.train_batch_size={batch}", f"data.max_length={length}",
                "data.packing=true", f"trainer.device={device}", "trainer.resume_mode=disable", "optim.lr=1e-5",
                "trainer.default_local_dir=/tmp/bench_ckpt", "trainer.save_freq=-1", "data.micro_batch_size_per_gpu=1"]
    if lora:
        cfg_over += ["model.lora_rank=8", "model.lora_alpha=16", "model.target_modules=[q_proj,v_proj]"]
    if cap:
        cfg_over.append(f"trainer.gpu_mem_gb={cap}")
    # Every case compiles the decoder layers (model.compile): the measured default of this bench.
    cfg = load_config(None, cfg_over + [f"model.compile={str(not smoke).lower()}"] + overrides + extra)
    vocab = SHAPES["tiny" if smoke else shape]["vocab_size"]
    n = batch * (warmup + steps)
    samples = long_samples(n, vocab, length) if long else synthetic_samples(n, vocab, length)
    ds = SFTDataset()
    # Step k trains samples k*batch..(k+1)*batch-1, as TRL's side (a sequential sampler) does: at long
    # context attention is quadratic in a sample's length, so both must time the same samples.
    for s in in_plan_order(samples, cfg.trainer.seed):
        ds.append(Encoded(s.input_ids, s.loss_mask))
    result = {"impl": "verlite", "case": case, "global_batch": batch, "max_length": length, "world": dist.world_size,
              "master_dtype": precision(cfg)}
    sdpa = os.environ.get("VERLITE_BENCH_SDPA")
    unfused = bool(os.environ.get("VERLITE_BENCH_NO_FUSED_NORM"))
    if unfused:  # transformers' own RMSNorm, to measure models/fused_norm.py against it
        import verlite.trainer.sft_trainer as sft_trainer

        sft_trainer.use_fused_rms_norm = lambda model: 0
    setting = " ".join(extra + ([f"one-sample rows: sdpa {sdpa}"] if sdpa else []) +
                       (["transformers' RMSNorm"] if unfused else [])) or None
    try:
        trainer = Trainer(cfg, dist, train_ds=ds)
        result.update(predicted_gib=predicted_peak(cfg, dist.world_size), switches=switches(cfg))
        n_params = sum(p.numel() for n_, p in trainer.model.named_parameters() if "lora_" not in n_)
        times, tokens = [], []
        batches = prefetch(trainer._micro_batches, range(warmup + steps))
        profiler = None
        trace_dir = os.environ.get("VERLITE_BENCH_TRACE")
        largest = 0  # tokens of the largest micro-batch run: what the measured peak was reached with
        for step, b in zip(range(warmup + steps), batches):
            if step == warmup and (os.environ.get("VERLITE_BENCH_PROFILE") or trace_dir):
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU] +
                                                  ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
                profiler.__enter__()
            snap_dir = os.environ.get("VERLITE_BENCH_MEMSNAP") if step == warmup and cuda else None
            if snap_dir:  # what is live at the first timed step's peak (bench/memory_peak.py)
                import memory_peak

                torch.cuda.reset_peak_memory_stats()
                memory_peak.start()
                baseline = torch.cuda.memory_allocated()
            sync()
            t0 = time.perf_counter()
            r = trainer._step(b)
            sync()
            if snap_dir:
                Path(snap_dir).mkdir(parents=True, exist_ok=True)
                name = f"{case}{os.environ.get('VERLITE_BENCH_LABEL', '')}_memory.txt"
                (Path(snap_dir) / name).write_text("\n".join(memory_peak.summarize(baseline)) + "\n")
            largest = max([largest, *(mb.input_ids.numel() for mb in b.micro_batches)])
            if step >= warmup:
                times.append(time.perf_counter() - t0)
                tokens.append(int(ds.lengths[trainer.plan.step_indices(step)].sum()))
            if profiler is not None and step == warmup + min(1, steps - 1):  # two steps show the gaps
                profiler.__exit__(None, None, None)
                if trace_dir:
                    Path(trace_dir).mkdir(parents=True, exist_ok=True)
                    trace = Path(trace_dir) / f"{case}{os.environ.get('VERLITE_BENCH_LABEL', '')}.json"
                    profiler.export_chrome_trace(str(trace))
                    result["trace"] = str(trace)
                if os.environ.get("VERLITE_BENCH_PROFILE"):
                    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30), file=sys.stderr)
                profiler = None
        tps = sum(tokens) / sum(times)
        from torch._dynamo.utils import counters

        # Graphs dynamo compiled in all (one per layer shape when nothing recompiles) and every
        # timed step's seconds: a recompile inside a timed step shows in both.
        result.update(graphs_compiled=counters["stats"].get("unique_graphs", 0),
                      step_times=[round(t, 3) for t in times],
                      cuda_graphs=(trainer.graph_stats.summary() + ("" if trainer.graphs else " (then off)"))
                      if trainer.graph_stats is not None else None)
        result.update(ok=True, tokens_per_s=round(tps), step_s=round(sum(times) / len(times), 4),
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                      last_loss=round(r.loss.item(), 4),
                      mfu=round((4 if lora else 6) * n_params * tps / PEAK_FLOPS, 3), params=n_params,
                      token_budget=cfg.data.max_token_len_per_gpu, checkpointing=cfg.model.enable_gradient_checkpointing,
                      checkpoint_layers=cfg.model.checkpoint_layers, fused_backward=cfg.optim.fused_backward,
                      keep_attention_layers=cfg.model.keep_attention_layers,
                      optimizer=f"{cfg.optim.optimizer_impl}.{cfg.optim.optimizer}", setting=setting,
                      oom_splits=trainer.oom_splits,
                      # The plan's peak for the largest micro-batch that ran (the budget is planned for
                      # max_length samples; the synthetic ones average about half of it).
                      predicted_run_gib=predicted_peak(cfg, dist.world_size, largest), largest_micro_batch=largest)
    except torch.OutOfMemoryError as e:
        # The whole message: it ends with what the allocator held when the request failed.
        result.update(ok=False, error="OOM: " + " ".join(str(e).split())[:600], setting=setting,
                      peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      allocated_gib=round(torch.cuda.memory_allocated() / 2**30, 2),
                      fused_backward=cfg.optim.fused_backward, checkpointing=cfg.model.enable_gradient_checkpointing,
                      checkpoint_layers=cfg.model.checkpoint_layers)
    finally:
        shutdown()
    return result


def in_plan_order(samples: list, seed: int) -> list:
    """`samples` placed so that the trainer's shuffled first epoch visits them in list order."""
    import numpy as np

    from verlite.data.batching import StepPlan

    order = StepPlan(np.ones(len(samples), dtype=np.int64), 1, 1, seed, 1, None, False).epoch_order(0)
    placed = [None] * len(samples)
    for k, index in enumerate(order):
        placed[index] = samples[k]
    return placed


def precision(cfg) -> str:
    m, o = cfg.model, cfg.optim
    if m.lora_rank:
        base = "NF4 base (frozen, double-quantized scales)" if m.quantization else "bf16 base (frozen)"
        return f"{base} + fp32 LoRA, bf16 compute"
    sr = "" if o.optimizer_impl == "bitsandbytes.optim" else " (stochastic rounding)"
    master = f"bf16 master{sr}" if m.fsdp_config.model_dtype in ("bf16", "bfloat16") else "fp32 master"
    state = {"AdamW8bit": "8-bit AdamW state", "AdamW4bit": "4-bit AdamW state"}.get(o.optimizer, "fp32 AdamW state")
    impl = " (bitsandbytes)" if o.optimizer_impl == "bitsandbytes.optim" else ""
    fused = ", update fused into backward (clip with the previous step's norm)" if o.fused_backward is True else ""
    return f"{master}, {state}{impl}{' in host memory' if m.fsdp_config.optimizer_offload else ''}{fused}, bf16 compute"


def predicted_peak(cfg, world: int, tokens: int | None = None) -> float:
    """What `verlite plan` predicts for the micro-batches this run uses (after `auto`), or for
    micro-batches of `tokens` tokens."""
    from verlite.engine.memory import GIB, estimate, model_shape, step_tokens

    d, m = cfg.data, cfg.model
    budget = d.max_token_len_per_gpu or d.micro_batch_size_per_gpu * d.max_length
    tokens = tokens or budget
    shape = model_shape(cfg)
    layers = (m.checkpoint_layers or shape.layers) if m.enable_gradient_checkpointing is True else 0
    est = estimate(cfg, shape, tokens, world, layers > 0, layers, one_micro_batch=budget >= step_tokens(cfg, world))
    return round(est.total / GIB, 2)


def switches(cfg) -> str:
    m = cfg.model
    on = [name for name, flag in (("act offload", m.enable_activation_offload), ("tiled MLP", m.tiled_mlp),
                                  ("opt offload", m.fsdp_config.optimizer_offload)) if flag]
    return ", ".join(on)


def run_case_subprocess(cmd: list[str], env: dict | None = None, timeout: int = 900) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if os.environ.get("VERLITE_BENCH_PROFILE"):
        print(proc.stderr[-12000:], file=sys.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"ok": False, "error": (proc.stderr or proc.stdout)[-600:]}


def table(rows: list[dict]) -> str:
    """One line per run; verlite's ratio against TRL measured in this invocation (its best
    setting per case) and against benchmark.md's TRL figure."""
    head = (f"{'case':<21}{'impl':<9}{'world':>5}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>7}{'vs TRL':>8}"
            f"{'vs doc':>8}  notes")
    out = [head, "-" * len(head)]
    trl: dict[str, int] = {}
    for r in rows:
        if r.get("impl") == "trl" and r.get("ok"):
            trl[r["case"]] = max(trl.get(r["case"], 0), r["tokens_per_s"])
    for r in rows:
        if not r.get("ok"):
            out.append(f"{r.get('case', '?'):<21}{r.get('impl', '?'):<9}{r.get('world', 1):>5}{'failed':>10}"
                       f"{r.get('peak_gib') or '':>10}{'':>7}{'':>8}{'':>8}  {r.get('error', '')[-90:]!r}")
            continue
        ratios = ["", ""]
        if r["impl"] == "verlite":
            for i, ref in enumerate([trl.get(r["case"]), PEER.get(r["case"], (None,))[0]]):
                ratios[i] = f"{r['tokens_per_s'] / ref:.2f}x" if ref else ""
        mfu = f"{r['mfu']:.0%}" if r.get("mfu") is not None else ""
        notes = r.get("setting") or (f"budget {r['token_budget']}" if r.get("token_budget") else "")
        if r.get("predicted_gib") is not None:
            notes += f", plan {r['predicted_gib']} GiB (for what ran: {r.get('predicted_run_gib')})" + (f", {r['switches']}" if r.get("switches") else "")
        out.append(f"{r['case']:<21}{r['impl']:<9}{r.get('world', 1):>5}{r['tokens_per_s']:>10}{r['peak_gib'] or 0:>10}"
                   f"{mfu:>7}{ratios[0]:>8}{ratios[1]:>8}  max_length {r.get('max_length')}, {notes}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", choices=["verlite"], help="run one case in this process and print its JSON line")
    p.add_argument("--case", default="full")
    p.add_argument("--cases", default="full,lora")
    p.add_argument("--models", default="/tmp/bench_models", help="where the random-init models are built")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max_length", type=int, default=None, help="override the case's max_length")
    p.add_argument("--trl", action="store_true", help="also run TRL's best setting of each case (bench/trl_bench.py)")
    p.add_argument("--out", default=None, help="append JSON results to this file")
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny model, 1+1 steps: check the cases run")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="export a chrome trace of 2 steps after warm-up per verlite run to DIR/CASE[_vN].json")
    p.add_argument("--no_variants", action="store_true", help="only each case's own setting (no VARIANTS)")
    p.add_argument("extra", nargs="*", help="verlite overrides for every case (key=value)")
    a = p.parse_args()
    if a.smoke:
        a.warmup, a.steps, a.trl = 1, 1, False
    if a.run:
        if a.trace:
            os.environ["VERLITE_BENCH_TRACE"] = a.trace
        if os.environ.get("VERLITE_BENCH_SDPA"):  # e.g. "cudnn,flash": one-sample rows through SDPA
            from torch.nn.attention import SDPBackend

            from verlite.models import attention

            names = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
            wanted = [n.strip().lower() for n in os.environ["VERLITE_BENCH_SDPA"].split(",") if n.strip()]
            if unknown := [n for n in wanted if n not in names and n != "none"]:
                sys.exit(f"VERLITE_BENCH_SDPA: unknown backend(s) {unknown}; use {', '.join(names)} or none")
            # "none": the varlen kernel for every row (an empty list is kept by the trainer's pick)
            attention.SINGLE_SEQUENCE_BACKENDS = [names[n] for n in wanted if n != "none"]
        model = model_dir(Path(a.models), "tiny" if a.smoke else CASES[a.case][0])
        res = run_verlite(a.case, model, a.warmup, a.steps, a.max_length, a.extra, a.smoke)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(res), flush=True)
        return
    rows = []
    for case in a.cases.split(","):
        model = model_dir(Path(a.models), "tiny" if a.smoke else CASES[case][0])
        cmd = [sys.executable, __file__, "--run", "verlite", "--case", case, "--models", a.models,
               "--warmup", str(a.warmup), "--steps", str(a.steps), *(["--smoke"] if a.smoke else []),
               *(["--max_length", str(a.max_length)] if a.max_length else []), *a.extra]  # overrides last
        env = dict(os.environ, **({"VERLITE_BENCH_TRACE": a.trace} if a.trace else {}))
        rows.append(run_case_subprocess(cmd, env))
        print(json.dumps(rows[-1]), flush=True)
        for i, variant in enumerate(VARIANTS.get(case, []) if not a.no_variants else []):
            if a.smoke and any("bitsandbytes" in v for v in variant):
                continue  # bitsandbytes' optimizers are CUDA kernels
            rows.append(run_case_subprocess(cmd + variant, dict(env, VERLITE_BENCH_LABEL=f"_v{i + 1}")))
            print(json.dumps(rows[-1]), flush=True)
        for trl_args in TRL_ARGS.get(case, []) if a.trl else []:
            trl_cmd = [sys.executable, str(HERE / "trl_bench.py"), "--model", str(model), "--case", case,
                       "--warmup", str(a.warmup), "--steps", str(a.steps), *trl_args]
            rows.append(run_case_subprocess(trl_cmd))
            print(json.dumps(rows[-1]), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))


if __name__ == "__main__":
    main()
