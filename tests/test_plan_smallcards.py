"""The planner on small cards (verlite/engine/memory.py): NF4 weights, 8-bit state,
optimizer offload and tiled MLP are counted; `auto` turns on the memory switches a run
needs and says why; a config that cannot fit is told the smallest change that would; the
example configs fit the cards they are written for. Real model configs, built on the meta
device (nothing is downloaded or allocated)."""

import sys
from pathlib import Path

import pytest

from verlite import cli
from verlite.config import load_config
from verlite.engine.memory import GIB, choose_batching, estimate, model_shape
from verlite.errors import VerliteError

from conftest import shape_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """config.json only, for the benchmark's Qwen2.5 shapes and a gemma-2b shape."""
    from transformers import GemmaConfig, Qwen2Config

    sys.path.insert(0, str(ROOT / "bench"))
    from shapes import SHAPES

    root = tmp_path_factory.mktemp("shapes")
    out = {}
    for name in ("qwen1.5b", "qwen7b"):
        Qwen2Config(max_position_embeddings=131072, **SHAPES[name]).save_pretrained(root / name)
        out[name] = root / name
    GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                num_key_value_heads=1, head_dim=256, vocab_size=256000, max_position_embeddings=8192
                ).save_pretrained(root / "gemma2b")
    out["gemma2b"] = root / "gemma2b"
    return out


def cfg_for(model: Path, *overrides: str):
    return load_config(None, [f"model.partial_pretrain={model}", *overrides])


QV = "model.target_modules=[q_proj,v_proj]"


def gsm8k_like(shapes):
    """GSM8K-like token counts (7,473 samples of ~207 +- 60 tokens) and a 0.5B shape."""
    import numpy as np

    lengths = np.random.default_rng(0).normal(207, 60, size=7473).clip(60, 1024).astype(int)
    return lengths, shape_config(shapes["qwen7b"].parent, "qwen0.5b", 32768)


def test_nf4_weights_8bit_state_and_offload_are_counted(shapes):
    lora = cfg_for(shapes["qwen7b"], "model.lora_rank=8", QV)
    shape = model_shape(lora)
    bf16 = estimate(lora, shape, 1024).parts["weights"]
    lora.model.quantization = "nf4"
    nf4 = estimate(lora, shape, 1024).parts["weights (NF4 base + fp32 LoRA)"]
    # 6.5 B linear weights at ~0.53 byte each; embeddings and LM head stay bf16.
    assert 5.0 * GIB < nf4 < 5.5 * GIB < 14 * GIB < bf16
    full = cfg_for(shapes["qwen1.5b"])
    shape = model_shape(full)
    assert estimate(full, shape, 1024).parts["AdamW state (fp32)"] == shape.params * 8
    full.optim.optimizer, full.optim.optimizer_impl = "AdamW8bit", "torchao.optim"
    assert estimate(full, shape, 1024).parts["AdamW state (8-bit)"] == shape.params * 2
    full.optim.optimizer, full.optim.optimizer_impl = "AdamW", "torch.optim"
    full.model.fsdp_config.optimizer_offload = True
    assert not any(k.startswith("AdamW state") for k in estimate(full, shape, 1024).parts)


def test_tiled_mlp_caps_the_mlp_activations(shapes):
    cfg = cfg_for(shapes["qwen7b"], "model.lora_rank=8", QV, "model.enable_gradient_checkpointing=false")
    shape = model_shape(cfg)
    plain = estimate(cfg, shape, 32768)
    cfg.model.tiled_mlp = True
    tiled = estimate(cfg, shape, 32768)
    assert tiled.parts["activations"] < 0.5 * plain.parts["activations"]
    assert tiled.parts["MLP tile"] < 0.01 * plain.parts["activations"]


def test_auto_turns_on_only_the_switches_needed_and_says_why(shapes, caplog):
    # 7B QLoRA, one 8192-token sample on an 8 GiB card: fits only with both switches.
    cfg = cfg_for(shapes["qwen7b"], "model.lora_rank=8", "model.quantization=nf4", QV, "data.max_length=8192",
                  "data.train_batch_size=1")
    shape = model_shape(cfg)
    with caplog.at_level("INFO", logger="verlite.plan"):
        assert choose_batching(cfg, shape, capacity_gib=8) == (8192, shape.layers)
    assert cfg.model.enable_activation_offload and cfg.model.tiled_mlp
    assert "model.enable_activation_offload=true model.tiled_mlp=true, because without them" in caplog.text
    # With room to spare, nothing is switched on.
    roomy = cfg_for(shapes["qwen7b"], "model.lora_rank=8", "model.quantization=nf4", QV, "data.max_length=8192",
                    "data.train_batch_size=1")
    choose_batching(roomy, shape, capacity_gib=24)
    assert not roomy.model.enable_activation_offload and not roomy.model.tiled_mlp


@pytest.mark.parametrize("model, overrides, cap, advice", [
    # A LoRA run is never told to use LoRA: it is told to quantize its base.
    ("qwen7b", ["model.lora_rank=8", QV, "data.micro_batch_size_per_gpu=8"], 12,
     "smallest change that fits: model.quantization=nf4 "),
    ("qwen1.5b", ["data.train_batch_size=8"], 12,
     "smallest change that fits: optim.optimizer=AdamW8bit optim.optimizer_impl=torchao.optim "
     "model.fsdp_config.model_dtype=bf16"),
    ("qwen7b", ["model.lora_rank=8", "model.quantization=nf4", QV, "data.max_length=262144"], 24,
     "lower data.max_length to"),
])
def test_a_config_that_cannot_fit_names_the_smallest_change(shapes, model, overrides, cap, advice):
    cfg = cfg_for(shapes[model], *overrides)
    with pytest.raises(VerliteError) as err:
        choose_batching(cfg, model_shape(cfg), capacity_gib=cap)
    assert advice in str(err.value) and "use LoRA" not in str(err.value)
    assert not cfg.model.enable_activation_offload and not cfg.model.tiled_mlp  # left as it was


@pytest.mark.parametrize("example, shape", [("qwen2.5-1.5b-lora-12gb.yaml", "qwen1.5b"),
                                            ("gemma-2b-lora-12gb.yaml", "gemma2b"),
                                            ("qwen2.5-7b-qlora-12gb.yaml", "qwen7b"),
                                            ("qwen2.5-1.5b-full-12gb.yaml", "qwen1.5b")])
def test_examples_fit_their_12_gib_card(shapes, example, shape, capsys):
    code = cli.main(["plan", "--config_path", str(EXAMPLES / example), f"model.partial_pretrain={shapes[shape]}"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "GPU memory planned for: 12.0 GiB" in out.out and "fastest plan that fits:" in out.out
    if "micro_batch_size_per_gpu: 1" in (EXAMPLES / example).read_text():
        assert "-> fits" in out.out  # the micro batch as written, not only the planner's pick
    if "gemma" in example:
        assert "rope_theta = 10000.0" in out.out + out.err


def test_recomputation_is_sized_for_the_largest_micro_batch_the_data_forms(shapes, caplog):
    """QLoRA 7B, batch 8 of at most 1024 tokens, 12 GiB: planned for 8192-token micro-batches,
    27 of 28 layers are recomputed; samples of 200-900 tokens never form more than ~5,000, and
    the plan then recomputes fewer layers, sized for the largest step of the run (all epochs).
    The GSM8K default run (0.5B, batch 32 of ~207 tokens, max_length 1024) on a 24 GiB card:
    planned for 32,768 tokens it recomputes 19 layers; for the ~7,800 its steps hold, none."""
    import logging

    import numpy as np
    import torch

    from verlite.data.batching import StepPlan
    from verlite.engine.memory import data_micro_batch_tokens, resolve_auto_memory

    def config(*extra):
        return load_config(None, [f"model.partial_pretrain={shapes['qwen7b']}", "model.lora_rank=8", QV,
                                  "model.quantization=nf4", "data.train_batch_size=8", "data.max_length=1024",
                                  "data.micro_batch_size_per_gpu=auto", "trainer.gpu_mem_gb=12",
                                  "trainer.total_epochs=3", "model.compile=true", *extra])

    lengths = np.random.default_rng(0).integers(200, 900, size=64)
    eager = config("model.compile=auto")  # planned as eager layers (compile decides later): more recomputed
    resolve_auto_memory(eager, torch.device("cuda"), lengths=lengths)
    worst, fitted = config(), config()
    resolve_auto_memory(worst, torch.device("cuda"))
    with caplog.at_level(logging.INFO, logger="verlite.plan"):
        resolve_auto_memory(fitted, torch.device("cuda"), lengths=lengths)
    assert worst.data.max_token_len_per_gpu == fitted.data.max_token_len_per_gpu == 8192  # same batching
    assert worst.model.checkpoint_layers == 27
    assert fitted.model.checkpoint_layers == 26  # a 7B layer keeps ~1 GiB at 5,700 tokens: one more fits
    assert eager.model.checkpoint_layers == 27
    seen = data_micro_batch_tokens(fitted, lengths, 1)
    plan = StepPlan(lengths, 8, 1, fitted.trainer.seed, None, 8192, packed=True)
    steps = 3 * plan.steps_per_epoch
    assert seen == max(int(lengths[plan.step_indices(s)].sum()) for s in range(steps)) < 8192
    assert any(f"largest micro-batch ({seen} tokens)" in r.getMessage() for r in caplog.records)
    # Predicted to fit at that size; several GPUs or unpacked batches keep planning for the budget.
    shape = model_shape(fitted)
    layers = fitted.model.checkpoint_layers
    assert estimate(fitted, shape, seen, 1, True, layers).total <= 12 * GIB * 0.92
    assert data_micro_batch_tokens(fitted, lengths, 2) is None
    assert data_micro_batch_tokens(config("data.max_token_len_per_gpu=2048"), lengths, 1) is None

    gsm8k, short = gsm8k_like(shapes)
    runs = [load_config(None, [f"model.partial_pretrain={short}", "data.micro_batch_size_per_gpu=32",
                                "data.max_length=1024", "data.packing=true", "trainer.gpu_mem_gb=24"]) for _ in "ab"]
    resolve_auto_memory(runs[0], torch.device("cuda"))
    resolve_auto_memory(runs[1], torch.device("cuda"), lengths=gsm8k)
    assert runs[0].model.enable_gradient_checkpointing is True and runs[0].model.checkpoint_layers == 19
    assert runs[1].model.enable_gradient_checkpointing is False
    assert runs[1].optim.fused_backward is False  # nothing to win from fusing where nothing is recomputed


def test_data_sized_plans_with_the_fused_step_and_fixed_micro_batches(shapes):
    """The 1.5B full fine-tune at 12 GiB (8-bit state, bf16 master): auto batching turns the
    fused step on and a data-sized step is still one micro-batch, so its gradients are not
    counted whole (that once crashed the plan); micro-batches of a fixed count are sized by
    their real tokens when the GPU lays them out padding-free, by padded rows otherwise."""
    import numpy as np
    import torch

    from verlite.engine.memory import data_micro_batch_tokens, plan_report, resolve_auto_memory

    lengths = np.random.default_rng(1).integers(48, 1024, size=48)
    small = ["data.train_batch_size=8", "data.max_length=1024", "optim.optimizer=AdamW8bit",
             "optim.optimizer_impl=torchao.optim", "model.fsdp_config.model_dtype=bf16", "trainer.gpu_mem_gb=12",
             "trainer.total_training_steps=6"]
    for batching in (["data.micro_batch_size_per_gpu=auto"], ["data.micro_batch_size_per_gpu=8", "data.packing=true"]):
        cfg = load_config(None, [f"model.partial_pretrain={shapes['qwen1.5b']}", *small, *batching])
        resolve_auto_memory(cfg, torch.device("cuda"), lengths=lengths)
        assert cfg.optim.fused_backward is True
        layers = cfg.model.checkpoint_layers
        assert layers is not None and layers < 27, layers  # 27 when planned for 8192 tokens
        seen = data_micro_batch_tokens(cfg, lengths, 1)
        assert estimate(cfg, model_shape(cfg), seen, 1, True, layers, one_micro_batch=True).total <= 12 * GIB * 0.92

    gsm8k, short = gsm8k_like(shapes)
    by_count = [f"model.partial_pretrain={short}", "data.micro_batch_size_per_gpu=32", "data.max_length=1024",
                "trainer.gpu_mem_gb=16"]
    planned = {}
    for name, lengths_, free in (("budget", None, True), ("padded", gsm8k, False), ("padding-free", gsm8k, True)):
        cfg = load_config(None, by_count)
        resolve_auto_memory(cfg, torch.device("cuda"), lengths=lengths_, padding_free=free)
        planned[name] = cfg.model.checkpoint_layers or (24 if cfg.model.enable_gradient_checkpointing else 0)
    assert planned["budget"] > planned["padded"] > planned["padding-free"], planned
    padded = data_micro_batch_tokens(load_config(None, by_count), gsm8k, 1, padding_free=False)
    free = data_micro_batch_tokens(load_config(None, by_count), gsm8k, 1, padding_free=True)
    assert free < padded < 32 * 1024 and padded % 32 == 0

    # `verlite plan` for the same 1.5B in fp32 master weights names the fused step in its advice.
    report = plan_report(load_config(None, [f"model.partial_pretrain={shapes['qwen1.5b']}", "data.train_batch_size=8",
                                            "data.micro_batch_size_per_gpu=auto"]), 12.0)
    assert "model.fsdp_config.model_dtype=bf16 optim.fused_backward=true" in report, report
