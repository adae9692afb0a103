"""Tiled MLP (verl's model.tiled_mlp): each decoder layer's MLP runs over the tokens in
tiles, forward and backward, so its [tokens x intermediate] activations (gate, up, their
product: 3-4x the hidden size each, the largest tensors of a long-context step) exist for
one tile at a time instead of the whole sequence.

Forward keeps only the MLP's input. Backward recomputes the MLP tile by tile and hands
autograd the summed weight gradients: the weights (LoRA's or all of them) are inputs of
the tiled function, so their gradients arrive through the normal graph and FSDP2's hooks
see them as usual. The cost is one extra MLP forward per layer, the same trade as
activation checkpointing, but on the one tensor family that grows with context x width.
"""

from __future__ import annotations

import torch


def tile_tokens(hidden_size: int) -> int:
    """Tokens per tile: half the hidden size, so one tile's intermediate activations (with
    their gradients) weigh about what one [hidden x intermediate] weight does: 0.4 GiB for a
    7B model, where an 8 GiB card has no more to give. 768-1792 tokens for 1.5B-7B models:
    still matmuls that fill a GPU."""
    return max(1, hidden_size // 2)


class TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp_forward, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.mlp_forward, ctx.tile, ctx.params = mlp_forward, tile, params
        ctx.autocast = torch.is_autocast_enabled("cuda")
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([mlp_forward(chunk) for chunk in flat.split(tile)])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = ctx.params
        flat_x, flat_g = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat_x) if ctx.needs_input_grad[2] else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        start = 0
        for xc, gc in zip(flat_x.split(ctx.tile), flat_g.split(ctx.tile)):
            xc = xc.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.autocast):
                out = ctx.mlp_forward(xc)
            inputs = ([xc] if grad_x is not None else []) + list(params)
            got = torch.autograd.grad(out, inputs, gc, allow_unused=True)
            if grad_x is not None:
                grad_x[start:start + xc.shape[0]] = got[0]
                got = got[1:]
            for i, g in enumerate(got):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)
            start += xc.shape[0]
        return (None, None, None if grad_x is None else grad_x.view_as(x), *grads)


def apply_tiled_mlp(model, tile: int | None = None) -> int:
    """Make every decoder layer's `mlp` run tiled; returns the tile size in tokens."""
    from verlite.models.sft_model import unwrap_peft

    lm = unwrap_peft(model)
    tile = tile or tile_tokens(lm.config.hidden_size)
    for layer in lm.get_decoder().layers:
        layer.mlp.forward = _tiled(layer.mlp, layer.mlp.forward, tile)
    return tile


def _tiled(mlp: torch.nn.Module, plain_forward, tile: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= tile:
            return plain_forward(x)
        if not torch.is_grad_enabled():  # validation: tiles, and nothing to keep
            flat = x.reshape(-1, x.shape[-1])
            out = torch.cat([plain_forward(chunk) for chunk in flat.split(tile)])
            return out.view(*x.shape[:-1], out.shape[-1])
        # Read at each call: under FSDP2 these are the unsharded weights of this forward.
        params = [p for p in mlp.parameters() if p.requires_grad]
        return TiledMLP.apply(plain_forward, tile, x, *params)

    return forward
