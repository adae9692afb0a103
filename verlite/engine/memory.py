"""Predicted peak GPU memory of a training configuration, and the largest micro-batch that
fits a card: what `verlite plan` prints and what `micro_batch_size_per_gpu: auto` uses.

The model is counted exactly (built on the meta device, so nothing is allocated); the
activations come from a per-token, per-layer byte count of what autograd keeps for one
Qwen2/Llama-style decoder layer in bf16. The coefficients were checked against measured
peaks on an H100 (bench/RESULTS.md gives the error).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from verlite.config.load import get_key
from verlite.config.schema import SFTConfig
from verlite.engine.compile import parse_setting
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
    linear_params: int = 0  # weights of the decoder layers' linear layers (what NF4 holds)
    largest_linear: int = 0  # weights of the largest of them (one is dequantized at a time)
    q_dim: int = 0  # attention heads x head dim (the attention output's width)
    heads: int = 1


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

    from verlite.models import liger
    from verlite.models.load import MODEL_BUILD_LOCK, linear_module_names, load_hf_config

    hf_config = load_hf_config(cfg.model)
    liger.finish_import()  # Liger's import (a side thread) and this build both import model code
    with MODEL_BUILD_LOCK, torch.device("meta"):  # the weights may be read meanwhile (models/early_read.py)
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
    linears = [m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    return ModelShape(params=params, trainable=trainable, layer_params=layer_params,
                      linear_params=sum(linears), largest_linear=max(linears, default=0),
                      root_params=params - layer_params * len(layers), hidden=c.hidden_size,
                      intermediate=c.intermediate_size, kv_dim=c.num_key_value_heads * head_dim,
                      layers=len(layers), vocab=c.vocab_size, q_dim=c.num_attention_heads * head_dim,
                      heads=c.num_attention_heads)


def attention_keep_bytes(s: ModelShape) -> float:
    """Per token: what a layer keeping its attention output holds beyond its input."""
    return 2 * (s.q_dim or s.hidden) + 4 * s.heads


def mlp_bytes_per_token(s: ModelShape, lora: bool) -> float:
    return 2 * 4 * s.intermediate if not lora else 2 * 3 * s.intermediate  # gate, up, act(gate) [, act*up]


def activation_bytes_per_token(s: ModelShape, lora: bool, tiled_mlp: bool = False) -> float:
    """Bytes autograd keeps per token per decoder layer (bf16 activations, fp32 norm inputs).

    Full fine-tuning keeps every linear layer's input; a frozen layer's input is only kept
    when something else needs it, which is what LoRA saves. A tiled MLP keeps only its
    input (the second norm's output, counted there)."""
    h, kv = s.hidden, s.kv_dim
    norms = 2 * (4 * h + 2 * h)  # two RMSNorms: fp32 input copy + bf16 output
    attention = 2 * (h + 2 * kv) + 2 * h + 2 * h  # rotated q/k/v, attention output, o_proj input
    mlp = 0 if tiled_mlp else mlp_bytes_per_token(s, lora)
    residual = 2 * 2 * h
    return norms + attention + mlp + residual


def estimate(cfg: SFTConfig, shape: ModelShape, tokens: int, world: int = 1,
             checkpointing: bool | None = None, checkpoint_layers: int | None = None,
             activation_offload: bool | None = None, keep_attention: int | None = None,
             one_micro_batch: bool | None = None) -> Estimate:
    """Peak bytes for micro-batches of `tokens` tokens (padding-free) on one of `world` GPUs.
    With sequence parallelism a micro-batch is split over its SP group: each GPU holds the
    activations of tokens / sp of them (attention's all-to-all buffers are that size too).

    `checkpoint_layers` of the decoder layers are recomputed in backward (None: all of them
    when checkpointing is on); the others keep their activations. `one_micro_batch` says
    whether a step is one micro-batch (None: when `tokens` holds a step of max_length samples)."""
    m = cfg.model
    lora = m.lora_rank > 0
    compiled = parse_setting(m.compile) is True  # `auto` is decided after the plan: planned as eager
    ckpt = m.enable_gradient_checkpointing if checkpointing is None else checkpointing
    ckpt = ckpt is True or ckpt == "auto"  # unresolved auto: planned as the worst case (all layers)
    offload = m.fsdp_config.cpu_offload or m.fsdp_config.offload_params
    fsdp = m.strategy in ("fsdp2", "fsdp") and (world > 1 or offload)
    shard = world if fsdp else 1
    est = Estimate()
    if not offload:
        fused = fused_gradients(cfg, tokens, world) if one_micro_batch is None else \
            (one_micro_batch and cfg.optim.fused_backward is True)
        _weights_and_optimizer(est, cfg, shape, shard, fused)
    if fsdp:  # bf16 copies FSDP gathers: the root and a layer or two in flight (all when not resharded)
        in_flight = shape.layers if not m.fsdp_config.reshard_after_forward else 2
        est.parts["bf16 compute copies"] = (shape.root_params + in_flight * shape.layer_params) * 2
    elif not lora and master_bytes(cfg) == 4:  # autocast's bf16 weight copies are kept for backward
        est.parts["bf16 compute copies"] = shape.params * 2
    if m.quantization and lora:  # one NF4 matrix dequantized at a time, and its transpose in backward
        est.parts["NF4 dequantized weight"] = shape.largest_linear * 2 * 2
    tiled = m.tiled_mlp
    per_layer = activation_bytes_per_token(shape, lora, tiled)
    tokens = -(-tokens // cfg.ulysses_sequence_parallel_size)  # this GPU's share of the sequence
    recomputed = 0 if not ckpt else (shape.layers if checkpoint_layers is None else min(checkpoint_layers, shape.layers))
    kept = shape.layers - recomputed
    # A recomputed layer keeps only its bf16 input, and not even that with activation offload.
    offload_inputs = m.enable_activation_offload if activation_offload is None else activation_offload
    kept_input = 0 if offload_inputs else shape.hidden * 2
    est.parts["activations"] = tokens * (kept * per_layer + recomputed * kept_input)
    # What every layer shares: ids, labels, positions, loss index (int64) and the rotary cos/sin
    # (bf16, with their fp32 source): ~1.6 KB a token at head_dim 128, 0.15 GiB at 100k tokens.
    head_dim = (shape.q_dim or shape.hidden) // max(1, shape.heads)
    est.parts["sequence inputs"] = tokens * (4 * 8 + head_dim * (2 + 4) * 2)
    if offload_inputs and recomputed:  # the input of the layer being recomputed, back from the host
        est.parts["recomputed input (from host)"] = tokens * shape.hidden * 2
    keep = m.keep_attention_layers if keep_attention is None else keep_attention
    keep = min(keep or 0, recomputed)
    if keep:  # recomputed layers that keep attention's output (bf16) and logsumexp (fp32) from forward
        est.parts["kept attention outputs"] = tokens * keep * attention_keep_bytes(shape)
    if m.quantization and lora and kept:
        # A layer that is not recomputed keeps the bf16 weights its NF4 ones were dequantized to
        # (the matmuls save them for the input gradient): seen at the H200's 7B QLoRA peaks
        # (bench/memory_peak.py, 2026-12-02) as 3 x 129.5 MiB MLP + 4 attention matrices a layer.
        est.parts["dequantized weights (kept layers)"] = kept * shape.linear_params / shape.layers * 2
    # Backward of a layer holds its activations (recomputed or kept) plus their gradients; a
    # tiled MLP adds one tile's MLP activations and their gradients. In a compiled LoRA run
    # that recomputes some layers, the layers that are not recomputed (the top ones) need
    # little beyond what they keep: their backward runs first and frees them before any
    # recomputed layer's backward starts, so the step peaks at the loss with every kept layer
    # live (the H200's compiled 7B QLoRA 32k step: 16.86 GiB measured, 21.99 planned with a
    # recomputed layer's working set on top). Everywhere else the working set stays on top: it
    # also covers what eager layers keep beyond the per-layer count (eager activations measured
    # 1.14x that count on a CPU probe of LoRA layers; an eager 0.5B full fine-tune without
    # recomputation peaked 2.4 % above a plan without it, 2026-12-02 H200 rows). The plan
    # assumes eager unless model.compile is true: `auto` decides after the plan.
    if kept == 0 or not lora or not compiled:
        est.parts["backward working set"] = tokens * per_layer
    if kept:
        # At that peak the 32k step also held six fp32 [tokens x hidden] tensors where the layer
        # and the loss below count three (the final norm's input and the hidden states' fp32
        # gradient beside the top layer's own).
        est.parts["fp32 hidden states at the loss"] = tokens * shape.hidden * 4 * 3
    if tiled:
        from verlite.models.tiled_mlp import tile_tokens

        est.parts["MLP tile"] = min(tokens, tile_tokens(shape.hidden)) * mlp_bytes_per_token(shape, lora) * 2
    from verlite.models.loss import chunk_size_for

    chunk = min(tokens, chunk_size_for(shape.vocab))
    # bf16 logits of one chunk (turned into their gradient in place), the bf16 partial LM-head
    # gradient of the chunk, and the gathered hidden states with their gradient.
    est.parts["logits (one chunk)"] = chunk * shape.vocab * 2 + tokens * shape.hidden * 4
    if not lora:  # the LM head's fp32 gradient accumulator and its per-chunk bf16 partial
        est.parts["LM head gradient buffer"] = shape.vocab * shape.hidden * (4 + 2)
    if not offload:
        _update_after_backward(est, cfg, shape, shard)
    return est


# torchao's low-bit AdamW updates one weight at a time with both moments dequantized to fp32
# and an fp32 copy of the weight (stochastic rounding): 12 bytes per element of that weight.
# Measured on the H100 (full1.5b_12g, bf16 master, AdamW8bit, 2026-11-25): a plain step peaked
# at 11.24 GiB = weights + gradients + state (8.63) + 12 B x the 233 M-element tied embedding
# (11.23); planned with 13 B so that the plan stays above a figure rounded to 0.01 GiB.
# AdamW4bit needs more: on the H200 (same case, plain step, 2026-12-01) it ran out of memory
# under the 12 GiB cap in its update (a 1.74 GiB request), so that update needs more than
# (12 - 7.19 held) GiB / 233 M = 22 B per element of the embedding (the run's peak, 11.33 GiB,
# plus the request suggests ~27 B); planned with 32 B.
LOW_BIT_UPDATE_BYTES = 13
LOW_BIT_UPDATE_BYTES_4BIT = 32


def low_bit_update_bytes(cfg: SFTConfig) -> int:
    """Bytes per element of the weight torchao's low-bit AdamW is updating (see above)."""
    from verlite.engine.optim import state_bytes

    return LOW_BIT_UPDATE_BYTES_4BIT if state_bytes(cfg.optim) == 1 else LOW_BIT_UPDATE_BYTES


def _update_after_backward(est: Estimate, cfg: SFTConfig, shape: ModelShape, shard: int) -> None:
    """The peak of the optimizer step when it comes after activations are freed (a plain
    step, or a fused step's tied embedding, whose gradient completes last): weights,
    gradients still held and moments, plus the update's working set on the largest weight.
    Counted only beyond the backward peak the other parts describe."""
    from verlite.engine.optim import state_bytes

    if cfg.optim.optimizer_impl != "torchao.optim" or cfg.model.lora_rank > 0 or state_bytes(cfg.optim) >= 8:
        return
    if cfg.model.fsdp_config.optimizer_offload:
        return
    largest = max(shape.vocab * shape.hidden, shape.largest_linear) / shard
    held = sum(v for k, v in est.parts.items() if k.startswith(("weights", "gradients", "AdamW state")))
    peak = held + largest * low_bit_update_bytes(cfg)
    if peak > est.total:
        est.parts["optimizer step (largest weight in fp32)"] = peak - est.total


def master_bytes(cfg: SFTConfig) -> int:
    """Bytes per trained weight as stored (model.fsdp_config.model_dtype; fp32 by default)."""
    return 2 if cfg.model.fsdp_config.model_dtype in ("bf16", "bfloat16", "fp16", "float16") else 4


def step_tokens(cfg: SFTConfig, world: int = 1) -> int:
    """Tokens of one rank's (SP group's) whole step, at max_length per sample."""
    d = cfg.data
    dp = max(1, world // cfg.ulysses_sequence_parallel_size)
    mb = d.micro_batch_size_per_gpu if isinstance(d.micro_batch_size_per_gpu, int) else 1
    return max(1, (d.train_batch_size or mb * dp) // dp) * d.max_length


def fused_gradients(cfg: SFTConfig, tokens: int, world: int = 1) -> bool:
    """Whether a step of `tokens`-token micro-batches holds no full gradient buffer: the update
    is fused into backward and the step is one micro-batch (earlier micro-batches accumulate)."""
    return cfg.optim.fused_backward is True and tokens >= step_tokens(cfg, world)


def _weights_and_optimizer(est: Estimate, cfg: SFTConfig, shape: ModelShape, shard: int,
                           fused: bool = False) -> None:
    """Weights, gradients and optimizer state on the GPU: an NF4 or bf16 frozen base under
    LoRA (fp32 adapters), or the trained weights in their master dtype; 8/4-bit or fp32
    AdamW moments, none when they live in host memory (optimizer_offload)."""
    from verlite.engine.optim import state_bytes

    m = cfg.model
    if m.lora_rank > 0:  # a frozen base stays in the compute dtype unless model_dtype says otherwise
        base_bytes = 4 if m.fsdp_config.model_dtype in ("fp32", "float32") else 2
        if m.quantization == "nf4":
            from verlite.models.quant import nf4_bytes

            base = nf4_bytes(shape.linear_params) + (shape.params - shape.linear_params) * base_bytes
            est.parts["weights (NF4 base + fp32 LoRA)"] = (base + shape.trainable * 4) / shard
        else:
            est.parts["weights"] = (shape.params * base_bytes + shape.trainable * 4) / shard
        grad_bytes = 4
    else:
        grad_bytes = master_bytes(cfg)
        name = "bf16" if grad_bytes == 2 else "fp32"
        est.parts[f"weights ({name} master)"] = shape.params * grad_bytes / shard
    kind = 'fp32' if grad_bytes == 4 else 'bf16'
    if fused:  # freed as each is applied: the root's (a tied embedding's lives all backward) and a layer's
        live = min(shape.trainable, shape.root_params + shape.layer_params)
        est.parts[f"gradients ({kind}, applied in backward)"] = live * grad_bytes / shard
        if cfg.optim.optimizer_impl == "torchao.optim" and m.lora_rank == 0:
            # torchao's update works on one weight with its moments (and, for stochastic rounding,
            # the weight) in fp32 while activations are still held: an untied LM head is updated
            # first in backward. The same bytes per element as the plain step's update.
            untied = shape.root_params > 1.5 * shape.vocab * shape.hidden
            biggest = shape.vocab * shape.hidden if untied else shape.largest_linear
            est.parts["fused update working set"] = biggest * low_bit_update_bytes(cfg)
    else:
        est.parts[f"gradients ({kind})"] = shape.trainable * grad_bytes / shard
    if m.fsdp_config.optimizer_offload:
        return  # moments (and the fp32 update copy) in host memory
    per = state_bytes(cfg.optim)
    label = {8: "fp32", 2: "8-bit", 1: "4-bit"}.get(per, f"{per} B")
    est.parts[f"AdamW state ({label})"] = shape.trainable * per / shard


def gpu_capacity_gib(cfg: SFTConfig, device: torch.device | None = None) -> float:
    if cfg.trainer.gpu_mem_gb:
        return float(cfg.trainer.gpu_mem_gb)
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    raise VerliteError("no GPU to plan for; pass --gpu_mem_gb N (or set trainer.gpu_mem_gb)")


def fits(cfg: SFTConfig, shape: ModelShape, tokens: int, capacity_gib: float, world: int,
         checkpoint_layers: int, activation_offload: bool | None = None, keep_attention: int | None = None,
         one_micro_batch: bool | None = None) -> bool:
    est = estimate(cfg, shape, tokens, world, checkpointing=checkpoint_layers > 0, checkpoint_layers=checkpoint_layers,
                   activation_offload=activation_offload, keep_attention=keep_attention, one_micro_batch=one_micro_batch)
    return est.total <= capacity_gib * GIB * USABLE


def _fastest_fit(cfg: SFTConfig, shape: ModelShape, capacity_gib: float, world: int) -> tuple[int, int] | None:
    """Aim for a micro-batch holding the rank's whole share of the step (capped at 16k tokens,
    where matmuls are efficient anyway), recomputing as few layers as possible; shrink the
    micro-batch only when even full recomputation cannot fit it."""
    d = cfg.data
    want = max(d.max_length, min(step_tokens(cfg, world), 16384))  # a rank's (SP group's) whole step
    while want >= d.max_length:
        for layers in range(shape.layers + 1):
            if fits(cfg, shape, want, capacity_gib, world, layers):
                return want, layers
        if want == d.max_length:
            break
        want = max(d.max_length, want // 2)
    return None


# ---- small cards (issue 10): memory switches the planner turns on, and the advice when
# nothing fits. A switch changes where tensors wait or how work is split, never the numbers
# a run computes, so `auto` may use them; precision changes (8-bit state, bf16 master
# weights, an NF4 base) are only ever suggested.
SWITCH_WHY = {
    "model.enable_activation_offload": "the recomputed layers' inputs wait in host memory",
    "model.tiled_mlp": "the MLP runs in tiles, never holding [tokens x intermediate] whole",
    "model.fsdp_config.optimizer_offload": "AdamW's state lives in host memory",
}


def _set(cfg: SFTConfig, key: str, value) -> None:
    *path, leaf = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def memory_switches(cfg: SFTConfig, world: int) -> list[str]:
    """The switches still off that could apply, cheapest in time first."""
    m, o = cfg.model, cfg.optim
    keys = ["model.enable_activation_offload", "model.tiled_mlp"]
    if m.lora_rank == 0 and world == 1 and (o.optimizer_impl, o.optimizer) == ("torch.optim", "AdamW") and \
            not (m.fsdp_config.cpu_offload or m.fsdp_config.offload_params):
        keys.append("model.fsdp_config.optimizer_offload")
    return [k for k in keys if not get_key(cfg, k)]


def _switch_until_fit(cfg: SFTConfig, shape: ModelShape, capacity_gib: float, world: int):
    """((tokens, layers), switches turned on) for the fastest fit, turning switches on one by
    one, cheapest first, only while needed; None (and `cfg` as it was) when nothing fits."""
    got = _fastest_fit(cfg, shape, capacity_gib, world)
    if got:
        return got, []
    turned = []
    for key in memory_switches(cfg, world):
        _set(cfg, key, True)
        turned.append(key)
        got = _fastest_fit(cfg, shape, capacity_gib, world)
        if got:
            return got, turned
    for key in turned:
        _set(cfg, key, False)
    return None


def choose_batching(cfg: SFTConfig, shape: ModelShape, capacity_gib: float, world: int = 1) -> tuple[int, int]:
    """(tokens per micro-batch, decoder layers to recompute) for the fastest plan that fits.

    When not even one max_length sample fits as configured, the memory switches are turned
    on one by one, cheapest first, and those that make it fit stay on in `cfg`. Nothing
    fitting raises an error naming the smallest change that would."""
    found = _switch_until_fit(cfg, shape, capacity_gib, world)
    if found:
        got, turned = found
        if turned:
            log.info("plan: %s, because without %s a %d-token sample is predicted not to fit in %.1f GiB",
                     " ".join(f"{k}=true" for k in turned), "it" if len(turned) == 1 else "them",
                     cfg.data.max_length, capacity_gib)
        return got
    raise VerliteError(f"even with gradient checkpointing{_switch_words(cfg, world)} a {cfg.data.max_length}-token "
                       f"sample is predicted not to fit in {capacity_gib:.1f} GiB; "
                       f"{smallest_change(cfg, shape, capacity_gib, world)}")


def _switch_words(cfg: SFTConfig, world: int) -> str:
    names = {"model.enable_activation_offload": "activation offload", "model.tiled_mlp": "tiled MLP",
             "model.fsdp_config.optimizer_offload": "optimizer offload"}
    keys = [k for k in names if get_key(cfg, k)] + memory_switches(cfg, world)
    return "".join(f", {names[k]}" for k in keys)


def _with_all_switches(cfg: SFTConfig, world: int) -> SFTConfig:
    import copy

    trial = copy.deepcopy(cfg)
    for key in memory_switches(trial, world):
        _set(trial, key, True)
    return trial


def _candidates(cfg: SFTConfig) -> list[dict]:
    """Changes to suggest, smallest first (in what they give up)."""
    m, o = cfg.model, cfg.optim
    eight = {"optim.optimizer": "AdamW8bit", "optim.optimizer_impl": "torchao.optim"}
    four = {"optim.optimizer": "AdamW4bit", "optim.optimizer_impl": "torchao.optim"}
    bf16 = {"model.fsdp_config.model_dtype": "bf16"}
    if m.lora_rank > 0:
        return [] if m.quantization else [{"model.quantization": "nf4"}]
    # Turned off by hand, the fused step is the cheapest change: same numbers, no gradient buffer.
    out = [{"optim.fused_backward": True}] if o.fused_backward is False else []
    if o.optimizer not in ("AdamW8bit", "PagedAdamW8bit", "AdamW4bit"):
        out.append(eight)
    if master_bytes(cfg) == 4:
        out.append({**eight, **bf16})
    out += [{**four, **bf16}, {"model.lora_rank": 8}, {"model.lora_rank": 8, "model.quantization": "nf4"}]
    return out


def smallest_change(cfg: SFTConfig, shape: ModelShape, capacity_gib: float, world: int) -> str:
    """The first change under which a max_length sample fits (with the fewest memory switches
    it needs); else the longest max_length that fits; else that the model alone does not."""
    import copy

    for change in _candidates(cfg):
        if change.get("optim.fused_backward") is True and \
                fused_backward_possible(cfg, torch.device("cuda"), world) is not None:
            continue  # this run cannot fuse its step (several ranks, offload, ...)
        trial = copy.deepcopy(cfg)
        for key, value in change.items():
            _set(trial, key, value)
        trial_shape = model_shape(trial) if "model.lora_rank" in change else shape
        found = _switch_until_fit(trial, trial_shape, capacity_gib, world)
        if not found and trial.optim.fused_backward == "auto" and \
                fused_backward_possible(trial, torch.device("cuda"), world) is None:
            trial.optim.fused_backward = True  # what `auto` turns on at run time when it is what fits
            found = _switch_until_fit(trial, trial_shape, capacity_gib, world)
            change = {**change, "optim.fused_backward": "true"} if found else change
        if found:
            (tokens, layers), turned = found
            settings = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                for k, v in {**change, **{k: "true" for k in turned}}.items())
            peak = estimate(trial, trial_shape, tokens, world, layers > 0, layers).total / GIB
            return (f"smallest change that fits: {settings} ({tokens}-token micro-batches, predicted peak {peak:.1f} "
                    "GiB; README 'Small cards' says what each costs)")
    trial = _with_all_switches(cfg, world)
    usable = capacity_gib * GIB * USABLE
    tokens = cfg.data.max_length
    while tokens > 128 and estimate(trial, shape, tokens, world, True).total > usable:
        tokens = int(tokens * 0.9)
    if estimate(trial, shape, tokens, world, True).total <= usable:
        return f"lower data.max_length to {tokens} or less, or use more GPUs / a larger card"
    return "the model alone does not fit: use more GPUs (FSDP2 shards it) or model.fsdp_config.cpu_offload=true"


def data_micro_batch_tokens(cfg: SFTConfig, lengths, world: int, padding_free: bool = False) -> int | None:
    """Tokens of the largest micro-batch this run's samples will form, when that is below what
    the batching allows (micro_batch_tokens: max_length samples throughout); None otherwise.
    A micro-batch found this way is a whole step (callers plan it with one_micro_batch=True).

    The order of the samples is fixed by the seed (data/batching.py), so a run knows its
    steps before the first one: a packed step of 8 samples of at most 1024 tokens planned at
    8192 tokens may never hold more than 5,000, and the layers that memory then spares need
    not be recomputed. Only for one GPU (or SP group), with packed micro-batches (a step that
    fits the budget is one micro-batch) or micro-batches of `micro_batch_size_per_gpu`
    samples (laid out `padding_free` on GPUs: their real tokens; else padded to the longest);
    other runs plan for the budget."""
    d = cfg.data
    if lengths is None or len(lengths) == 0 or world > 1 or cfg.ulysses_sequence_parallel_size > 1:
        return None
    from verlite.data.batching import StepPlan

    budget = micro_batch_tokens(cfg)
    mb = d.micro_batch_size_per_gpu if isinstance(d.micro_batch_size_per_gpu, int) else 1
    global_batch = d.train_batch_size or mb
    if len(lengths) < global_batch:
        return None  # the trainer says so in its own words
    by_count = not d.packing and d.max_token_len_per_gpu is None
    if not d.packing and not by_count:
        return None  # a token budget over padded rows: planned for the budget
    if by_count and global_batch % mb:
        return None  # the trainer refuses it
    plan = StepPlan(lengths, global_batch, 1, cfg.trainer.seed, mb if by_count else None,
                    None if by_count else budget, packed=d.packing)
    steps = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * plan.steps_per_epoch
    if by_count:
        if global_batch != mb:
            return None  # accumulation over several micro-batches: planned for the budget
        largest = plan.largest_step_tokens(steps, padded=not padding_free)
    else:
        largest = plan.largest_step_tokens(steps)
    return largest if largest < budget else None  # a larger step is split into budget-sized micro-batches


def planned_tokens(cfg: SFTConfig, lengths, world: int, padding_free: bool) -> tuple[int, bool]:
    """(tokens of the micro-batches to plan for, whether that is the data's largest step, which
    is then one whole micro-batch): data_micro_batch_tokens where it applies, else the budget."""
    seen = data_micro_batch_tokens(cfg, lengths, world, padding_free)
    return (seen, True) if seen else (micro_batch_tokens(cfg), False)


def resolve_auto_batching(cfg: SFTConfig, device: torch.device, world: int, lengths=None) -> None:
    """Replace `auto` micro-batching with a token budget (and checkpointing) that fits."""
    d = cfg.data
    if d.micro_batch_size_per_gpu == "auto" and d.train_batch_size is None:
        raise VerliteError("data.micro_batch_size_per_gpu is auto: set data.train_batch_size (samples per step) too")
    shape = model_shape(cfg)
    capacity = gpu_capacity_gib(cfg, device)
    budget, layers = choose_batching(cfg, shape, capacity, world)
    d.max_token_len_per_gpu = per_gpu(cfg, budget)
    d.packing = True  # micro-batches grouped by tokens, not by count
    if d.micro_batch_size_per_gpu == "auto":
        d.micro_batch_size_per_gpu = max(1, budget // d.max_length)
    tokens, sized, one = budget, "", None
    seen = data_micro_batch_tokens(cfg, lengths, world, padding_free=True)  # auto batching packs
    fewer = fewest_recomputed(cfg, shape, seen, capacity, world, one_micro_batch=True) if seen and layers else None
    if fewer is not None:  # memory the data leaves unused goes to recomputing fewer layers
        tokens, layers, one = seen, min(layers, fewer), True
        sized = f", sized for the data's largest micro-batch ({seen} tokens)"
    cfg.model.enable_gradient_checkpointing = layers > 0
    cfg.model.checkpoint_layers = layers if 0 < layers < shape.layers else None
    choose_kept_attention(cfg, shape, tokens, layers, capacity, world, one_micro_batch=one)
    predicted = estimate(cfg, shape, tokens, world, layers > 0, layers, one_micro_batch=one).total / GIB
    switches = [f"{k.rsplit('.', 1)[-1]} ({why})" for k, why in SWITCH_WHY.items() if get_key(cfg, k)]
    log.info("auto: %d tokens per micro-batch, %d of %d layers recomputed%s%s (planned for %.1f GiB, predicted peak "
             "%.1f GiB)", budget, layers, shape.layers, sized, "".join(f", {w}" for w in switches), capacity, predicted)


# From this sample length on, attention forward is a large share of a recomputed layer
# (~55% of the GPU time at 32k on an H100): worth memory to run it once. Shorter samples
# spend the memory better on more tokens or fewer recomputed layers.
KEEP_ATTENTION_FROM = 8192


def choose_kept_attention(cfg: SFTConfig, shape: ModelShape, tokens: int, layers: int, capacity_gib: float,
                          world: int, one_micro_batch: bool | None = None) -> None:
    """model.keep_attention_layers unset: as many recomputed layers as the card still holds keep
    their attention output, for long samples; logged with the predicted cost."""
    m = cfg.model
    if m.keep_attention_layers is not None or layers == 0 or cfg.data.max_length < KEEP_ATTENTION_FROM:
        return
    keep = 0
    while keep < layers and fits(cfg, shape, tokens, capacity_gib, world, layers, keep_attention=keep + 1,
                                 one_micro_batch=one_micro_batch):
        keep += 1
    m.keep_attention_layers = keep
    if keep:
        log.info("plan: %d of %d recomputed layers keep their attention output (%.2f GiB), so backward does not "
                 "rerun attention forward there (model.keep_attention_layers)", keep, layers,
                 tokens * keep * attention_keep_bytes(shape) / GIB)


def micro_batch_tokens(cfg: SFTConfig) -> int:
    """Tokens in the largest micro-batch the configured batching can form (per SP group)."""
    d = cfg.data
    if isinstance(d.max_token_len_per_gpu, int):
        return max(d.max_token_len_per_gpu * cfg.ulysses_sequence_parallel_size, d.max_length)
    mb = d.micro_batch_size_per_gpu if isinstance(d.micro_batch_size_per_gpu, int) else 1
    return mb * d.max_length


def fewest_recomputed(cfg: SFTConfig, shape: ModelShape, tokens: int, capacity_gib: float, world: int,
                      one_micro_batch: bool | None = None) -> int | None:
    """The fewest decoder layers to recompute so micro-batches of `tokens` fit; None if none does.
    `one_micro_batch`: each step is one such micro-batch (None: when `tokens` holds a whole step
    of max_length samples)."""
    for layers in range(shape.layers + 1):
        if fits(cfg, shape, tokens, capacity_gib, world, layers, one_micro_batch=one_micro_batch):
            return layers
    return None


def resolve_auto_memory(cfg: SFTConfig, device: torch.device, world: int = 1, lengths=None,
                        padding_free: bool = False) -> bool:
    """Everything `auto` in memory terms, in order: optim.fused_backward, micro-batching,
    gradient checkpointing. `lengths`: the training samples' token counts, when loaded (the
    recomputation is then sized for the largest micro-batch they form; `padding_free`: the
    trainer lays micro-batches out without padding). Returns whether the plan chose
    recomputation (checkpointing or kept attention outputs were auto): an OOM then
    recomputes every layer fully before splitting."""
    was_auto = cfg.model.enable_gradient_checkpointing == "auto" or cfg.model.keep_attention_layers is None
    resolve_fused_backward(cfg, device, world, lengths, padding_free)
    d = cfg.data
    if d.micro_batch_size_per_gpu == "auto" or d.max_token_len_per_gpu == "auto":
        resolve_auto_batching(cfg, device, world, lengths)
    return resolve_checkpointing(cfg, device, world, lengths, padding_free) or was_auto


def fused_backward_possible(cfg: SFTConfig, device: torch.device, world: int) -> str | None:
    """Why the update cannot be fused into backward here (None: it can)."""
    m, o = cfg.model, cfg.optim
    if device.type != "cuda":
        return f"on {device.type} memory is no cap"
    if world > 1 or m.fsdp_config.cpu_offload or m.fsdp_config.offload_params:
        return "FSDP sharding writes gradients itself"
    if m.fsdp_config.optimizer_offload:
        return "the optimizer state is in host memory"
    if o.optimizer.startswith("Paged"):
        return "paged optimizers wait for the GPU after every update"
    return None


def resolve_fused_backward(cfg: SFTConfig, device: torch.device, world: int = 1, lengths=None,
                           padding_free: bool = False) -> None:
    """optim.fused_backward=auto: on only where it lets the step run as fewer micro-batches or
    with fewer recomputed layers than the plain step (its per-weight updates cost host time,
    and clipping acts one step late, so it is not worth it where memory is plentiful)."""
    o = cfg.optim
    if o.fused_backward != "auto":
        return
    o.fused_backward = False
    why_not = fused_backward_possible(cfg, device, world)
    if why_not:
        log.debug("optim.fused_backward auto: off (%s)", why_not)
        return
    import copy

    shape = model_shape(cfg)
    capacity = gpu_capacity_gib(cfg, device)
    on = copy.deepcopy(cfg)
    on.optim.fused_backward = True
    d = cfg.data
    if d.micro_batch_size_per_gpu == "auto" or d.max_token_len_per_gpu == "auto":
        plain, fused = _fastest_fit(cfg, shape, capacity, world), _fastest_fit(on, shape, capacity, world)
        if plain is None and fused is None:
            o.fused_backward = "auto"  # nothing fits: the error's smallest change weighs the fused step itself
            return
        better = fused is not None and (plain is None or fused[0] > plain[0] or
                                         (fused[0] == plain[0] and fused[1] < plain[1]))
        what = (f"{fused[0]}-token micro-batches, {fused[1]} layers recomputed" if fused else "")
        was = (f"{plain[0]}-token micro-batches, {plain[1]} layers recomputed" if plain else "not fitting")
    else:
        tokens, sized = planned_tokens(cfg, lengths, world, padding_free)
        one = True if sized else None
        plain, fused = fewest_recomputed(cfg, shape, tokens, capacity, world, one_micro_batch=one), \
            fewest_recomputed(on, shape, tokens, capacity, world, one_micro_batch=one)
        better = fused is not None and (plain is None or fused < plain)
        what, was = f"{fused} layers recomputed", (f"{plain} layers" if plain is not None else "not fitting")
    if better:
        o.fused_backward = True
        log.info("optim.fused_backward auto: on, each gradient applied and freed in backward: %s (plain step: %s) "
                 "in %.1f GiB; clip_grad uses the previous step's norm", what, was, capacity)


def resolve_checkpointing(cfg: SFTConfig, device: torch.device, world: int = 1, lengths=None,
                          padding_free: bool = False) -> bool:
    """Turn model.enable_gradient_checkpointing=auto into true/false (and checkpoint_layers):
    off when the configured micro-batches fit the card without it, else only as many layers
    as needed. Logs one line saying what and why. Returns whether it was auto (an OOM then
    turns recomputation on for every layer before anything else is split)."""
    m = cfg.model
    if m.enable_gradient_checkpointing != "auto":
        return False
    if device.type != "cuda":
        # Host memory is no cap worth recomputing for; recomputation only costs time there.
        m.enable_gradient_checkpointing = False
        log.info("gradient checkpointing auto: off (on %s nothing caps memory; recomputing would only cost time)",
                 device.type)
        return True
    shape = model_shape(cfg)
    capacity = gpu_capacity_gib(cfg, device)
    tokens, sized = planned_tokens(cfg, lengths, world, padding_free)
    one = True if sized else None
    layers = fewest_recomputed(cfg, shape, tokens, capacity, world, one_micro_batch=one)
    why = (f"{tokens}-token micro-batches" + (" (the largest this data forms)" if sized else "") +
           f" in {capacity:.1f} GiB ({USABLE:.0%} usable)")
    if layers is None:
        layers = shape.layers
        peak = estimate(cfg, shape, tokens, world, True, layers, one_micro_batch=one).total / GIB
        log.info("gradient checkpointing auto: on for all %d layers; even so %s are predicted to need %.1f GiB",
                 shape.layers, why, peak)
    else:
        peak = estimate(cfg, shape, tokens, world, layers > 0, layers, one_micro_batch=one).total / GIB
        if layers == 0:
            log.info("gradient checkpointing auto: off, %s fit without it (predicted peak %.1f GiB)", why, peak)
        else:
            log.info("gradient checkpointing auto: %d of %d layers recomputed, the fewest with which %s fit "
                     "(predicted peak %.1f GiB)", layers, shape.layers, why, peak)
    m.enable_gradient_checkpointing = layers > 0
    m.checkpoint_layers = layers if 0 < layers < shape.layers else None
    return True


def per_gpu(cfg: SFTConfig, budget: int) -> int:
    """data.max_token_len_per_gpu for micro-batches of `budget` tokens: per GPU, as verl
    counts it, so an SP group's micro-batch holds sp times that."""
    return -(-budget // cfg.ulysses_sequence_parallel_size)


def plan_report(cfg: SFTConfig, capacity_gib: float, world: int = 1, lengths=None) -> str:
    """What `verlite plan` prints. `lengths`: the training samples' token counts, when the
    config names its data: the last line then says what a run on one GPU would choose."""
    from verlite.engine.ulysses import check_sp_size
    from verlite.models.load import load_hf_config

    sp = cfg.ulysses_sequence_parallel_size
    if sp != 1:
        check_sp_size(sp, world, load_hf_config(cfg.model), cfg.model.strategy)
    shape = model_shape(cfg)
    as_given = cfg
    if cfg.optim.fused_backward == "auto":  # decided as a run on this card would (a GPU run's rule)
        import copy

        cfg = copy.deepcopy(cfg)
        cfg.trainer.gpu_mem_gb = capacity_gib
        resolve_fused_backward(cfg, torch.device("cuda"), world)
    d = cfg.data
    lines = [f"model: {cfg.model.partial_pretrain}: {shape.params / 1e9:.3f} B parameters, "
             f"{shape.trainable / 1e6:.2f} M trainable ({'LoRA r=%d' % cfg.model.lora_rank if cfg.model.lora_rank else 'full fine-tune'})",
             f"GPU memory planned for: {capacity_gib:.1f} GiB x {world} GPU(s)"]
    if sp > 1:
        lines.append(f"sequence parallel: each micro-batch split over {sp} GPUs (1/{sp} of its activations per GPU), "
                     f"{world // sp} data-parallel group(s)")
    if isinstance(d.micro_batch_size_per_gpu, int) and d.max_token_len_per_gpu in (None, "auto"):
        tokens = d.micro_batch_size_per_gpu * d.max_length
        what = f"micro batch {d.micro_batch_size_per_gpu} x max_length {d.max_length} = {tokens} tokens"
    elif isinstance(d.max_token_len_per_gpu, int):
        tokens = d.max_token_len_per_gpu * sp
        what = f"{tokens} tokens per micro-batch"
    else:
        tokens = None
    if tokens:
        ckpt_setting = cfg.model.enable_gradient_checkpointing
        if ckpt_setting == "auto":
            layers = fewest_recomputed(cfg, shape, tokens, capacity_gib, world)
            layers = shape.layers if layers is None else layers
            est = estimate(cfg, shape, tokens, world, layers > 0, layers)
            ckpt_words = f"auto: {layers} of {shape.layers} layers recomputed"
        else:
            est = estimate(cfg, shape, tokens, world)
            ckpt_words = "on" if ckpt_setting else "off"
        fits = est.total <= capacity_gib * GIB * USABLE
        lines += [f"as configured ({what}, gradient checkpointing {ckpt_words}):", est.table(),
                  f"  -> {'fits' if fits else 'does NOT fit'} ({USABLE:.0%} of {capacity_gib:.1f} GiB usable)"]
    try:
        budget, layers = choose_batching(cfg, shape, capacity_gib, world)
        ckpt = f"model.enable_gradient_checkpointing={'true' if layers else 'false'}"
        if 0 < layers < shape.layers:
            ckpt += f" model.checkpoint_layers={layers}"
        if cfg.model.keep_attention_layers is None and layers and d.max_length >= KEEP_ATTENTION_FROM:
            import copy

            trial = copy.deepcopy(cfg)
            choose_kept_attention(trial, shape, budget, layers, capacity_gib, world)
            if trial.model.keep_attention_layers:
                ckpt += f" model.keep_attention_layers={trial.model.keep_attention_layers}"
        for key in SWITCH_WHY:
            if get_key(cfg, key):
                ckpt += f" {key}=true"
        if cfg.optim.fused_backward is True:
            ckpt += " optim.fused_backward=true"
        lines.append(f"fastest plan that fits: {budget} tokens per micro-batch, {layers} of {shape.layers} layers "
                     f"recomputed: data.packing=true data.max_token_len_per_gpu={per_gpu(cfg, budget)} {ckpt} "
                     "(or data.micro_batch_size_per_gpu=auto)")
    except VerliteError as e:
        lines.append(str(e))
    if lengths is not None:
        lines.append(_data_line(as_given, shape, capacity_gib, world, lengths))
    elif cfg.model.enable_gradient_checkpointing == "auto":
        lines.append("planned for micro-batches of max_length samples throughout; on one GPU a run sizes "
                     "recomputation for the largest micro-batch its data forms (name data.train_files to see it)")
    return "\n".join(lines)


def _data_line(cfg: SFTConfig, shape: ModelShape, capacity_gib: float, world: int, lengths) -> str:
    """What a run of this config on these samples would choose (a GPU run's rules: micro-batches
    laid out padding-free)."""
    import copy

    trial = copy.deepcopy(cfg)
    trial.trainer.gpu_mem_gb = capacity_gib
    head = f"with data.train_files ({len(lengths)} sample(s), longest {int(max(lengths))} tokens)"
    try:
        resolve_auto_memory(trial, torch.device("cuda"), world, lengths, padding_free=True)
    except VerliteError as e:
        return f"{head}: {e}"
    tokens, sized = planned_tokens(trial, lengths, world, padding_free=True)
    m = trial.model
    layers = (m.checkpoint_layers or shape.layers) if m.enable_gradient_checkpointing else 0
    peak = estimate(trial, shape, tokens, world, layers > 0, layers, one_micro_batch=True if sized else None).total
    where = f"its largest micro-batch holds {tokens} tokens" if sized else f"micro-batches of up to {tokens} tokens"
    fused = ", optimizer step fused into backward" if trial.optim.fused_backward is True else ""
    verdict = "" if peak <= capacity_gib * GIB * USABLE else " -- does NOT fit"
    return (f"{head}: {where} -> {layers} of {shape.layers} layers recomputed{fused} "
            f"(predicted peak {peak / GIB:.1f} GiB of {capacity_gib:.1f}){verdict}")


def apply_memory_cap(gpu_mem_gb: float | None, device: torch.device) -> None:
    """Make trainer.gpu_mem_gb a real limit, so a run planned for a 24 GB card behaves like one."""
    if not gpu_mem_gb or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if gpu_mem_gb < total:
        torch.cuda.set_per_process_memory_fraction(gpu_mem_gb / total, device)
        log.info("GPU memory capped at %.1f of %.1f GiB (trainer.gpu_mem_gb)", gpu_mem_gb, total)


def oom_recompute(model, optimizer, cfg: SFTConfig) -> bool:
    """After an OOM under gradient checkpointing auto: recompute every decoder layer and say
    so; False when all of them already were (the caller then splits micro-batches)."""
    from verlite.models.checkpointing import recompute_every_layer

    turned = recompute_every_layer(model, cfg.model.enable_activation_offload)
    if not turned:
        return False
    cfg.model.keep_attention_layers = 0
    optimizer.zero_grad(set_to_none=True)  # a half-done backward left partial gradients
    torch.cuda.empty_cache()
    cfg.model.enable_gradient_checkpointing, cfg.model.checkpoint_layers = True, None
    log.warning("out of GPU memory: %d layer(s) now recompute fully in backward (planned by auto), step retried", turned)
    return True
