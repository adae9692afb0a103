"""CPU probe: what a checkpoint write costs the training thread.

A GPU training loop is bound by Python launching kernels, so a background writer that holds
the GIL slows it even though the copy to the host is done. This probe writes a synthetic
full-fine-tune checkpoint (a randomly initialised Qwen2-shaped model's weights + two AdamW
moments per weight, ~1.2 GB by default) on a background thread while the main thread runs a
loop of tiny torch ops (Python-dispatch bound, like kernel launches) and reports:
  write_s      wall time of the write (files fsynced, folder renamed)
  loop_alone   main-loop iterations/s with nothing else running
  loop_during  main-loop iterations/s while the write runs (and the ratio)
  max_stall_ms the longest the main loop went without progress during the write (GIL holds)
for the writer before this change ("old": save_pretrained + torch.save of the whole state),
the current one ("new": async_checkpoint.write_snapshot), and the primitives behind them.

    python bench/ckpt_probe.py                 # ~1.2 GB state
    python bench/ckpt_probe.py --smoke         # a few MB, seconds (tests run this)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verlite.trainer import async_checkpoint as ac  # noqa: E402
from verlite.trainer import checkpoint as ckpt  # noqa: E402


class _Tokenizer:
    """Stands in for a tokenizer: a checkpoint also writes one small file for it."""

    def save_pretrained(self, folder):
        Path(folder, "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))


def build_state(hidden: int, layers: int, vocab: int, with_model: bool):
    """A Qwen2-shaped model's weights (the model itself when a writer needs its config) and an
    AdamW state for them."""
    torch.manual_seed(0)
    if with_model:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                          vocab_size=vocab, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
        weights = {n: p.detach() for n, p in model.named_parameters()}
    else:  # the same shapes without transformers (to try other safetensors versions)
        model, kv = None, max(1, hidden // 128) * 64
        weights = {"model.embed_tokens.weight": torch.randn(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
        for i in range(layers):
            for name, shape in (("self_attn.q_proj.weight", (hidden, hidden)), ("self_attn.k_proj.weight", (kv, hidden)),
                                ("self_attn.v_proj.weight", (kv, hidden)), ("self_attn.o_proj.weight", (hidden, hidden)),
                                ("mlp.gate_proj.weight", (4 * hidden, hidden)), ("mlp.up_proj.weight", (4 * hidden, hidden)),
                                ("mlp.down_proj.weight", (hidden, 4 * hidden)), ("input_layernorm.weight", (hidden,))):
                weights[f"model.layers.{i}.{name}"] = torch.randn(shape)
    optim = {"state": {n: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                       for n, p in weights.items()},
             "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01,
                               "params": list(weights)}]}
    state = {"optimizer": optim, "scheduler": {"last_epoch": 10}, "rng": ckpt.rng_state(), "global_step": 10}
    return model, weights, state


def old_writer(model, weights, state, root: Path) -> None:
    """The write before this change: the NaN/inf check of the host copy, transformers'
    save_pretrained, one torch.save of the whole state, fsync, rename."""
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
    tmp = root / "global_step_10.tmp"
    (tmp / "huggingface").mkdir(parents=True)
    model.save_pretrained(tmp / "huggingface", state_dict=weights, safe_serialization=True)
    _Tokenizer().save_pretrained(tmp / "huggingface")
    torch.save(state, tmp / "trainer_state.pt")
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    os.rename(tmp, root / "global_step_10")


def new_writer(model, weights, state, root: Path) -> None:
    snap = ac.Snapshot(root, 10, model, _Tokenizer(), weights, state, is_lora=False)
    assert ac.write_snapshot(snap, background=True) is not None


def torch_save(model, weights, state, root: Path) -> None:
    with open(root / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _flat(weights, state):
    data, tensors = ckpt.split_tensors(state)
    return {**{f"w/{k}": v for k, v in weights.items()}, **tensors}


def safetensors_save_file(model, weights, state, root: Path) -> None:
    from safetensors.torch import save_file

    save_file(_flat(weights, state), str(root / "all.safetensors"))
    with open(root / "all.safetensors", "rb") as f:
        os.fsync(f.fileno())


def tensor_file(model, weights, state, root: Path) -> None:
    ckpt.write_tensor_file(root / "all.safetensors", _flat(weights, state))


def host_nan_check(model, weights, state, root: Path) -> None:
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


WRITERS = {"old": old_writer, "host NaN check": host_nan_check, "new": new_writer, "torch.save": torch_save,
           "safetensors.save_file": safetensors_save_file, "write_tensor_file": tensor_file}


def loop_rate(stop: threading.Event | None, seconds: float) -> tuple[float, float]:
    """Iterations/s of a Python-bound loop of tiny torch ops until `stop` is set (or for
    `seconds`), and the longest stretch (ms) in which it made no progress: a writer holding
    the GIL shows as long stalls, mere competition for the CPU as a uniformly lower rate."""
    x = torch.ones(16)
    n, start = 0, time.perf_counter()
    last, worst = start, 0.0
    while True:
        for _ in range(50):
            x = torch.add(x, 1e-3).mul_(0.999)
        n += 50
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
        elapsed = now - start
        if (stop is not None and stop.is_set()) or (stop is None and elapsed >= seconds):
            return n / elapsed, worst * 1e3


def measure(name: str, model, weights, state, folder: Path, alone_s: float) -> dict:
    """One write on a background thread; the main loop's rate during it against its rate
    alone just before (the machine is shared: each run gets its own baseline)."""
    root = folder / name.replace(".", "_").replace(" ", "_")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    alone, _ = loop_rate(None, alone_s)
    done = threading.Event()
    took = {}

    def write():
        start = time.perf_counter()
        WRITERS[name](model, weights, state, root)
        took["s"] = time.perf_counter() - start
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    during, stall_ms = loop_rate(done, 0)
    writer.join()
    shutil.rmtree(root, ignore_errors=True)
    return {"writer": name, "write_s": round(took["s"], 2), "loop_alone": round(alone),
            "loop_during": round(during), "loop_ratio": round(during / alone, 2), "max_stall_ms": round(stall_ms)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few MB, for tests")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--writers", default="old,new,torch.save,safetensors.save_file,write_tensor_file")
    ap.add_argument("--repeat", type=int, default=3, help="runs per writer (the fastest write and the "
                    "median loop ratio are reported)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.repeat = 64, 2, 512, 1
    import safetensors

    writers = args.writers.split(",")
    model, weights, state = build_state(args.hidden, args.layers, args.vocab, {"old", "new"} & set(writers))
    nbytes = sum(t.numel() * t.element_size() for t in _flat(weights, state).values())
    folder = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_probe_"))
    print(json.dumps({"state_gb": round(nbytes / 1e9, 3), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "safetensors": safetensors.__version__, "dir": str(folder)}), flush=True)
    try:
        for name in writers:
            runs = [measure(name, model, weights, state, folder, 0.2 if args.smoke else 1.5) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["write_s"])
            best["loop_ratio_median"] = sorted(r["loop_ratio"] for r in runs)[len(runs) // 2]
            best["max_stall_ms_median"] = sorted(r["max_stall_ms"] for r in runs)[len(runs) // 2]
            print(json.dumps(best), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
