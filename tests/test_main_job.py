"""The main job, examples/mnist_unsup.py: end to end per model, bad flags, resume, figures.

The smoke runs are subprocesses of the real script on a 200-image MNIST subset with tiny networks
(one epoch each); evaluation still covers the full 10k test set, as a real run's does.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from pyro_gmvae import make_guide, make_model
from pyro_gmvae.estimators import ESTIMATORS
from pyro_gmvae.guides import GUIDES
from pyro_gmvae.harness.data import DATA_ENV_VAR, make_arcs
from pyro_gmvae.harness.run import load_run, read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "mnist_unsup.py"
DATA_ROOT = pathlib.Path(os.environ.get(DATA_ENV_VAR) or REPO.parent / "shared" / "data")
needs_mnist = pytest.mark.skipif(
    not (DATA_ROOT / "MNIST" / "raw").is_dir(),
    reason=f"no MNIST under {DATA_ROOT} (set {DATA_ENV_VAR} to the data root)",
)

MODELS = ("m2", "modified_m2", "gmvae", "gmvae_w")
SMOKE = ["--limit", "200", "--test-limit", "2000", "--batch-size", "50", "--epochs", "1",
         "--hidden", "16", "--latent-dim", "4", "--eval-every", "1", "--no-progress"]  # fmt: skip
FIGURES = ("curves", "samples", "traversal", "reconstructions", "confusion")
ACCURACIES = ("acc_hungarian", "acc_majority", "acc_aae")


def script_env():
    env = dict(os.environ, **{DATA_ENV_VAR: str(DATA_ROOT)})
    # The runs go two at a time on the shared 2-core CPU: one thread each.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def start(args):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def smoke_args(model, out):
    extra = ["--w-dim", "4"] if model == "gmvae_w" else []
    return [*SMOKE, *extra, "--model", model, "--out", str(out)]


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """One run directory per model, from the real script; two subprocesses at a time."""
    root = tmp_path_factory.mktemp("main_job")
    results = {}
    for pair in (MODELS[:2], MODELS[2:]):
        procs = {m: start(smoke_args(m, root / m)) for m in pair}
        results.update({m: finish(p) for m, p in procs.items()})
    return root, results


@pytest.fixture(scope="module")
def script():
    """The main job's module (examples/mnist_unsup.py calls it), to call ``main(argv)`` in-process."""
    import pyro_gmvae.harness.cli

    return pyro_gmvae.harness.cli


# --------------------------------------------------------------------------- end to end


def check_png(path):
    assert path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.verify()  # a well-formed PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 100 and im.height >= 100, (path, im.size)
        lo, hi = im.convert("L").getextrema()
        assert hi > lo, f"{path} is blank"


@needs_mnist
@pytest.mark.parametrize("model", MODELS)
def test_smoke_run_outputs(smoke_runs, model):
    root, results = smoke_runs
    proc, run_dir = results[model], root / model
    assert proc.returncode == 0, proc.stderr[-3000:]
    k = 10

    config = json.loads((run_dir / "config.json").read_text())
    assert (config["model"], config["k"], config["epochs"], config["limit"]) == (model, k, 1, 200)
    assert config["hidden"] == 16 and config["latent_dim"] == 4 and "versions" in config
    assert config["test_limit"] == 2000

    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1] and rows[0]["step"] == 200 // 50
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (*ACCURACIES, "nmi", "ari", "cond_entropy", "test_elbo", "wall_time_s", "run_dir"):
        assert key in summary, key
    for key in ACCURACIES:
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
        assert summary[key] == rows[-1][key]
    assert 0.0 <= summary["cond_entropy"] <= math.log(k) + 1e-9
    assert 0.0 <= summary["nmi"] <= 1.0 and -1.0 <= summary["ari"] <= 1.0
    # Bernoulli log-likelihoods are <= 0, so the ELBO is negative, and finite after one epoch.
    assert math.isfinite(summary["test_elbo"]) and summary["test_elbo"] < 0
    assert summary["wall_time_s"] > 0

    for name in FIGURES:
        check_png(run_dir / f"{name}.png")

    # The checkpoint holds a usable model.
    trained, guide = load_run(run_dir)
    probs = guide.cluster_probs(torch.zeros(3, 784))
    assert probs.shape == (3, k) and torch.allclose(probs.sum(-1), torch.ones(3))

    # The terminal summary reports the final numbers and where they are.
    text = proc.stdout
    assert f"Hungarian {summary['acc_hungarian']:.4f}" in text
    assert (
        f"majority {summary['acc_majority']:.4f}" in text
        and f"AAE {summary['acc_aae']:.4f}" in text
    )
    assert f"NMI {summary['nmi']:.4f}" in text and f"H(Y|X) {summary['cond_entropy']:.4f}" in text
    assert f"test ELBO {summary['test_elbo']:.2f}" in text
    assert "wall time" in text and str(run_dir) in text


@needs_mnist
def test_model_specific_defaults(smoke_runs):
    """gmvae_w takes the paper's lr 1e-4 and λ = 0.5 unless given; the others RunConfig's."""
    root, _ = smoke_runs
    saved = {m: json.loads((root / m / "config.json").read_text()) for m in MODELS}
    assert (saved["gmvae_w"]["lr"], saved["gmvae_w"]["free_bits"]) == (1e-4, 0.5)
    assert saved["gmvae_w"]["guide"] == "exact_posterior" and saved["gmvae_w"]["w_dim"] == 4
    for m in ("m2", "modified_m2", "gmvae"):
        assert (saved[m]["lr"], saved[m]["free_bits"], saved[m]["estimator"]) == (
            1e-3,
            0.0,
            "enum-jit",
        )


@needs_mnist
def test_resume_continues_and_appends(smoke_runs, tmp_path):
    root, _ = smoke_runs
    run_dir = tmp_path / "gmvae"
    shutil.copytree(root / "gmvae", run_dir)
    before = read_metrics(run_dir)
    proc = finish(start(["--resume", "--out", str(run_dir), "--epochs", "2", "--no-progress"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0] == before[0]  # appended, the first evaluation untouched
    assert rows[1]["step"] == 2 * rows[0]["step"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "gmvae" and config["hidden"] == 16  # the saved settings were kept
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epoch"] == 2 and summary["acc_hungarian"] == rows[1]["acc_hungarian"]
    assert "epoch 2/2" in proc.stdout
    check_png(run_dir / "curves.png")


# --------------------------------------------------------------------------- bad flags


def expect_flag_error(script, monkeypatch, capsys, argv, flag):
    """main(argv) exits non-zero with one line on stderr naming ``flag``, before any training."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started despite a bad flag")

    monkeypatch.setattr(script, "run", no_training)
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert flag in err, err
    return err


BAD_FLAGS = [
    (["--model", "vae"], "--model"),
    (["--k", "1"], "--k"),
    (["--free-bits", "-1"], "--free-bits"),
    (["--kl-weight", "-0.5"], "--kl-weight"),
    (["--model", "m2", "--arch", "conv"], "--arch"),
    (["--guide", "no_such_guide"], "--guide"),
    (["--model", "gmvae_w", "--guide", "mean_field", "--hidden", "16"], "--guide"),
    (["--model", "gmvae", "--guide", "exact_posterior"], "--guide"),
    (["--elbo", "no_such_elbo"], "--elbo"),
    (["--lr", "0"], "--lr"),
    (["--epochs", "two"], "--epochs"),
    (["--limit", "10", "--batch-size", "50"], "--limit"),
    (["--test-limit", "0"], "--test-limit"),
    (["--model", "gmvae", "--w-dim", "4"], "--w-dim"),
    (["--dataset", "cifar"], "--dataset"),
    (["--device", "banana"], "--device"),
    # Misfits only a dry run shows (a relaxed y under exact enumeration; free bits with a
    # score-function estimator): still one line, before the data are loaded.
    (["--guide", "relaxed", "--hidden", "16"], "--elbo"),
    (["--elbo", "score", "--free-bits", "0.5", "--hidden", "16"], "--elbo"),
]


@pytest.mark.parametrize("argv, flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags(script, monkeypatch, capsys, tmp_path, argv, flag):
    out = tmp_path / "run"
    expect_flag_error(script, monkeypatch, capsys, [*argv, "--out", str(out)], flag)
    assert not out.exists()


def test_guide_misfit_message_names_both(script, monkeypatch, capsys, tmp_path):
    err = expect_flag_error(
        script, monkeypatch, capsys,
        ["--model", "gmvae_w", "--guide", "mean_field", "--hidden", "16", "--out", str(tmp_path / "r")],
        "--guide",
    )  # fmt: skip
    assert "gmvae_w" in err and "exact_posterior" in err  # what fits instead


def test_missing_data_dir(script, monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no_data_here"
    err = expect_flag_error(
        script, monkeypatch, capsys,
        ["--data-dir", str(missing), "--out", str(tmp_path / "r"), "--hidden", "16",
         "--no-download"], "--data-dir",
    )  # fmt: skip
    assert str(missing) in err and "--no-download" in err
    assert not missing.exists()  # nothing downloaded or created with --no-download


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(script, monkeypatch, capsys, tmp_path):
    expect_flag_error(
        script, monkeypatch, capsys, ["--device", "cuda", "--out", str(tmp_path)], "--device"
    )


@needs_mnist
def test_existing_run_and_resume_errors(script, monkeypatch, capsys, smoke_runs, tmp_path):
    root, _ = smoke_runs
    done = str(root / "gmvae")
    # An existing run is never overwritten silently.
    expect_flag_error(script, monkeypatch, capsys, [*smoke_args("gmvae", done)], "--out")
    # --resume needs a checkpoint, and keeps the run's settings (only a few may change).
    expect_flag_error(script, monkeypatch, capsys, ["--resume", "--out", str(tmp_path)], "--resume")
    err = expect_flag_error(
        script, monkeypatch, capsys, ["--resume", "--out", done, "--lr", "0.1"], "--resume"
    )
    assert "--lr" in err and "--epochs" in err
    # The test subset decides what metrics.jsonl holds: a resume keeps it too.
    argv = ["--resume", "--out", done, "--test-limit", "500"]
    expect_flag_error(script, monkeypatch, capsys, argv, "--test-limit")


def test_bad_flag_in_a_real_process(tmp_path):
    """The exit status and stderr of the script itself, not just of main()."""
    proc = finish(start(["--k", "1", "--out", str(tmp_path / "r")]), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--k" in lines[0] and "must be an integer >= 2" in lines[0]
    assert not (tmp_path / "r").exists()


def test_help_covers_every_flag(script, capsys):
    parser = script.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    choices = {a.option_strings[0]: a.choices for a in parser._actions if a.option_strings}
    # Read from the registries at run time, so newly registered guides/estimators appear.
    assert list(choices["--guide"]) == sorted(GUIDES)
    assert list(choices["--elbo"]) == sorted(ESTIMATORS)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("--model", "--guide", "--elbo", "--k", "--epochs", "--batch-size", "--lr",
                 "--free-bits", "--kl-weight", "--kl-warmup-epochs", "--mc-samples", "--arch",
                 "--dataset", "--data-dir", "--device", "--seed", "--out", "--resume",
                 "--eval-every", "--limit", "--test-limit", "--hidden", "--latent-dim", "--w-dim",
                 "--clip-norm", "--iw-samples", "--on-nan", "--no-progress"):  # fmt: skip
        assert name in text, name


# --------------------------------------------------------------------------- figures on vectors


def test_figures_for_vector_data(tmp_path):
    """Arcs (2-D points): no image figures, a scatter plot and the confusion matrix instead."""
    from pyro_gmvae.harness.plots import make_figures

    torch.manual_seed(0)
    model = make_model("gmvae", data_dim=2, k=5, z_dim=2, hidden=(8, 8), likelihood="gaussian")
    guide = make_guide(None, model)
    arcs = make_arcs(100)
    paths = make_figures(tmp_path, model, guide, arcs.x, arcs.labels, None)
    assert set(paths) == {"confusion", "clusters"}  # no metrics.jsonl here: no curves either
    for path in paths.values():
        check_png(path)


# --------------------------------------------------------------------------- figure contents


def test_reconstruct_is_the_decoder_mean_at_the_guide_mean(make_tiny, binary_batch):
    from pyro_gmvae.harness.plots import reconstruct

    clusters = torch.tensor([0, 2, 1, 1, 0])
    for name in ("gmvae", "m2", "gmvae_w"):
        model, guide = make_tiny(name)
        model.eval(), guide.eval()
        with torch.no_grad():
            if name == "gmvae_w":
                x_loc = guide.x_head(guide.recogniser(binary_batch))[0]
                expected = torch.sigmoid(model.decoder(x_loc))
            else:
                y = torch.eye(model.k, dtype=binary_batch.dtype)[clusters]
                h = guide.z_net(torch.relu(guide.z_in(binary_batch, y)))
                z_loc = guide.z_head.loc(h)
                logits = model.decoder(z_loc) if name == "gmvae" else model.decode(z_loc, y)
                expected = torch.sigmoid(logits)
        got = reconstruct(model, guide, binary_batch, clusters)
        torch.testing.assert_close(got, expected, msg=name)


def test_reconstruction_grid_alternates_images_and_reconstructions(make_tiny):
    from pyro_gmvae.harness.plots import reconstruct, reconstruction_grid

    model, guide = make_tiny("gmvae")
    model.eval(), guide.eval()
    x = (torch.rand(30, 6, generator=torch.Generator().manual_seed(1)) < 0.5).double()
    clusters = torch.arange(30) % 3  # every cluster used
    grid = reconstruction_grid(model, guide, x, clusters, n_cols=4, n_rows=2)
    assert grid.shape == (4, 4, 6)
    for i in (0, 2):
        shown = grid[i]
        index = [int((x == row).all(-1).nonzero()[0]) for row in shown]
        torch.testing.assert_close(grid[i + 1], reconstruct(model, guide, shown, clusters[index]))
    first = [int(clusters[(x == row).all(-1).nonzero()[0]]) for row in grid[0]]
    assert set(first[:3]) == {0, 1, 2}  # round-robin: the first row shows every cluster


def test_gmvae_w_samples_and_traversal_use_component_means(make_tiny):
    """Fig. 5a: column 0 is decoder(μ_c(0)); Fig. 5b: the centre column is μ_c at the mean w."""
    from pyro_gmvae.harness.plots import sample_grid, traversal_grid

    model, _ = make_tiny("gmvae_w")
    model.eval()
    grid = sample_grid(model, n_cols=4, seed=0)
    assert grid.shape == (model.k, 4, model.data_dim)
    with torch.no_grad():
        mu0 = model.components(torch.zeros(model.w_dim, dtype=torch.float64))[0]  # (K, x_dim)
        torch.testing.assert_close(grid[:, 0], torch.sigmoid(model.decoder(mu0)))
        latents = torch.randn(50, model.w_dim, dtype=torch.float64)
        line = traversal_grid(model, latents, torch.zeros(50, dtype=torch.long), n_cols=5)
        mu = model.components(latents.mean(0))[0]
        torch.testing.assert_close(line[:, 2], torch.sigmoid(model.decoder(mu)))
    assert not torch.allclose(line[:, 0], line[:, -1])  # the line does move


def test_plot_curves_needs_rows(tmp_path):
    from pyro_gmvae.harness.plots import plot_curves

    with pytest.raises(ValueError, match="no metrics"):
        plot_curves([], 10, tmp_path / "c.png")
