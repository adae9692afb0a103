"""QLoRA's frozen base: the decoder layers' linear weights stored as 4-bit NF4 (torchao's
`NF4Tensor`, double-quantized block scales), dequantized to the compute dtype inside each
matmul. LoRA's own weights stay trainable in fp32 beside them.

Only the decoder layers' frozen linear weights are quantized. The embedding is a table
lookup (quantizing it saves memory but each row would be dequantized on every token), the
norms are a few thousand numbers whose rounding shifts every activation, and the LM head
is read directly by the chunked fused loss, which needs a dense matrix: they all stay in
full precision, as bitsandbytes' QLoRA keeps them.

`NF4Tensor` is a plain tensor subclass, so the swap happens in place (peft's LoRA layers
keep their `base_layer`), FSDP2 all-gathers its packed 4-bit data, and dequantization is
ordinary PyTorch that runs on CPU too.
"""

from __future__ import annotations

import logging
import math

import torch

from verlite.errors import VerliteError

log = logging.getLogger("verlite.model")

BLOCK = 64  # weights per NF4 scale (QLoRA's and torchao's default)
SCALER_BLOCK = 256  # scales per double-quantization block, at most


def _nf4_api():
    quiet_torchao_import()
    try:  # torchao >= 0.15 keeps NF4 under quantization; older releases under dtypes
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
    return NF4Tensor, to_nf4


def quiet_torchao_import() -> None:
    """Import torchao with its start-up warnings (optional CUDA kernels for other torch
    builds, pytree deprecations) kept out of the run's log: none of them concerns NF4 or
    its optimizers, which are plain PyTorch."""
    import sys

    if "torchao" in sys.modules:
        return
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    except ImportError:  # not installed (it is the optional `smallcards` extra): nothing to quiet
        pass
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def is_quantized(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def scaler_block_for(numel: int, world: int = 1) -> int | None:
    """The double-quantization block (scales per block) for a weight of `numel` elements, or
    None when it cannot be NF4. The largest divisor of its scale count up to 256 that leaves
    a multiple of 8 blocks (FSDP2 gives each rank whole blocks, so the same NF4 weights serve
    1, 2, 4 or 8 ranks: a run matches itself on any of them), else a multiple of `world`."""
    if numel % (BLOCK * world):
        return None
    scales = numel // BLOCK
    for multiple in (math.lcm(8, world), world):
        for size in range(min(SCALER_BLOCK, scales // multiple), 0, -1):
            if scales % size == 0 and (scales // size) % multiple == 0:
                return size
    return None


def to_nf4(weight: torch.Tensor, world: int = 1) -> torch.Tensor | None:
    scaler_block = scaler_block_for(weight.numel(), world)
    if scaler_block is None:
        return None
    _, convert = _nf4_api()
    return convert(weight.detach(), BLOCK, scaler_block)


def check_quantizable(hf_config, trust_remote_code: bool = False) -> None:
    """Before any weight is read: the decoder layers have linear weights NF4 can hold."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    sizes = [m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear)] if decoder else []
    if not any(scaler_block_for(n) for n in sizes):
        raise VerliteError(f"model.quantization=nf4: {type(model).__name__} has no decoder linear layer NF4 can store "
                           "(none found, or no size a multiple of 64); drop model.quantization for this model")


def quantize_frozen_linears(model, device: torch.device | None = None) -> int:
    """Replace every frozen linear weight inside the decoder layers by its NF4 copy; returns how
    many. `device` (a GPU) is where the quantization runs and the NF4 weights stay: minutes
    on a CPU for a 7B model, a second there."""
    from verlite.models.sft_model import unwrap_peft

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    decoder = unwrap_peft(model).get_decoder()
    done = skipped = 0
    before = after = 0
    for name, module in decoder.named_modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad or is_quantized(module.weight):
            continue
        weight = module.weight.data
        if device is not None:
            weight = weight.to(device)
        nf4 = to_nf4(weight, world)
        if nf4 is None:  # a shape NF4's 64-weight blocks do not tile stays in full precision
            skipped += 1
            continue
        before += weight.numel() * weight.element_size()
        after += nf4_bytes(weight.numel())
        module.weight = torch.nn.Parameter(nf4, requires_grad=False)
        done += 1
    if done == 0:
        raise VerliteError("model.quantization=nf4: no linear layer of the model can be stored as NF4 (their sizes "
                           "are not multiples of 64); drop model.quantization")
    log.info("NF4 base: %d linear weights quantized (%.2f -> %.2f GiB)%s", done, before / 2**30, after / 2**30,
             f", {skipped} kept in full precision (size not a multiple of 64)" if skipped else "")
    return done


def nf4_bytes(numel: int) -> float:
    """Storage of `numel` weights as NF4: 4 bits each, an 8-bit scale per 64 weights, and per
    256 scales one fp32 scale and one fp32 mean (torchao's double quantization)."""
    return numel / 2 + numel / BLOCK + numel / BLOCK / SCALER_BLOCK * 8

