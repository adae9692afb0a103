"""Predicted peak GPU memory of a training configuration, and the largest micro-batch that
fits a card: what `verlite plan` prints and what `micro_batch_size_per_gpu: auto` uses.

The model is counted exactly (built on the meta device, so nothing is allocated); the
activations come from a per-token, per-layer byte count of what autograd keeps for one
Qwen2/Llama-style decoder layer in bf16. The coefficients were checked against measured
peaks on an H100 (bench/RESULTS.md gives the error).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from verlite.config.schema import SFTConfig
from verlite.errors import VerliteError

log = logging.getLogger("verlite.plan")

GIB = 2**30
# The caching allocator rounds and fragments; plan for this share of the card.
USABLE = 0.92


@dataclass
class ModelShape:
    params: int
    trainable: int
    layer_params: int
    root_params: int  # embeddings, final norm, untied LM head: everything outside the layers
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    vocab: int


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self) -> str:
        rows = [f"  {k:<34}{v / GIB:8.2f} GiB" for k, v in self.parts.items()]
        return "\n".join(rows + [f"  {'total (peak, predicted)':<34}{self.total / GIB:8.2f} GiB"])


def model_shape(cfg: SFTConfig) -> ModelShape:
    from transformers import AutoModelForCausalLM

    from verlite.models.load import linear_module_names, load_hf_config

    hf_config = load_hf_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    params = sum(p.numel() for p in model.parameters())
    layers = list(model.get_decoder().layers)
    layer_params = sum(p.numel() for p in layers[0].parameters())
    trainable = params
    if cfg.model.lora_rank > 0:
        targets = cfg.model.target_modules
        if targets == "all-linear":
            targets = [n for n in linear_module_names(model) if n != "lm_head"]
        r = cfg.model.lora_rank
        trainable = sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and "lm_head" not in name)
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelShape(params=params, trainable=trainable, layer_params=layer_params,
                      root_params=params - layer_params * len(layers), hidden=c.hidden_size,
                      intermediate=c.intermediate_size, kv_dim=c.num_key_value_heads * head_dim,
                      layers=len(layers), vocab=c.vocab_size)


def activation_bytes_per_token(s: ModelShape, lora: bool) -> float:
    """Bytes autograd keeps per token per decoder layer (bf16 activations, fp32 norm inputs).

    Full fine-tuning keeps every linear layer's input; a frozen layer's input is only kept
    when something else needs it, which is what LoRA saves."""
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    norms = 2 * (4 * h + 2 * h)  # two RMSNorms: fp32 input copy + bf16 output
    attention = 2 * (h + 2 * kv) + 2 * h + 2 * h  # rotated q/k/v, attention output, o_proj input
    mlp = 2 * 4 * i if not lora else 2 * 3 * i  # gate, up, act(gate) [, act*up as down_proj input]
    residual = 2 * 2 * h
    return norms + attention + mlp + residual


def estimate(cfg: SFTConfig, shape: ModelShape, tokens: int, world: int = 1,
             checkpointing: bool | None = None) -> Estimate:
    """Peak bytes for micro-batches of `tokens` tokens (padding-free) on one of `world` GPUs."""
    m = cfg.model
    lora = m.lora_rank > 0
    ckpt = m.enable_gradient_checkpointing if checkpointing is None else checkpointing
    offload = m.fsdp_config.cpu_offload or m.fsdp_config.offload_params
    est = Estimate()
    frozen = shape.params if lora else 0
    master = 2 if lora and not m.fsdp_config.model_dtype else 4  # a frozen LoRA base stays bf16
    if not offload:
        est.parts["weights (sharded)"] = (frozen * master + shape.trainable * 4) / world if lora \
            else shape.params * 4 / world
        est.parts["gradients (fp32, sharded)"] = shape.trainable * 4 / world
        est.parts["AdamW state (fp32, sharded)"] = shape.trainable * 8 / world
    # bf16 copies FSDP gathers for compute: the root, and a layer or two in flight (all of them
    # when nothing is resharded after forward).
    in_flight = shape.layers if not m.fsdp_config.reshard_after_forward else 2
    est.parts["bf16 compute copies"] = (shape.root_params + in_flight * shape.layer_params) * 2
    per_layer = activation_bytes_per_token(shape, lora)
    if ckpt:
        est.parts["activations (checkpointed)"] = tokens * (shape.layers * shape.hidden * 2 + per_layer)
    else:
        est.parts["activations"] = tokens * shape.layers * per_layer
    from verlite.models.loss import chunk_size_for

    chunk = min(tokens, chunk_size_for(shape.vocab))
    # bf16 logits of one chunk (turned into their gradient in place), the bf16 partial LM-head
    # gradient of the chunk, and the gathered hidden states with their gradient.
    est.parts["logits (one chunk)"] = chunk * shape.vocab * 2 + shape.vocab * shape.hidden * 2 * (not lora) \
        + tokens * shape.hidden * 4
    if not lora:  # the LM head's fp32 gradient accumulator of the chunked loss
        est.parts["LM head gradient buffer"] = shape.vocab * shape.hidden * 4
    return est


def gpu_capacity_gib(cfg: SFTConfig, device: torch.device | None = None) -> float:
    if cfg.trainer.gpu_mem_gb:
        return float(cfg.trainer.gpu_mem_gb)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    raise VerliteError("no GPU to plan for; pass --gpu_mem_gb N (or set trainer.gpu_mem_gb)")


def largest_budget(cfg: SFTConfig, shape: ModelShape, capacity_gib: float, world: int = 1,
                   checkpointing: bool | None = None) -> int:
    """The most tokens per micro-batch whose predicted peak fits `capacity_gib` (0: none fit)."""
    limit = capacity_gib * GIB * USABLE
    lo, hi = 0, 1 << 20
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(cfg, shape, mid, world, checkpointing).total <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def choose_batching(cfg: SFTConfig, shape: ModelShape, capacity_gib: float, world: int = 1) -> tuple[int, bool]:
    """(token budget, gradient checkpointing): checkpointing only when a max_length sample
    would not fit without it. The budget is a whole number of max_length samples at least."""
    need = cfg.data.max_length
    budget = largest_budget(cfg, shape, capacity_gib, world, checkpointing=False)
    if budget >= need:
        return budget, False
    budget = largest_budget(cfg, shape, capacity_gib, world, checkpointing=True)
    if budget < need:
        raise VerliteError(f"even with gradient checkpointing a {need}-token sample is predicted not to fit in "
                           f"{capacity_gib:.1f} GiB (max {budget} tokens); lower data.max_length, use LoRA, or "
                           "set model.fsdp_config.cpu_offload=true")
    return budget, True


def resolve_auto_batching(cfg: SFTConfig, device: torch.device, world: int) -> None:
    """Replace `auto` micro-batching with a token budget (and checkpointing) that fits."""
    d = cfg.data
    if d.micro_batch_size_per_gpu == "auto" and d.train_batch_size is None:
        raise VerliteError("data.micro_batch_size_per_gpu is auto: set data.train_batch_size (samples per step) too")
    shape = model_shape(cfg)
    capacity = gpu_capacity_gib(cfg, device)
    budget, ckpt = choose_batching(cfg, shape, capacity, world)
    budget = min(budget, max(d.max_length, d.train_batch_size // world * d.max_length if d.train_batch_size else 0))
    d.max_token_len_per_gpu = budget
    d.packing = True  # micro-batches grouped by tokens, not by count
    if d.micro_batch_size_per_gpu == "auto":
        d.micro_batch_size_per_gpu = max(1, budget // d.max_length)
    cfg.model.enable_gradient_checkpointing = ckpt
    log.info("auto: %d tokens per micro-batch, gradient checkpointing %s (plan for %.1f GiB, predicted peak %.1f GiB)",
             budget, "on" if ckpt else "off", capacity, estimate(cfg, shape, budget, world, ckpt).total / GIB)


def plan_report(cfg: SFTConfig, capacity_gib: float, world: int = 1) -> str:
    shape = model_shape(cfg)
    d = cfg.data
    lines = [f"model: {cfg.model.partial_pretrain}: {shape.params / 1e9:.3f} B parameters, "
             f"{shape.trainable / 1e6:.2f} M trainable ({'LoRA r=%d' % cfg.model.lora_rank if cfg.model.lora_rank else 'full fine-tune'})",
             f"GPU memory planned for: {capacity_gib:.1f} GiB x {world} GPU(s)"]
    if isinstance(d.micro_batch_size_per_gpu, int) and d.max_token_len_per_gpu in (None, "auto"):
        tokens = d.micro_batch_size_per_gpu * d.max_length
        what = f"micro batch {d.micro_batch_size_per_gpu} x max_length {d.max_length} = {tokens} tokens"
    elif isinstance(d.max_token_len_per_gpu, int):
        tokens = d.max_token_len_per_gpu
        what = f"{tokens} tokens per micro-batch"
    else:
        tokens = None
    if tokens:
        est = estimate(cfg, shape, tokens, world)
        fits = est.total <= capacity_gib * GIB * USABLE
        lines += [f"as configured ({what}, gradient checkpointing "
                  f"{'on' if cfg.model.enable_gradient_checkpointing else 'off'}):", est.table(),
                  f"  -> {'fits' if fits else 'does NOT fit'} ({USABLE:.0%} of {capacity_gib:.1f} GiB usable)"]
    try:
        budget, ckpt = choose_batching(cfg, shape, capacity_gib, world)
        lines.append(f"largest that fits: {budget} tokens per micro-batch "
                     f"({budget // d.max_length} samples of max_length {d.max_length}), gradient checkpointing "
                     f"{'on' if ckpt else 'off'}: set data.max_token_len_per_gpu={budget} data.packing=true"
                     f"{' model.enable_gradient_checkpointing=true' if ckpt else ' model.enable_gradient_checkpointing=false'}"
                     " (or micro_batch_size_per_gpu=auto)")
    except VerliteError as e:
        lines.append(str(e))
    return "\n".join(lines)


def apply_memory_cap(gpu_mem_gb: float | None, device: torch.device) -> None:
    """Make trainer.gpu_mem_gb a real limit, so a run planned for a 24 GB card behaves like one."""
    if not gpu_mem_gb or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if gpu_mem_gb < total:
        torch.cuda.set_per_process_memory_fraction(gpu_mem_gb / total, device)
        log.info("GPU memory capped at %.1f of %.1f GiB (trainer.gpu_mem_gb)", gpu_mem_gb, total)
