#!/usr/bin/env bash
# Fetch the pure-Python wheels the GPU machine lacks (it has no internet) into .whl/ (git-ignored):
# omegaconf + antlr4 for verlite itself; trl, datasets, dill, multiprocess, liger-kernel for the
# TRL side of bench/bench.py. Two datasets versions: 5.x wants pyarrow >= 24, 4.8 takes >= 21;
# the GPU command installs the one its pyarrow allows (see bench/RESULTS.md for the command).
set -euo pipefail
cd "$(dirname "$0")/.."
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
get .whl omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 trl==1.16.0 dill==0.4.1 multiprocess==0.70.19 \
    liger-kernel==0.8.5
# Small cards (issue 10): torchao for verlite's NF4 base and 8/4-bit AdamW; bitsandbytes for the
# TRL side's QLoRA and paged_adamw_8bit (both are manylinux_2_24+ wheels: their own platform tag).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl torchao==0.18.0 bitsandbytes==0.50.2
get .whl/ds5 datasets==5.2.0
get .whl/ds4 datasets==4.8.5
ls -R .whl
