"""The optimizer step fused into backward (engine/fused_backward.py): without clipping it is
the plain step (same losses and weights up to float noise), with gradient accumulation too;
with clipping it follows the plain step's loss curve within a stated tolerance; it resumes
exactly; a NaN loss leaves weights and state untouched; an OOM after updates began is not
retried. Runs go through the CLI entry point."""

import shutil

import pytest
import torch

from verlite.errors import VerliteError

from conftest import shape_config

from test_optim_lowmem import EIGHT_BIT, train, wide_model  # noqa: F401  (fixture)

FUSED = "optim.fused_backward=true"
NO_CLIP = "optim.clip_grad=100"  # gradient norms of this run stay far below: clipping never acts


@pytest.mark.parametrize("extra", [[], ["data.micro_batch_size_per_gpu=2"]], ids=["one_micro_batch", "accumulated"])
def test_without_clipping_fused_is_the_plain_step(tmp_path, wide_model, extra):  # noqa: F811
    plain = train(tmp_path / "plain", wide_model, 6, NO_CLIP, *extra)
    fused = train(tmp_path / "fused", wide_model, 6, NO_CLIP, FUSED, *extra)
    assert sorted(plain) == sorted(fused)
    for s in plain:
        assert fused[s] == pytest.approx(plain[s], rel=1e-5, abs=1e-6), (s, plain, fused)


# Measured (2 CPU cores, torch 2.13): identical for 2 steps (Adam is nearly scale-invariant, so
# clipping matters only as the gradient scale changes between steps), then within 3.2% until a
# gradient spike at step 10 (norm 7.7, clipped one step late): 8.2% at step 11 (lower loss),
# 1.6% at step 12. clip_grad=1.0 acts on every step of this lr=3e-3 run (norms 1.7-7.7).
CLIPPED_TOLERANCE, FINAL_TOLERANCE = 0.12, 0.04


def test_with_clipping_fused_follows_the_plain_step(tmp_path, wide_model):  # noqa: F811
    plain = train(tmp_path / "plain", wide_model, 12, "optim.clip_grad=1.0")
    fused = train(tmp_path / "fused", wide_model, 12, "optim.clip_grad=1.0", FUSED)
    worst = max(abs(fused[s] - plain[s]) / plain[s] for s in plain)
    print("worst relative loss difference", worst, {s: round(fused[s] / plain[s] - 1, 4) for s in plain})
    assert worst <= CLIPPED_TOLERANCE, (plain, fused)
    assert abs(fused[12] - plain[12]) / plain[12] <= FINAL_TOLERANCE, (plain, fused)
    assert fused[12] < fused[1] - 0.3  # it learned


@pytest.mark.parametrize("extra", [[], EIGHT_BIT], ids=["adamw", "adamw8bit"])
def test_fused_resumes_exactly(tmp_path, wide_model, extra):  # noqa: F811
    args = (FUSED, "optim.clip_grad=1.0", "trainer.save_freq=3", *extra)
    ref = train(tmp_path / "ref", wide_model, 6, *args)
    cut = tmp_path / "cut" / "run"
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "run" / "global_step_3", cut / "global_step_3")
    (cut / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = train(tmp_path / "cut", wide_model, 6, *args)
    assert resumed == {s: ref[s] for s in (4, 5, 6)}
    name = "global_step_6/huggingface/model.safetensors"
    assert (tmp_path / "ref" / "run" / name).read_bytes() == (cut / name).read_bytes()


def test_a_nan_step_leaves_weights_and_state_untouched(tmp_path, tiny_model, monkeypatch):
    from test_optim_lowmem import check_nan_step_changes_nothing
    from test_trainer import config
    from verlite.engine.distributed import init_distributed
    from verlite.trainer.sft_trainer import Trainer

    trainer = Trainer(config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=3",
                             FUSED), init_distributed("cpu"))
    assert trainer.optimizer.fused_backward is not None
    check_nan_step_changes_nothing(trainer, monkeypatch, grads_freed=True)


# ---- the planner (engine/memory.py) ----------------------------------------------------------
@pytest.fixture(scope="module")
def qwen15b(tmp_path_factory):
    return shape_config(tmp_path_factory.mktemp("shape"), "qwen1.5b", 32768)


def small_card(model, *extra):
    from verlite.config import load_config

    # bench's full1.5b_12g: batch 8 of 1024 tokens, bf16 master weights, 8-bit AdamW, 12 GiB.
    return load_config(None, [f"model.partial_pretrain={model}", "data.train_batch_size=8", "data.max_length=1024",
                              "data.micro_batch_size_per_gpu=auto", *EIGHT_BIT, "model.fsdp_config.model_dtype=bf16",
                              "trainer.gpu_mem_gb=12", *extra])


def test_planner_fuses_when_it_makes_the_step_one_micro_batch(qwen15b, caplog):
    import logging

    from verlite.engine.memory import GIB, estimate, model_shape, resolve_auto_memory

    cfg = small_card(qwen15b)
    assert cfg.optim.fused_backward == "auto"
    with caplog.at_level(logging.INFO, logger="verlite.plan"):
        resolve_auto_memory(cfg, torch.device("cuda"))
    assert cfg.optim.fused_backward is True
    assert cfg.data.max_token_len_per_gpu == 8 * 1024  # the whole step in one micro-batch
    # Without it the plain step's update (every gradient held, plus torchao's fp32 working
    # set: 11.24 GiB measured; the 4-bit state's ran out of memory on the H200) does not fit the
    # plan's share of 12 GiB at all, and turning it back on is the change named.
    with pytest.raises(VerliteError, match="smallest change that fits: optim.fused_backward=true "):
        resolve_auto_memory(small_card(qwen15b, "optim.fused_backward=false"), torch.device("cuda"))
    assert any("optim.fused_backward auto: on" in r.getMessage() for r in caplog.records)
    shape = model_shape(cfg)
    layers = (cfg.model.checkpoint_layers or shape.layers) if cfg.model.enable_gradient_checkpointing else 0
    est = estimate(cfg, shape, 8192, 1, layers > 0, layers)
    grads = est.parts["gradients (bf16, applied in backward)"]
    # No full gradient buffer: the root's (tied embedding) and one layer's gradients at most.
    assert grads == (shape.root_params + shape.layer_params) * 2 < shape.params * 2 / 4
    assert est.total <= 12 * GIB * 0.92


@pytest.mark.parametrize("extra, device", [(["trainer.gpu_mem_gb=80"], "cuda"), ([], "cpu"),
                                           (["model.fsdp_config.optimizer_offload=true", "optim.optimizer=AdamW",
                                             "optim.optimizer_impl=torch.optim"], "cuda")],
                         ids=["plenty_of_memory", "cpu", "optimizer_offload"])
def test_planner_leaves_it_off_where_it_does_not_pay(qwen15b, extra, device):
    from verlite.engine.memory import resolve_fused_backward

    cfg = small_card(qwen15b, *extra)
    resolve_fused_backward(cfg, torch.device(device))
    assert cfg.optim.fused_backward is False


def test_explicit_fused_with_host_state_is_refused(tmp_path, wide_model):  # noqa: F811
    from test_optim_lowmem import ROWS
    from conftest import write_jsonl
    from verlite import cli

    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    code = cli.main(["sft", f"data.train_files={data}", f"model.partial_pretrain={wide_model}", "trainer.device=cpu",
                     f"trainer.default_local_dir={tmp_path / 'run'}", "trainer.total_training_steps=1", FUSED,
                     "model.fsdp_config.optimizer_offload=true"])
    assert code == 2


def test_a_decoder_layer_is_updated_with_one_optimizer_call(tmp_path, tiny_model, monkeypatch):
    """Per-weight host work was on the step's critical path: a layer's weights are clipped and
    updated together, once its last gradient is complete; the other weights one by one."""
    from test_trainer import config
    from verlite.engine.distributed import init_distributed
    from verlite.trainer.sft_trainer import Trainer

    trainer = Trainer(config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=2",
                             "optim.clip_grad=1.0", FUSED), init_distributed("cpu"))
    fused = trainer.optimizer.fused_backward
    layers = trainer.model.decoder_layers()
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    in_layers = {p for layer in layers for p in layer.parameters()}
    assert len(fused.buckets) == len(layers) + sum(p not in in_layers for p in trained)
    sizes = []
    step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (sizes.append(
        sum(len(g["params"]) for g in trainer.optimizer.param_groups)), step(*a, **k))[1])
    before = [p.detach().clone() for p in trained]
    trainer._step(trainer._micro_batches(0))
    assert len(sizes) == len(fused.buckets) and sorted(sizes)[-1] == len(list(layers[0].parameters()))
    assert all(not torch.equal(a, p) for a, p in zip(before, trained))  # every weight moved
    assert all(p.grad is None for p in trained)  # and every gradient was freed


def _two_layers(fused_adamw: bool):
    from verlite.engine.fused_backward import FusedBackward

    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
    unused = torch.nn.Parameter(torch.zeros(8))  # in the second layer's bucket, never in the graph
    params = [*layers[0].parameters(), *layers[1].parameters(), unused]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=fused_adamw)
    buckets = [list(layers[0].parameters()), [*layers[1].parameters(), unused]]
    return layers, params, opt, FusedBackward(opt, params, clip_grad=1.0, buckets=buckets)


def _backward(layers, fused, x, poison: bool = False):
    fused.arm(torch.device("cpu"))
    h = layers[0](x)
    if poison:  # a finite loss whose first layer gets a NaN gradient
        h = h + (h.detach() * float("nan")).sum() * 0 * h
        h.register_hook(lambda g: torch.full_like(g, float("nan")))
    layers[1](h).square().mean().backward()


@pytest.mark.parametrize("fused_adamw", [True, False], ids=["torch_fused_adamw", "other_optimizers"])
def test_fused_step_edge_cases(fused_adamw):
    """An unused weight does not hold its layer's gradients past the first step; a NaN
    gradient with a finite loss does not poison the next steps' clip; an OOM inside backward
    before any update leaves every weight and state as it was, and the hooks disarmed."""
    layers, params, opt, fused = _two_layers(fused_adamw)
    x = torch.randn(4, 8)
    _backward(layers, fused, x)
    fused.finish()
    assert [len(b) for b in fused.buckets] == [2, 2, 1]  # the unused weight now stands alone
    assert all(p.grad is None for p in params)

    _backward(layers, fused, x, poison=True)
    fused.finish()
    good = fused.prev_norm.clone()
    assert torch.isfinite(good) and bool(fused.bad)
    for _ in range(2):
        _backward(layers, fused, x)
        fused.finish()
    assert all(torch.isfinite(p).all() for p in params), "a NaN step poisoned the later ones"

    before = [p.detach().clone() for p in params]
    steps = {id(p): opt.state[p]["step"].clone() for p in params if p in opt.state}
    fused.arm(torch.device("cpu"))
    out = layers[1](layers[0](x)).square().mean()

    def oom(grad):
        raise torch.OutOfMemoryError("simulated")

    handle = layers[1].weight.register_hook(oom)  # the last layer's weight: before any bucket is complete
    with pytest.raises(torch.OutOfMemoryError):
        try:
            out.backward()
        except torch.OutOfMemoryError:
            assert fused.abandon() == 0  # nothing updated: the step may be retried
            raise
    assert not fused.armed
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # a partial bucket was not applied
    assert all(torch.equal(opt.state[p]["step"], steps[id(p)]) for p in params if id(p) in steps)
    handle.remove()
    for p in params:
        p.grad = None  # what the step's zero_grad does before the retry
    _backward(layers, fused, x)  # the retry
    fused.finish()
    assert not any(torch.equal(a, p) for a, p in zip(before[:4], params[:4]))


@pytest.mark.parametrize("where", ["bucket", "finish"])
def test_an_oom_after_updates_began_ends_the_run_instead_of_retrying(tmp_path, tiny_model, monkeypatch, where):
    """The trainer's OOM retry reruns the step with halved micro-batches: after an optimizer
    call raised part-way (moments, step counts or weights changed in place), or in finish()
    (which updates the leftover weights), that would update weights twice. Such an OOM ends
    the run in one line, and the hooks are disarmed."""
    from test_trainer import config
    from verlite.engine.distributed import init_distributed
    from verlite.engine.fused_backward import FusedBackward
    from verlite.trainer.sft_trainer import Trainer

    trainer = Trainer(config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=2",
                             FUSED), init_distributed("cpu"))
    fused = trainer.optimizer.fused_backward

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(FusedBackward, "_step" if where == "bucket" else "finish", oom)
    with pytest.raises(VerliteError, match="cannot be retried"):
        trainer._step(trainer._micro_batches(0))
    assert not fused.armed


def test_an_oom_in_the_plain_optimizer_step_is_not_retried(tmp_path, tiny_model, monkeypatch):
    """AdamW builds its state lazily and foreach kernels update in place: an OOM inside
    optimizer.step() may leave either half done, and halving micro-batches frees nothing there."""
    from test_trainer import config
    from verlite.engine.distributed import init_distributed
    from verlite.trainer.sft_trainer import Trainer

    trainer = Trainer(config(tmp_path, tiny_model, "trainer.total_training_steps=2"), init_distributed("cpu"))

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(trainer.optimizer, "step", oom)
    with pytest.raises(VerliteError, match="out of GPU memory in the optimizer step"):
        trainer._step(trainer._micro_batches(0))


def test_a_bad_first_step_does_not_turn_clipping_off_for_the_next():
    """A NaN gradient in the very first step leaves no finite norm to clip the second step
    by: that step clips by shares, as a first step (its gradient norm stays <= clip)."""
    layers, params, opt, fused = _two_layers(fused_adamw=True)
    x = torch.randn(4, 8) * 100  # gradients far above clip_grad = 1
    _backward(layers, fused, x, poison=True)
    fused.finish()
    assert bool(fused.bad) and not torch.isfinite(fused.prev_norm)
    clipped = []
    step = fused._step
    fused._step = lambda bucket: (clipped.append(sum(float(p.grad.float().square().sum()) for p in bucket)),
                                  step(bucket))
    _backward(layers, fused, x)
    fused.finish()
    assert not bool(fused.bad) and torch.isfinite(fused.prev_norm)
    assert sum(clipped) ** 0.5 <= 1.0 + 1e-4, sum(clipped) ** 0.5  # the old code: not clipped at all
    assert float(fused.prev_norm) > 10  # the reported norm is the one before clipping



def test_an_overflowing_norm_does_not_zero_the_next_steps_gradients():
    """Every bucket's norm finite but their sum overflowing: the previous finite norm stays
    (clip / inf would scale the next step's gradients to zero)."""
    layers, params, opt, fused = _two_layers(fused_adamw=True)
    x = torch.randn(4, 8)
    _backward(layers, fused, x)
    fused.finish()
    good = fused.prev_norm.clone()
    _backward(layers, fused, x)
    fused.sq.fill_(float("inf"))  # what an fp32 overflow of the summed squares leaves
    fused.finish()
    assert torch.equal(fused.prev_norm, good)
