"""verl's keys, defaults and Hydra's override grammar (verlite/config/verl.py, overrides.py)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import yaml

from verlite.config import load_config
from verlite.config import verl as verl_cfg
from verlite.config.schema import OptimConfig
from verlite.engine.optim import lr_factor
from verlite.errors import VerliteError


def legacy(*overrides, path=None):
    return load_config(path, ["model.partial_pretrain=/m", *overrides], dialect="verl")


def engine(*overrides):
    return load_config(None, ["model.path=/m", *overrides], dialect="verl_engine")


def test_legacy_defaults_are_verls():
    cfg = legacy()
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.warmup_steps_ratio, cfg.optim.lr_scheduler) == \
        (1e-5, [0.9, 0.95], 0.1, "cosine")
    assert (cfg.data.train_batch_size, cfg.data.micro_batch_size_per_gpu, cfg.data.max_length) == (256, 4, 1024)
    assert (cfg.trainer.total_epochs, cfg.trainer.seed, cfg.trainer.save_freq) == (4, 1, -1)
    assert cfg.trainer.default_local_dir == "checkpoints/gsm8k-sft/test"  # ${...} interpolated
    assert cfg.data.train_files == "~/data/gsm8k/train.parquet" and cfg.data.response_end == "eos"
    assert cfg.trainer.device == "auto"  # verl's `device: cuda` means "the accelerator"
    assert cfg.trainer.checkpoint.load_contents == ["model", "optimizer", "extra"]


def test_hydra_grammar():
    cfg = legacy("data.prompt_dict_keys=['question']", "+data.response_dict_keys=[answer]", "++optim.lr=3e-4",
                 "~trainer.seed", "data.val_files=null", "trainer.logger=[console,tensorboard]",
                 "trainer.experiment_name='a b'", "trainer.default_local_dir=${trainer.project_name}/x",
                 "optim=fsdp", "data.apply_chat_template_kwargs={enable_thinking:false}",
                 "data.train_files=~/data/sft-test/train.json")
    assert cfg.data.prompt_dict_keys == ["question"] and cfg.data.response_dict_keys == ["answer"]
    assert cfg.optim.lr == 3e-4 and cfg.trainer.seed == 42  # ~key: back to verlite's default
    assert cfg.data.val_files is None and cfg.trainer.logger == ["console", "tensorboard"]
    assert cfg.trainer.experiment_name == "a b" and cfg.trainer.default_local_dir == "gsm8k-sft/x"
    assert cfg.data.apply_chat_template_kwargs == {"enable_thinking": False}
    assert cfg.data.train_files == "~/data/sft-test/train.json"  # `~` is outside Hydra's lexer: a plain string


@pytest.mark.parametrize("override, fragment", [
    ("data.max_lenght=5", "unknown config key 'data.max_lenght'; did you mean 'data.max_length'?"),
    ("data.prompt_dict_key=[a]", "did you mean 'data.prompt_dict_keys'?"),
    ("optim.lr=1e-4,1e-5", "is a sweep"),
    ("data.train_files=[a", "not valid Hydra syntax"),
    ("optim=adam", "config group optim=adam is not available in verlite; use optim=fsdp"),
    ("trainer.checkpoint.save_contents=[model,weights]", "'trainer.checkpoint.save_contents' has ['weights']"),
    ("model.external_lib=no_such_module_xyz", "model.external_lib: cannot import 'no_such_module_xyz'"),
    ("data.custom_cls.path=/nope/ds.py", "data.custom_cls.path: /nope/ds.py does not exist"),
])
def test_bad_keys_are_one_line(override, fragment):
    with pytest.raises(VerliteError) as e:
        legacy("data.custom_cls.name=X", override)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_custom_cls_file_without_the_class(tmp_path):
    code = tmp_path / "ds.py"
    code.write_text("class Other:\n    pass\n")
    with pytest.raises(VerliteError, match=r"data.custom_cls.name: .*ds.py defines no 'MyDataset'"):
        legacy(f"data.custom_cls.path={code}", "data.custom_cls.name=MyDataset")


def test_ignored_keys_are_named_once_in_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="verlite.config"):
        legacy("trainer.default_hdfs_dir=/hdfs/x", "data.use_shm=true")
    lines = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(lines) == 1
    for key in ("data.use_shm", "trainer.default_hdfs_dir", "trainer.nnodes", "trainer.n_gpus_per_node"):
        assert lines[0].count(key) == 1


def test_renamed_and_deprecated_legacy_keys(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = legacy("data.micro_batch_size=8", "optim.lr_warmup_steps_ratio=0.2", "optim.lr_warmup_steps=5",
                 "model.override_config={attention_dropout:0.1}", "use_remove_padding=true",
                 "ulysses_sequence_parallel_size=2", "optim.min_lr_ratio=0.1", "optim.num_cycles=1.0")
    assert cfg.data.micro_batch_size_per_gpu == 8  # 8 global over dp = 2 / sp 2 = 1 rank
    assert (cfg.optim.warmup_steps_ratio, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio) == (0.2, 5, 0.1)
    assert cfg.model.config_overrides == {"attention_dropout": 0.1} and cfg.ulysses_sequence_parallel_size == 2
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert legacy("data.micro_batch_size=8").data.micro_batch_size_per_gpu == 2


def test_engine_keys_land_on_verlite_fields():
    cfg = engine("engine=fsdp", "optim=fsdp", "engine.param_offload=true", "engine.optimizer_offload=true",
                 "engine.use_torch_compile=false", "engine.ulysses_sequence_parallel_size=2",
                 "engine.model_dtype=bf16", "optim.lr_scheduler_type=cosine", "optim.lr_warmup_steps=3",
                 "data.messages_key=conv", "data.tools_key=fn", "data.use_dynamic_bsz=false",
                 "checkpoint.save_contents=[model,hf_model]", "model.lora_rank=8", "model.exclude_modules=[lm_head]",
                 "model.custom_chat_template='{{x}}'", "model.tiled_mlp.enabled=true")
    m, d, o = cfg.model, cfg.data, cfg.optim
    assert m.partial_pretrain == "/m" and m.fsdp_config.offload_params and m.fsdp_config.optimizer_offload
    assert m.compile is False and cfg.ulysses_sequence_parallel_size == 2 and m.fsdp_config.model_dtype == "bf16"
    assert (o.lr, o.lr_scheduler, o.warmup_steps, o.betas) == (1e-3, "cosine", 3, [0.9, 0.999])
    assert d.multiturn.enable and d.multiturn.messages_key == "conv" and d.multiturn.tools_key == "fn"
    assert d.max_token_len_per_gpu is None and cfg.trainer.checkpoint.save_contents == ["model", "hf_model"]
    assert m.lora_rank == 8 and m.exclude_modules == ["lm_head"] and d.chat_template == "{{x}}" and m.tiled_mlp
    dyn = engine()
    assert dyn.data.max_token_len_per_gpu == 8192 and dyn.model.compile is True and dyn.optim.lr_scheduler == "constant"
    with pytest.raises(VerliteError, match="unknown config key 'engine.param_ofload'; did you mean 'engine.param_offload'"):
        engine("engine.param_ofload=true")
    with pytest.raises(VerliteError, match="engine=megatron is not available"):
        engine("engine=megatron")


def test_verls_yaml_files_compose_as_hydra_does(tmp_path):
    """A YAML with verl's `defaults:` list (optim: fsdp, _self_) reads as verl composes it."""
    path = tmp_path / "sft_trainer.yaml"
    path.write_text(yaml.safe_dump(verl_cfg.LEGACY_DEFAULTS), encoding="utf-8")
    from_file = load_config(str(path), ["model.partial_pretrain=/m"], dialect="verl")
    assert from_file == legacy()
    assert from_file.optim.optimizer == "AdamW" and from_file.optim.num_cycles == 0.5  # from the optim group


def test_lora_adapter_path_turns_lora_on(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12, "lora_alpha": 24,
                                                              "target_modules": ["model.layers.0.self_attn.v_proj", "q_proj"]}))
    cfg = legacy(f"model.lora_adapter_path={tmp_path}")
    assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.target_modules) == (12, 24, ["q_proj", "v_proj"])


def test_warmup_steps_and_num_cycles():
    cfg = OptimConfig(warmup_steps_ratio=0.5, warmup_steps=2, num_cycles=1.0, min_lr_ratio=0.1)
    assert [lr_factor(s, 10, cfg) for s in (0, 1)] == [0.5, 1.0]  # lr_warmup_steps wins over the ratio
    # one full cosine wave after warmup: down to the floor halfway, back up at the end
    assert lr_factor(2, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(6, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(2 * math.pi * 7 / 8)))


def test_an_engine_yaml_reads_through_verlite_sft_too(tmp_path):
    path = tmp_path / "sft_trainer_engine.yaml"
    path.write_text(yaml.safe_dump(verl_cfg.ENGINE_DEFAULTS), encoding="utf-8")
    cfg = load_config(str(path), ["model.path=/m"])
    assert cfg.model.partial_pretrain == "/m" and cfg.data.multiturn.enable and cfg.optim.lr == 1e-3
    assert cfg.data.response_end == "template"  # verlite's own semantics under `verlite sft`


def test_hydra_config_flags():
    from verlite.verl_cli import _hydra_config

    assert _hydra_config(["--config-path", "/c", "--config-name=run", "a=1"]) == (["a=1"], "/c/run.yaml")
    assert _hydra_config(["-cn", "sft_trainer", "a=1"]) == (["a=1"], None)  # verl's packaged name: built in
    assert _hydra_config(["a=1"]) == (["a=1"], None)
