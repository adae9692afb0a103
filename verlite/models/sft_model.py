"""The training module: a Hugging Face causal LM whose forward returns the summed response
loss of a micro-batch, computed from hidden states without full logits.

Wrapping the HF model in one nn.Module gives FSDP a root that owns the embeddings, final
norm and LM head, so one `fully_shard` on it covers everything the decoder layers do not.
"""

from __future__ import annotations

import torch
from torch import nn

from verlite.data.batching import IGNORE_INDEX, MicroBatch
from verlite.models.loss import linear_cross_entropy_sum


def unwrap_peft(model):
    """The underlying transformers model (PEFT's LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class SFTModel(nn.Module):
    def __init__(self, hf_model, fused_loss: bool = True):
        super().__init__()
        self.hf = hf_model
        self.fused_loss = fused_loss

    @property
    def causal_lm(self):
        return unwrap_peft(self.hf)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.causal_lm.get_decoder().layers)

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        """Sum of token cross-entropies over the micro-batch's loss positions (fp32 scalar)."""
        lm = self.causal_lm
        kwargs = {}
        if mb.cu_seqlens is not None:  # packed: attention stays inside each sample
            kwargs = dict(cu_seq_lens_q=mb.cu_seqlens, cu_seq_lens_k=mb.cu_seqlens,
                          max_length_q=mb.max_seqlen, max_length_k=mb.max_seqlen)
        out = lm.get_decoder()(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False, **kwargs)
        hidden = out.last_hidden_state
        labels = mb.labels.reshape(-1)
        # Only loss positions reach the vocabulary projection (about half the tokens in SFT).
        where = (labels != IGNORE_INDEX).nonzero().squeeze(1) if mb.loss_index is None else mb.loss_index
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
        targets = labels.index_select(0, where)
        weight = lm.get_output_embeddings().weight
        if mb.loss_weight is not None:  # rows padded to a fixed shape: weight 0, any valid target
            return linear_cross_entropy_sum(h, weight, targets.clamp(min=0), fused=self.fused_loss,
                                            row_weight=mb.loss_weight)
        return linear_cross_entropy_sum(h, weight, targets, fused=self.fused_loss)
