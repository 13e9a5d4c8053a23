#!/usr/bin/env bash
# The GPU check, one unattended command for a lent H100/H200 (at most BUDGET = 540 s of wall time,
# 9 minutes: a step gets what is left of it), every output under one folder:
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT]        (OUT defaults to gpu_check/)
#
# 1. the machine (torch, pyro, the GPU, nvidia-smi);
# 2. the tests that need CUDA (the rest of the suite runs on the CPU anyway);
# 3. bench_step (MNIST-size step of every model against the hand-written loss, B = 100 and 1000,
#    with enum-jit) and bench_epoch (measured epochs of gmvae K = 10, enum and enum-jit) on CUDA;
# 4. the default recipe over 4 seeds at once on the one GPU (seeds in parallel, one process each;
#    20k training images, 5 epochs, to fit the budget), through benchmarks/quality.py;
# 5. data-parallel training of Shu's recipe under torchrun, 1 and then 2 processes on the one GPU
#    (two processes share it through gloo; NCCL wants a GPU per process), 2 epochs of 20k images
#    each: the epoch times are in each run's metrics.jsonl (time_s).
#
# On the `device` tool's machine (no network, no Pyro): benchmarks/gpu_prepare.sh here, then
# benchmarks/gpu_device.sh there, which installs the carried wheels and runs this script.
#
# --dry-run runs the same steps on the CPU at tiny sizes (about a minute; the tests step only
# collects): tests/test_gpu_check.py runs it so that the script does not rot before a GPU is lent.
# Each step has a time limit (STEP_TIMEOUT seconds, default 150) and its own log; a failing step is
# recorded in steps.log and the next one runs. The data root is $PYRO_GMVAE_DATA (MNIST's raw files).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
: > "$OUT/steps.log"

BUDGET=${BUDGET:-540}  # seconds for the whole check; a step gets what is left, at most its own limit

step() {
    local name=$1; shift
    local start=$SECONDS limit=${STEP_TIMEOUT:-150} left=$((BUDGET - SECONDS))
    echo "== $name: $*" >> "$OUT/steps.log"
    if [ "$left" -lt 10 ]; then
        echo "   $name rc=124 skipped: the budget of $BUDGET s is spent" | tee -a "$OUT/steps.log"
        return
    fi
    timeout "$((left < limit ? left : limit))" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name rc=$rc $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
}

step machine "$PY" -c "import torch, pyro, platform; print(platform.node(), 'torch', torch.__version__,
'pyro', pyro.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
if [ $DRY = 0 ]; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    STEP_TIMEOUT=60 step tests "$PY" -m pytest -q -k "cuda" tests/
    step bench_step "$PY" benchmarks/bench_step.py --device cuda --batch-sizes 100 1000 --jit \
        --repeats 3 --min-block-s 0.25 --no-memory --out "$OUT/bench_step_cuda.json"
    STEP_TIMEOUT=60 step bench_epoch "$PY" benchmarks/bench_epoch.py --device cuda \
        --batch-sizes 100 1000 --epochs 2 --out "$OUT/bench_epoch_cuda.json"
    STEP_TIMEOUT=60 step bench_epoch_jit "$PY" benchmarks/bench_epoch.py --device cuda \
        --estimator enum-jit --batch-sizes 100 1000 --epochs 2 --out "$OUT/bench_epoch_cuda_jit.json"
    STEP_TIMEOUT=${QUALITY_TIMEOUT:-200} step quality "$PY" benchmarks/quality.py --dataset mnist \
        --recipes vade-umap --seeds 0 1 2 3 --workers 4 --limit 20000 --epochs 5 \
        --runs-dir "$OUT/runs" --out-dir "$OUT"
    for n in 1 2; do  # 20k training images, so that both fit what is left of the budget
        STEP_TIMEOUT=90 step "torchrun$n" "$PY" -m torch.distributed.run --standalone \
            --nproc_per_node $n examples/mnist_unsup.py --recipe shu --device cuda --epochs 2 \
            --limit 20000 --no-progress --out "$OUT/torchrun$n"
    done
else
    step tests "$PY" -m pytest -q --collect-only -k "cuda" tests/
    step bench_step "$PY" benchmarks/bench_step.py --quick --device cpu --out "$OUT/bench_step_cuda.json"
    step bench_epoch "$PY" benchmarks/bench_epoch.py --device cpu --synthetic --batch-sizes 50 \
        --epochs 2 --max-steps 2 --limit 200 --out "$OUT/bench_epoch_cuda.json"
    step quality "$PY" benchmarks/quality.py --dataset mnist --recipes vade --seeds 0 1 --workers 2 \
        --limit 200 --test-limit 100 --epochs 1 --pretrain-epochs 1 --hidden 16 \
        --runs-dir "$OUT/runs" --out-dir "$OUT"
    for n in 1 2; do
        step "torchrun$n" "$PY" -m torch.distributed.run --standalone --nproc_per_node $n \
            examples/mnist_unsup.py --recipe shu --device cpu --epochs 1 --limit 400 \
            --test-limit 200 --batch-size 20 --hidden 16 --latent-dim 4 --no-progress \
            --out "$OUT/torchrun$n"
    done
fi
failed=$(grep -c " rc=[1-9]" "$OUT/steps.log")
echo "gpu check: $failed failed step(s); logs and results in $OUT/"
exit $((failed > 0))
