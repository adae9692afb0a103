"""Ulysses sequence parallelism on real kernels: one packed row, split over the ranks of one
SP group, gives the loss and gradients of the whole row on one rank (bf16 varlen flash
attention on GPUs, where the CPU tests cannot look), and how long each takes.

    torchrun --standalone --nproc_per_node=2 bench/ulysses_check.py MODEL_DIR [--tokens 16384]
    torchrun --standalone --nproc_per_node=2 bench/ulysses_check.py --smoke   # CPU, gloo, tiny model

Every rank runs the reference (the whole row, no SP) itself, then its 1/N share with the
SP attention; gradients of the shares are summed over the group and compared. Rank 0
prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

from gpu_checks import random_samples
from verlite.config.schema import ModelConfig
from verlite.data.batching import collate
from verlite.engine import ulysses
from verlite.engine.distributed import init_distributed, shutdown
from verlite.models import attention
from verlite.models.load import load_model
from verlite.models.sft_model import SFTModel


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    attention.register()
    torch.manual_seed(0)  # the same weights on every rank
    config = Qwen2Config(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, attn_implementation=attention.NAME)
    return Qwen2ForCausalLM(config)


def loss_and_grads(model: SFTModel, mb, device) -> tuple[float, list[torch.Tensor], float]:
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    loss = model(mb.to(device))
    loss.backward()
    sync()
    seconds = time.perf_counter() - start
    return loss.item(), [p.grad.float().clone() for p in model.parameters() if p.grad is not None], seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of the packed row (about)")
    args = parser.parse_args()
    info = init_distributed("cpu" if args.smoke else "auto")
    sp = info.world_size
    if args.smoke:
        hf, tokens = tiny_model(), 1000
    else:
        dtype = torch.bfloat16 if info.device.type == "cuda" else torch.float32
        hf = load_model(ModelConfig(partial_pretrain=args.model, enable_gradient_checkpointing=False), dtype)
        tokens = args.tokens
    model = SFTModel(hf).to(info.device)
    ds = random_samples(0, max(2, tokens // 500))  # 100-900 tokens each: about 500
    row = collate(ds, list(range(len(ds))), True, 0)

    loss_ref, grads_ref, t_ref = loss_and_grads(model, row, info.device)
    loss_ref, grads_ref, t_ref = loss_and_grads(model, row, info.device)  # the first call warms up

    info = ulysses.setup(sp, info)
    ulysses.use_ulysses_attention(hf, info.sp_group)
    share = ulysses.shard_micro_batch(row, info)
    loss_sp, grads_sp, _ = loss_and_grads(model, share, info.device)
    loss_sp, grads_sp, t_sp = loss_and_grads(model, share, info.device)
    total = torch.tensor([loss_sp], dtype=torch.float64, device=info.device)
    dist.all_reduce(total, group=info.sp_group)
    for g in grads_sp:
        dist.all_reduce(g, group=info.sp_group)
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(grads_sp, grads_ref)))
    norm = torch.sqrt(sum((b ** 2).sum() for b in grads_ref))
    result = {"sp": sp, "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
              "tokens": row.num_tokens, "samples": row.num_samples, "loss_ref": loss_ref, "loss_sp": total.item(),
              "loss_rel_err": abs(total.item() - loss_ref) / abs(loss_ref), "grad_rel_err": (diff / norm).item(),
              "fwd_bwd_s_one_rank_whole_row": round(t_ref, 4), "fwd_bwd_s_sp_share": round(t_sp, 4)}
    if info.is_main:
        print(json.dumps(result))
    tol = 1e-5 if hf.dtype == torch.float32 else 2e-2
    ok = result["loss_rel_err"] < tol and result["grad_rel_err"] < 10 * tol
    shutdown()
    if not ok:
        raise SystemExit(f"SP differs from the whole row beyond {tol}: {result}")


if __name__ == "__main__":
    main()
