"""verl's SFT command lines on a GPU: the ported example scripts (examples/verl/), the engine
trainer with verl's defaults (torch.compile on, dynamic batches) and the model merger, on GSM8K
written in the layouts of verl's preprocess scripts, with a Qwen2.5-0.5B-shaped random-init
model standing in for `Qwen/Qwen2.5-0.5B-Instruct` (a local hub cache; nothing is downloaded).

    python bench/verl_check.py --gsm8k ../shared/data/gsm8k          # GPU: one JSON line per run
    python bench/verl_check.py --smoke                              # CPU: tiny model, 1 step each

Each line: the run, its exit code, wall seconds, steps, final train/loss and tokens/s. A run
with two processes (the multi-turn SP 2 script) runs only where two GPUs are visible.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from verl_helpers import fake_hub, write_gsm8k, write_multiturn  # noqa: E402

REPO_ID = "Qwen/Qwen2.5-0.5B-Instruct"


def read_pairs(folder: Path, limit: int | None) -> dict:
    out = {}
    for split in ("train", "test"):
        lines = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines[: limit or None]]
        out[split] = [(r["question"], r["answer"]) for r in rows]
    return out


def build_model(work: Path, smoke: bool, gsm8k: Path | None) -> Path:
    out = work / "model"
    if (out / "config.json").is_file():
        return out
    if smoke:
        from verlite.models.tiny import build_qwen2, train_tokenizer
        from verlite.quickstart import article_samples

        texts = [s["question"] + " " + s["answer"] for s in article_samples()] + ["Tom has apples #### 12"]
        return build_qwen2(out, train_tokenizer(texts, vocab_size=320), hidden_size=64, layers=2, heads=4,
                           kv_heads=2)
    from shapes import build

    return build("qwen0.5b", out, gsm8k / "train.jsonl" if gsm8k else None)


def gpus() -> int:
    import torch

    return torch.cuda.device_count()


def run(name: str, cmd: list[str], home: Path, run_dir: Path, env_extra: dict | None = None) -> dict:
    env = dict(os.environ, HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(home / "hub"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(env_extra or {})
    start = time.time()
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True)
    result = {"run": name, "rc": proc.returncode, "wall_s": round(time.time() - start, 1)}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        train = [r for r in rows if "train/loss" in r]
        if train:
            result.update(steps=train[-1]["step"], final_loss=round(train[-1]["train/loss"], 4),
                          tokens_per_s=round(train[-1].get("tokens/s", 0.0)))
    if proc.returncode:
        result["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, synthetic GSM8K-like rows, 1 step each")
    p.add_argument("--gsm8k", default=None, help="folder with GSM8K train.jsonl / test.jsonl")
    p.add_argument("--work", default="/tmp/verl_check")
    p.add_argument("--steps", type=int, default=20, help="trainer.total_training_steps for each run (GPU)")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work / "home", ignore_errors=True)
    home = work / "home"
    gsm8k = Path(a.gsm8k) if a.gsm8k else None
    pairs = read_pairs(gsm8k, None) if gsm8k and not a.smoke else None
    n_train, n_test = (260, 4) if a.smoke or pairs is None else (0, 0)
    pairs_test = {"train": pairs["train"], "test": pairs["test"][:256]} if pairs else None
    write_gsm8k(home / "data" / "gsm8k", n_train, n_test, pairs_test)
    write_multiturn(home / "data" / "multiturn", n_train, n_test, pairs_test)
    write_multiturn(home / "data" / "gsm8k_sft", n_train, n_test, pairs_test)
    model = build_model(work, a.smoke, gsm8k)
    fake_hub(home / "hub", REPO_ID, model)
    shutil.copytree(model, home / "models" / REPO_ID)
    steps = 1 if a.smoke else a.steps
    cap = [f"trainer.total_training_steps={steps}"]
    ex = ROOT / "examples" / "verl"
    results = [run("run_qwen_05_peft.sh", ["bash", str(ex / "run_qwen_05_peft.sh"), "1", str(home / "peft"), *cap],
                   home, home / "peft")]
    results.append(run("model_merger(lora)", [sys.executable, "-m", "verlite.model_merger", "merge", "--backend",
                                              "fsdp", "--local_dir", str(home / "peft"), "--target_dir",
                                              str(home / "merged")], home, home / "merged"))
    results.append(run("run_sft.sh", ["bash", str(ex / "run_sft.sh"), f"trainer.total_training_steps={steps}"],
                       home, home / "sft", {"NUM_GPUS": "1", "ckpts_home": str(home / "sft")}))
    results.append(run("sft_trainer(engine defaults)",
                       [sys.executable, "-m", "verlite.trainer.sft_trainer", f"model.path={REPO_ID}",
                        f"data.train_files={home / 'data/gsm8k_sft/train.parquet'}", "trainer.logger=console", *cap],
                       home, home / "checkpoints" / "gsm8k-sft" / "test"))
    if a.smoke or gpus() >= 2:
        results.append(run("run_qwen_05_sp2.sh (multiturn, 2 procs)",
                           ["bash", str(ex / "run_qwen_05_sp2_multiturn.sh"), "2", str(home / "mt")], home, home / "mt"))
    sys.exit(1 if any(r["rc"] for r in results) else 0)


if __name__ == "__main__":
    main()
