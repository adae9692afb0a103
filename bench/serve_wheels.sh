#!/usr/bin/env bash
# The wheels `verlite serve` and bench/serve_bench.py need on the GPU machine (no internet)
# into .whl/serve/ (git-ignored). pip there installs only what is missing:
#   pip install --no-index --find-links .whl/serve fastapi uvicorn httpx openai
# (openai: `transformers serve`, the library baseline, imports its types.)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl/serve \
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 \
    pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
    typing_extensions==4.16.0 anyio==4.16.0 sniffio==1.3.1 httpx==0.28.1 httpcore==1.0.9 idna certifi \
    openai==3.57.0 jiter==0.19.0 distro
ls .whl/serve
