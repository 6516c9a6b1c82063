#!/usr/bin/env bash
# Packs what the lent GPU machine lacks into .gpu/ (git-ignored; the device tool carries it, ~30 MB):
# quantkit as a wheel, the gguf and diskcache wheels, llama-cpp-python (the portable build the
# tests use as their oracle, from pip's cache) and llama.cpp's converter sources. numba is left out
# (llvmlite alone is ~40 MB): there the CPU scale searches run in torch, which gives the same bytes.
#
#   bash tools/gpu_kit.sh                                   # here, after `make install-test`
#   device run, carry [".gpu"]: bash tools/gpu_session.sh check profile speed-llama3   # there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LLAMA_CPP_PYTHON=$(sed -n 's/^LLAMA_CPP_PYTHON := //p' Makefile)
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"}
test -f .cache/llama.cpp-src/convert_hf_to_gguf.py || { echo "gpu_kit.sh: run \`make install-test\` first" >&2; exit 2; }
rm -rf .gpu && mkdir -p .gpu/whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl .
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl \
  "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" diskcache==5.6.3
"$PY" -m pip wheel -q --no-deps -w .gpu/whl "$LLAMA_CPP_PYTHON"     # built once, then pip's cache
cp -r .cache/llama.cpp-src .gpu/llama.cpp-src
du -sh .gpu
