import numpy as np
import pytest

from verlite.data.batching import IGNORE_INDEX, StepPlan, collate
from verlite.data.dataset import SFTDataset
from verlite.data.formatting import Encoded
from verlite.errors import VerliteError


def make_ds(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ds = SFTDataset()
    for n in lengths:
        ids = rng.integers(5, 100, n).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        ds.append(Encoded(ids, mask))
    return ds


def test_article_step_count():
    # 100 samples, micro batch 2, one process, no accumulation: the article's "Step x / 50".
    plan = StepPlan(np.full(100, 20), global_batch=2, world_size=1, seed=1, micro_batch_size=2,
                    token_budget=None, packed=False)
    assert plan.steps_per_epoch == 50


def test_order_is_a_function_of_seed_and_step():
    lengths = np.arange(10, 74)
    a = StepPlan(lengths, 8, 1, seed=3, micro_batch_size=2, token_budget=None, packed=False)
    b = StepPlan(lengths, 8, 1, seed=3, micro_batch_size=2, token_budget=None, packed=False)
    assert [a.step_indices(s) for s in range(16)] == [b.step_indices(s) for s in range(16)]
    epoch0 = sorted(i for s in range(8) for i in a.step_indices(s))
    assert epoch0 == list(range(64))  # every sample once per epoch
    assert a.step_indices(0) != a.step_indices(8)  # a new order each epoch


def test_ranks_partition_the_global_batch():
    lengths = np.arange(10, 42)
    plan = StepPlan(lengths, 8, 2, seed=0, micro_batch_size=2, token_budget=None, packed=False)
    mine = [i for r in range(2) for mb, _ in plan.rank_micro_batches(3, r) for i in mb]
    assert sorted(mine) == sorted(plan.step_indices(3))
    assert all(len(plan.rank_micro_batches(3, r)) == 2 for r in range(2))


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_plan(packed):
    lengths = np.random.default_rng(0).integers(10, 100, 64)
    plan = StepPlan(lengths, 16, 2, seed=0, micro_batch_size=None, token_budget=200, packed=packed)
    for step in range(4):
        per_rank = [plan.rank_micro_batches(step, r) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1])  # both ranks run the same number of micro-batches
        real = [i for mbs in per_rank for mb, ph in mbs if not ph for i in mb]
        assert sorted(real) == sorted(plan.step_indices(step))
        for mbs in per_rank:
            for mb, _ in mbs:
                cost = sum(lengths[mb]) if packed else max(lengths[mb]) * len(mb)
                assert cost <= 200


def test_bad_batch_shapes():
    with pytest.raises(VerliteError, match="fewer than one optimizer step"):
        StepPlan(np.full(3, 5), 4, 1, 0, 2, None, False)
    with pytest.raises(VerliteError, match="multiple of micro_batch_size_per_gpu"):
        StepPlan(np.full(30, 5), 6, 1, 0, 4, None, False)


def test_collate_padded_and_packed_labels():
    ds = make_ds([6, 9])
    padded = collate(ds, [0, 1], packed=False, pad_id=0)
    packed = collate(ds, [0, 1], packed=True, pad_id=0)
    assert padded.input_ids.shape == (2, 9) and packed.input_ids.shape == (1, 15)
    assert packed.cu_seqlens.tolist() == [0, 6, 15]
    assert packed.position_ids[0].tolist() == list(range(6)) + list(range(9))
    # Label of position t is token t+1 where t+1 carries loss; a sample never predicts the next one.
    ids0, mask0 = ds.input_ids[0], ds.loss_mask[0]
    expected = [int(ids0[t + 1]) if mask0[t + 1] else IGNORE_INDEX for t in range(5)] + [IGNORE_INDEX]
    assert padded.labels[0, :6].tolist() == expected and packed.labels[0, :6].tolist() == expected
    assert (padded.labels[0, 6:] == IGNORE_INDEX).all()
    assert padded.num_loss_tokens == packed.num_loss_tokens == len(packed.loss_index)
    assert padded.num_tokens == packed.num_tokens == 15
