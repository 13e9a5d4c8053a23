"""Your own data in the main job (.npy/.npz files, folders of images) and `pyro-gmvae predict`."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_gmvae.harness.cli as cli
from pyro_gmvae.evaluate import cluster_probs
from pyro_gmvae.harness.data import NO_LABEL, load_user_data
from pyro_gmvae.harness.run import load_run

TINY = ["--recipe", "shu", "--k", "3", "--hidden", "16", "--latent-dim", "2", "--epochs", "1",
        "--batch-size", "30", "--no-progress"]  # fmt: skip


def glyphs(n=90, size=8, seed=0):
    """n uint8 images (n, size, size) of 3 glyphs (0 / 255 pixels, 5 % flipped) and their labels."""
    rng = np.random.default_rng(seed)
    protos = rng.random((3, size, size)) < 0.5
    labels = np.arange(n) % 3
    flips = rng.random((n, size, size)) < 0.05
    return ((protos[labels] ^ flips) * 255).astype(np.uint8), labels


def test_load_user_data_reads_arrays_and_image_folders(tmp_path):
    images, labels = glyphs()
    np.save(tmp_path / "x.npy", images)
    np.savez(tmp_path / "xy.npz", x=images[..., None], y=labels)  # channels last
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
    for i, (im, lab) in enumerate(zip(images[:20], labels[:20])):
        Image.fromarray(im).save(tmp_path / "folder" / "ab"[lab % 2] / f"{i:03d}.png")
    plain = load_user_data(tmp_path / "x.npy")
    assert plain.x.shape == (90, 64) and plain.image_shape == (1, 8, 8)
    assert not plain.has_labels and (plain.labels == NO_LABEL).all()
    torch.testing.assert_close(plain.x, torch.tensor(images.reshape(90, 64) / 255.0).float())
    both = load_user_data(tmp_path / "xy.npz")
    assert (
        both.has_labels and torch.equal(both.x, plain.x) and both.labels.tolist() == labels.tolist()
    )
    folder = load_user_data(tmp_path / "folder")
    assert folder.x.shape == (20, 64) and folder.has_labels
    assert sorted(set(folder.labels.tolist())) == [0, 1]
    for bad, message in [
        (tmp_path / "nothing", "no such"),
        (tmp_path / "x.txt", "expected a .npy"),
    ]:
        if bad.suffix:
            bad.write_text("1 2 3")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_user_data(bad)


def test_the_main_job_trains_on_a_npy_file_and_predict_writes_its_clusters(tmp_path, capsys):
    images, _ = glyphs()
    np.save(tmp_path / "x.npy", images)
    out = tmp_path / "run"
    summary = cli.main(["--dataset", str(tmp_path / "x.npy"), *TINY, "--out", str(out)])
    assert "acc_hungarian" not in summary and "cond_entropy" in summary  # no labels
    assert "no labels" in capsys.readouterr().out
    assert (out / "samples.png").exists() and not (out / "confusion.png").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["data_dim"] == 64 and saved["image_shape"] == [1, 8, 8]
    cli.console_main(
        ["predict", str(out), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")]
    )
    table = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    assert table.shape == (90, 1 + 3 + 2)  # cluster, 3 probabilities, 2 latent means
    _, guide = load_run(out)
    expected = cluster_probs(guide, images).argmax(-1).numpy()
    assert (table[:, 0].astype(int) == expected).all()
    np.testing.assert_allclose(table[:, 1:4].sum(1), 1.0, atol=1e-4)
    cli.console_main(
        ["predict", str(out), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.npy")]
    )
    assert (np.load(tmp_path / "p.npy")[:, 0] == expected).all()


def test_the_main_job_trains_on_a_folder_of_pngs_with_labels(tmp_path):
    images, labels = glyphs(60)
    for lab in range(3):
        (tmp_path / "imgs" / f"class{lab}").mkdir(parents=True)
    for i, (im, lab) in enumerate(zip(images, labels)):
        Image.fromarray(im).save(tmp_path / "imgs" / f"class{lab}" / f"{i:03d}.png")
    out = tmp_path / "run"
    summary = cli.main(["--dataset", str(tmp_path / "imgs"), *TINY, "--out", str(out)])
    assert 0 <= summary["acc_hungarian"] <= 1 and (out / "confusion.png").exists()


def test_real_valued_own_data_get_a_gaussian_likelihood(tmp_path):
    x = np.random.default_rng(0).normal(size=(90, 5)) * 3
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    cli.main(["--dataset", str(tmp_path / "x.npy"), *TINY, "--out", str(out)])
    saved = json.loads((out / "config.json").read_text())
    assert (saved["binarize"], saved["likelihood"]) == ("none", "gaussian")


def test_bad_own_data_and_predict_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["--dataset", str(tmp_path / "empty"), *TINY, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no PNG or JPEG" in err
    images, _ = glyphs()
    np.save(tmp_path / "x.npy", images)
    cli.main(["--dataset", str(tmp_path / "x.npy"), *TINY, "--out", str(tmp_path / "run")])
    np.save(tmp_path / "wide.npy", np.zeros((4, 10)))
    with pytest.raises(SystemExit):
        cli.predict_main([str(tmp_path / "run"), str(tmp_path / "wide.npy"), "--out",
                          str(tmp_path / "p.csv")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "64 features" in err


# pip puts the console script beside the interpreter of the environment it installs into.
COMMAND = shutil.which("pyro-gmvae", path=str(pathlib.Path(sys.executable).parent))


@pytest.mark.skipif(COMMAND is None, reason="the package is not pip-installed here")
def test_the_console_command_is_installed():
    proc = subprocess.run([COMMAND, "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--recipe" in proc.stdout
    proc = subprocess.run([COMMAND], capture_output=True, text=True)
    assert proc.returncode != 0 and "train,predict" in proc.stderr
