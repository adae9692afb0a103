"""Fast by default (issue 14): the compile decision, background checkpoints, the summary."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli, write_jsonl
from verlite.engine import compile as comp
from verlite.errors import VerliteError

ROWS = [{"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}. The answer is {2 * i + 1}."}
        for i in range(16)]


def sft_args(tmp: Path, model: Path, steps: int, *extra: str, rows: list[dict] = ROWS) -> list[str]:
    data = write_jsonl(tmp / "train.jsonl", rows)
    return [f"data.train_files={data}", f"model.partial_pretrain={model}", "trainer.device=cpu",
            f"trainer.default_local_dir={tmp / 'run'}", "data.micro_batch_size_per_gpu=2", "data.train_batch_size=4",
            f"trainer.total_training_steps={steps}", "trainer.log_interval=1", "optim.lr=1e-3",
            "model.enable_gradient_checkpointing=false", *extra]


# ---- compile: auto -----------------------------------------------------------------------

def test_compile_auto_rule():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    # Break-even with a cold cache: (COLD_S + SETUP_S) / (2 passes x layers x SAVED_S_PER_PASS) steps of one micro-batch.
    per_step = 2 * 24 * comp.SAVED_S_PER_PASS
    even = math.ceil((comp.COLD_S + comp.SETUP_S) / per_step)
    assert comp.decide("auto", gpu, even, 1, 24, warm=False).enabled
    assert not comp.decide("auto", gpu, even - 1, 1, 24, warm=False).enabled
    # Once the caches hold the shape, fewer steps repay the (shorter) compile.
    assert comp.decide("auto", gpu, math.ceil((comp.WARM_S + comp.SETUP_S) / per_step), 1, 24, warm=True).enabled
    # Two micro-batches a step save twice as much per step.
    assert comp.decide("auto", gpu, math.ceil(even / 2), 2, 24, warm=False).enabled
    # Recomputed layers run forward twice: a third more passes to save on.
    assert comp.decide("auto", gpu, math.ceil((comp.COLD_S + comp.SETUP_S) / (3 * 24 * comp.SAVED_S_PER_PASS)), 1, 24, warm=False,
                       recomputed=24).enabled
    assert "72 layer passes (24 layers, 24 recomputed)" in comp.decide("auto", gpu, 10, 1, 24, False, 24).reason
    # Replayed as CUDA graphs, a step saves only GPU time: the break-even moves out.
    graphed = math.ceil((comp.COLD_S + comp.SETUP_S) / (2 * 24 * comp.SAVED_S_PER_PASS_GRAPHED))
    assert graphed > even
    assert not comp.decide("auto", gpu, graphed - 1, 1, 24, warm=False, graphs=True).enabled
    assert comp.decide("auto", gpu, graphed, 1, 24, warm=False, graphs=True).enabled
    assert "(CUDA graphs)" in comp.decide("auto", gpu, graphed, 1, 24, warm=False, graphs=True).reason
    assert not comp.decide("auto", cpu, 10**6, 8, 24, warm=True).enabled
    assert not comp.decide(True, cpu, 10, 1, 24, warm=False).enabled  # compiling is GPU-only
    assert comp.decide("true", gpu, 1, 1, 24, warm=False).enabled
    assert not comp.decide(False, gpu, 10**6, 1, 24, warm=True).enabled
    with pytest.raises(VerliteError, match="model.compile"):
        comp.decide("sometimes", gpu, 10, 1, 24, warm=False)


def test_compile_cache_goes_under_the_verlite_cache(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # set, then removed: monkeypatch restores both
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("VERLITE_CACHE_DIR", str(tmp_path / "c"))
    folder = comp.use_persistent_cache()
    assert folder == tmp_path / "c" / "compile" and folder.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")  # Triton's kernels in the same folder
    comp.remember_shape(folder, "Qwen2DecoderLayer/896")
    comp.remember_shape(folder, "Qwen2DecoderLayer/896")
    assert comp._known_shapes(folder) == {"Qwen2DecoderLayer/896": {}}


def test_compile_auto_decides_from_the_costs_measured_on_this_machine(tmp_path, monkeypatch):
    """A compiled run records what compiling cost it; the next run of the shape decides from
    that figure, not from the H200 constants (a file from before costs were kept still reads)."""
    monkeypatch.setenv("VERLITE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    folder = comp.compile_cache_dir()
    folder.mkdir(parents=True)
    (folder / comp.SHAPES_FILE).write_text(json.dumps(["old/shape"]))  # the earlier format
    assert comp._known_shapes(folder) == {"old/shape": {}}
    gpu = torch.device("cuda")
    per_step = 2 * 24 * comp.SAVED_S_PER_PASS
    steps = math.ceil((comp.WARM_S + comp.SETUP_S) / per_step)  # repays the assumed warm cost, not 3x it
    assert comp.decide("auto", gpu, steps, 1, 24, True, known=comp._known_shapes(folder)["old/shape"]).enabled
    comp.record_cost("old/shape", 21.0, warm=False)  # the first, cold compile: kept, not used for warm runs
    comp.record_cost("old/shape", 3 * comp.WARM_S, warm=True)  # this machine compiles slower than the H200
    known = comp._known_shapes(folder)["old/shape"]
    assert known == {"cold_s": 21.0, "warm_s": round(3 * comp.WARM_S, 2)}
    choice = comp.decide("auto", gpu, steps, 1, 24, True, known=known)
    assert not choice.enabled and "measured here" in choice.reason
    assert comp.decide("auto", gpu, 3 * steps + 1, 1, 24, True, known=known).enabled
    assert "assumed from an H200" in comp.decide("auto", gpu, steps, 1, 24, False).reason
    # A new shape: the H200's cold cost scaled by how this machine's cold compiles compared.
    shapes = comp._known_shapes(folder)
    cold, source = comp.compile_cost(None, shapes)
    assert cold == pytest.approx(21.0) and "scaled by the cold compiles measured here" in source
    # Nonsense in the file (hand-edited, another version) is ignored; one bad figure is bounded.
    assert comp.compile_cost({"warm_s": "slow"}, {"x": {"cold_s": None}}) == (comp.WARM_S, pytest.approx(
        "a cached shape, assumed from an H200 0.5B run"))
    assert comp.compile_cost({"warm_s": 1e6})[0] == 4 * comp.WARM_S
    # What the trainer calls after its run: the first steps' time above a steady step's.
    ran = comp.CompileChoice(True, "", signature="new/shape", warm=False)
    assert comp.measured_cost(ran, [9.5, 0.5, 0.5, 0.5, 0.5]) == pytest.approx(9.0)
    assert comp._known_shapes(folder)["new/shape"] == {"cold_s": 9.0}
    assert comp.measured_cost(comp.CompileChoice(False, ""), [9.5, 0.5, 0.5]) == 0.0
    comp.measured_cost(comp.CompileChoice(True, "", "other/shape", True), [3.0, 0.5, 0.5], record=False)  # rank > 0
    assert "other/shape" not in comp._known_shapes(folder)


def test_one_compile_serves_every_length(tiny_model):
    """The token dimension is dynamic from the first call: a new length reuses the graph."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from verlite.models.sft_model import SFTModel

    torch._dynamo.reset()
    model = SFTModel(AutoModelForCausalLM.from_pretrained(tiny_model))
    comp.compile_layers(model, backend="eager")  # dynamo's tracing and guards, without inductor's codegen
    decoder = model.causal_lm.get_decoder()
    frames = []
    for length in (7, 9, 16, 33):
        ids = torch.randint(0, 100, (1, length))
        decoder(input_ids=ids, position_ids=torch.arange(length)[None], use_cache=False).last_hidden_state.sum().backward()
        frames.append(counters["frames"]["ok"])
    torch._dynamo.reset()
    assert frames[0] >= 1 and frames == [frames[0]] * 4, frames
    assert comp.steady_max_seqlen(300, 1024, 5) == 1024 and comp.steady_max_seqlen(9000, 16384, 3) == 9000
    assert comp.steady_max_seqlen(9000, 32768, 1) == 32768  # one sample a row (long context): fixed at any length


def test_short_cpu_run_logs_compile_off_and_the_time_breakdown(tmp_path, tiny_model):
    r = run_cli("sft", *sft_args(tmp_path, tiny_model, 4))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "compile: model.compile=auto: off on CPU" in out
    assert "model.use_liger=auto: Liger's kernels run on CUDA GPUs only; off on cpu" in out
    done = next(line for line in out.splitlines() if "Done: 4 steps" in line)
    for part in ("training", "compiling off", "token cache miss", "model loading", "1 checkpoint(s): training paused",
                 "in the background"):
        assert part in done, done


@pytest.mark.slow
def test_gsm8k_cli_bench_smoke_logs_compile_off_time_breakdown_and_cache_hit(tmp_path):
    """bench/gsm8k_cli.py --smoke: two `verlite sft` launches on CPU with one fresh cache."""
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": r["question"], "answer": r["answer"] + " #### 1"}
                                                   for r in ROWS * 5])
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gsm8k_cli.py"), "--gsm8k", str(gsm8k), "--smoke",
                        "--models", str(tmp_path / "models")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    runs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(runs) == 2 and all(x["ok"] and x["final_checkpoint"] and x["first_step_s"] for x in runs)
    assert all(len(x["save_pause_s"]) == 1 for x in runs)  # the final save, from its "Checkpoint saved" line
    assert all("model.compile=auto: off on CPU" in x["compile"] for x in runs)
    for run, cache in zip(runs, ("token cache miss", "token cache hit")):
        assert "Done: 4 steps" in run["done"]
        for part in ("training", "compiling off", cache, "model loading", "1 checkpoint(s): training paused",
                     "in the background"):
            assert part in run["done"], run["done"]
    for run in runs:  # the Done line's parts, as numbers, add up to the time since launch
        done = run["done_parts"]
        assert {"start-up", "data", "model loading", "training", "final checkpoint"} <= set(done["parts_s"])
        assert abs(sum(done["parts_s"].values()) - done["since_launch_s"]) <= 0.05 * len(done["parts_s"]) + 0.05
        assert run["first_log_line_s"] <= run["first_step_s"] <= run["done_line_s"] <= run["wall_s"]
        start_up = run["start_up"]  # split into the steps before the first log line
        assert {"python", "config", "imports (torch, verlite)", "device init", "transformers import",
                "tokenizer"} <= set(start_up["parts_s"]), start_up
        assert abs(sum(start_up["parts_s"].values()) - start_up["total_s"]) <= 0.05 * len(start_up["parts_s"]) + 0.05
        assert abs(start_up["total_s"] - done["parts_s"]["start-up"]) <= 0.1
    assert "second launch's time to first step" in r.stdout
