"""The run harness: run directory contents, exact resume, crash safety, refusals, load_run.

Every run is the tiny GMVAE (8 hidden units, 2-d z, K = 5) on 100 arcs points in batches of 50:
two steps and one evaluation (on 20 test points) per epoch.
"""

import dataclasses
import inspect
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pyro
import pytest
import torch

import pyro_gmvae.harness.run as R
import pyro_gmvae.train as T
from pyro_gmvae.evaluate import cluster_probs
from pyro_gmvae.harness.run import RunConfig, load_run, read_metrics, run
from pyro_gmvae.train import NonFiniteLossError, Trainer

# The free-bits factor's ordering warning is expected (see pyro_gmvae.objectives).

METRIC_KEYS = {"epoch", "step", "time_s", "train_loss", "test_elbo", "acc_hungarian",
               "acc_majority", "acc_aae", "nmi", "ari", "cond_entropy", "usage_entropy",
               "clusters_used", "cluster_kl", "kl_weight"}  # fmt: skip
STEPS_PER_EPOCH = 2


def config(out, **overrides):
    base = dict(model="gmvae", k=5, dataset="arcs", binarize="none", hidden=8, latent_dim=2,
                limit=100, batch_size=50, eval_batch_size=100, epochs=4, kl_warmup_epochs=3,
                progress=False, out=str(out))  # fmt: skip
    return RunConfig(**{**base, **overrides})


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


class Killed(Exception):
    """Stands in for the process dying."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run; also keeps its trainer, to compare load_run with."""
    out = tmp_path_factory.mktemp("reference")
    trainers = []

    class Recording(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R, "Trainer", Recording)
        summary = run(config(out))
    return {"out": out, "rows": read_metrics(out), "trainer": trainers[0], "summary": summary}


def test_run_directory_contents(reference):
    out, rows = reference["out"], reference["rows"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for row in rows:
        assert METRIC_KEYS <= set(row)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values())
    assert [r["time_s"] for r in rows] == sorted(r["time_s"] for r in rows)
    # KL warm-up over 3 epochs, then constant.
    assert [r["kl_weight"] for r in rows] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])

    saved = json.loads((out / "config.json").read_text())
    cfg = config(out)
    for field in dataclasses.fields(RunConfig):
        given = getattr(cfg, field.name)
        # Every default is resolved: None becomes the value the run used.
        assert saved[field.name] == given or (given is None and saved[field.name] is not None), (
            field.name
        )
    assert (saved["guide"], saved["likelihood"], saved["device"]) == (
        "mean_field",
        "gaussian",
        "cpu",
    )
    assert saved["threads"] == torch.get_num_threads()
    assert saved["seed"] == 0
    assert {"pyro", "torch", "numpy", "scipy", "sklearn", "python", "pyro_gmvae"} <= set(
        saved["versions"]
    )
    resolved = {k: saved[k] for k in ("guide", "likelihood", "device")}
    assert R.load_config(out) == dataclasses.replace(cfg, **resolved)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["epoch"] == 4 and summary["acc_hungarian"] == rows[-1]["acc_hungarian"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_run_and_resume_after_epochs(reference, tmp_path):
    run(config(tmp_path, epochs=2))
    assert without_time(read_metrics(tmp_path)) == without_time(reference["rows"][:2])
    run(config(tmp_path, epochs=4), resume=True)
    assert without_time(read_metrics(tmp_path)) == without_time(reference["rows"])
    assert R.load_config(tmp_path).epochs == 4  # config.json follows the resumed settings
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_elbo"] == reference["summary"]["test_elbo"]


def test_training_does_not_depend_on_the_evaluations(reference, tmp_path):
    """Evaluation draws from its own stream: evaluating every 2 epochs, and once more at the
    end of a 3-epoch run that is then extended, leaves the training trajectory unchanged."""
    run(config(tmp_path, epochs=3, eval_every=2))
    run(config(tmp_path, epochs=4, eval_every=2), resume=True)
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [2, 3, 4]
    expected = reference["rows"]
    assert without_time([rows[0], rows[2]]) == without_time([expected[1], expected[3]])
    assert without_time(rows[1:2])[0]["test_elbo"] == expected[2]["test_elbo"]


def test_resume_after_a_kill_mid_epoch(reference, tmp_path, monkeypatch):
    calls = []
    step = Trainer.step

    def dying_step(self, x):
        calls.append(None)
        if len(calls) == 2 * STEPS_PER_EPOCH + 2:  # epoch 3, after its first step
            raise Killed
        return step(self, x)

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(Killed):
        run(config(tmp_path))
    assert len(read_metrics(tmp_path)) == 2
    monkeypatch.setattr(Trainer, "step", step)
    run(config(tmp_path), resume=True)
    assert without_time(read_metrics(tmp_path)) == without_time(reference["rows"])


def test_checkpoint_write_killed_midway(reference, tmp_path, monkeypatch):
    """The second checkpoint dies half written: the first stays whole, nothing partial is left,
    and resume drops the evaluation written after the surviving checkpoint."""
    real_save, saves = torch.save, []

    def half_save(obj, f, *args, **kwargs):
        saves.append(None)
        if len(saves) < 2:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise Killed

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(Killed):
        run(config(tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", "checkpoint.pt", "config.json", "metrics.jsonl",
    ]  # fmt: skip
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["trainer"]["step"] == STEPS_PER_EPOCH
    assert len(read_metrics(tmp_path)) == 2  # epoch 2 was evaluated, never checkpointed
    run(config(tmp_path), resume=True)
    assert without_time(read_metrics(tmp_path)) == without_time(reference["rows"])


# A child process that writes one checkpoint, then dies by SIGKILL halfway through the next.
# It runs atomic_save's own source with only torch imported (the whole package is 3x slower).
KILLED_CHILD = """
import io, os, signal, sys, tempfile
from pathlib import Path

import torch

ATOMIC_SAVE

path = sys.argv[1]
atomic_save({"version": 1}, path)
real_save = torch.save


def dying_save(obj, f):
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[:100])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = dying_save
atomic_save({"version": 2, "weights": torch.zeros(10_000)}, path)
"""


def test_checkpoint_write_killed_by_a_signal(tmp_path):
    """SIGKILL inside atomic_save (no cleanup runs): checkpoint.pt is still the old file."""
    script = KILLED_CHILD.replace("ATOMIC_SAVE", inspect.getsource(R.atomic_save))
    path = tmp_path / "checkpoint.pt"
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True)
    assert done.returncode == -9, done.stderr.decode()
    assert torch.load(path, weights_only=False) == {"version": 1}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # never named checkpoint.pt


def test_refusals_and_a_moved_run(reference, tmp_path, monkeypatch):
    moved = tmp_path / "moved"
    shutil.copytree(reference["out"], moved)
    with pytest.raises(ValueError, match=r"settings differ .*\['lr'\]"):
        run(config(moved, lr=1e-2), resume=True)
    with pytest.raises(ValueError, match=r"\['hidden', 'k'\]"):
        run(config(moved, k=4, hidden=16), resume=True)
    with pytest.raises(FileExistsError, match="resume"):
        run(config(moved))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(config(tmp_path / "empty"), resume=True)
    # A copied run directory resumes under its new path; finished, it trains no further.
    monkeypatch.setattr(Trainer, "step", lambda self, x: pytest.fail("trained again"))
    summary = run(config(moved), resume=True)
    assert summary["epoch"] == 4 and summary["run_dir"] == str(moved)
    assert read_metrics(moved) == reference["rows"]


def test_resume_from_a_checkpoint_of_another_device_type(reference, tmp_path):
    """A CUDA generator's state (16 bytes: seed and offset) cannot set a CPU generator: the
    resumed run warns and goes on with a reseeded data order instead of crashing."""
    moved = tmp_path / "from_cuda"
    shutil.copytree(reference["out"], moved)
    state = torch.load(moved / "checkpoint.pt", weights_only=False)
    state["trainer"]["batches"] = torch.zeros(16, dtype=torch.uint8)
    R.atomic_save(state, moved / "checkpoint.pt")
    with pytest.warns(UserWarning, match="another device type"):
        summary = run(config(moved, epochs=5), resume=True)
    assert summary["epoch"] == 5 and math.isfinite(summary["train_loss"])


def test_load_run_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(tmp_path)


def test_load_run_gives_the_trained_model(reference):
    model, guide = load_run(reference["out"])
    assert not model.training and not guide.training
    trainer = reference["trainer"]
    x = R.make_arcs(50, seed=3).x
    torch.testing.assert_close(cluster_probs(guide, x), cluster_probs(trainer.guide, x))
    for a, b in zip(model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)


def test_load_run_gmvae_w_with_batchnorm_and_iw_summary(tmp_path, monkeypatch):
    trainers = []
    init = Trainer.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(Trainer, "__init__", recording_init)
    cfg = config(tmp_path, model="gmvae_w", w_dim=2, epochs=1, kl_warmup_epochs=0, iw_samples=3)
    summary = run(cfg)
    assert summary["test_elbo"] < summary["test_iw_bound"]
    model, guide = load_run(tmp_path)
    running_mean = guide.recogniser[1].running_mean
    assert not torch.equal(running_mean, torch.zeros_like(running_mean))
    x = R.make_arcs(30, seed=3).x
    torch.testing.assert_close(cluster_probs(guide, x), cluster_probs(trainers[0].guide, x))


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"k": 1}, "k"),
        ({"dataset": "cifar"}, "dataset"),
        ({"model": "vade"}, "model"),
        ({"arch": "conv", "dataset": "mnist"}, "arch"),
        ({"likelihood": "bernoulli"}, "likelihood"),
        ({"binarize": "dynamic"}, "binarize"),
        ({"limit": 40}, "limit"),
        ({"test_limit": 0}, "test_limit"),
        ({"test_limit": 2.5}, "test_limit"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"on_nan": "skip"}, "on_nan"),
        ({"w_dim": 3}, "w_dim"),
        ({"hidden": -1}, "hidden"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"free_bits": -0.5}, "free_bits"),
        ({"guide": "nope"}, "guide"),
        ({"guide": "exact_posterior"}, "guide"),  # gmvae_w's guide, on gmvae
        ({"estimator": "nope"}, "estimator"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"binarize": "otsu"}, "binarize"),
        ({"arch": "cnn"}, "arch"),
        ({"model": "gmvae_w", "arch": "conv"}, "arch"),  # conv nets need images, not arcs
        ({"likelihood": "poisson"}, "likelihood"),
        ({"iw_samples": -1}, "iw_samples"),
    ],
)
def test_validate_names_the_flag(overrides, flag, tmp_path):
    cfg = config(tmp_path / "never", **overrides)
    with pytest.raises(ValueError, match=rf"^{flag}\b"):
        cfg.validate()
    with pytest.raises(ValueError, match=rf"^{flag}\b"):
        run(cfg)
    assert not (tmp_path / "never").exists()  # refused before any work


def test_test_limit_evaluates_on_the_first_n_test_points(tmp_path, monkeypatch):
    evaluated, real = [], R.evaluate

    def recording(model, guide, x, labels, batch_size):
        evaluated.append((x, labels))
        return real(model, guide, x, labels, batch_size)

    monkeypatch.setattr(R, "evaluate", recording)
    cfg = config(tmp_path / "run", epochs=2, kl_warmup_epochs=0, test_limit=7)
    run(cfg)
    full = R.load_data(dataclasses.replace(cfg, test_limit=None), torch.device("cpu"))[1]
    assert len(full) == 20  # the arcs test set: limit // 5 points
    assert len(evaluated) == 2  # one evaluation per epoch, each on the first 7 test points
    for x, labels in evaluated:
        assert torch.equal(x, full.x[:7]) and torch.equal(labels, full.labels[:7])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["test_limit"] == 7
    # More arcs test points than the default are drawn, not silently capped at 20.
    big = R.load_data(dataclasses.replace(cfg, test_limit=50), torch.device("cpu"))[1]
    assert len(big) == 50 and set(big.labels.tolist()) == set(range(5))
    # It decides what metrics.jsonl holds, so a resume may not change it.
    with pytest.raises(ValueError, match=r"\['test_limit'\]"):
        run(dataclasses.replace(cfg, test_limit=None, epochs=3), resume=True)


def test_free_bits_and_warm_up_reach_the_loss(tmp_path):
    """With a learning rate too small to move the weights, free bits λ add λ - KL per point."""
    lam = 10.0
    common = dict(epochs=1, lr=1e-9, kl_warmup_epochs=0)
    plain = run(config(tmp_path / "plain", **common))
    floored = run(config(tmp_path / "floored", free_bits=lam, progress=True, **common))
    gap = floored["train_loss"] - plain["train_loss"]
    assert lam - math.log(5) <= gap <= lam
    assert floored["test_elbo"] == pytest.approx(plain["test_elbo"], abs=1e-4)  # plain ELBO
    warm = run(config(tmp_path / "warm", **{**common, "kl_warmup_epochs": 4}))
    assert warm["kl_weight"] == 0.25
    # β = 1/4 removes 3/4 of the cluster KL (<= log K per point) from the loss.
    assert 0 < plain["train_loss"] - warm["train_loss"] <= 0.75 * math.log(5)


@pytest.mark.parametrize(
    "dataset, corrupt, message",
    [
        ("arcs", lambda x: x.__setitem__((7, 1), math.nan), "NaN"),
        # Grey levels outside [0, 1] cannot be binarised (dataset named mnist: arcs data).
        ("mnist", lambda x: x.mul_(3.0), r"grey levels in \[0, 1\]"),
    ],
)
def test_bad_data_raise_before_training(dataset, corrupt, message, tmp_path, monkeypatch):
    def bad_data(cfg, device):
        train, test = R.make_arcs(100), R.make_arcs(20, seed=1)
        corrupt(train.x)
        return train, test

    monkeypatch.setattr(R, "load_data", bad_data)
    monkeypatch.setattr(Trainer, "step", lambda self, x: pytest.fail("trained on bad data"))
    binarize = "dynamic" if dataset == "mnist" else "none"
    with pytest.raises(ValueError, match=message):
        run(config(tmp_path, dataset=dataset, binarize=binarize, likelihood="gaussian"))
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("on_nan", ["raise", "rollback"])
def test_a_nan_batch_during_a_run(on_nan, tmp_path, monkeypatch):
    iterate = T.iterate_minibatches

    def poisoned(*args, **kwargs):
        for i, x in enumerate(iterate(*args, **kwargs)):
            if i == 1:
                x = x.clone()
                x[0, 0] = math.nan
            yield x

    monkeypatch.setattr(T, "iterate_minibatches", poisoned)
    cfg = config(tmp_path, epochs=1, kl_warmup_epochs=0, on_nan=on_nan)
    if on_nan == "raise":
        with pytest.raises(NonFiniteLossError, match="step 1"):
            run(cfg)
        return
    summary = run(cfg)
    # The rolled-back step is left out of the step count and of the mean training loss.
    assert summary["step"] == STEPS_PER_EPOCH - 1
    assert math.isfinite(summary["train_loss"])


def test_pyro_checks_run_on_the_first_step_only(tmp_path, monkeypatch):
    """Pyro's validation (host reads every step) checks the first step, then the NaN guard."""
    from pyro.infer.util import is_validation_enabled

    seen, step = [], Trainer.step

    def recording(self, x):
        seen.append(is_validation_enabled())
        return step(self, x)

    monkeypatch.setattr(Trainer, "step", recording)
    run(config(tmp_path, epochs=2, kl_warmup_epochs=0))
    assert seen == [True] + [False] * (2 * STEPS_PER_EPOCH - 1)
    assert is_validation_enabled()  # restored after the run
    # Switched off by the user, they stay off.
    seen.clear()
    with pyro.validation_enabled(False):
        run(config(tmp_path / "off", epochs=1, kl_warmup_epochs=0))
    assert seen == [False] * STEPS_PER_EPOCH


def test_atomic_save_leaves_no_temporary_file_on_error(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    R.atomic_save({"a": 1}, path)

    def failing(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        R.atomic_save({"a": 2}, path)
    assert os.listdir(tmp_path) == ["state.pt"]
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}


def test_truncate_metrics_drops_rows_after_the_checkpoint_and_a_cut_line(tmp_path):
    rows = [{"epoch": e, "step": 2 * e} for e in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n\n" for r in rows) + '{"epoch": 4, "st'
    (tmp_path / "metrics.jsonl").write_text(text)
    R._truncate_metrics(tmp_path, 4)
    assert read_metrics(tmp_path) == rows[:2]


DATA_ROOT = pathlib.Path(
    os.environ.get("PYRO_GMVAE_DATA")
    or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
)


@pytest.mark.skipif(not (DATA_ROOT / "MNIST").is_dir(), reason=f"no MNIST under {DATA_ROOT}")
def test_a_small_mnist_run_and_load_run(tmp_path, monkeypatch):
    """MNIST end to end: dynamic binarisation in training, a fixed binary test set."""
    cfg = config(tmp_path, dataset="mnist", binarize="dynamic", k=10, hidden=16, latent_dim=4,
                 limit=200, batch_size=100, epochs=1, kl_warmup_epochs=0, eval_batch_size=2500,
                 data_dir=str(DATA_ROOT))  # fmt: skip
    train, full = R.load_data(cfg, torch.device("cpu"))
    assert train.x.shape == (200, 784) and full.x.shape == (10_000, 784)
    assert ((full.x == 0) | (full.x == 1)).all()
    assert torch.equal(R.load_data(cfg, torch.device("cpu"))[1].x, full.x)  # fixed draw
    # Evaluated on 1000 of the 10k test images (the test ELBO is K decoder passes per image):
    # the first 1000 of the full evaluation's fixed draw, not a fresh draw of 1000.
    cfg = dataclasses.replace(cfg, test_limit=1000)
    test = R.load_data(cfg, torch.device("cpu"))[1]
    assert torch.equal(test.x, full.x[:1000]) and torch.equal(test.labels, full.labels[:1000])

    trainers = []
    init = Trainer.__init__
    monkeypatch.setattr(
        Trainer, "__init__", lambda self, *a, **k: (init(self, *a, **k), trainers.append(self))[0]
    )
    summary = run(cfg)
    assert METRIC_KEYS <= set(summary) and summary["step"] == 2
    assert summary["test_elbo"] < 0
    model, guide = load_run(tmp_path)
    assert model.data_dim == 784 and model.k == 10
    torch.testing.assert_close(
        cluster_probs(guide, test.x[:500]), cluster_probs(trainers[0].guide, test.x[:500])
    )


def test_validation_split_is_carved_from_the_training_images(tmp_path, monkeypatch):
    """--validation N trains on the first images and evaluates on the last N, never the test set."""
    root = pathlib.Path(os.environ.get("PYRO_GMVAE_DATA") or "../shared/data")
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip("no MNIST in the data root")
    cfg = RunConfig(dataset="mnist", data_dir=str(root), limit=300, validation=100, hidden=8,
                    latent_dim=2, batch_size=50, epochs=1, progress=False, out=str(tmp_path))  # fmt: skip
    train, held_out = R.load_data(cfg, torch.device("cpu"))
    full = R.load_dataset("mnist", train=True, data_dir=str(root), limit=300)
    assert len(train) == 200 and torch.equal(train.x, full.x[:200])
    assert torch.equal(held_out.labels, full.labels[200:])
    assert torch.equal(held_out.x, R.binarize_fixed(full.x[200:], seed=0))  # binarised once
    with pytest.raises(ValueError, match="validation"):
        dataclasses.replace(cfg, dataset="arcs", binarize="none").validate()


def test_run_returns_the_trained_model_and_guide(tmp_path):
    """run()'s summary carries the trained pair: the same weights load_run reads back."""
    import pyro_gmvae

    summary = run(config(tmp_path, epochs=1))
    model, guide = pyro_gmvae.load_run(tmp_path)
    assert summary["model"] == "gmvae" and not summary.model_.training
    for trained, loaded in ((summary.model_, model), (summary.guide_, guide)):
        trained_state, loaded_state = trained.state_dict(), loaded.state_dict()
        assert trained_state.keys() == loaded_state.keys()
        for name, value in trained_state.items():
            torch.testing.assert_close(value, loaded_state[name], rtol=0, atol=0)
