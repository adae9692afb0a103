"""`verlite serve` under concurrent clients, against one request at a time through
`verlite generate`'s path and, where it runs, `transformers serve --continuous-batching`.

Issue 13's targets (GPU, Qwen2.5-0.5B shape, random init, prompts <= 20 characters,
64 new tokens forced with ignore_eos):
  8 clients: p50 latency <= 300 ms, p99 <= 500 ms; aggregate tokens/s >= 8x the baseline;
  64 clients: aggregate tokens/s >= 30x the baseline; 7B shape + one LoRA: p50 and tokens/s at 8.

    python bench/serve_bench.py                         # the GPU run: 0.5B at 8 and 64, transformers serve, 7B+LoRA
    python bench/serve_bench.py --smoke                 # tiny model on CPU, a few requests (tests run this)

Each client sends its requests one after another (closed loop), streaming, and times the
first content chunk (TTFT) and the last (latency); tokens are the server's usage counts.
Every server runs in its own process with --max_num_seqs equal to the client count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PROMPTS = [f"计算 {i} + {i + 1} 等于多少?" for i in range(100)]  # 13-15 characters each


def build_model(shape: str, root: Path, device: str) -> Path:
    path = root / shape
    if not (path / "config.json").is_file():
        if shape == "tiny":
            from verlite.models.tiny import build_qwen2, train_tokenizer
            from verlite.quickstart import article_samples

            tok = train_tokenizer([s["question"] + " " + s["answer"] for s in article_samples()], vocab_size=320)
            build_qwen2(path, tok, hidden_size=64, layers=2, heads=4, kv_heads=2)
        else:
            from shapes import build

            build(shape, path)
    if not (path / MASKED).is_file():  # also a model an older version of this script built
        mask_unused_ids(path)
    return path


MASKED = "unused_ids_masked"


def mask_unused_ids(path: Path) -> None:
    """Zero the LM-head rows (and, tied, the embedding rows) of ids past the tokenizer.

    The random-init shapes keep Qwen's 151,936-token vocabulary (so the LM head costs what
    it costs in the real model) over a 4,096-token tokenizer. Unmasked, greedy mostly picks
    ids the tokenizer cannot decode: the stream sends no text and TTFT cannot be timed. A
    zero row gives logit 0, and the largest of 4,096 random logits is above 0 (all below it
    has odds 2^-4096), so greedy only picks real tokens; the shape and the work are unchanged.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    real = len(AutoTokenizer.from_pretrained(path))
    vocab = AutoConfig.from_pretrained(path).vocab_size
    if real < vocab:
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        for name in files:
            tensors = load_file(str(path / name))
            rows = [k for k in ("lm_head.weight", "model.embed_tokens.weight") if k in tensors]
            if rows:
                for key in rows:
                    tensors[key][real:] = 0
                save_file(tensors, str(path / name), metadata={"format": "pt"})
    (path / MASKED).write_text(f"rows {real}..{vocab - 1} of the LM head are zero\n")


def no_eos_copy(model_dir: Path, root: Path) -> Path:
    """The model for `transformers serve`, which takes no ignore_eos: the same files, with a
    generation config whose end-of-sequence id is one greedy never picks (a masked id), so
    every request runs to max_tokens like verlite's ignore_eos requests."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    tok = AutoTokenizer.from_pretrained(model_dir)
    if len(tok) >= vocab:
        return model_dir  # nothing is masked: keep the model's own end of sequence
    out = root / (model_dir.name + "-no-eos")
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "generation_config.json" and not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    GenerationConfig(eos_token_id=vocab - 1, pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(out)
    return out


def write_lora(base: Path, out: Path, r: int = 8, targets=("q_proj", "v_proj")) -> Path:
    """A random PEFT LoRA adapter for `base` (the article's r 8 on q/v), written directly."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    if (out / "adapter_config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(base)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    outs = {"q_proj": config.num_attention_heads * head_dim, "k_proj": config.num_key_value_heads * head_dim,
            "v_proj": config.num_key_value_heads * head_dim}
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(config.num_hidden_layers):
        for name in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            weights[f"{key}.lora_A.weight"] = torch.randn(r, config.hidden_size, generator=gen) * 0.02
            weights[f"{key}.lora_B.weight"] = torch.randn(outs[name], r, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "lora_dropout": 0.0,
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}))
    return out


def baseline(model_dir: Path, device: str, max_tokens: int, requests: int) -> dict:
    """One request at a time through `verlite generate`'s path (load_model_and_tokenizer + generate)."""
    import torch

    from verlite.inference import generate, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(model_dir), device=device)
    generate(model, tok, PROMPTS[0], max_new_tokens=max_tokens, min_new_tokens=max_tokens)  # warm-up
    latencies = []
    for i in range(requests):
        start = time.perf_counter()
        generate(model, tok, PROMPTS[i + 1], max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - start)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    mean = statistics.mean(latencies)
    return {"server": "verlite generate, one at a time", "clients": 1, "requests": requests,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * max(latencies), "ttft_p50_ms": None,
            "tokens_per_s": max_tokens / mean}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A server subprocess, up once /health answers (200, or with any_answer any HTTP status:
    a server that has no /health is listening); its output goes to a file."""

    def __init__(self, argv: list[str], port: int, timeout: float, any_answer: bool = False):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.output = tempfile.TemporaryFile(mode="w+")
        # This checkout first; keep the caller's path (the GPU machine's carried wheels live there).
        path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        self.proc = subprocess.Popen(argv, stdout=self.output, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200 or any_answer:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"not up after {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self.output.seek(0)
        return " | ".join(self.output.read().strip().splitlines()[-5:])[-600:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first, chunks, tokens = None, 0, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"].get("completion_tokens", tokens)
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter() - start
                    chunks += 1
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens if tokens else chunks}


async def load_test(url: str, model: str, clients: int, per_client: int, max_tokens: int,
                    ignore_eos: bool = True) -> dict:
    """`ignore_eos` is vLLM's and verlite's field; transformers serve refuses unknown fields, and a
    random-init model seldom ends early anyway (mean_tokens shows it)."""
    import httpx

    def body(i):
        return {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **({"ignore_eos": True} if ignore_eos else {})}

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one_request(client, url, body(i)) for i in range(clients)))  # warm-up round

        async def worker(c):
            return [await one_request(client, url, body(c * per_client + k)) for k in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    return {"clients": clients, "requests": len(results), "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None,
            "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "mean_tokens": sum(r["tokens"] for r in results) / len(results)}


def run_verlite(model_dir: Path, clients: int, args, lora: Path | None = None) -> dict:
    name = "verlite serve" + (" + LoRA" if lora else "")
    port = free_port()
    argv = [sys.executable, "-m", "verlite.cli", "serve", "--checkpoint", str(model_dir), "--port", str(port),
            "--served_model_name", "base", "--max_num_seqs", str(clients), "--max_model_len", str(args.max_model_len),
            "--device", args.device] + (["--lora", f"sft={lora}"] if lora else [])
    try:
        server = Process(argv, port, timeout=900)
    except Exception as e:  # recorded in its row; the other rows still run
        return {"server": name, "clients": clients, "skipped": f"did not start: {e}"[:600]}
    try:
        row = asyncio.run(load_test(server.url, "sft" if lora else "base", clients, args.per_client, args.max_tokens))
    except Exception as e:
        return {"server": name, "clients": clients, "skipped": f"{type(e).__name__}: {e}; server: {server.tail()}"[:600]}
    finally:
        server.stop()
    server.output.seek(0)
    printed = server.output.read()
    # Whether the decode step ran as CUDA graphs (the server logs the capture or why it failed).
    graphs = "captured" if "decode step captured as CUDA graphs" in printed else \
        ("failed: " + printed.split("CUDA graph capture failed", 1)[1][:200].strip()
         if "CUDA graph capture failed" in printed else "none")
    prefill = "captured" if "prefill captured as CUDA graphs" in printed else \
        ("failed: " + printed.split("prefill graph capture failed", 1)[1][:200].strip()
         if "prefill graph capture failed" in printed else "none")
    return {"server": name, **row, "cuda_graphs": graphs, "prefill_graphs": prefill}


def transformers_serve_argv(exe: str, model: str, port: int, device: str) -> list[str]:
    """`transformers serve --continuous-batching` pinned to `model`. Releases differ in how the
    model is pinned: newer ones take it as the positional argument, older ones as --force-model;
    its own --help tells which."""
    argv = [exe, "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), "--device", device]
    try:
        shown = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, COLUMNS="200"))
        help_text = shown.stdout + shown.stderr
    except (OSError, subprocess.SubprocessError):
        help_text = ""
    return argv + (["--force-model", model] if "--force-model" in help_text else [model])


def run_transformers(model_dir: Path, clients: int, args) -> dict:
    """transformers' own server with its continuous-batching manager, as it ships (no --cb-* tuning)."""
    name = "transformers serve --continuous-batching"
    exe = shutil.which("transformers")
    if exe is None:
        return {"server": name, "clients": clients, "skipped": "the `transformers` command is not installed"}
    try:
        model = str(no_eos_copy(model_dir, Path(args.workdir)))
        port = free_port()
        server = Process(transformers_serve_argv(exe, model, port, args.device), port, timeout=600, any_answer=True)
    except Exception as e:  # recorded in its row; the other rows still run
        return {"server": name, "clients": clients, "skipped": f"did not start: {type(e).__name__}: {e}"[:600]}
    try:
        row = asyncio.run(load_test(server.url, model, clients, args.per_client, args.max_tokens, ignore_eos=False))
    except Exception as e:  # it may reject a request shape; report instead of failing the whole run
        return {"server": name, "clients": clients, "skipped": f"{type(e).__name__}: {e}; server: {server.tail()}"[:600]}
    finally:
        server.stop()
    return {"server": name, **row}


def overhead_probe(slots: int, tokens: int = 64, rounds: int = 5) -> dict:
    """The engine's own cost per decode step on CPU: a 2-layer model's step, alone and inside
    the engine (8 or 64 requests of `tokens` forced tokens, events handed to an asyncio loop
    as the server does); the difference is scheduling, sampling, detokenising and hand-over."""
    import threading

    import torch

    from verlite.data.formatting import encode_prompt
    from verlite.inference import load_model_and_tokenizer
    from verlite.serve.engine import Engine, Request
    from verlite.serve.runner import SlotRunner
    from verlite.serve.sampling import SamplingParams

    torch.set_num_threads(1)
    sys.setswitchinterval(0.0005)  # as `verlite serve` sets it
    path = build_model("tiny", Path(tempfile.mkdtemp()), "cpu")
    model, tok = load_model_and_tokenizer(str(path), device="cpu")
    runner = SlotRunner(model, num_slots=slots, max_model_len=256)
    forwards = []  # best of several: the CPU may be shared, and noise only ever adds time
    with torch.no_grad():
        for _ in range(6):
            start = time.perf_counter()
            for _ in range(50):
                runner.step(128)
            forwards.append((time.perf_counter() - start) / 50)
    forward = min(forwards[1:])
    engine = Engine(runner, tok, stop_ids=[])
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    steps = []
    for r in range(rounds + 1):
        done = threading.Semaphore(0)
        start = time.perf_counter()
        for i in range(slots):
            prompt = encode_prompt(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            engine.submit(Request(prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), 0,
                                  lambda e: e.finish_reason and done.release(), loop=loop))
        for _ in range(slots):
            assert done.acquire(timeout=300)
        if r:  # the first round warms up
            steps.append((time.perf_counter() - start) / tokens)
    engine.stop()
    loop.call_soon_threadsafe(loop.stop)
    step = min(steps)
    return {"probe": "engine overhead per decode step (CPU)", "slots": slots, "forward_us": 1e6 * forward,
            "step_us": 1e6 * step, "overhead_us": 1e6 * (step - forward)}


def table(rows: list[dict], base_tps: float) -> str:
    lines = ["| shape | server | clients | requests | p50 ms | p99 ms | TTFT p50 ms | tokens/s | × baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['server']} | {r['clients']} | skipped: {r['skipped'][:120]} ||||||")
            continue
        ttft = f"{r['ttft_p50_ms']:.0f}" if r.get("ttft_p50_ms") is not None else "-"
        ratio = f"{r['tokens_per_s'] / base_tps:.1f}×" if r["shape"] == rows[0]["shape"] else "-"
        lines.append(f"| {r['shape']} | {r['server']} | {r['clients']} | {r['requests']} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {ttft} | {r['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, CPU, few requests: checks the script runs")
    p.add_argument("--shape", default="qwen0.5b")
    p.add_argument("--clients", default="8,64", help="comma-separated client counts")
    p.add_argument("--per_client", type=int, default=8, help="timed requests each client sends")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--max_model_len", type=int, default=1024)
    p.add_argument("--baseline_requests", type=int, default=5)
    p.add_argument("--lora_shape", default="qwen7b", help="shape for the one-LoRA case at 8 clients ('' skips)")
    p.add_argument("--no_transformers", action="store_true", help="skip transformers serve")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "verlite-serve-bench"))
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="append the rows as JSON lines here")
    p.add_argument("--overhead", action="store_true",
                   help="only the CPU probe of the engine's per-step overhead (8 and 64 slots)")
    args = p.parse_args(argv)
    if args.overhead:
        for slots in (8, 64):
            print(json.dumps(overhead_probe(slots)), flush=True)
        return 0
    if args.smoke:
        args.shape, args.clients, args.per_client, args.max_tokens = "tiny", "3", 2, 8
        args.max_model_len, args.baseline_requests, args.lora_shape, args.no_transformers = 128, 2, "tiny", True
        args.device = args.device or "cpu"
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.shape, root, args.device)
    clients = [int(c) for c in args.clients.split(",")]
    base = baseline(model_dir, args.device, args.max_tokens, args.baseline_requests)
    rows = [{"shape": args.shape, **base}]
    for c in clients:
        rows.append({"shape": args.shape, **run_verlite(model_dir, c, args)})
        print(json.dumps(rows[-1]), flush=True)
    if not args.no_transformers:
        for c in clients:
            rows.append({"shape": args.shape, **run_transformers(model_dir, c, args)})
            print(json.dumps(rows[-1]), flush=True)
    if args.lora_shape:
        lora_base = build_model(args.lora_shape, root, args.device)
        adapter = write_lora(lora_base, root / f"{args.lora_shape}-lora")
        rows.append({"shape": args.lora_shape, **run_verlite(lora_base, clients[0], args, lora=adapter)})
        print(json.dumps(rows[-1]), flush=True)
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "max_tokens": args.max_tokens, "per_client": args.per_client}
    print(table(rows, base["tokens_per_s"]))
    print(json.dumps(info))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**info, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
