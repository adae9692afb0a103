#!/usr/bin/env bash
# Fetch the pure-Python wheels the GPU machine lacks (it has no internet) into .whl/ (git-ignored):
# omegaconf + hydra-core + antlr4 for verlite itself (hydra-core 1.3 pins antlr4 4.9.*, which
# PyPI has only as an sdist, so it is built here into a pure-Python wheel; omegaconf < 2.4 to
# match); trl, datasets, dill, multiprocess, liger-kernel for the TRL side of bench/bench.py.
# Two datasets versions: 5.x wants pyarrow >= 24, 4.8 takes >= 21; the GPU command installs
# the one its pyarrow allows (see bench/RESULTS.md for the command).
set -euo pipefail
cd "$(dirname "$0")/.."
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
get .whl omegaconf==2.3.0 hydra-core==1.3.8 trl==1.16.0 dill==0.4.1 multiprocess==0.70.19 \
    liger-kernel==0.8.5
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
get .whl/ds5 datasets==5.2.0
get .whl/ds4 datasets==4.8.5
ls -R .whl
