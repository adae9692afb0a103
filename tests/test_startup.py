"""Launch to first step (issue 14): what a run imports, and a summary that accounts for the
whole time since launch."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, write_jsonl

ROWS = [{"question": f"What is {i} plus {i + 1}?", "answer": f"The answer is {2 * i + 1}."} for i in range(8)]
WATCHED = ("torch", "transformers", "peft", "torchao", "sklearn")

# Runs the CLI's main() in-process, then prints which packages the run imported.
PROBE = ("import json, sys\n"
         "from verlite.cli import main\n"
         "code = main(sys.argv[1:])\n"
         f"print('MODULES=' + json.dumps(sorted(m for m in {WATCHED!r} if sys.modules.get(m))))\n"
         "import torchao  # hidden from transformers during set-up only: still importable afterwards\n"
         "sys.exit(code)\n")


def probe(*args: str, cwd=None) -> tuple[subprocess.CompletedProcess, list[str], float]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - start
    found = re.search(r"MODULES=(.*)", r.stdout)
    return r, json.loads(found.group(1)) if found else [], wall


def test_bad_config_fails_before_torch_is_imported(tmp_path):
    r, modules, _ = probe("sft", "data.train_files=x.jsonl", "model.partial_pretrain=m", "nokey.x=1")
    assert r.returncode != 0 and "unknown config key 'nokey'" in r.stderr
    assert "\n" not in r.stderr.strip() or "Traceback" not in r.stderr
    assert "torch" not in modules and "transformers" not in modules, modules


def test_full_finetune_imports_no_peft_nor_torchao_and_its_summary_adds_up(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    r, modules, wall = probe("sft", f"data.train_files={data}", f"model.partial_pretrain={tiny_model}",
                             "trainer.device=cpu", f"trainer.default_local_dir={tmp_path / 'run'}",
                             "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=3",
                             "trainer.save_freq=2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "peft" not in modules and "torchao" not in modules and "sklearn" not in modules, modules
    done = next(line for line in r.stdout.splitlines() if "Done: 3 steps" in line)
    since, parts = re.search(r"\| ([\d.]+) s since launch: (.*?); checkpoints written", done).groups()
    shown = dict(re.match(r"(.*?) ?([\d.]+) s\b", p).groups() for p in parts.split(", ") if p != "compiling off")
    seconds = [float(x) for x in shown.values()]
    for name in ("start-up", "data", "model loading", "training", "2 checkpoint(s): training paused",
                 "final checkpoint"):
        assert name in shown, (name, parts)
    assert "compiling off" in parts
    # every part is shown to 0.1 s: together they are the time since launch
    assert abs(sum(seconds) - float(since)) <= 0.05 * len(seconds) + 0.05, (seconds, since)
    # measured from the process's own start, so never more than the launcher saw
    assert float(since) <= wall + 0.05, (since, wall)
    # start-up is split into its steps in its own line, which adds up to it as well
    total, steps = re.search(r"start-up: ([\d.]+) s since launch \((.*)\)", r.stdout).groups()
    split = dict((k, float(v)) for k, v in re.findall(r"(?:^|, )(.+?) ([\d.]+) s", steps))
    assert list(split)[:7] == ["python", "config", "imports (torch, verlite)", "device init", "run set-up",
                               "transformers import", "tokenizer"], split
    assert abs(sum(split.values()) - float(total)) <= 0.05 * len(split) + 0.05
    # the same time in both lines, up to their rounding (the Done line's parts are rounded twice)
    assert abs(float(shown["start-up"]) - float(total)) <= 0.1 + 1e-9, (shown["start-up"], total)


def test_process_age_counts_from_the_process_start():
    code = ("import time; time.sleep(0.5)\n"
            "from verlite.trainer.timeline import process_age, mark_launch, launch_time\n"
            "mark_launch(); print(process_age(), time.perf_counter() - launch_time(), "
            "time.perf_counter() - launch_time())")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    wall = time.perf_counter() - start
    age, since_launch, second = float(out[0]), float(out[1]), float(out[2])
    assert second < 0.1
    tick = 0.02  # the kernel keeps the start time in clock ticks (10 ms)
    # only the first run after mark_launch() counts from the process start; a later one from its own start
    assert 0.5 <= age <= wall + tick and 0.5 <= since_launch <= wall + tick


@pytest.mark.slow
def test_launch_time_bench_runs_on_cpu(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "launch_time.py"), "--gsm8k", str(data), "--model",
                        str(tiny_model), "--tree", f"this={ROOT}", "--rounds", "2"], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert re.search(r"this: launch -> step 1 min [\d.]+ / median [\d.]+ s, launch -> exit .* \(1 launches\)", r.stdout)


def test_weights_are_read_ahead_only_for_a_local_folder(tiny_model):
    from verlite.models.load import read_ahead_weights

    size = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    assert size > 0 and read_ahead_weights(str(tiny_model)) == size
    assert read_ahead_weights("Qwen/Qwen2.5-0.5B") == 0  # a hub id: nothing local to read


def test_hidden_packages_look_absent_only_inside_the_block():
    code = ("import importlib.util as u, sys\n"
            "from verlite.models.lean_imports import without\n"
            "with without(['torchao', 'sklearn']) as hidden:\n"
            "    inside = u.find_spec('torchao') is None\n"
            "print(hidden, inside, u.find_spec('torchao') is not None, 'torchao' in sys.modules)\n"
            "import transformers.utils.import_utils as iu\n"
            "iu.is_torchao_available()  # transformers has asked now: hiding it would break its import\n"
            "with without(['torchao']) as hidden:\n"
            "    print(hidden)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.splitlines()
    assert out == ["['torchao', 'sklearn'] True True False", "[]"], out


def test_a_lora_run_needs_no_torchao(tmp_path, tiny_model):
    """torchao is an optional extra (`smallcards`): the quickstart's LoRA run works without it."""
    from test_fast import sft_args as fast_sft_args

    code = ("import importlib.abc, sys\n"
            "class NoTorchao(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'torchao' or name.startswith('torchao.'):\n"
            "            raise ModuleNotFoundError(\"No module named 'torchao'\", name=name)\n"
            "finder = NoTorchao()\n"
            "sys.meta_path.insert(0, finder)\n"
            "from verlite.models.quant import quiet_torchao_import\n"
            "quiet_torchao_import()  # what the model build calls first: nothing to quiet, no error\n"
            "sys.meta_path.remove(finder)\n"
            "sys.modules['torchao'] = None  # absent for transformers and peft too (find_spec: None)\n"
            "from verlite.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    args = fast_sft_args(tmp_path, tiny_model, 1, "model.lora_rank=4", "model.target_modules=[q_proj,v_proj]")
    out = subprocess.run([sys.executable, "-c", code, "sft", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VERLITE_WARM": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Done:" in out.stdout + out.stderr
