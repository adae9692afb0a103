"""Ulysses sequence parallelism: one packed micro-batch row split along the sequence over
the N ranks of a sequence-parallel (SP) group.

Everything outside attention works token by token, so each rank runs embeddings, MLPs,
norms and the loss on its own 1/N of the tokens. Attention needs the whole sequence: an
all-to-all before it turns [my tokens, all heads] into [all tokens, my H/N heads], every
rank attends over the full packed row (cu_seqlens keep samples apart) for its heads, and
the reverse all-to-all brings [my tokens, all heads] back for o_proj.

Ranks are laid out as a (dp, sp) mesh: an SP group is N consecutive ranks, all fed the
same micro-batches (data-parallel rank = rank // N). FSDP2 still shards the parameters
over the whole world. Numerics stay those of one process: each rank's loss is the sum over
its share of the loss tokens, the step divides by the step's global loss-token count (the
shares of an SP group add up to the micro-batch's count, so nothing is counted twice), and
the gradient of a parameter is the sum of every rank's contribution - the token-wise
layers' from their own tokens, attention's through the all-to-all's backward (the
reverse all-to-all) - which FSDP's reduce-scatter averages over the world and the step's
world-size scale turns back into that sum.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.distributed as dist

from verlite.data.batching import IGNORE_INDEX, MicroBatch
from verlite.engine.distributed import DistInfo
from verlite.errors import VerliteError

NAME = "verlite_ulysses"
KEY = "ulysses_sequence_parallel_size"


def check_sp_size(sp: int, world: int, hf_config, strategy: str) -> None:
    """Refuse, before any weights are read, an SP size the world or the model cannot split by."""
    if sp < 1:
        raise VerliteError(f"{KEY}={sp} must be 1 (off) or more ranks per sequence")
    if sp == 1:
        return
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % sp:
        raise VerliteError(f"{KEY}={sp} does not divide the model's {heads} attention heads "
                           f"(num_attention_heads); use a divisor of {heads}")
    if kv_heads % sp and sp % kv_heads:
        # Fewer KV heads than ranks are repeated up to one per rank, which needs sp % kv_heads == 0.
        raise VerliteError(f"{KEY}={sp} does not divide the model's {kv_heads} key/value heads "
                           f"(num_key_value_heads) nor is a multiple of them; use a divisor of {kv_heads} "
                           f"or a multiple of it that divides {heads}")
    if world % sp:
        raise VerliteError(f"{KEY}={sp} does not divide the {world} process(es); launch a multiple of {sp} "
                           f"(torchrun --nproc_per_node) or set {KEY} to a divisor of {world}")
    if strategy not in ("fsdp2", "fsdp"):
        raise VerliteError(f"{KEY}={sp} needs model.strategy=fsdp2 (the SP ranks' gradients are combined by FSDP); "
                           f"model.strategy is {strategy}")


def setup(sp: int, dist_info: DistInfo) -> DistInfo:
    """`dist_info` with its SP group: a (dp, sp) device mesh whose sp rows are consecutive ranks."""
    if sp == 1:
        return dist_info
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size // sp, sp), mesh_dim_names=("dp", "sp"))
    return dataclasses.replace(dist_info, sp_size=sp, sp_group=mesh["sp"].get_group())


def use_ulysses_attention(hf_model, group) -> None:
    """Switch the model's attention layers to the SP wrapper around verlite's attention."""
    from transformers import AttentionInterface

    from verlite.models.sft_model import unwrap_peft

    # torch.compile (model.compile) cannot trace the collectives: attention runs eagerly between
    # the compiled parts of the layer. Applied here, not as a decorator, so that importing this
    # module does not import torch._dynamo (~700 modules, seconds of every launch on slow disks).
    attention = torch.compiler.disable(functools.partial(ulysses_attention, sp_group=group))
    AttentionInterface.register(NAME, attention)
    # The setter reaches every sub-config; attention layers read it on each forward.
    unwrap_peft(hf_model).config._attn_implementation = NAME


# ---- the all-to-alls ---------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Chunk j of dim 0 goes to rank j; chunk j of the result came from rank j. Backward is
    the same exchange (the gradient of chunk j goes back to the rank it came from)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # before empty_like, which would copy a view's strides
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad.contiguous(), ctx.group), None


def seq_to_heads(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Each [1, H_i, t, D] (all heads, my t tokens) -> [1, H_i/N, N*t, D] (my heads, every
    token). q, k and v travel in one all-to-all: one collective per layer instead of three."""
    sp = dist.get_world_size(group)
    parts = [x[0].reshape(sp, x.shape[1] // sp, *x.shape[2:]) for x in tensors]  # [rank of head group, ...]
    heads = [p.shape[1] for p in parts]
    if len({(p.shape[2:], p.dtype) for p in parts}) == 1:
        joined = _AllToAll.apply(torch.cat(parts, dim=1), group)  # [rank whose tokens, my heads, t, D]
        parts = joined.split(heads, dim=1)
    else:  # e.g. value heads of another width: one exchange each
        parts = [_AllToAll.apply(p, group) for p in parts]
    return [p.transpose(0, 1).reshape(1, h, sp * p.shape[2], p.shape[3]) for p, h in zip(parts, heads)]


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[1, N*t, H/N, D] (every token, my heads) -> [1, t, H, D] (my tokens, all heads)."""
    sp = dist.get_world_size(group)
    _, total, h, d = x.shape
    parts = _AllToAll.apply(x[0].reshape(sp, total // sp, h, d), group)  # [rank whose heads, my t, H/N, D]
    return parts.transpose(0, 1).reshape(1, total // sp, sp * h, d)


def ulysses_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, sp_group, **kwargs):
    """transformers' attention contract on this rank's tokens; cu_seq_lens describe the whole row."""
    from verlite.models.attention import verlite_attention

    sp = dist.get_world_size(sp_group)
    if key.shape[1] < sp:  # GQA with fewer KV heads than ranks: one (repeated) KV head per rank
        rep = sp // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    q, k, v = seq_to_heads([query, key, value], sp_group)
    out, _ = verlite_attention(module, q, k, v, None, scaling=scaling, dropout=dropout, **kwargs)
    return heads_to_seq(out, sp_group), None


# ---- the data --------------------------------------------------------------------------
def shard_micro_batch(mb: MicroBatch, dist_info: DistInfo) -> MicroBatch:
    """This rank's contiguous 1/N of a packed row (unchanged without SP).

    The row is padded to a multiple of N with a segment of its own (no loss, attends only
    to itself); labels were shifted before the split, so every position's target is local.
    cu_seqlens and max_seqlen keep describing the whole row: attention sees all of it."""
    sp = dist_info.sp_size
    if sp == 1:
        return mb
    if mb.cu_seqlens is None or mb.input_ids.shape[0] != 1:
        raise ValueError("sequence parallelism splits packed rows only")
    total = mb.input_ids.shape[1]
    pad = -total % sp
    ids, labels, pos, cu = mb.input_ids, mb.labels, mb.position_ids, mb.cu_seqlens
    if pad:
        ids = torch.cat([ids, ids.new_zeros(1, pad)], dim=1)
        labels = torch.cat([labels, labels.new_full((1, pad), IGNORE_INDEX)], dim=1)
        pos = torch.cat([pos, torch.arange(pad, dtype=pos.dtype)[None]], dim=1)
        cu = torch.cat([cu, cu.new_tensor([total + pad])])
    local = (total + pad) // sp
    s = slice(dist_info.sp_rank * local, (dist_info.sp_rank + 1) * local)
    labels = labels[:, s].contiguous()
    loss_index = torch.from_numpy(np.flatnonzero(labels[0].numpy() != IGNORE_INDEX))
    real = max(0, min(total, s.stop) - s.start)
    return dataclasses.replace(mb, input_ids=ids[:, s].contiguous(), labels=labels, position_ids=pos[:, s].contiguous(),
                               cu_seqlens=cu, loss_index=loss_index, max_seqlen=max(mb.max_seqlen, pad),
                               num_tokens=real, num_loss_tokens=len(loss_index))
