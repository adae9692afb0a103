from pathlib import Path

import pytest

from verlite.config import load_config
from verlite.errors import VerliteError

ROOT = Path(__file__).resolve().parent.parent

# Section 3.1 of the article, character for character (its comments included).
ARTICLE_YAML = """\
data:
  train_files: ${oc.env:HOME}/data/sft-test/train.json
  prompt_key: question
  response_key: answer
  micro_batch_size_per_gpu: 2  # 单卡batch size,2是7B模型安全起点
  max_length: 1024             # 降低序列长度,减少显存压力
  packing: false               # 关闭序列打包,避免单卡内存碎片
model:
  partial_pretrain: Qwen/Qwen2.5-0.5B-Instruct  # 首选0.5B小模型,单卡友好
  strategy: fsdp2
  enable_gradient_checkpointing: true  # 必开!省30%显存
  lora_rank: 8                 # LoRA秩设为8,平衡效果与显存
  lora_alpha: 16
  target_modules: ["q_proj", "v_proj"]  # 仅注入Q/V线性层,更轻量
optim:
  lr: 2e-5
  warmup_steps_ratio: 0.1
  weight_decay: 0.01
trainer:
  total_epochs: 1              # 单轮足够验证流程
  project_name: sft-single-gpu
  default_local_dir: ./checkpoints
  logger: console
  log_interval: 10             # 每10步打印一次,避免刷屏
"""


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_article_yaml_loads_with_its_meaning(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = load_config(write(tmp_path, ARTICLE_YAML))
    assert cfg.data.train_files == "/home/someone/data/sft-test/train.json"
    assert cfg.data.micro_batch_size_per_gpu == 2 and cfg.data.max_length == 1024 and cfg.data.packing is False
    assert cfg.model.partial_pretrain == "Qwen/Qwen2.5-0.5B-Instruct"
    assert cfg.model.lora_rank == 8 and cfg.model.lora_alpha == 16
    assert cfg.model.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.lr == pytest.approx(2e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.logger == "console" and cfg.trainer.log_interval == 10
    assert cfg.trainer.save_freq == 10  # the article's checkpoint every 10 steps
    assert cfg.data.train_batch_size is None  # -> micro batch x world size at run time


def test_example_file_is_the_article_config(monkeypatch):
    monkeypatch.setenv("HOME", "/h")
    cfg = load_config(str(ROOT / "examples" / "sft_single.yaml"))
    article = load_config(None, ["model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct"])
    assert cfg.model.target_modules == ["q_proj", "v_proj"] and cfg.trainer.save_freq == 10
    assert article.model.partial_pretrain == cfg.model.partial_pretrain


def test_interpolation_and_overrides(tmp_path):
    text = ARTICLE_YAML.replace("default_local_dir: ./checkpoints", "default_local_dir: ./out/${trainer.project_name}")
    cfg = load_config(write(tmp_path, text), ["data.max_length=512", "trainer.total_epochs=2",
                                              "trainer.logger=[console,tensorboard]", "+model.rope_theta=10000000"])
    assert cfg.trainer.default_local_dir == "./out/sft-single-gpu"
    assert cfg.data.max_length == 512 and cfg.trainer.total_epochs == 2
    assert cfg.trainer.logger == ["console", "tensorboard"]
    assert cfg.model.config_overrides == {"rope_theta": 10000000}


def test_article_new_keys(tmp_path):
    cfg = load_config(write(tmp_path, ARTICLE_YAML), ["model.fsdp_config.cpu_offload=true",
                                              "model.fsdp_config.offload_params=true",
                                              "model.fsdp_config.reshard_after_forward=true"])
    assert cfg.model.fsdp_config.cpu_offload and cfg.model.fsdp_config.offload_params
    assert cfg.model.fsdp_config.reshard_after_forward


@pytest.mark.parametrize("override, expected", [
    ("data.max_lenght=10", "unknown config key 'data.max_lenght'; did you mean 'data.max_length'?"),
    ("trainer.log_intervall=10", "did you mean 'trainer.log_interval'?"),
    ("optim.warmup_ratio=0.1", "did you mean 'optim.warmup_steps_ratio'?"),
    ("data.micro_batch_size_per_gpu=two", "'data.micro_batch_size_per_gpu' must be a positive integer or auto"),
    ("optim.lr=fast", "'optim.lr' must be a number"),
    ("data.truncation=middle", "'data.truncation' is 'middle'; use one of error, left, right, drop"),
    ("data.max_length", "must look like section.key=value"),
    ("trainer.resume_mode=resume_path", "trainer.resume_from_path is not set"),
])
def test_bad_config_errors(tmp_path, override, expected):
    with pytest.raises(VerliteError) as e:
        load_config(write(tmp_path, ARTICLE_YAML), [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_section_key_in_file_names_file(tmp_path):
    path = write(tmp_path, ARTICLE_YAML.replace("  packing: false", "  pakcing: false"))
    with pytest.raises(VerliteError, match=r"cfg.yaml: unknown config key 'data.pakcing'; did you mean 'data.packing'"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(VerliteError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(VerliteError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
