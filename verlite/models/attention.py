"""The attention function verlite trains with, registered with transformers as "verlite".

One function serves both batch layouts, so the model never needs a dense mask:
- right-padded rows: plain causal SDPA. Real tokens come before the padding and causal
  attention never looks ahead, so they never see it; padded positions carry no loss.
- packed rows (`cu_seq_lens_q` passed through the model's kwargs): attention restricted to
  each sample. On CUDA through PyTorch's varlen flash kernel; elsewhere segment by segment
  with SDPA, which is exact and what the CPU tests compare against.
- a long packed row of ONE sample (long-context runs: batch 1) is plain causal attention, so
  on CUDA it goes to SDPA's backends in the order SINGLE_SEQUENCE_BACKENDS gives (None: the
  varlen kernel, as every other row). On Hopper that is cuDNN first: `bench/attention_check.py`
  measured cuDNN's attention 1.7x the varlen flash kernel at 8k-32k tokens on the H200, and a
  trace of the 7B QLoRA step at ~26k tokens 43 % less time in attention (bench/RESULTS.md).
  cuDNN builds a graph for every new length: ~110 ms a step in that trace (forward, the
  recomputed forward, backward). So a row goes there only from SINGLE_SEQUENCE_MIN_TOKENS on,
  set per model where the attention it saves is at least twice that (the saving grows with
  layers x query width x tokens^2): ~14k tokens for a 7B shape, ~31k for a 0.5B one. Other
  GPUs keep the varlen kernel (cuDNN's speed there is not measured).
"""

from __future__ import annotations

import inspect
import math

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
# holds one sample of at least SINGLE_SEQUENCE_MIN_TOKENS on CUDA; None keeps the varlen kernel
# for it. Set by pick_single_sequence_backends for the training device and model (module
# globals, so the compiled layers read constants).
SINGLE_SEQUENCE_BACKENDS: list | None = None
SINGLE_SEQUENCE_MIN_TOKENS = 16384
# The H200 trace behind the threshold: a 7B shape (28 layers x 3584 query width) at 25.7k
# tokens saved 0.72 s of attention a step with cuDNN; new-length graph builds cost ~0.11 s.
_MEASURED_SAVING_S, _MEASURED_WIDTH, _MEASURED_TOKENS, _BUILD_S = 0.72, 28 * 3584, 25_700, 0.11


def min_tokens_for_cudnn(layers: int, query_width: int) -> int:
    """Shortest one-sample row whose cuDNN saving is at least twice the graph builds."""
    scale = 2 * _BUILD_S / _MEASURED_SAVING_S * _MEASURED_WIDTH / max(1, layers * query_width)
    return int(_MEASURED_TOKENS * math.sqrt(scale))


def pick_single_sequence_backends(device: torch.device, hf_config=None) -> list | None:
    """cuDNN then flash on Hopper (measured there), None (the varlen kernel) elsewhere, with
    the row length from which it pays for this model (`hf_config`). Leaves a choice already
    made by hand (bench.py's VERLITE_BENCH_SDPA) as it is."""
    global SINGLE_SEQUENCE_BACKENDS, SINGLE_SEQUENCE_MIN_TOKENS
    if SINGLE_SEQUENCE_BACKENDS is None and device.type == "cuda" and supports_varlen(device) \
            and torch.cuda.get_device_capability(device)[0] == 9:
        from torch.nn.attention import SDPBackend

        SINGLE_SEQUENCE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
        if hf_config is not None:
            heads = hf_config.num_attention_heads
            head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
            SINGLE_SEQUENCE_MIN_TOKENS = min_tokens_for_cudnn(hf_config.num_hidden_layers, heads * head_dim)
    return SINGLE_SEQUENCE_BACKENDS


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


def one_sample(cu: torch.Tensor, tokens: int) -> bool:
    """Does this packed row go to SDPA whole: SDPA backends are set and the row holds exactly
    one sample (cu = [0, T]; read from the shape, not the values: no host sync) of at least
    SINGLE_SEQUENCE_MIN_TOKENS tokens."""
    # The length first: with the row's sample count dynamic under torch.compile, testing it
    # first would add a guard that recompiles for the first short row of one sample.
    return bool(SINGLE_SEQUENCE_BACKENDS) and tokens >= SINGLE_SEQUENCE_MIN_TOKENS and cu.shape[0] == 2


def _varlen(q, k, v, cu, max_len, scale):
    if _VARLEN is None or q.device.type != "cuda":
        return _segments_sdpa(q, k, v, cu, scale)
    if one_sample(cu, q.shape[0]):
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
