#!/usr/bin/env bash
# Runs on the lent GPU machine (see benchmarks/gpu_prepare.sh): installs the carried wheels,
# runs the GPU check within the device tool's 10-minute call, and packs what it wrote into $OUT
# (which returns at most 8 files): steps.log, and gpu_check.tgz with every log and JSON
# (checkpoints and figures left out).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYRO_GMVAE_DATA=$PWD/.gpu_data PYTHON=python3 PYTHONUNBUFFERED=1
RESULTS=/tmp/gpu_check
BUDGET=${BUDGET:-540} bash benchmarks/gpu_check.sh "$RESULTS"
rc=$?
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
cp "$RESULTS/steps.log" "$OUT/"
tar czf "$OUT/gpu_check.tgz" --exclude='*.pt' --exclude='*.png' -C "$(dirname "$RESULTS")" \
    "$(basename "$RESULTS")"
exit $rc
