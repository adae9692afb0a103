"""Which samples make each optimizer step, how they split across ranks and micro-batches,
and how a micro-batch becomes tensors.

The order is a pure function of (seed, epoch, step), so resuming needs only the global
step, and every rank computes the same plan for all ranks (so all agree on how many
micro-batches a step has, which FSDP's collectives require).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import torch

from verlite.data.dataset import SFTDataset
from verlite.errors import VerliteError

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]; label of position t is token t+1, IGNORE_INDEX = no loss
    position_ids: torch.Tensor  # [B, T]; restart at 0 for every packed sample
    attention_mask: Optional[torch.Tensor]  # [B, T] for padded rows; None when packed
    cu_seqlens: Optional[torch.Tensor]  # int32 [n+1] sample boundaries when packed
    loss_index: Optional[torch.Tensor]  # flat positions with loss, found on the host (no device sync)
    max_seqlen: int
    num_tokens: int  # real (non-padding) tokens
    num_loss_tokens: int
    # 1.0 per loss position that counts, 0.0 for rows added only to reach a fixed shape
    # (pad_packed); None: every position in loss_index counts.
    loss_weight: Optional[torch.Tensor] = None

    @property
    def num_samples(self) -> int:
        return len(self.cu_seqlens) - 1 if self.cu_seqlens is not None else self.input_ids.shape[0]

    def _map(self, fn) -> "MicroBatch":
        tensors = {f.name: fn(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors)

    def to(self, device: torch.device) -> "MicroBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "MicroBatch":
        return self._map(lambda t: t.pin_memory())


@dataclass
class StepBatches:
    """This rank's micro-batches of one optimizer step, and how many times they were halved."""

    step: int
    splits: int
    micro_batches: list[MicroBatch]


def split_evenly(indices: list[int], parts: int) -> list[list[int]]:
    """`indices` in at most `parts` non-empty, contiguous pieces of near-equal size."""
    parts = max(1, min(parts, len(indices)))
    size, extra = divmod(len(indices), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        out.append(indices[start:end])
        start = end
    return out


def shifted_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
    return labels


def collate(ds: SFTDataset, indices: list[int], packed: bool, pad_id: int, zero_loss: bool = False) -> MicroBatch:
    """`zero_loss` builds a placeholder micro-batch that runs forward/backward but adds nothing."""
    ids = [ds.input_ids[i].astype(np.int64) for i in indices]
    labels = [shifted_labels(ds.input_ids[i], ds.loss_mask[i]) for i in indices]
    if zero_loss:
        labels = [np.full_like(lab, IGNORE_INDEX) for lab in labels]
    lengths = [len(x) for x in ids]
    num_loss = int(sum((lab != IGNORE_INDEX).sum() for lab in labels))
    if packed:
        cu = np.zeros(len(ids) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(lengths)
        flat = np.concatenate(labels)
        return MicroBatch(
            input_ids=torch.from_numpy(np.concatenate(ids))[None],
            labels=torch.from_numpy(flat)[None],
            position_ids=torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))[None],
            attention_mask=None, cu_seqlens=torch.from_numpy(cu),
            loss_index=torch.from_numpy(np.flatnonzero(flat != IGNORE_INDEX)),
            max_seqlen=max(lengths), num_tokens=sum(lengths), num_loss_tokens=num_loss)
    width = max(lengths)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (x, lab) in enumerate(zip(ids, labels)):
        input_ids[row, : len(x)] = torch.from_numpy(x)
        label_t[row, : len(x)] = torch.from_numpy(lab)
        attn[row, : len(x)] = 1
    positions = torch.arange(width).expand(len(ids), width).contiguous()
    loss_index = (label_t.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return MicroBatch(input_ids, label_t, positions, attn, None, loss_index, width, sum(lengths), num_loss)


def bucket(n: int, per_octave: int) -> int:
    """The smallest size above `n` (strictly: room for at least one padding token) on a grid
    of `per_octave` sizes per power of two: a varying count rounds to a few fixed sizes, at
    most 1/per_octave of padding."""
    step = bucket_step(n, per_octave)
    return (n // step + 1) * step


def bucket_step(n: int, per_octave: int) -> int:
    """The spacing of bucket()'s grid around `n` (so also the most padding it adds)."""
    return 1 << max(0, n.bit_length() - 1 - (per_octave.bit_length() - 1))


def pad_packed(mb: MicroBatch, tokens: int, loss_rows: int, pad_id: int, max_seqlen: int,
               segments: int | None = None) -> MicroBatch:
    """A packed micro-batch grown to exactly `tokens` tokens, `loss_rows` loss positions and
    `segments` samples (None: one more than it has), so that steps of different lengths share
    one shape (a CUDA graph replays a fixed shape).

    The padding is made of extra samples at the end (segments of their own in cu_seqlens, so
    no real token attends to them; positions restart at 0): one token each but the last,
    which takes the rest. The extra loss rows point at padding with weight 0: they add
    nothing to the loss or to any gradient. num_tokens / num_loss_tokens stay the real counts."""
    real, rows, samples = mb.input_ids.shape[1], len(mb.loss_index), mb.num_samples
    pad, extra = tokens - real, loss_rows - rows
    added = 1 if segments is None else segments - samples
    if mb.cu_seqlens is None or added < 1 or pad < added or extra < 0 or pad - added + 1 > max_seqlen \
            or max_seqlen < mb.max_seqlen:
        raise ValueError(f"cannot pad a micro-batch of {real} tokens / {rows} loss rows / {samples} samples to "
                         f"{tokens} / {loss_rows} / {segments}")
    lengths = [1] * (added - 1) + [pad - added + 1]
    cat = lambda t, fill: torch.cat([t, torch.full((1, pad), fill, dtype=t.dtype)], dim=1)  # noqa: E731
    ends = real + torch.tensor(lengths).cumsum(0)
    cu = torch.cat([mb.cu_seqlens, ends.to(mb.cu_seqlens.dtype)])
    # Positions the real samples also reach (a model with learned absolute positions has no
    # row past its own limit): each padding sample counts from 0, wrapped at the longest real one.
    positions = torch.cat([torch.arange(n) for n in lengths]) % max(1, mb.max_seqlen)
    weight = torch.zeros(loss_rows, dtype=torch.float32)
    weight[:rows] = 1.0 if mb.loss_weight is None else mb.loss_weight
    return replace(mb, input_ids=cat(mb.input_ids, pad_id), labels=cat(mb.labels, IGNORE_INDEX),
                   position_ids=torch.cat([mb.position_ids, positions.to(mb.position_ids.dtype)[None]], 1),
                   cu_seqlens=cu, max_seqlen=max_seqlen,
                   loss_index=torch.cat([mb.loss_index, torch.full((extra,), real, dtype=mb.loss_index.dtype)]),
                   loss_weight=weight)


class StepPlan:
    """Global batches of sample indices per step, and this rank's micro-batches of each."""

    def __init__(self, lengths: np.ndarray, global_batch: int, world_size: int, seed: int,
                 micro_batch_size: Optional[int], token_budget: Optional[int], packed: bool):
        self.lengths = lengths
        self.global_batch = global_batch
        self.world_size = world_size
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.token_budget = token_budget
        self.packed = packed
        n = len(lengths)
        if n < global_batch:
            raise VerliteError(f"the training data has {n} samples, fewer than one optimizer step needs "
                               f"(data.train_batch_size={global_batch}); lower train_batch_size or add data")
        if global_batch % world_size:
            raise VerliteError(f"data.train_batch_size={global_batch} is not divisible by the {world_size} processes")
        if token_budget is None:
            per_rank = global_batch // world_size
            if per_rank % micro_batch_size:
                raise VerliteError(
                    f"data.train_batch_size={global_batch} must be a multiple of micro_batch_size_per_gpu="
                    f"{micro_batch_size} x {world_size} process(es); lower micro_batch_size_per_gpu or raise train_batch_size")
        elif int(lengths.max()) > token_budget:
            raise VerliteError(f"data.max_token_len_per_gpu={token_budget} is smaller than the longest sample "
                               f"({int(lengths.max())} tokens); raise it to at least data.max_length")
        self.steps_per_epoch = n // global_batch  # the last partial batch is dropped, as verl does

    def epoch_order(self, epoch: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.lengths), generator=gen).numpy()

    def step_indices(self, step: int) -> list[int]:
        """Sample indices of global step `step` (0-based, counting across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return order[within * self.global_batch:(within + 1) * self.global_batch].tolist()

    def largest_step_tokens(self, steps: int, padded: bool = False) -> int:
        """Tokens of the largest of the first `steps` global steps (all their samples together;
        `padded`: as rows padded to the step's longest sample), one vectorized pass per epoch."""
        largest, done, epoch = 0, 0, 0
        while done < steps:
            take = min(self.steps_per_epoch, steps - done)
            sizes = self.lengths[self.epoch_order(epoch)[: take * self.global_batch].reshape(take, self.global_batch)]
            per_step = sizes.max(axis=1) * self.global_batch if padded else sizes.sum(axis=1)
            largest = max(largest, int(per_step.max()))
            done, epoch = done + take, epoch + 1
        return largest

    def rank_micro_batches(self, step: int, rank: int) -> list[tuple[list[int], bool]]:
        """This rank's micro-batches for `step`, as (sample indices, is_placeholder)."""
        indices = self.step_indices(step)
        per_rank = self._split_ranks(indices)
        if self.token_budget is None:
            mine = per_rank[rank]
            mb = self.micro_batch_size
            return [(mine[i:i + mb], False) for i in range(0, len(mine), mb)]
        bins = [self._pack_bins(share) for share in per_rank]
        count = max(len(b) for b in bins)
        mine = [(b, False) for b in self._split_to(bins[rank], count)]
        # A rank short of samples still runs every micro-batch (collectives must match):
        # it repeats its smallest sample with no loss.
        while len(mine) < count:
            mine.append(([min(per_rank[rank], key=lambda i: self.lengths[i])], True))
        return mine

    def _split_ranks(self, indices: list[int]) -> list[list[int]]:
        w = self.world_size
        if self.token_budget is None or w == 1:
            per = len(indices) // w
            return [indices[r * per:(r + 1) * per] for r in range(w)]
        # Balance tokens: longest first, each to the rank with the fewest tokens so far.
        shares: list[list[int]] = [[] for _ in range(w)]
        load = [0] * w
        for i in sorted(indices, key=lambda i: (-self.lengths[i], i)):
            r = min(range(w), key=lambda r: (load[r], r))
            shares[r].append(i)
            load[r] += int(self.lengths[i])
        return shares

    def _cost(self, group: list[int]) -> int:
        lens = [int(self.lengths[i]) for i in group]
        return sum(lens) if self.packed else max(lens) * len(lens)

    def _pack_bins(self, share: list[int]) -> list[list[int]]:
        """First-fit decreasing into micro-batches of at most token_budget tokens."""
        bins: list[list[int]] = []
        for i in sorted(share, key=lambda i: (-self.lengths[i], i)):
            for b in bins:
                if self._cost(b + [i]) <= self.token_budget:
                    b.append(i)
                    break
            else:
                bins.append([i])
        return bins

    def _split_to(self, bins: list[list[int]], count: int) -> list:
        bins = [list(b) for b in bins]
        while len(bins) < count:
            big = max(range(len(bins)), key=lambda k: (len(bins[k]), -k))
            if len(bins[big]) < 2:
                break
            half = len(bins[big]) // 2
            bins.append(bins[big][half:])
            bins[big] = bins[big][:half]
        return bins
