#!/usr/bin/env bash
# On the lent GPU machine, from the repository root, with .gpu/ carried (tools/gpu_kit.sh):
#
#   bash tools/gpu_session.sh check                 # the CUDA tests: GPU bytes == CPU bytes == ggml (~2 min)
#   bash tools/gpu_session.sh rates                 # kernel rates, whole blocks against the searches (~1 min)
#   bash tools/gpu_session.sh profile               # stage rates and top ops on 8B shapes (4 layers)
#   bash tools/gpu_session.sh speed-llama3          # export_speed on the full Llama-3.1-8B shape (~7 min)
#   bash tools/gpu_session.sh speed-qwen3           # ... and Qwen3-8B
#
# A session has 15 device-minutes in all, the machine's start (1-2 min) included, and a call at
# most 10: the first call should be `check speed-llama3` with timeout_s 590, and nothing else; then
# `rates` (whether the whole-block kernels beat the torch code around the compiled searches there:
# QUANTKIT_KERNELS=numba,cuda-searches picks the latter) with what is left.
# Most of speed-*'s time is llama.cpp's flow (convert + three llama-quantize runs, ~280 s on
# 16 cores); quantkit's export runs first, so its figures come back even if the call is cut.
# Logs and result JSONs go to $OUT (the device tool brings them back). Steps run in the order given.
set -uo pipefail
REPO=$PWD
OUT=${OUT:-/tmp/quantkit-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 QUANTKIT_LLAMACPP_SRC=$REPO/.gpu/llama.cpp-src
export QUANTKIT_TOKENIZERS=$REPO/tests/fixtures/tokenizers    # the installed wheel has no tests/
cd /tmp    # not the repository root: its folders must not import as top-level packages
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, quantkit; print('torch', torch.__version__, torch.cuda.get_device_name(0), quantkit.__file__)"
status=0
for step in "$@"; do
  echo "== $step"
  case $step in
    check) python3 -m pytest -q -p no:cacheprovider -k cuda "$REPO/tests/test_kernels_registry.py" \
             "$REPO/tests/test_streams.py" "$REPO/tests/test_gguf_export.py" "$REPO/tests/test_gptq.py" 2>&1 | tee "$OUT/check.log" ;;
    rates) python3 -m quantkit.bench.export_profile --input llama3-tiny --device cuda --no-export --work /tmp 2>&1 \
             | tee "$OUT/rates.log" ;;
    profile) python3 -m quantkit.bench.export_profile --input llama3-8b --layers 4 --device cuda --work /tmp 2>&1 \
             | tee "$OUT/profile.log" ;;
    speed-*) python3 -m quantkit.bench.export_speed --input "${step#speed-}-8b" --device cuda --work /tmp --low-disk 2>&1 \
             | tee "$OUT/$step.log" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  # whole blocks wrong where the torch code around the compiled searches is right: time the latter,
  # so that the session still measures an export with the right bytes
  if [ "$step" = check ] && grep -Eq '^FAILED [^ ]*\[[^]]*-blocks\]' "$OUT/check.log" &&
     ! grep -Eq '^FAILED [^ ]*\[[^]]*-compiled\]' "$OUT/check.log"; then
    echo "== the whole-block kernels differ from the CPU's bytes: QUANTKIT_KERNELS=numba,cuda-searches from here on"
    export QUANTKIT_KERNELS=numba,cuda-searches
  fi
done
cp /tmp/site/quantkit/bench/results/*.json "$OUT/" 2>/dev/null
exit $status
