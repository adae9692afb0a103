"""The attention function's one-sample path: SDPA over the whole row equals the per-segment
reference (the CUDA varlen kernel is checked against the same reference on the GPU by
bench/attention_check.py)."""

import torch
from torch.nn.attention import SDPBackend

from verlite.models import attention


def test_single_sequence_sdpa_matches_segment_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(37, 4, 16, generator=g)
    k, v = torch.randn(37, 2, 16, generator=g), torch.randn(37, 2, 16, generator=g)  # grouped-query heads
    cu = torch.tensor([0, 37], dtype=torch.int32)
    ref = attention._segments_sdpa(q, k, v, cu, 0.25)
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    out = attention._single_sequence(q, k, v, 0.25)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # causal: the first position sees only itself
    torch.testing.assert_close(out[0, :2], v[0, :1].expand(2, 16), rtol=1e-5, atol=1e-5)


def test_only_a_row_of_one_sample_goes_to_sdpa_whole(monkeypatch):
    """Two samples in one row must never attend across each other: only cu = [0, T] qualifies."""
    one, two = torch.tensor([0, 37], dtype=torch.int32), torch.tensor([0, 20, 37], dtype=torch.int32)
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", None)
    assert not attention.one_sample(one, 40000)  # no backends set: every row takes the varlen kernel
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", [SDPBackend.FLASH_ATTENTION])
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_MIN_TOKENS", 32)
    assert attention.one_sample(one, 37)
    assert not attention.one_sample(one, 31)  # short rows stay on varlen (cuDNN builds a graph per length)
    assert not attention.one_sample(two, 37)
    assert not attention.one_sample(torch.tensor([0], dtype=torch.int32), 37)


def test_backends_are_picked_only_for_hopper_gpus(monkeypatch):
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", None)
    assert attention.pick_single_sequence_backends(torch.device("cpu")) is None
    monkeypatch.setattr(attention, "supports_varlen", lambda device: True)
    for major, expected in ((8, None), (9, [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION])):
        monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, major=major: (major, 0))
        assert attention.pick_single_sequence_backends(torch.device("cuda", 0)) == expected
    # The row length from which cuDNN pays grows as the model's attention shrinks
    from types import SimpleNamespace

    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", None)
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_MIN_TOKENS", attention.SINGLE_SEQUENCE_MIN_TOKENS)
    big = SimpleNamespace(num_hidden_layers=28, num_attention_heads=28, hidden_size=3584, head_dim=128)
    attention.pick_single_sequence_backends(torch.device("cuda", 0), big)
    assert 12000 < attention.SINGLE_SEQUENCE_MIN_TOKENS < 16000
    small = SimpleNamespace(num_hidden_layers=24, num_attention_heads=14, hidden_size=896)
    assert attention.min_tokens_for_cudnn(24, 896) > 2 * attention.SINGLE_SEQUENCE_MIN_TOKENS
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", None)
    attention.pick_single_sequence_backends(torch.device("cuda", 0), small)
    assert attention.SINGLE_SEQUENCE_MIN_TOKENS == attention.min_tokens_for_cudnn(24, 896)
    chosen = [SDPBackend.FLASH_ATTENTION]  # a choice made by hand stays
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", chosen)
    assert attention.pick_single_sequence_backends(torch.device("cuda", 0)) is chosen


def test_a_short_row_of_one_sample_does_not_recompile_the_layers(monkeypatch):
    """Under torch.compile the row length is tested before the sample count: the other order
    guards on the (dynamic) sample count and recompiles for the first short one-sample row
    (a placeholder micro-batch, an OOM split, a sample that fills the budget)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_BACKENDS", [SDPBackend.FLASH_ATTENTION])
    monkeypatch.setattr(attention, "SINGLE_SEQUENCE_MIN_TOKENS", 16384)

    def layer(x, cu):
        return x * 2 if attention.one_sample(cu, x.shape[0]) else x + cu.sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, backend="eager")
    graphs = []
    for samples, tokens in [(5, 900), (7, 1000), (3, 1100), (1, 700), (4, 800), (1, 650)]:
        x = torch.randn(tokens, 4)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        compiled(x, torch.zeros(samples + 1, dtype=torch.int32))
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[3:] == [graphs[2]] * 3, graphs  # the short one-sample rows reuse the graph
