#!/usr/bin/env bash
# The one prepared GPU check of issue 13, for one H200 from a bare machine (under 8 minutes):
# install the project, then scripts/gpu_check.py: the CUDA tests (-m cuda), bench_throughput.py
# for r18-rd100 and wr50-rd550 on the GPU, and a 100,000-image synthetic fit with its peak host
# and GPU memory, all into one JSON file ($OUT/gpu_check.json, or ./gpu_check.json).
#
#   bash scripts/gpu_check.sh                      # on the GPU machine
#   GPU_CHECK_ARGS="--device cpu --images 64 --bench-n 16" bash scripts/gpu_check.sh   # dry run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-.}/gpu_check.json"
python3 -m pip install -q -e ".[test]" || exit 1
# shellcheck disable=SC2086
exec python3 scripts/gpu_check.py --out "$out" ${GPU_CHECK_ARGS:-}
