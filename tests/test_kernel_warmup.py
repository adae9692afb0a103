"""Liger's kernels compiled by a side process at launch (models/kernel_warmup.py): what it
reads from the model folder, when it starts, that it imports neither transformers nor
torch._dynamo, and on a GPU that the trainer's layers then find every kernel in Triton's cache."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from verlite.config.schema import ModelConfig
from verlite.models import kernel_warmup
from verlite.models.kernel_warmup import model_sizes, spec_for, start, start_for_run

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None
CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def _config(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
            "intermediate_size": 4864}
    (folder / "config.json").write_text(json.dumps({**base, **fields}))
    return folder


def test_sizes_come_from_config_json_with_overrides_and_only_for_known_model_types(tmp_path):
    folder = _config(tmp_path / "m")
    assert model_sizes(str(folder)) == {"model_type": "qwen2", "heads": 14, "kv_heads": 2, "head_dim": 64,
                                        "rotary_dim": 64, "intermediate": 4864}
    assert model_sizes(str(folder), {"intermediate_size": 1024, "rope_theta": 1.0})["intermediate"] == 1024
    partial = _config(tmp_path / "p", model_type="llama", head_dim=128, rope_parameters={"partial_rotary_factor": 0.5})
    assert model_sizes(str(partial))["rotary_dim"] == 64
    assert model_sizes(str(_config(tmp_path / "g", model_type="gemma2"))) is None  # GEGLU, another RoPE call
    assert model_sizes(str(tmp_path / "missing")) is None
    assert model_sizes("Qwen/Qwen2.5-0.5B") is None  # a hub id: nothing to read before loading


def test_no_side_process_off_gpus_on_other_ranks_or_without_liger_kernels(tmp_path, monkeypatch):
    folder = _config(tmp_path / "m")
    cfg = ModelConfig(partial_pretrain=str(folder))
    started = []
    monkeypatch.setattr(kernel_warmup, "start", lambda *a: started.append(a))
    assert start_for_run(cfg, ("rope", "swiglu"), CPU, 0, False, True, 32, 1) is None
    assert start_for_run(cfg, ("rope", "swiglu"), CUDA, 1, False, True, 32, 1) is None  # one per machine
    assert start_for_run(cfg, (), CUDA, 0, False, True, 32, 1) is None
    assert start_for_run(cfg, ("rms_norm",), CUDA, 0, False, True, 32, 1) is None
    assert start_for_run(cfg, ("rope", "swiglu"), CUDA, 0, False, True, 32, 2) is None  # SP splits the heads
    assert started == []


def test_the_spec_follows_the_runs_dtypes_and_layout(tmp_path, monkeypatch):
    folder = _config(tmp_path / "m")
    specs = []
    monkeypatch.setattr(kernel_warmup, "start", lambda spec, index, gpu: specs.append(spec))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    monkeypatch.delenv("VERLITE_FP32_STREAM", raising=False)
    full = ModelConfig(partial_pretrain=str(folder))
    start_for_run(full, ("rope", "swiglu", "rms_norm"), CUDA, 0, False, True, 32, 1)
    start_for_run(full, ("swiglu",), CUDA, 0, False, False, 32, 1)  # padded rows: the micro batch is the batch
    monkeypatch.setenv("VERLITE_FP32_STREAM", "1")
    start_for_run(full, ("rope",), CUDA, 0, False, True, 32, 1)  # fp32 masters' embedding output: fp32 cos/sin
    start_for_run(full, ("rope",), CUDA, 0, True, True, 32, 1)  # FSDP computes in its param dtype (bf16)
    full.fsdp_config.mixed_precision.param_dtype = "fp32"
    start_for_run(full, ("rope",), CUDA, 0, True, True, 32, 1)
    assert [(s["kinds"], s["compute_dtype"], s["stream_dtype"], s["batch"]) for s in specs] == [
        (["rope", "swiglu"], "bfloat16", "bfloat16", 1), (["swiglu"], "bfloat16", "bfloat16", 32),
        (["rope"], "bfloat16", "float32", 1), (["rope"], "bfloat16", "bfloat16", 1), (["rope"], "float32", "float32", 1)]


def test_the_side_process_imports_neither_transformers_nor_dynamo():
    """Liger's package __init__ imports torch._dynamo and its utils peft (and transformers):
    seconds on a cold machine that the side process must not spend."""
    if not HAVE_LIGER:
        pytest.skip("liger-kernel is not installed")
    code = textwrap.dedent("""
        import sys
        from verlite.models.kernel_warmup import _import_kernel_modules
        rope, swiglu = _import_kernel_modules()
        assert rope.__name__ == "LigerRopeFunction" and swiglu.__name__ == "LigerSiLUMulFunction"
        heavy = [m for m in ("torch._dynamo", "transformers", "peft") if sys.modules.get(m) is not None]
        print("heavy:", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heavy: []" in out.stdout


def test_a_failed_side_process_leaves_no_marker_and_a_finished_one_is_not_started_again(tmp_path, monkeypatch,
                                                                                          caplog):
    """Off a GPU the side process fails at its first CUDA call: its log says why, no marker is
    written and the trainer is told at its first step. A marker (and the Triton cache it
    filled) stops later launches from starting one."""
    monkeypatch.setenv("VERLITE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(kernel_warmup, "_hold_device", lambda index: True)  # no GPU here to hold
    spec = spec_for(model_sizes(str(_config(tmp_path / "m"))), ("rope", "swiglu"), "bfloat16", "bfloat16", 1)
    marker = kernel_warmup.marker_for(spec, "GPU")
    side = start(spec, 0, "GPU")
    assert side is not None and side.proc.wait(timeout=300) != 0
    assert not marker.exists() and marker.with_suffix(".log").read_text().strip()
    with caplog.at_level(logging.INFO, logger="verlite.models"):
        kernel_warmup.finish(side)
    assert "failed (exit" in caplog.text
    (tmp_path / "triton").mkdir()
    marker.write_text("{}")
    assert start(spec, 0, "GPU") is None
    assert kernel_warmup.marker_for(dict(spec, batch=2), "GPU") != marker  # another layout, another warm-up


def test_no_side_process_where_this_process_cannot_hold_the_gpu_first(tmp_path, monkeypatch):
    """The run's own CUDA context comes first (exclusive-process GPUs admit one); where it
    cannot be made, as for a GPU index that is not there (with or without GPUs), nothing is started."""
    monkeypatch.setenv("VERLITE_CACHE_DIR", str(tmp_path / "cache"))
    spec = spec_for(model_sizes(str(_config(tmp_path / "m"))), ("rope",), "bfloat16", "bfloat16", 1)
    assert start(spec, 99, "GPU") is None
    assert not list((tmp_path / "cache" / "kernels").glob("*.compiling"))


_FAILING_RUN = """
import subprocess, sys
from verlite.models import kernel_warmup as k
k._hold_device = lambda index: True
real = subprocess.Popen
k.subprocess.Popen = lambda cmd, **kw: real([sys.executable, "-c", "import time; time.sleep(120)"])
side = k.start(k.spec_for(k.model_sizes(sys.argv[1]), ("rope",), "bfloat16", "bfloat16", 1), 0, "GPU")
print(side.proc.pid, flush=True)
raise SystemExit("the run failed before its first step")
"""


def test_a_run_that_fails_before_its_first_step_takes_the_side_process_along(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_FAILING_RUN)
    env = dict(os.environ, VERLITE_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(script), str(_config(tmp_path / "m"))], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "failed before its first step" in out.stderr
    pid = int(out.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (killed and reaped at the run's exit)


def _sleeper(tmp_path: Path, compiling: bool) -> kernel_warmup.SideProcess:
    marker = tmp_path / f"{compiling}.done"
    if compiling:
        marker.with_suffix(".compiling").touch()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return kernel_warmup.SideProcess(proc, marker, 0.0)


def test_the_first_step_waits_for_a_compiling_side_process_and_stops_the_rest(tmp_path, monkeypatch, caplog):
    """The side process never runs beside training: one that compiles is waited for (up to
    WAIT_S), one still importing is stopped at once, one done is only logged."""
    monkeypatch.setattr(kernel_warmup, "WAIT_S", 1.0)
    with caplog.at_level(logging.INFO, logger="verlite.models"):
        importing = _sleeper(tmp_path, compiling=False)
        kernel_warmup.finish(importing)
        assert importing.proc.returncode is not None and "stopped before it compiled anything" in caplog.text
        compiling = _sleeper(tmp_path, compiling=True)
        kernel_warmup.finish(compiling)
        assert compiling.proc.returncode is not None and "stopped after 1.0 s of waiting" in caplog.text
        done = kernel_warmup.SideProcess(subprocess.Popen([sys.executable, "-c", "pass"]), tmp_path / "d.done", 0.0)
        done.proc.wait()
        kernel_warmup.finish(done)
    assert "Liger kernel warm-up in a side process: done at the first step" in caplog.text


_LAYERS_STEP = """
import sys, torch
from verlite.config.schema import ModelConfig
from verlite.models.compute_dtype import stream_in_compute_dtype
from verlite.models.load import load_model
cfg = ModelConfig(partial_pretrain=sys.argv[1], enable_gradient_checkpointing=False)
model = load_model(cfg, torch.float32, ("rope", "swiglu")).cuda()
stream_in_compute_dtype(model)
for length in (45, 48):  # packed rows: one sample boundary inside, lengths both sides of a multiple of 16
    ids = torch.randint(0, 100, (1, length), device="cuda")
    pos = torch.cat([torch.arange(20), torch.arange(length - 20)]).unsqueeze(0).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
torch.cuda.synchronize()
"""


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.skipif(not (HAVE_LIGER and torch.cuda.is_available()), reason="Liger's kernels need a CUDA GPU")
def test_after_the_side_process_the_layers_compile_nothing(tiny_model, tmp_path):
    script = tmp_path / "step.py"
    script.write_text(_LAYERS_STEP)
    env = dict(os.environ, VERLITE_CACHE_DIR=str(tmp_path / "cache"))
    # Control: on an empty cache the layers' step compiles (adds cache entries).
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cold")
    subprocess.run([sys.executable, str(script), str(tiny_model)], env=env, check=True, timeout=600)
    assert _entries(tmp_path / "cold")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "warmed")
    code = ("import sys, torch; from verlite.config.schema import ModelConfig; from verlite.models import kernel_warmup;"
            "p = kernel_warmup.start_for_run(ModelConfig(partial_pretrain=sys.argv[1]), ('rope', 'swiglu'),"
            " torch.device('cuda', 0), 0, False, True, 8, 1); assert p is not None and p.proc.wait(600) == 0")
    subprocess.run([sys.executable, "-c", code, str(tiny_model)], env=env, check=True, timeout=600)
    before = _entries(tmp_path / "warmed")
    assert before
    subprocess.run([sys.executable, str(script), str(tiny_model)], env=env, check=True, timeout=600)
    assert _entries(tmp_path / "warmed") - before == set()  # every kernel of the step was in the cache
