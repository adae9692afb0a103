"""verl's SFT command lines, for `python -m verlite.trainer.fsdp_sft_trainer` (verl's legacy
trainer, `sft_trainer.yaml`) and `python -m verlite.trainer.sft_trainer` (verl >= 0.8's engine
trainer, `sft_trainer_engine.yaml`), under python or torchrun.

Arguments are Hydra's: `key=value` overrides in its grammar, and `--config-path DIR
--config-name NAME` for a YAML of verl's own. verlite's `--config_path FILE` works as with
`verlite sft` (verlite's defaults under the file); without it the trainer's verl defaults apply.
"""

from __future__ import annotations

import os
import sys


# verl's packaged config names; without --config-path they name the defaults built in here.
BUILT_IN = ("sft_trainer", "sft_trainer_engine")


def _hydra_config(argv: list[str]) -> tuple[list[str], str | None]:
    """Pull Hydra's --config-path/--config-name (either `--flag value` or `--flag=value`)."""
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--config-path", "--config-name", "-cp", "-cn"):
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            values["path" if name in ("--config-path", "-cp") else "name"] = value
        else:
            rest.append(arg)
        i += 1
    if "name" not in values:
        return rest, None
    if "path" not in values and values["name"] in BUILT_IN:
        return rest, None  # verl's own config by name: the trainer's built-in verl defaults
    name = values["name"] if values["name"].endswith((".yaml", ".yml")) else values["name"] + ".yaml"
    return rest, os.path.join(values.get("path", "."), name)


def main(argv: list[str], dialect: str) -> None:
    from verlite.cli import run_and_exit

    rest, hydra_file = _hydra_config(argv)
    if hydra_file is not None:
        rest = ["--config_path", hydra_file, *rest]
    elif any(a == "--config_path" or a.startswith(("--config_path=", "--config=")) or a == "--config" for a in rest):
        dialect = "verlite" if dialect == "verl" else dialect  # the article's flow: verlite's defaults
    run_and_exit(["sft", f"--dialect={dialect}", *rest])


if __name__ == "__main__":
    main(sys.argv[1:], "verl")
