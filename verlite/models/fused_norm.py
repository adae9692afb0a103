"""RMSNorm through PyTorch's fused kernel (torch.rms_norm) instead of transformers' five
element-wise ops.

Why: with the step replayed as CUDA graphs (engine/graph_step.py) launches are free and an
eager step is bound by the GPU time of its small kernels. Transformers' RMSNorm runs pow,
mean, add, rsqrt and two multiplies forward (each a pass over the hidden states) and about
twice as many backward; PyTorch's fused kernel does one pass forward and one backward. A
0.5B model has 49 of them a step. (A compiled layer fuses them itself; this is for the
eager steps `model.compile: auto` keeps when compiling would not pay.)

Only modules whose forward is exactly the common formula are switched: the source of their
class's forward is compared with it (142 of transformers 5.24's RMSNorm classes, Llama,
Qwen2/3 and Mistral among them; Gemma's `1 + weight` and OLMo's cast order differ and are
left alone), and only where weight and input share a dtype, so the output dtype is the same
-- or where autocast computes in the input's dtype (a bf16 stream, models/compute_dtype.py),
where the weight's bf16 copy is used, as FSDP's bf16 compute weights are on several GPUs.
The formula is the same maths in fp32; for bf16 inputs the weight is applied before the one
rounding to bf16 instead of after it.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

_STANDARD = ("input_dtype = hidden_states.dtype",
             "hidden_states = hidden_states.to(torch.float32)",
             "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
             "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
             "return self.weight * hidden_states.to(input_dtype)")


@functools.lru_cache(maxsize=None)
def is_standard(cls: type) -> bool:
    """Whether `cls.forward` is the common RMSNorm formula, statement for statement."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    lines = [line.strip() for line in source.splitlines()]
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("def ")), len(lines))
    body = tuple(line for line in lines[start:] if line and not line.startswith("#") and not line.startswith('"'))
    return body == _STANDARD


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if hidden_states.dtype != weight.dtype:
        device = hidden_states.device.type
        if not (torch.is_autocast_enabled(device) and hidden_states.dtype == torch.get_autocast_dtype(device)):
            return type(self).forward(self, hidden_states)
        # A bf16 stream under autocast (models/compute_dtype.py): the weight's bf16 copy, as
        # FSDP's bf16 compute weights give on several GPUs; the output stays bf16.
        with torch.autocast(device, enabled=False):  # bf16 in, bf16 out, whatever autocast's lists say
            return torch.rms_norm(hidden_states, (hidden_states.shape[-1],), weight.to(hidden_states.dtype),
                                  self.variance_epsilon)
    return torch.rms_norm(hidden_states, (hidden_states.shape[-1],), weight, self.variance_epsilon)


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Switch every standard RMSNorm module of `model` to the fused kernel; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor) and hasattr(module, "variance_epsilon") \
                and is_standard(type(module)):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
