"""CUDA-graph training steps (engine/graph_step.py).

On CPU: the fixed-shape padding the graphs rely on is exact (same loss and gradients as the
unpadded micro-batch), the size grid, and the setting's checks. On a GPU (the device run of
bench/gpu_runbook.sh): whole runs with graphs on against the same runs without them.
"""

import dataclasses

import pytest
import torch

from conftest import write_jsonl
from test_trainer import config, rows
from verlite.config import load_config
from verlite.data.batching import IGNORE_INDEX, bucket, collate, pad_packed
from verlite.engine.distributed import init_distributed, shutdown
from verlite.errors import VerliteError
from verlite.trainer.sft_trainer import Trainer, run_sft


def test_graph_shapes_of_varying_sample_counts_are_few(tmp_path, tiny_model):
    """Token-budget micro-batches hold varying sample counts; padded for the graphs
    (engine/graph_step.py GraphedSteps.pad) the counts fall on a few sizes too, and the
    padding keeps loss and gradients."""
    from verlite.engine.graph_step import GraphedSteps

    cfg = config(tmp_path, tiny_model, "data.packing=true", "trainer.total_training_steps=1")
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        runner = GraphedSteps.__new__(GraphedSteps)  # pad() only: no GPU state
        runner.max_length, runner.pad_id, runner.varying_counts = cfg.data.max_length, 0, True
        counts = range(9, 16)
        segments = set()
        for n in counts:
            mb = collate(trainer.train_ds, list(range(n)), packed=True, pad_id=0)
            p = runner.pad(mb)
            assert p.num_tokens == mb.num_tokens and p.input_ids.shape[1] > mb.input_ids.shape[1]
            assert int(p.cu_seqlens.diff().max()) <= p.max_seqlen and (p.cu_seqlens.diff() > 0).all()
            segments.add(p.num_samples)
        assert len(segments) <= 4 < len(counts)
        # Compiled layers specialise on max_seqlen: one bound for every shape of the run.
        batches = [collate(trainer.train_ds, list(range(n)), packed=True, pad_id=0) for n in counts]
        runner.fix_max_seqlen(max(b.num_tokens for b in batches))
        padded = [runner.pad(b) for b in batches]
        assert len({b.max_seqlen for b in padded}) == 1 and len({b.input_ids.shape[1] for b in padded}) > 1
        assert all(int(b.cu_seqlens.diff().max()) <= b.max_seqlen for b in padded)
        runner.compiled_max_seqlen = None
        runner.varying_counts = False  # a fixed micro batch size: one padding sample, as measured on the GPU
        assert runner.pad(mb).num_samples == mb.num_samples + 1
        loss_a, grads_a = _grads(trainer.model, mb)
        loss_b, grads_b = _grads(trainer.model, p)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        shutdown()


def test_kernel_class_is_what_triton_specialises_on():
    from verlite.engine.graph_step import kernel_class

    assert kernel_class((256, 96, 34, 1024)) == kernel_class((512, 112, 18, 2048))  # all multiples of 16
    assert kernel_class((256, 96, 34, 1024)) != kernel_class((264, 96, 34, 1024))  # 264 is not
    assert kernel_class((1, 16)) != kernel_class((17, 16))  # 1 is a class of its own


def test_bucket_grid_is_above_n_and_at_most_one_step_of_padding():
    for per in (4, 8):
        sizes = set()
        for n in range(1, 20000, 7):
            b = bucket(n, per)
            assert n < b <= n + max(1, 2 ** (n.bit_length() - 1) // per)
            if 4096 <= n < 8192:
                sizes.add(b)
        assert len(sizes) <= per + 1  # a few fixed sizes per power of two


def _grads(model, mb):
    model.zero_grad(set_to_none=True)
    loss = model(mb)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padded_micro_batch_has_the_same_loss_and_gradients(tmp_path, tiny_model):
    """The padding sample attends only to itself and its loss rows weigh 0: loss and every
    gradient equal the unpadded micro-batch's (fp32, CPU: the segment-by-segment attention)."""
    cfg = config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4", "data.packing=true",
                 "trainer.total_training_steps=1")
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        mb = trainer._micro_batches(0).micro_batches[0]
        assert mb.cu_seqlens is not None and mb.loss_weight is None
        tokens, rows_ = mb.input_ids.shape[1], len(mb.loss_index)
        model = trainer.model
        loss_a, grads_a = _grads(model, mb)
        for segments in (None, mb.num_samples + 3):  # one padding sample, or several
            padded = pad_packed(mb, bucket(tokens, 8) + 5, bucket(rows_, 4), pad_id=0, max_seqlen=mb.max_seqlen + 32,
                                segments=segments)
            assert padded.input_ids.shape[1] == bucket(tokens, 8) + 5 and len(padded.loss_index) == bucket(rows_, 4)
            assert padded.num_tokens == mb.num_tokens and padded.num_loss_tokens == mb.num_loss_tokens
            assert int(padded.cu_seqlens[-1]) == padded.input_ids.shape[1]
            assert padded.num_samples == (segments or mb.num_samples + 1)
            assert (padded.cu_seqlens.diff() > 0).all() and padded.cu_seqlens.dtype == mb.cu_seqlens.dtype
            assert (padded.labels[0, tokens:] == IGNORE_INDEX).all() and padded.loss_weight[rows_:].sum() == 0
            assert int(padded.position_ids.max()) < mb.max_seqlen
            loss_b, grads_b = _grads(model, padded)
            torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
            assert grads_a.keys() == grads_b.keys()
            for name in grads_a:
                torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        shutdown()


def test_pad_refuses_what_it_cannot_pad(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=2", "data.packing=true",
                 "trainer.total_training_steps=1")
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        mb = trainer._micro_batches(0).micro_batches[0]
        tokens = mb.input_ids.shape[1]
        with pytest.raises(ValueError):  # no room for the padding sample
            pad_packed(mb, tokens, len(mb.loss_index), 0, mb.max_seqlen)
        with pytest.raises(ValueError):  # fewer loss rows than the micro-batch has
            pad_packed(mb, tokens + 4, len(mb.loss_index) - 1, 0, mb.max_seqlen)
        with pytest.raises(ValueError):  # more padding samples than padding tokens
            pad_packed(mb, tokens + 2, len(mb.loss_index), 0, mb.max_seqlen, segments=mb.num_samples + 3)
        padded_rows = collate(trainer.train_ds, [0, 1], packed=False, pad_id=0)
        with pytest.raises(ValueError):  # padded rows have no segments to add to
            pad_packed(padded_rows, 999, 999, 0, 999)
    finally:
        shutdown()


def test_cuda_graphs_setting_is_checked_before_loading(tmp_path, tiny_model, caplog):
    with pytest.raises(VerliteError, match="model.cuda_graphs is 'sometimes'"):
        run_sft(config(tmp_path / "a", tiny_model, "model.cuda_graphs=sometimes", "trainer.total_training_steps=1"))
    with pytest.raises(VerliteError, match="model.cuda_graphs=true cannot run here: they need a GPU"):
        run_sft(config(tmp_path / "b", tiny_model, "model.cuda_graphs=true", "trainer.total_training_steps=1"))
    with caplog.at_level("INFO", logger="verlite"):
        run_sft(config(tmp_path / "c", tiny_model, "trainer.total_training_steps=1"))
    assert "cuda graphs: off (they need a GPU (this run: cpu))" in caplog.text


# ---- on a GPU -----------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs run on a GPU")


def _gpu_run(tmp_path, model, graphs: str, *extra, steps: int = 24):
    data = write_jsonl(tmp_path / "train.jsonl", rows(64))
    cfg = load_config(None, [f"data.train_files={data}", f"model.partial_pretrain={model}",
                             f"trainer.default_local_dir={tmp_path / 'ckpt'}", "trainer.save_freq=-1",
                             "trainer.logger=console", "optim.lr=1e-3", "optim.warmup_steps_ratio=0",
                             "data.micro_batch_size_per_gpu=4", f"trainer.total_training_steps={steps}",
                             "trainer.log_interval=1", f"model.cuda_graphs={graphs}", "model.compile=false",
                             "model.enable_gradient_checkpointing=false", *extra])
    trainer = Trainer(cfg, init_distributed("cuda"))
    losses = []
    original = trainer._step

    def step(batches):
        result = original(batches)
        losses.append(result.loss.item())
        return result

    trainer._step = step
    try:
        trainer.fit()
        stats = trainer.graph_stats
        weights = {n: p.detach().float().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return losses, weights, stats, trainer.graphs is not None
    finally:
        shutdown()


@gpu
@pytest.mark.parametrize("extra", [(), ("model.lora_rank=8", "model.target_modules=all-linear"),
                                   ("model.enable_gradient_checkpointing=true",), ("model.compile=true",),
                                   ("data.train_batch_size=8",), ("model.use_liger=true",)],
                         ids=["full", "lora", "recompute", "compiled", "accumulation", "liger_rms_norm"])
def test_graphed_run_follows_the_eager_run(tmp_path, tiny_model, extra):
    eager, w_eager, none, _ = _gpu_run(tmp_path / "eager", tiny_model, "false", *extra)
    graphed, w_graphed, stats, still_on = _gpu_run(tmp_path / "graphs", tiny_model, "true", *extra)
    assert none is None
    assert still_on, "graphs were turned off during the run"
    assert stats.replays > 0 and stats.captures >= 2, stats.summary()
    # New shapes of a warm kernel class were captured without an eager run (not for compiled
    # layers, which may recompile at a new shape, nor with Liger's RMSNorm, whose backward takes
    # an integer the class does not see), and still follow the eager run below.
    eager_first = {"model.compile=true", "model.use_liger=true"} & set(extra)
    assert (stats.captured_at_once == 0) if eager_first else (stats.captured_at_once >= 1), stats.summary()
    # bf16 compute at another token count (padding) rounds differently: close, not equal.
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-2, atol=2e-2)
    for name in w_eager:
        torch.testing.assert_close(w_graphed[name], w_eager[name], rtol=0, atol=5e-3, msg=name)


@gpu
def test_nan_step_is_skipped_inside_the_graph(tmp_path, tiny_model):
    """A step whose loss is NaN leaves the weights untouched, replayed as when eager."""
    from verlite.data.batching import MicroBatch

    data = write_jsonl(tmp_path / "train.jsonl", rows(64))
    cfg = load_config(None, [f"data.train_files={data}", f"model.partial_pretrain={tiny_model}",
                             f"trainer.default_local_dir={tmp_path / 'ckpt'}", "trainer.save_freq=-1",
                             "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=8",
                             "model.cuda_graphs=true", "model.compile=false"])
    trainer = Trainer(cfg, init_distributed("cuda"))
    try:
        batches = [trainer._micro_batches(0) for _ in range(4)]  # one shape, run 4 times
        for b in batches[:3]:
            trainer._step(b)
        assert trainer.graphs.step_graph is not None and trainer.graphs.replays > 0
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        # A NaN loss: one loss row weighs NaN, so the loss and its gradients are NaN.
        bad = batches[3]
        mb: MicroBatch = bad.micro_batches[0]
        weight = mb.loss_weight.clone()
        weight[0] = float("nan")
        bad.micro_batches[0] = dataclasses.replace(mb, loss_weight=weight)
        result = trainer._step(bad)
        assert result.skipped.item() == 1.0 and not torch.isfinite(result.loss).item()
        for n, p in trainer.model.named_parameters():
            assert torch.equal(p.detach(), before[n]), n
        good = trainer._step(batches[0])
        assert good.skipped.item() == 0.0 and torch.isfinite(good.loss).item()
    finally:
        shutdown()


def test_a_failed_capture_turns_graphs_off_and_reruns_the_step_eagerly(tmp_path, tiny_model, caplog):
    """The trainer's side of the fallback (CPU: a stand-in runner whose capture fails after
    it has added into the gradients): the step runs again eagerly from clean gradients and
    gives the plain step's result; graphs stay off."""
    from verlite.engine import graph_step

    def run(with_stub: bool):
        cfg = config(tmp_path / ("stub" if with_stub else "plain"), tiny_model, "data.micro_batch_size_per_gpu=4",
                     "data.packing=true", "trainer.total_training_steps=1")
        trainer = Trainer(cfg, init_distributed("cpu"))
        try:
            batches = trainer._micro_batches(0)

            class FailingRunner:
                released = False
                capture_s = 0.0

                def step(self, micro_batches, scheduler):
                    trainer.model(micro_batches[0]).backward()  # gradients half-accumulated, then:
                    raise graph_step.GraphsOff("capture failed: test")

                def release(self):
                    FailingRunner.released = True

            if with_stub:
                trainer.graphs = trainer.graph_stats = FailingRunner()
            with caplog.at_level("WARNING", logger="verlite"):
                result = trainer._step(batches)
            weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            return result, weights, trainer, FailingRunner.released
        finally:
            shutdown()

    plain, w_plain, _, _ = run(False)
    fell_back, w_fell_back, trainer, released = run(True)
    assert released and trainer.graphs is None
    assert "cuda graphs: off from here on (capture failed: test)" in caplog.text
    assert fell_back.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert fell_back.grad_norm.item() == pytest.approx(plain.grad_norm.item(), rel=1e-5)
    for name in w_plain:
        torch.testing.assert_close(w_fell_back[name], w_plain[name], msg=name)


def test_why_not_names_what_keeps_graphs_off():
    from verlite.engine.graph_step import why_not

    cfg = load_config(None, ["model.partial_pretrain=/nowhere"])

    class FusedAdamW:
        defaults = {"fused": True}

    class Foreach:
        defaults = {"fused": False}

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert why_not(cfg, cuda, False, 1, True, FusedAdamW()) is None
    assert "2 processes" in why_not(cfg, cuda, False, 1, True, FusedAdamW(), world_size=2)
    assert "FSDP" in why_not(cfg, cuda, True, 1, True, FusedAdamW())
    assert "padded rows" in why_not(cfg, cuda, False, 1, False, FusedAdamW())
    assert "fused AdamW" in why_not(cfg, cuda, False, 1, True, Foreach())
    liger = load_config(None, ["model.partial_pretrain=/nowhere", "model.use_liger=true"])
    assert why_not(liger, cuda, False, 1, True, FusedAdamW()) is None  # Liger's layer kernels replay like any
    # `auto` also leaves them off where memory is short or steps are long (true still runs them).
    from verlite.engine.graph_step import why_not_auto

    assert why_not_auto(cfg) is None
    recompute = load_config(None, ["model.partial_pretrain=/nowhere", "model.enable_gradient_checkpointing=true"])
    assert "recomputed" in why_not_auto(recompute)
    tiled = load_config(None, ["model.partial_pretrain=/nowhere", "model.tiled_mlp=true"])
    assert "tiled_mlp" in why_not_auto(tiled)
