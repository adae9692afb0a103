"""`python -m verlite.trainer.fsdp_sft_trainer [key=value ...]`: verl's legacy SFT entry point.
It takes every key of verl's `sft_trainer.yaml` with verl's defaults, or `--config_path X.yaml`
as `verlite sft` does. Only an entry point: argv is read by verlite/verl_cli.py, the recipe
is `verlite.trainer.sft_trainer.run_sft`."""

import sys

if __name__ == "__main__":
    from verlite.verl_cli import main

    main(sys.argv[1:], "verl")
