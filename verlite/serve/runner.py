"""The forward pass over a fixed set of slots, with a paged KV cache.

Why not the model's own forward: decoding needs every slot at its own position in one
step (requests join and leave at any step), which transformers' caches do not take, and a
step whose tensors never change shape can be replayed as a CUDA graph. So this module
runs the Hugging Face model's own submodules (embeddings, norms, projections, rotary
table, LM head) in the Llama/Qwen2 decoder order.

The KV cache is paged: [layers, blocks, BLOCK tokens, kv_heads, head_dim], allocated once;
each slot has a row of the block table naming its blocks in order (block 0 is scratch:
idle slots and padding write there). The engine gives a sequence the blocks its prompt and
max_tokens need when it is admitted, so memory follows what requests ask for, not
slots x context. Decode attends only to the first `bucket` positions (the next power of two
over the longest live sequence), gathered through the block table; the step keeps one
shape per bucket, so on GPU each bucket is one CUDA graph.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from verlite.errors import VerliteError
from verlite.serve.lora import LoraBank

log = logging.getLogger("verlite.serve")

SUPPORTED = ("qwen2", "qwen3", "llama", "mistral")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_BUCKET = 64
BLOCK = 16  # tokens per KV cache block
# Prompt widths a prefill is padded to and replayed at as a CUDA graph (with the batch padded to
# a power of two of rows); a longer prompt is prefilled eagerly. Chat prompts of a few words
# fit in 64 tokens; each width is one graph per row count.
PREFILL_WIDTHS = (32, 64, 128, 256)


_FUSED_RMS = getattr(F, "rms_norm", None)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class SlotRunner:
    """Prefill and one-token decode for `num_slots` sequences held in a static KV cache."""

    def __init__(self, model, num_slots: int, max_model_len: int, adapters: dict | None = None,
                 cuda_graphs: bool = True, num_blocks: int | None = None):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise VerliteError(f"verlite serve runs {', '.join(SUPPORTED)} models; this checkpoint is "
                               f"'{config.model_type}'; use `verlite generate` for it")
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.num_slots, self.max_model_len = num_slots, max_model_len
        first = self.layers[0].self_attn
        self.head_dim = first.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = first.scaling
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.blocks_per_seq = -(-max_model_len // BLOCK)
        # Default: every slot can hold a full context at once (+ the scratch block).
        self.num_blocks = num_blocks or num_slots * self.blocks_per_seq + 1
        shape = (len(self.layers), self.num_blocks, BLOCK, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        # One row per slot, and one more (all scratch) for the padding rows of a captured prefill.
        self.block_table = torch.zeros(num_slots + 1, self.blocks_per_seq, dtype=torch.long, device=self.device)
        with torch.no_grad():  # the rotary table for every position, looked up per token
            positions = torch.arange(max_model_len, device=self.device)[None]
            probe = torch.zeros(1, 1, self.head_dim, dtype=self.dtype, device=self.device)
            cos, sin = self.inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]
        linears = {(i, name): module for i, layer in enumerate(self.layers)
                   for name, module in _projections(layer).items()}
        self.lora = LoraBank.build(adapters or {}, linears, self.dtype, self.device)
        # Static inputs of the decode step (CUDA graphs read them from fixed addresses).
        self.tokens = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.adapter = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        self.active = torch.zeros(num_slots, dtype=torch.long, device=self.device)  # 1 = a live sequence
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Static inputs of the captured prefills: views [:rows * width] etc. of these.
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        widest = max(self.prefill_widths(), default=0)
        self.p_ids = torch.zeros(num_slots * widest, dtype=torch.long, device=self.device)
        self.p_lengths = torch.ones(num_slots, dtype=torch.long, device=self.device)
        self.p_slots = torch.full((num_slots,), num_slots, dtype=torch.long, device=self.device)
        self.p_adapters = torch.zeros(num_slots, dtype=torch.long, device=self.device)
        if cuda_graphs and self.device.type == "cuda":
            self.capture_graphs()

    # --- the decoder, shared by prefill and decode ---------------------------------------

    def _linear(self, layer: int, name: str, module, x: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        return self.lora.apply((layer, name), x, module(x), adapter)

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, adapter: torch.Tensor,
                 write_at: torch.Tensor, keys: int, mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm. x: [rows, tokens, hidden]; positions: [rows, tokens];
        new keys/values go to the slot's position write_at; attention reads its positions [0, keys)
        under mask. slots None means every slot in order (the decode step)."""
        rows, tokens = x.shape[:2]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        table = self.block_table[:self.num_slots] if slots is None else self.block_table[slots]
        flat = (table.gather(1, write_at // BLOCK) * BLOCK + write_at % BLOCK).reshape(-1)
        pages = table[:, :-(-keys // BLOCK)]  # the blocks holding positions [0, keys)
        group = self.num_heads // self.num_kv_heads  # query heads per key head (see _attention)
        mask = mask.repeat(1, 1, group, 1) if group > 1 else mask  # once, not in every layer
        # As an additive bias, which is what attention turns a boolean mask into (in every layer).
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._norm(layer.input_layernorm, x)
            q = self._linear(i, "q_proj", attn.q_proj, h, adapter).view(rows, tokens, -1, self.head_dim)
            k = self._linear(i, "k_proj", attn.k_proj, h, adapter).view(rows, tokens, -1, self.head_dim)
            v = self._linear(i, "v_proj", attn.v_proj, h, adapter).view(rows, tokens, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            # Queries and keys rotated together: half the kernels of rotating each (the same values).
            qk = torch.cat((q, k), dim=1)
            qk = qk * cos + rotate_half(qk) * sin
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
            # Into cache[layer] viewed as [block * BLOCK + offset, kv_heads, dim]: index_copy_ is one
            # kernel with no host sync, so it is recorded in the CUDA graph like any other op.
            shape = (-1, self.num_kv_heads, self.head_dim)
            self.k_cache[i].view(shape).index_copy_(0, flat, k.transpose(1, 2).reshape(shape))
            self.v_cache[i].view(shape).index_copy_(0, flat, v.transpose(1, 2).reshape(shape))
            keys_i = self.k_cache[i][pages].view(rows, -1, self.num_kv_heads, self.head_dim)[:, :keys]
            values_i = self.v_cache[i][pages].view(rows, -1, self.num_kv_heads, self.head_dim)[:, :keys]
            keys_i, values_i = keys_i.transpose(1, 2), values_i.transpose(1, 2)  # [rows, kv_heads, keys, dim]
            out = self._attention(q, keys_i, values_i, mask)
            out = out.transpose(1, 2).reshape(rows, tokens, -1)
            x = x + self._linear(i, "o_proj", attn.o_proj, out, adapter)
            h = self._norm(layer.post_attention_layernorm, x)
            mlp = layer.mlp
            gate = self._linear(i, "gate_proj", mlp.gate_proj, h, adapter)
            up = self._linear(i, "up_proj", mlp.up_proj, h, adapter)
            x = x + self._linear(i, "down_proj", mlp.down_proj, mlp.act_fn(gate) * up, adapter)
        return self._norm(self.inner.norm, x)

    @staticmethod
    def _norm(module, x: torch.Tensor) -> torch.Tensor:
        """The model's RMSNorm (weight * normalised-in-fp32 x, cast back) with torch's rms_norm:
        on GPU one fused kernel where the module's own code launches eight."""
        eps = getattr(module, "variance_epsilon", None)
        if eps is None or _FUSED_RMS is None:
            return module(x)
        return module.weight * _FUSED_RMS(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def _attention(self, q, keys, values, mask):
        """Grouped-query attention without repeating keys: the query heads sharing a key head are
        folded into that head's query rows (head h reads key head h // group, as transformers does)."""
        rows, heads, tokens, dim = q.shape
        group = heads // self.num_kv_heads
        q = q.reshape(rows, self.num_kv_heads, group * tokens, dim)  # mask: already repeated per group
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
        return out.reshape(rows, heads, tokens, dim)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def upload(self, values: list, dtype=torch.long) -> torch.Tensor:
        """A host list on the device without waiting for the GPU: a plain copy from pageable
        memory synchronises the stream, which would stall the step already queued."""
        tensor = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def fetch(self, tensor: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """Start copying `tensor` to the host; (the copy, an event that fires once it is there)."""
        if self.device.type != "cuda":
            return tensor.clone(), None
        host = tensor.to("cpu", non_blocking=True)  # into pinned memory: no sync
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def assign(self, slot: int, blocks: list[int]) -> None:
        """Give `slot` these cache blocks, in position order (the rest of its row: scratch)."""
        if not blocks:
            self.block_table[slot].zero_()
            return
        row = [0] * self.blocks_per_seq
        row[:len(blocks)] = blocks
        self.block_table[slot].copy_(self.upload(row), non_blocking=True)

    def admit(self, slots: torch.Tensor, tokens: torch.Tensor, lengths: list[int], adapters: list[int]) -> None:
        """New sequences in `slots`: their first sampled token at position `lengths` (device state
        only, so the next decode step can be queued before the host has seen the token)."""
        self.tokens.index_copy_(0, slots, tokens)
        self.positions.index_copy_(0, slots, self.upload(lengths))
        self.adapter.index_copy_(0, slots, self.upload(adapters))
        self.active.index_fill_(0, slots, 1)

    def release(self, slot: int) -> None:
        """The slot idles: position 0, cache row pointing at scratch (a step already queued for
        it still writes to its old blocks first: one stream keeps the order)."""
        self.active[slot] = 0
        self.positions[slot] = 0
        self.block_table[slot].zero_()

    # --- prefill: new sequences, right-padded into one batch ------------------------------

    @torch.no_grad()
    def prefill(self, slots: list[int], prompts: list[list[int]], adapters: list[int]) -> torch.Tensor:
        """Fill the cache of `slots` with their prompts; returns next-token logits [rows, vocab]."""
        width = max(len(p) for p in prompts)
        shape = self.prefill_shape(len(prompts), width)
        if shape not in self.prefill_graphs:
            ids = self.upload([p + [0] * (width - len(p)) for p in prompts]).view(len(prompts), width)
            return self._prefill_step(ids, self.upload([len(p) for p in prompts]), self.upload(slots),
                                      self.upload(adapters))
        rows, width = shape
        pad = rows - len(prompts)  # rows of one token in the scratch row of the block table
        self.p_ids[:rows * width].copy_(self.upload([t for p in prompts for t in p + [0] * (width - len(p))]
                                                    + [0] * (pad * width)), non_blocking=True)
        self.p_lengths[:rows].copy_(self.upload([len(p) for p in prompts] + [1] * pad), non_blocking=True)
        self.p_slots[:rows].copy_(self.upload(slots + [self.num_slots] * pad), non_blocking=True)
        self.p_adapters[:rows].copy_(self.upload(adapters + [0] * pad), non_blocking=True)
        graph, out = self.prefill_graphs[shape]
        graph.replay()
        return out[:len(prompts)]

    def _prefill_step(self, ids: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
                      adapters: torch.Tensor) -> torch.Tensor:
        rows, width = ids.shape
        positions = torch.arange(width, device=self.device).expand(rows, width)
        # Causal within each prompt; padding keys (past a prompt's end) are never attended.
        causal = positions[:, :, None] >= positions[:, None, :]
        mask = (causal & (positions[:, None, :] < lengths[:, None, None]))[:, None]
        x = self.inner.embed_tokens(ids)
        hidden = self._forward(x, positions, slots, adapters, positions, width, mask)
        last = hidden[torch.arange(rows, device=self.device), lengths - 1]
        return self.logits(last)

    def prefill_widths(self) -> list[int]:
        return [w for w in PREFILL_WIDTHS if w <= self.max_model_len]

    def prefill_rows(self) -> list[int]:
        out, rows = [], 1
        while rows < self.num_slots:
            out.append(rows)
            rows *= 2
        return out + [self.num_slots]

    def prefill_shape(self, rows: int, width: int) -> tuple[int, int] | None:
        """The captured (rows, width) a prefill of `rows` prompts of up to `width` tokens pads to."""
        padded_rows = next((r for r in self.prefill_rows() if r >= rows), None)
        padded_width = next((w for w in self.prefill_widths() if w >= width), None)
        return None if padded_rows is None or padded_width is None else (padded_rows, padded_width)

    # --- decode: one token for every slot --------------------------------------------------

    def buckets(self) -> list[int]:
        """The attention lengths a decode step runs at: powers of two from MIN_BUCKET, the last
        one max_model_len. capture_graphs captures exactly these."""
        out, size = [], MIN_BUCKET
        while True:
            out.append(min(size, self.max_model_len))
            if size >= self.max_model_len:
                return out
            size *= 2

    def bucket(self, longest: int) -> int:
        """Keys a decode step attends to: the first bucket covering `longest` positions."""
        return next((b for b in self.buckets() if b >= longest), self.max_model_len)

    def _decode_step(self, keys: int) -> torch.Tensor:
        """Logits [num_slots, vocab] for one new token per slot; the step also leaves each slot's
        greedy token in `tokens` and moves live slots one position on, so consecutive steps run
        with no host round trip (the engine overwrites the tokens of sampled rows)."""
        positions = self.positions[:, None]
        mask = (torch.arange(keys, device=self.device)[None, :] <= positions)[:, None, None, :]
        x = self.inner.embed_tokens(self.tokens[:, None])
        hidden = self._forward(x, positions, None, self.adapter, positions, keys, mask)
        logits = self.logits(hidden[:, 0])
        self.tokens.copy_(logits.argmax(dim=-1))
        self.positions.add_(self.active)
        return logits

    @torch.no_grad()
    def step(self, keys: int) -> torch.Tensor:
        """One decode step from the device state, attending to `keys` positions (a bucket)."""
        graph = self.graphs.get(keys)
        if graph is None:
            return self._decode_step(keys)
        graph[0].replay()
        return graph[1]

    @torch.no_grad()
    def decode(self, tokens: list[int], positions: list[int], adapters: list[int]) -> torch.Tensor:
        """Logits [num_slots, vocab] for these tokens at these positions (idle slots: any token,
        position 0); the engine keeps this state on the device and calls `step` instead."""
        self.tokens.copy_(self.upload(tokens))
        self.positions.copy_(self.upload(positions))
        self.adapter.copy_(self.upload(adapters))
        return self.step(self.bucket(max(positions) + 1))

    def capture_graphs(self) -> None:
        """One CUDA graph per attention bucket, and one per prefill shape; any failure leaves
        that kind of step eager."""
        buckets = self.buckets()
        pool = torch.cuda.graph_pool_handle()
        try:
            with torch.no_grad():
                for keys in reversed(buckets):  # largest first: later graphs reuse its memory
                    self.graphs[keys] = self._capture(lambda keys=keys: self._decode_step(keys), pool)
            torch.cuda.synchronize()
            self._check_graph(buckets[0])
            log.info("decode step captured as CUDA graphs for %d attention lengths", len(buckets))
        except Exception as e:  # an op that cannot be captured: stay correct, just slower
            self.graphs.clear()
            log.warning("CUDA graph capture failed (%s); decoding eagerly", " ".join(str(e).split())[:200])
        shapes = [(r, w) for r in reversed(self.prefill_rows()) for w in reversed(self.prefill_widths())]
        if not shapes:  # a context shorter than the narrowest width: prefills stay eager
            return
        try:
            with torch.no_grad():
                for rows, width in shapes:
                    ids = self.p_ids[:rows * width].view(rows, width)
                    self.prefill_graphs[rows, width] = self._capture(
                        lambda ids=ids, rows=rows: self._prefill_step(ids, self.p_lengths[:rows], self.p_slots[:rows],
                                                                      self.p_adapters[:rows]), pool)
            torch.cuda.synchronize()
            self._check_prefill_graph()
            log.info("prefill captured as CUDA graphs for %d shapes (up to %d prompts x %d tokens)", len(shapes),
                     self.num_slots, max(self.prefill_widths(), default=0))
        except Exception as e:
            self.prefill_graphs.clear()
            log.warning("prefill graph capture failed (%s); prefilling eagerly", " ".join(str(e).split())[:200])

    @staticmethod
    def _capture(step, pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
        return graph, out

    @torch.no_grad()
    def _check_prefill_graph(self) -> None:
        """A replayed prefill gives the eager prefill's logits (each row in its own blocks)."""
        rows = min(2, self.num_slots)
        width = min(self.prefill_widths())
        if self.num_blocks - 1 < rows * -(-width // BLOCK):
            return
        per_row = -(-width // BLOCK)
        for slot in range(rows):
            self.assign(slot, [1 + slot * per_row + b for b in range(per_row)])
        prompts = [[(7 * i + 3 * r) % self.model.config.vocab_size for i in range(width - r)] for r in range(rows)]
        eager = self._prefill_step(
            self.upload([p + [0] * (width - len(p)) for p in prompts]).view(rows, width),
            self.upload([len(p) for p in prompts]), self.upload(list(range(rows))), self.upload([0] * rows)).clone()
        out = self.prefill(list(range(rows)), prompts, [0] * rows)
        for slot in range(rows):
            self.assign(slot, [])
        if not torch.allclose(out, eager, rtol=2e-2, atol=2e-2 * float(eager.abs().max())):
            raise RuntimeError(f"prefill graph logits differ from eager by {float((out - eager).abs().max()):.3g}")

    @torch.no_grad()
    def _check_graph(self, keys: int) -> None:
        """The replayed graph must give the eager step's logits (no request is live yet). Each
        slot writes its own block, so the two runs write the same values to the same places."""
        if self.num_blocks - 1 < self.num_slots:
            return
        for slot in range(self.num_slots):
            self.assign(slot, [1 + slot])
        slots = torch.arange(self.num_slots, device=self.device)
        self.tokens.copy_(slots * 7 % self.model.config.vocab_size)
        self.positions.copy_(slots % BLOCK)
        self.active.fill_(1)
        eager = self._decode_step(keys).clone()
        eager_next = self.tokens.clone()
        self.tokens.copy_(slots * 7 % self.model.config.vocab_size)  # the step advanced both
        self.positions.copy_(slots % BLOCK)
        graph, out = self.graphs[keys]
        graph.replay()
        advanced = bool((self.positions == slots % BLOCK + 1).all()) and bool((self.tokens == eager_next).all())
        self.active.zero_()
        for slot in range(self.num_slots):
            self.assign(slot, [])
        self.tokens.zero_()
        self.positions.zero_()
        if not torch.allclose(out, eager, rtol=2e-2, atol=2e-2 * float(eager.abs().max())):
            raise RuntimeError(f"graph logits differ from eager by {float((out - eager).abs().max()):.3g}")
        if not advanced and torch.equal(out.argmax(-1), eager.argmax(-1)):
            raise RuntimeError("the graph did not advance the slots' tokens and positions")


def _projections(layer) -> dict[str, torch.nn.Module]:
    found = {}
    for owner in (layer.self_attn, layer.mlp):
        for name in PROJECTIONS:
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Linear):
                found[name] = module
    return found
