#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks (it has no internet) into .whl/ (git-ignored), for its
# Python 3.12, torch 2.11, pyarrow 25 (checked there on 2026-11-25):
#   verlite itself: omegaconf + antlr4 + hydra-core (the versions hydra-core 1.3 accepts),
#                   torchao (QLoRA's NF4, 8-bit AdamW), fastapi/uvicorn/starlette/pydantic (serve), openai + jiter + distro
#                   + httpx2/httpcore2/sniffio/truststore (`transformers serve`, serve_bench.py's library baseline, imports
#                   openai's types; without httpx2 it did not start there on 2026-11-25);
#   the peers:      trl, datasets, dill, multiprocess, liger-kernel, bitsandbytes (TRL's QLoRA and
#                   8-bit AdamW).
# antlr4 4.9.3 exists only as a source archive: it is pure Python, so it is built into a wheel here.
# On the GPU machine, before verlite or the bench runs:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
          --platform manylinux2014_x86_64 -d .whl "$@"; }
get omegaconf==2.3.1 hydra-core==1.3.8 torchao==0.18.0 \
    fastapi==0.165.0 uvicorn==0.54.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 annotated-doc==0.0.7 typing-inspection==0.4.2 typing-extensions==4.16.0 \
    opentelemetry-api==1.45.2 openai==3.57.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 truststore==0.10.5 httpx2==2.16.2 httpcore2==2.16.2 \
    trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5 bitsandbytes==0.50.2
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
