"""A tiny model whose greedy text depends on the prompt (weights drawn wider than the usual
0.02, so two prompts rarely share an answer and mixed-up replies are caught), two PEFT
adapters on it with different targets and ranks, and a real `verlite serve` process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def served_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """build_models once per test session (both serve test modules use the same folders)."""
    root = tmp_path_factory.getbasetemp() / "serve_models"
    if not (root / "b" / "adapter_config.json").is_file():
        build_models(root, tokenizer)
    return {name: root / name for name in ("base", "a", "b")}


def build_models(root: Path, tokenizer) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=192, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.1, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    paths = {"base": base}
    for name, lora in (("a", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                        init_lora_weights=False)),
                       ("b", LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                        target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]))):
        torch.manual_seed(len(name) + ord(name))
        adapter = get_peft_model(Qwen2ForCausalLM.from_pretrained(base), lora)
        adapter.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`verlite serve ...` in a subprocess on 127.0.0.1, up once /health answers."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall it
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "verlite.cli", "serve", "--port", str(self.port),
                                      "--device", "cpu", *args], env=full_env, stdout=self.output,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"verlite serve exited {self.proc.returncode}: {self.printed()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("verlite serve did not come up")

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM, as a scheduler would; (exit code, everything it printed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.printed()

    def printed(self) -> str:
        self.output.seek(0)
        return self.output.read()
