"""The `verlite` command. Parses argv, sets up logging, calls the library, and turns user
errors into one line on stderr with a non-zero exit (no traceback)."""

from __future__ import annotations

import argparse
import logging
import sys

from verlite import __version__
from verlite.errors import VerliteError

log = logging.getLogger("verlite.cli")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log_level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="how much to print (default INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verlite", description="Supervised fine-tuning for causal LMs.")
    parser.add_argument("--version", action="version", version=f"verlite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sft", help="train from a YAML config (verl's sft_trainer keys)")
    p.add_argument("--config_path", "--config", dest="config_path", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.max_length=512")
    # The article's single-GPU flags: verlite needs neither (one process is the default).
    p.add_argument("--disable_ddp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--use_fsdp2", action="store_true", help=argparse.SUPPRESS)
    _common(p)

    p = sub.add_parser("plan", help="predict peak GPU memory for a config and the largest micro-batch that fits")
    p.add_argument("--config_path", "--config", dest="config_path", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpu_mem_gb", type=float, default=None, help="plan for this much GPU memory (default: this GPU)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs the run will shard over")
    _common(p)

    p = sub.add_parser("quickstart", help="train a tiny model on the article's 100 math samples, then answer one")
    p.add_argument("--model", default=None, help="run the same flow on this HF model (path or id) instead")
    p.add_argument("--output_dir", default="./verlite-quickstart", help="where data and checkpoints go")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 40 for the tiny model, the article's 1 with --model)")
    _common(p)
    return parser


def _cmd_sft(args) -> int:
    from verlite.config import load_config
    from verlite.trainer.sft_trainer import run_sft

    run_sft(load_config(args.config_path, args.overrides))
    return 0


def _cmd_plan(args) -> int:
    import torch

    from verlite.config import load_config
    from verlite.engine.memory import gpu_capacity_gib, plan_report

    cfg = load_config(args.config_path, args.overrides)
    if args.gpu_mem_gb:
        cfg.trainer.gpu_mem_gb = args.gpu_mem_gb
    device = torch.device("cuda") if torch.cuda.is_available() else None
    print(plan_report(cfg, gpu_capacity_gib(cfg, device), args.nproc))
    return 0


def _cmd_quickstart(args) -> int:
    from verlite.quickstart import run_quickstart

    run_quickstart(args.output_dir, model=args.model, device=args.device, epochs=args.epochs)
    return 0


COMMANDS = {"sft": _cmd_sft, "plan": _cmd_plan, "quickstart": _cmd_quickstart}


def main(argv: list[str] | None = None) -> int:
    from verlite.logs import setup_logging

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may stand between flags (verl's scripts interleave them).
    stray = [a for a in rest if a.startswith("-") or "=" not in a or args.command not in ("sft", "plan")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    setup_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except VerliteError as e:
        print(f"verlite: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("verlite: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a stop with a saved checkpoint carries its own exit code
        from verlite.trainer.signals import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            print(f"verlite: {e}", file=sys.stderr)
            return e.exit_code
        raise


if __name__ == "__main__":
    sys.exit(main())
