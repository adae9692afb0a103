"""`python -m verlite.model_merger merge --backend fsdp --local_dir CKPT --target_dir OUT`: verl's
model merger command line on verlite checkpoints, so scripts written for verl keep working.

verlite's checkpoints already hold Hugging Face files (`global_step_N/huggingface/`), so a
full fine-tune is copied as is (the weights bit for bit). A LoRA checkpoint gives what verl's
merger gives and more: the PEFT adapter in OUT/lora_adapter/ and, in OUT itself, the full
model with the adapter merged in (verl leaves the base weights there), which
transformers and vLLM load directly.

`test --local_dir CKPT --test_hf_dir REF` checks that the checkpoint's weights equal a
reference Hugging Face model folder's, as verl's `test` does.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from verlite.errors import VerliteError

log = logging.getLogger("verlite.inference")

# The files of a Hugging Face model folder worth carrying over (weights, config, tokenizer).
_SKIP = {"training_args.bin"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m verlite.model_merger",
                                     description="verl's model merger on verlite checkpoints")
    sub = parser.add_subparsers(dest="operation", required=True)
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--backend", required=True, choices=["fsdp", "megatron"])
    base.add_argument("--local_dir", required=True, help="global_step_N (or its actor/ or huggingface/), or a run dir")
    base.add_argument("--tie-word-embedding", action="store_true", help=argparse.SUPPRESS)
    base.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    base.add_argument("--is-value-model", action="store_true", help=argparse.SUPPRESS)
    base.add_argument("--use_cpu_initialization", action="store_true", help=argparse.SUPPRESS)
    p = sub.add_parser("merge", parents=[base], help="write a Hugging Face model folder")
    p.add_argument("--target_dir", default="tmp")
    p.add_argument("--hf_upload_path", default=None, help="not supported here (no upload); leave unset")
    p.add_argument("--private", action="store_true", help=argparse.SUPPRESS)
    p = sub.add_parser("test", parents=[base], help="compare the checkpoint's weights with a reference model folder")
    p.add_argument("--test_hf_dir", required=True)
    return parser


def _hf_folder(local_dir: str) -> Path:
    from verlite.inference.loading import resolve_checkpoint

    path = Path(local_dir).expanduser()
    if path.name == "actor" and not path.exists():  # verl's PPO layout: global_step_N/actor
        path = path.parent
    if not path.exists():
        raise VerliteError(f"--local_dir {local_dir} does not exist; pass a global_step_N checkpoint folder")
    folder = resolve_checkpoint(str(path))
    if not isinstance(folder, Path):
        raise VerliteError(f"--local_dir {local_dir} is not a checkpoint folder")
    return folder


def merge(local_dir: str, target_dir: str) -> Path:
    from verlite.inference.loading import is_adapter
    from verlite.lora import export_lora_to_hf, merge_lora

    folder = _hf_folder(local_dir)
    out = Path(target_dir).expanduser()
    if is_adapter(folder):
        merge_lora(str(folder), str(out))
        export_lora_to_hf(None, str(folder), str(out / "lora_adapter"))
        log.info("merged model written to %s, LoRA adapter to %s", out, out / "lora_adapter")
        return out
    out.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.is_file() and item.name not in _SKIP:
            shutil.copy2(item, out / item.name)
    log.info("model written to %s", out)
    return out


def _state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VerliteError(f"{folder} holds no .safetensors weights")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def test(local_dir: str, reference: str) -> None:
    import torch

    from verlite.inference.loading import is_adapter

    folder = _hf_folder(local_dir)
    if is_adapter(folder):
        raise VerliteError(f"{local_dir} is a LoRA checkpoint; merge it first, then test the merged folder")
    ours, ref = _state_dict(folder), _state_dict(Path(reference).expanduser())
    if set(ours) != set(ref):
        diff = sorted(set(ours) ^ set(ref))[:3]
        raise VerliteError(f"weights differ in names from {reference}, e.g. {diff}")
    for name, tensor in ours.items():
        if tensor.shape != ref[name].shape or not torch.allclose(tensor.float(), ref[name].float(), atol=1e-5, rtol=1e-3):
            raise VerliteError(f"weight {name} differs from {reference}")
    print(f"{local_dir}: all {len(ours)} weights match {reference}")


def main(argv: list[str] | None = None) -> int:
    from verlite.logs import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging("INFO")
    try:
        if args.backend != "fsdp":
            raise VerliteError("--backend megatron: verlite writes FSDP checkpoints only; use --backend fsdp")
        if args.operation == "merge":
            if args.hf_upload_path:
                raise VerliteError("--hf_upload_path: uploading is not supported; merge, then upload "
                                   "with `huggingface-cli upload`")
            print(merge(args.local_dir, args.target_dir))
        else:
            test(args.local_dir, args.test_hf_dir)
        return 0
    except VerliteError as e:
        print(f"verlite: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
