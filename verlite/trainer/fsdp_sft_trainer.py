"""`python -m verlite.trainer.fsdp_sft_trainer --config_path X.yaml [key=value ...]`: the module
path verl users know. It is only an entry point, equal to `verlite sft`; the recipe itself
is `verlite.trainer.sft_trainer.run_sft`."""

import sys

if __name__ == "__main__":
    from verlite.cli import run_and_exit

    run_and_exit(["sft", *sys.argv[1:]])
