"""verl's model keys: exclude_modules, lora_adapter_path (continue an adapter), external_lib."""

from __future__ import annotations

import torch

from verlite.config import load_config
from verlite.models.load import load_model


def test_exclude_modules_keeps_lora_off_them(tiny_model):
    cfg = load_config(None, [f"model.partial_pretrain={tiny_model}", "model.lora_rank=4",
                             "model.exclude_modules=[o_proj,down_proj]"], dialect="verl")
    model = load_model(cfg.model, torch.float32)
    names = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert "o_proj" not in names and "down_proj" not in names and "q_proj" in names


def test_lora_adapter_path_continues_that_adapter(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter: B is no longer zero
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_" in n}

    cfg = load_config(None, [f"model.partial_pretrain={tiny_model}", f"model.lora_adapter_path={tmp_path / 'adapter'}"],
                      dialect="verl")
    assert cfg.model.lora_rank == 6
    model = load_model(cfg.model, torch.float32)
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[n], saved[n]) and loaded[n].requires_grad for n in saved)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_external_lib_is_imported(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "my_ext_lib.py").write_text("import builtins\nbuiltins._verlite_ext_loaded = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_config(None, [f"model.partial_pretrain={tiny_model}", "model.external_lib=my_ext_lib"], dialect="verl")
    import builtins

    assert getattr(builtins, "_verlite_ext_loaded", False)
    del builtins._verlite_ext_loaded
