"""The attention function verlite trains with, registered with transformers as "verlite".

One function serves both batch layouts, so the model never needs a dense mask:
- right-padded rows: plain causal SDPA. Real tokens come before the padding and causal
  attention never looks ahead, so they never see it; padded positions carry no loss.
- packed rows (`cu_seq_lens_q` passed through the model's kwargs): attention restricted to
  each sample. On CUDA through PyTorch's varlen flash kernel; elsewhere segment by segment
  with SDPA, which is exact and what the CPU tests compare against.
- a packed row of ONE sample (long-context runs: batch 1) is plain causal attention, so on
  CUDA it can go to SDPA's backends in the order SINGLE_SEQUENCE_BACKENDS gives (None: the
  varlen kernel, as every other row). `bench/attention_check.py` times the candidates.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

NAME = "verlite"


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch without the varlen API
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    # The causal flag changed spelling between torch releases.
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    return varlen_attn, {"causal": causal, "gqa": "enable_gqa" in params}


_VARLEN, _VARLEN_ARGS = _varlen_kernel()

# SDPA backends (torch.nn.attention.SDPBackend, in order of preference) for a packed row that
# holds one sample on CUDA; None keeps the varlen kernel for it.
SINGLE_SEQUENCE_BACKENDS: list | None = None


def supports_varlen(device: torch.device) -> bool:
    """Whether packed rows run on the fused varlen kernel (else segment by segment)."""
    return _VARLEN is not None and device.type == "cuda"


def _segments_sdpa(q, k, v, cu: torch.Tensor, scale):
    """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D], causal within each segment."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    gqa = q.shape[1] != k.shape[1]
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                               is_causal=True, scale=scale, enable_gqa=gqa)
            out[s:e] = o.transpose(0, 1)
    return out


def _single_sequence(q, k, v, scale):
    """[T, Hq, D] causal attention over one sample through SDPA's preferred backends."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(SINGLE_SEQUENCE_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def one_sample(cu: torch.Tensor) -> bool:
    """Does this packed row go to SDPA whole: SDPA backends are set and the row holds exactly
    one sample (cu = [0, T]; read from the shape, not the values: no host sync)."""
    return bool(SINGLE_SEQUENCE_BACKENDS) and cu.shape[0] == 2


def _varlen(q, k, v, cu, max_len, scale):
    if _VARLEN is None or q.device.type != "cuda":
        return _segments_sdpa(q, k, v, cu, scale)
    if one_sample(cu):
        return _single_sequence(q, k, v, scale)
    kwargs = dict(_VARLEN_ARGS["causal"], scale=scale)
    if q.shape[1] != k.shape[1]:
        if _VARLEN_ARGS["gqa"]:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _VARLEN(q, k, v, cu, cu, max_len, max_len, **kwargs)


def verlite_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function contract: q/k/v [B, H, T, D] -> ([B, T, H, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        gqa = query.shape[1] != key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1,
                                             dropout_p=dropout if module.training else 0.0,
                                             scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError("packed batches hold a single row")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # autocast does not know the varlen op; the flash kernel takes only half precision.
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = _varlen(q, k, v, cu, int(kwargs.get("max_length_q") or q.shape[0]), scaling)
    return out[None], None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, verlite_attention)
