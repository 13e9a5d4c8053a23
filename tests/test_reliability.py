"""Faults a user meets: concurrent writers, rollback storms, interrupts, corrupt checkpoints,
incomplete runs, awkward inputs, resume mistakes, what config.json records (issue 14).

The CLI cases run the real script in subprocesses on the arcs data (no files needed), with tiny
networks; each takes seconds.
"""

import json
import math
import os
import pathlib
import signal
import stat
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from pyro_gmvae import make_guide, make_model
from pyro_gmvae.evaluate import cluster_probs
from pyro_gmvae.harness.run import (
    IncompleteRunWarning,
    RunConfig,
    load_run,
    read_metrics,
    run,
    run_status,
)
from pyro_gmvae.train import NonFiniteLossError, Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "mnist_unsup.py"
# 1000 steps of 50 arcs points per epoch: a few seconds, long enough to be interrupted.
ARCS = ["--dataset", "arcs", "--model", "gmvae", "--k", "5", "--hidden", "16", "--latent-dim", "2",
        "--batch-size", "50", "--test-limit", "500", "--no-progress"]  # fmt: skip


# One thread: the same as the runs compared with (another thread count sums in another order).
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)  # fmt: skip


def wait_for_training(proc) -> str:
    """Read the child's stdout up to its plan line (printed as training is about to start)."""
    line = proc.stdout.readline()
    assert "threads: about" in line, line + proc.stderr.read()
    return line


def rows_without_time(out):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(out)]


def test_a_second_writer_is_refused_and_the_first_run_is_intact(tmp_path):
    out = tmp_path / "run"
    # Long enough to outlive both refusals; interrupted (and checkpointed) at the end.
    first = cli(
        *ARCS, "--limit", "20000", "--epochs", "100", "--eval-every", "1", "--out", str(out)
    )
    wait_for_training(first)
    # A fresh run with other settings, then a resume of the same run, while the first writes.
    for extra in (["--seed", "1", "--lr", "3e-3"], ["--resume"]):
        second = cli(*ARCS, "--limit", "20000", "--epochs", "2", "--out", str(out), *extra)
        _, err = second.communicate(timeout=120)
        assert second.returncode != 0
        assert f"process {first.pid}" in err and "in use" in err and "Traceback" not in err
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert "--resume" in err
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))  # one run's rows, in order
    saved = json.loads((out / "config.json").read_text())
    assert (saved["seed"], saved["lr"], saved["epochs"]) == (0, 1e-3, 100)
    assert run_status(out)["epoch"] == len(rows)


def test_sigint_during_the_first_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole = cli(*ARCS, "--limit", "40000", "--epochs", "2", "--out", str(tmp_path / "whole"))
    cut = cli(*ARCS, "--limit", "40000", "--epochs", "2", "--out", str(tmp_path / "cut"))
    wait_for_training(cut)
    time.sleep(0.5)
    cut.send_signal(signal.SIGINT)
    _, err = cut.communicate(timeout=120)
    assert cut.returncode != 0 and "Traceback" not in err
    command = err.strip().splitlines()[-1].split("with: ", 1)[1]
    assert "--resume" in command
    state = run_status(tmp_path / "cut")
    assert state["epoch"] == 0 and not state["complete"]  # a mid-epoch checkpoint
    resumed = subprocess.run(
        [sys.executable, *command.split()[1:], "--no-progress"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole.communicate(timeout=300)
    assert rows_without_time(tmp_path / "cut") == rows_without_time(tmp_path / "whole")


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, epochs in ((a, "3"), (b, "2")):
        proc = cli(*ARCS, "--limit", "500", "--epochs", epochs, "--out", str(out))
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    data = (b / "checkpoint.pt").read_bytes()
    (b / "checkpoint.pt").write_bytes(data[: len(data) // 3])  # truncated
    (b / "checkpoint.pt.123.tmp").write_bytes(b"orphan of a killed write")
    proc = cli(*ARCS, "--limit", "500", "--epochs", "3", "--resume", "--out", str(b))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    said = [line for line in (out + err).splitlines() if "unreadable" in line]
    assert said and "previous checkpoint (epoch 1)" in said[0] and "Traceback" not in err
    assert not list(b.glob("*.tmp"))
    assert rows_without_time(b) == rows_without_time(a)


def test_a_run_whose_checkpoints_are_all_corrupt_says_so_in_one_line(tmp_path):
    out = tmp_path / "run"
    cli(*ARCS, "--limit", "500", "--epochs", "1", "--out", str(out)).communicate(timeout=300)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = cli(*ARCS, "--limit", "500", "--epochs", "2", "--resume", "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "unreadable" in err and len(err.strip().splitlines()) == 1


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    out = tmp_path / "run"
    cli(*ARCS, "--limit", "500", "--epochs", "2", "--out", str(out)).communicate(timeout=300)
    proc = cli(*ARCS, "--limit", "500", "--epochs", "1", "--resume", "--out", str(out))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "fewer than the 2 epochs" in err
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_config_resolves_defaults_and_files_are_readable_by_others(tmp_path):
    out = tmp_path / "run"
    proc = cli(*ARCS, "--limit", "500", "--epochs", "1", "--out", str(out))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    plan = stdout.splitlines()[0]
    assert "cpu with 1 threads: about" in plan and "1 epochs" in plan
    saved = json.loads((out / "config.json").read_text())
    assert saved["guide"] == "mean_field" and saved["likelihood"] == "gaussian"
    assert saved["device"] == "cpu" and saved["threads"] == 1
    assert saved["hidden"] == 16 and saved["latent_dim"] == 2
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name


# --- the Python API ------------------------------------------------------------------------------


def tiny_run(out, **overrides):
    base = dict(model="gmvae", k=5, dataset="arcs", binarize="none", hidden=8, latent_dim=2,
                limit=100, batch_size=50, eval_batch_size=100, epochs=2, progress=False,
                out=str(out))  # fmt: skip
    return RunConfig(**{**base, **overrides})


def test_load_run_says_when_a_run_is_incomplete_and_which_device_is_missing(tmp_path):
    run(tiny_run(tmp_path, epochs=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(tmp_path)  # complete: no warning
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["epochs"] = 3  # as if it had been asked for 3 and stopped after 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(IncompleteRunWarning, match="epoch 1 of 3"):
        load_run(tmp_path)
    assert run_status(tmp_path) == {"epoch": 1, "epochs": 3, "complete": False}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_run(tmp_path, device="cuda")


def test_rollbacks_are_counted_in_metrics_and_summary(tmp_path, monkeypatch):
    step, calls = Trainer.step, []

    def one_nan(self, x):
        calls.append(None)
        if len(calls) == 2:  # epoch 1's second step
            x = torch.full_like(torch.as_tensor(x), math.nan)
            from pyro_gmvae import nets

            nets.set_validation(False)  # let the NaN reach the loss, as a diverging step would
        return step(self, x)

    monkeypatch.setattr(Trainer, "step", one_nan)
    summary = run(tiny_run(tmp_path, on_nan="rollback"))
    assert [r["rollbacks"] for r in read_metrics(tmp_path)] == [1, 1]
    assert summary["rollbacks"] == 1


def test_a_rollback_storm_stops_the_run():
    """Good and bad steps alternating (each rollback undoes the good step before it) is caught
    by the share of recent rollbacks, not only by rollbacks in a row."""
    torch.manual_seed(0)
    model = make_model("gmvae", data_dim=6, k=3, z_dim=2, hidden=(8,))
    trainer = Trainer(model, on_nan="rollback", max_rollbacks=3, rollback_window=10,
                      max_rollback_fraction=0.3)  # fmt: skip
    good = torch.bernoulli(torch.full((4, 6), 0.5))
    from pyro_gmvae import nets

    nets.set_validation(False)
    bad = torch.full((4, 6), math.nan)
    with pytest.raises(NonFiniteLossError, match="of the last 10 steps rolled back"):
        for _ in range(20):
            trainer.step(good)
            trainer.step(bad)
    assert trainer.rollbacks_total >= 4


def test_the_first_step_failing_under_rollback_does_not_suggest_rollback():
    from pyro_gmvae import nets

    nets.set_validation(False)
    model = make_model("gmvae", data_dim=6, k=3, z_dim=2, hidden=(8,))
    with pytest.raises(NonFiniteLossError) as err:
        Trainer(model, on_nan="rollback").step(torch.full((4, 6), math.nan))
    assert "no good state to roll back to yet" in str(err.value)
    assert "on_nan='rollback'" not in str(err.value)


@pytest.fixture
def mnist_like():
    torch.manual_seed(0)
    model = make_model("gmvae", data_dim=784, k=3, z_dim=2, hidden=(8,))
    return model, make_guide("vade", model)


def test_inputs_are_converted_or_refused_in_one_line(mnist_like):
    model, guide = mnist_like
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    grey = images.reshape(5, 784).float() / 255
    expected = cluster_probs(guide, grey)
    for same in (images, images.numpy(), grey.numpy(), grey.double(), grey.reshape(5, 1, 28, 28)):
        torch.testing.assert_close(cluster_probs(guide, same), expected)
    binary = (images > 127).to(torch.uint8)  # 0/1 uint8: not rescaled
    trainer = Trainer(model, guide)
    with trainer.context(advance=False):  # the same draw of z for both
        loss_uint8 = trainer.loss(binary)
    with trainer.context(advance=False):
        torch.testing.assert_close(loss_uint8, trainer.loss(binary.reshape(5, 784).float()))
    for bad, message in [
        (torch.zeros(0, 784), "empty"),
        (np.zeros((5, 100)), "784 features"),
        (torch.full((5, 784), math.nan), "NaN"),
        (torch.empty(5, 784, device="meta"), "meta device"),
        ("not data", "expected an array"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            cluster_probs(guide, bad)
        with pytest.raises((ValueError, TypeError), match=message):
            trainer.step(bad)
