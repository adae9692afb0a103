"""Activation checkpointing of the decoder layers: which layers recompute in backward, and
where the one input each of them keeps waits meanwhile (GPU, or pinned host memory)."""

from __future__ import annotations

import torch


def enable_checkpointing(model, layers: int | None = None, offload_inputs: bool = False,
                         keep_attention: int | None = None) -> None:
    """Recompute the decoder layers in backward (the first `layers` of them; None: all), the
    first `keep_attention` of those without rerunning attention."""
    # Renamed in transformers 5.2x; the GPU machine's 5.17 has only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    limit_checkpointing(model, layers)
    if keep_attention:
        keep_attention_outputs(model, keep_attention)
    if offload_inputs:
        offload_checkpoint_inputs(model)


def _attention_policy(ctx, op, *args, **kwargs):
    """Selective recompute: attention's forward outputs (output, logsumexp, RNG state) are
    kept from the first pass; everything else in the layer is recomputed as usual."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = str(op)
    if ("attention" in name or "_attn" in name) and "backward" not in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention_outputs(model, count: int) -> int:
    """The first `count` recomputed decoder layers keep attention's outputs for backward
    (PyTorch's selective activation checkpointing): at 32k tokens attention forward is the
    layer's costliest kernel, and a layer's output plus logsumexp is only [tokens x hidden]
    bf16 + [heads x tokens] fp32. Returns how many layers got it."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    context = partial(create_selective_checkpoint_contexts, _attention_policy)
    done = 0
    for layer in model.get_decoder().layers:
        if done >= count:
            break
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False, context_fn=context)
            done += 1
    return done


def limit_checkpointing(model, layers: int | None) -> None:
    """Recompute only the first `layers` decoder layers: the rest keep their activations,
    trading memory for the recompute time (a third of a LoRA step's work per layer)."""
    if layers is None:
        return
    for i, layer in enumerate(model.get_decoder().layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i < layers


def offload_checkpoint_inputs(model) -> None:
    """Keep each recomputed layer's input on the host between forward and backward.

    A checkpointed layer still holds its input hidden states (recomputation starts from
    them): that is all checkpointing leaves on the GPU, and at long context it is most of
    it. The forward pass runs on the GPU tensor as usual; only a host copy (pinned, copied
    asynchronously on the compute stream) is handed to the recomputation, which brings it
    back when backward reaches the layer."""
    for layer in model.get_decoder().layers:
        if getattr(layer, "gradient_checkpointing", False):
            layer._gradient_checkpointing_func = _offloading(layer._gradient_checkpointing_func)


def _offloading(checkpoint_fn):
    def run(fn, hidden, *args, **kwargs):
        pinned = hidden.is_cuda
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=pinned)
        host.copy_(hidden.detach(), non_blocking=pinned)  # ordered before any reuse of hidden's memory
        device, needs_grad, first = hidden.device, hidden.requires_grad, [hidden]
        del hidden  # only `first` may reference the GPU tensor, and only until the forward has run

        def body(h, *a, **k):
            # The forward pass uses the original (its autograd edges lead to the previous
            # layer); recomputation rebuilds it from the host copy, requires_grad alike so
            # autograd saves the same tensors both times.
            h = first.pop() if first else h.to(device, non_blocking=pinned).requires_grad_(needs_grad)
            return fn(h, *a, **k)

        return checkpoint_fn(body, host, *args, **kwargs)

    run.__wrapped__ = checkpoint_fn
    return run


def recompute_every_layer(model, offload_inputs: bool = False) -> int:
    """Turn recomputation on for every decoder layer not recomputing yet (after an OOM under
    model.enable_gradient_checkpointing=auto); returns how many layers it turned on.

    Works on a loaded, wrapped, sharded or compiled model: transformers' decoder layers decide
    per call from their `gradient_checkpointing` flag, outside any compiled region."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    turned = 0
    for module in model.modules():
        if not hasattr(module, "gradient_checkpointing") or not _is_layer(module):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        if module.gradient_checkpointing and not _keeps_attention(func):
            continue
        # A layer keeping its attention output gives that memory back too.
        module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        module.gradient_checkpointing = True
        if offload_inputs:
            module._gradient_checkpointing_func = _offloading(module._gradient_checkpointing_func)
        turned += 1
    return turned


def _keeps_attention(func) -> bool:
    while func is not None:
        if getattr(func, "keywords", {}).get("context_fn") is not None:
            return True
        func = getattr(func, "__wrapped__", None)
    return False


def _is_layer(module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # an older transformers: every module with the flag is a repeated block
        return True
    return isinstance(module, GradientCheckpointingLayer)
