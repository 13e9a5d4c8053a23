"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step runs (on the CPU, tiny sizes),
so the script is ready, untouched, when a GPU is lent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    not (Path(os.environ.get("PYRO_GMVAE_DATA", "data")) / "MNIST" / "raw").exists(),
    reason="needs MNIST's raw files under $PYRO_GMVAE_DATA",
)
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    log = (tmp_path / "steps.log").read_text()
    assert proc.returncode == 0, log + proc.stdout[-2000:] + proc.stderr[-2000:]
    steps = [line.split()[0] for line in log.splitlines() if " rc=" in line]
    assert steps == ["machine", "tests", "bench_step", "bench_epoch", "quality", "torchrun1",
                     "torchrun2"]  # fmt: skip
    for name in ("bench_step_cuda.json", "bench_epoch_cuda.json", "quality_mnist.json",
                 "torchrun1/summary.json", "torchrun2/summary.json"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    """Each step gets what is left of BUDGET: with none left, every step says it was skipped and
    the check fails, instead of running past the device's time limit."""
    env = {**os.environ, "PYTHON": sys.executable, "BUDGET": "0"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    log = (tmp_path / "steps.log").read_text()
    assert proc.returncode == 1
    assert log.count("skipped: the budget of 0 s is spent") == 7, log


def test_the_device_scripts_parse():
    for script in ("gpu_check.sh", "gpu_device.sh", "gpu_prepare.sh"):
        subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], check=True)
