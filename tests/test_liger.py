"""model.use_liger (models/liger.py): which of Liger's kernels a run asks for, the error where
liger-kernel is missing, and on a GPU the patched layers against transformers' own."""

import copy
import importlib.util
import logging
import sys

import pytest
import torch
import transformers

from verlite.errors import VerliteError
from verlite.models import liger
from verlite.models.liger import AUTO_KINDS, KINDS, use_liger_kernels, wanted_kinds

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None


CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing runs on them


def test_use_liger_asks_for_every_layer_kernel_and_the_knob_for_some(monkeypatch):
    monkeypatch.delenv("VERLITE_LIGER_KERNELS", raising=False)
    assert wanted_kinds(True, CUDA) == KINDS == ("rope", "swiglu", "rms_norm")
    assert wanted_kinds(False, CUDA) == ()
    monkeypatch.setenv("VERLITE_LIGER_KERNELS", "rope, swiglu")
    assert wanted_kinds(False, CUDA) == wanted_kinds("auto", CUDA) == ("rope", "swiglu")
    assert wanted_kinds(True, CUDA) == KINDS  # true asks for all of them whatever the knob says
    monkeypatch.setenv("VERLITE_LIGER_KERNELS", "rope,geglu")
    with pytest.raises(VerliteError, match="geglu"):
        wanted_kinds(False, CUDA)


def test_auto_takes_rope_and_swiglu_on_a_gpu_with_liger_and_says_why_not_elsewhere(monkeypatch, caplog):
    monkeypatch.delenv("VERLITE_LIGER_KERNELS", raising=False)
    monkeypatch.setattr(liger, "installed", lambda: True)
    assert wanted_kinds("auto", CUDA) == AUTO_KINDS == ("rope", "swiglu")  # RMSNorm stays PyTorch's fused one
    with caplog.at_level(logging.INFO, logger="verlite.models"):
        assert wanted_kinds("auto", CPU) == ()
        assert wanted_kinds(True, CPU) == ()
        monkeypatch.setattr(liger, "installed", lambda: False)
        assert wanted_kinds("auto", CUDA) == ()
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "model.use_liger=auto: Liger's kernels run on CUDA GPUs only; off on cpu") in said
    assert ("WARNING", "model.use_liger=true: Liger's kernels run on CUDA GPUs only; off on cpu") in said
    assert any(level == "INFO" and "liger-kernel is not installed (pip install liger-kernel" in m for level, m in said)


def test_the_side_thread_import_is_waited_for_and_its_error_left_to_the_patch(monkeypatch):
    monkeypatch.setattr(liger, "installed", lambda: True)
    monkeypatch.setattr(liger, "_ENTRY", "json")
    liger.start_import(("rope",))
    liger.finish_import()  # joined, imported
    liger.finish_import()  # nothing started: returns at once
    liger.start_import(())  # nothing asked: no thread
    assert liger._import_thread is None
    monkeypatch.setattr(liger, "_ENTRY", "verlite_no_such_module")
    liger.start_import(("rope",))
    liger.finish_import()  # a failed import is not raised here: use_liger_kernels meets it again
    assert liger._import_thread is None and liger._import_error is None


def test_every_thread_that_finishes_the_import_waits_for_it(monkeypatch):
    """The model read and the memory plan's weightless model each wait for Liger's import
    (both build transformers models): the second caller must not return while it runs."""
    import threading
    import time

    done = threading.Event()
    monkeypatch.setattr(liger, "_import_thread", threading.Thread(target=lambda: (time.sleep(0.3), done.set())))
    liger._import_thread.start()
    seen = []
    callers = [threading.Thread(target=lambda: (liger.finish_import(), seen.append(done.is_set()))) for _ in range(3)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert seen == [True, True, True] and liger._import_thread is None


def test_auto_goes_on_without_liger_where_it_does_not_import(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # an import that fails
    with caplog.at_level(logging.WARNING, logger="verlite.models"):
        assert use_liger_kernels(torch.nn.Linear(2, 2), AUTO_KINDS, required=False) is False
    assert "model.use_liger=auto: liger-kernel did not import (ModuleNotFoundError" in caplog.text
    with pytest.raises(VerliteError, match="pip install liger-kernel"):
        use_liger_kernels(torch.nn.Linear(2, 2), KINDS)
    # A Liger that breaks otherwise while importing (e.g. against another transformers): auto
    # goes on without it, true stops with the error.
    import builtins

    real_import = builtins.__import__

    def broken_liger(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise AttributeError("module 'transformers' has no attribute 'X'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "liger_kernel.transformers.monkey_patch")
    monkeypatch.setattr(builtins, "__import__", broken_liger)
    assert use_liger_kernels(torch.nn.Linear(2, 2), AUTO_KINDS, required=False) is False
    assert "did not import (AttributeError" in caplog.text
    with pytest.raises(AttributeError):
        use_liger_kernels(torch.nn.Linear(2, 2), KINDS)


def test_use_liger_defaults_to_auto_but_verl_commands_keep_verls_false():
    from verlite.config import load_config

    assert load_config(None, ["model.partial_pretrain=/m"]).model.use_liger == "auto"
    with pytest.raises(VerliteError, match="'model.use_liger' is 'maybe'; use true, false or auto"):
        load_config(None, ["model.partial_pretrain=/m", "model.use_liger=maybe"])
    assert load_config(None, ["model.partial_pretrain=/m"], dialect="verl").model.use_liger is False
    assert load_config(None, ["model.path=/m"], dialect="verl_engine").model.use_liger is False
    assert load_config(None, ["model.partial_pretrain=/m", "model.use_liger=true"], dialect="verl").model.use_liger is True


@pytest.mark.skipif(HAVE_LIGER, reason="liger-kernel is installed here")
def test_a_clear_error_where_liger_is_not_installed():
    with pytest.raises(VerliteError, match="pip install liger-kernel"):
        use_liger_kernels(torch.nn.Linear(2, 2), KINDS)
    assert use_liger_kernels(torch.nn.Linear(2, 2), ()) is False  # nothing asked: nothing imported


@pytest.fixture
def qwen2_module_restored():
    """Liger patches transformers' Qwen2 module itself (RoPE, norm and MLP classes): put it back
    for the tests that run after this one in the same process."""
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    yield
    for name in [n for n in vars(modeling_qwen2) if n not in saved]:
        delattr(modeling_qwen2, name)
    for name, value in saved.items():
        setattr(modeling_qwen2, name, value)


@pytest.mark.skipif(not (HAVE_LIGER and torch.cuda.is_available()), reason="Liger's kernels need a CUDA GPU")
def test_liger_layers_follow_transformers_layers_on_a_gpu(qwen2_module_restored):
    cfg = transformers.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).cuda()
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    results = []
    for liger in (False, True):  # the reference first: Liger's RoPE patch is module-wide
        model = copy.deepcopy(ref)
        if liger:
            assert use_liger_kernels(model, KINDS)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), model.model.embed_tokens.weight.grad.float()))
    (a, ga), (b, gb) = results
    assert abs(a - b) / a < 1e-2 and ((ga - gb).norm() / ga.norm()).item() < 5e-2


def test_liger_patches_the_plain_model_before_lora_and_the_tiled_mlp(tiny_model, monkeypatch):
    """Liger looks up the decoder by the model's own attributes (a PEFT wrapper has none) and
    replaces each MLP's forward (which would undo the tiling): it must come first."""
    import verlite.models.liger as liger
    from verlite.config.schema import ModelConfig
    from verlite.models.load import load_model

    seen = []

    def record(model, kinds, required=True):
        seen.append((type(model).__name__, kinds, type(model.model.layers[0].mlp.forward).__name__))
        return True

    monkeypatch.setattr(liger, "use_liger_kernels", record)
    cfg = ModelConfig(partial_pretrain=str(tiny_model), lora_rank=4, target_modules=["q_proj", "v_proj"],
                      enable_gradient_checkpointing=False, tiled_mlp=True)
    model = load_model(cfg, torch.float32, ("swiglu",))
    assert seen == [("Qwen2ForCausalLM", ("swiglu",), "method")]  # plain model, MLP not tiled yet
    assert type(model).__name__.startswith("Peft")
