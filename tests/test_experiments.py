"""Smoke tests of the experiment scripts (examples/compare_models.py, compare_guides.py,
synthetic_arcs.py, table1.py, svhn.py): each runs in-process on tiny fake data with tiny networks and a budget of seconds, and
its outputs are checked: files exist, JSON and markdown are well formed, PNGs open.

MNIST and SVHN are replaced by small fake files in torchvision's own formats (idx ubyte, .mat), so
the real loading code path runs and the tests need no data root.
"""

import hashlib
import importlib.util
import json
import math
import pathlib
import re
import struct

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pyro_gmvae.harness.run import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 200, 100


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_idx(path, array):
    """An idx-ubyte file (the MNIST format): magic 0x08 (uint8) + ndim, big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    """A data root with a fake MNIST (200 train / 100 test images, 10 classes) in the raw layout
    torchvision reads: class c's images are bright in a band of rows of its own."""
    root = tmp_path_factory.mktemp("fake_mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 250
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def check_png(path):
    assert path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 100 and im.height >= 100, (path, im.size)
        lo, hi = im.convert("L").getextrema()
        assert hi > lo, f"{path} is blank"
    assert path.stat().st_size < 300_000, f"{path} is too large for docs/figures"


def table_rows(markdown):
    """The data rows of the (single) markdown table in ``markdown``, as lists of cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, markdown
    # A cell's own "|" must be escaped ("\\|"), or the table gets an extra column.
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in lines]
    assert all(set(c) == {"-"} for c in cells[1]), lines[1]
    assert all(len(row) == len(cells[0]) for row in cells), "ragged markdown table"
    return cells[2:]


def test_compare_models(fake_mnist, tmp_path):
    script = load_script("compare_models")
    out = tmp_path / "compare"
    argv = ["--epochs", "2", "--seeds", "0", "1", "--limit", "100", "--test-limit", "50",
            "--hidden", "8", "--z-dim", "2", "--batch-size", "50", "--data-dir", str(fake_mnist),
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    summaries = script.main(argv)
    assert set(summaries) == {"m2", "modified_m2", "gmvae"}
    for name, rows in summaries.items():
        assert [r["seed"] for r in rows] == [0, 1]
        for seed in (0, 1):
            metrics = read_metrics(out / name / f"seed{seed}")
            assert [r["epoch"] for r in metrics] == [1, 2]
            assert all(0 <= r["cond_entropy"] <= math.log(10) + 1e-6 for r in metrics)
            # --test-limit reaches the run: it evaluated on the first 50 test images.
            config = json.loads((out / name / f"seed{seed}" / "config.json").read_text())
            assert config["test_limit"] == 50
    check_png(out / "curves.png")
    rows = table_rows((out / "results.md").read_text())
    assert [r[0] for r in rows] == ["M2", "modified M2", "GMVAE"]
    for row in rows:
        mean, std = (float(v) for v in row[2].split("±"))  # majority accuracy in %
        assert 0 <= mean <= 100 and std >= 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["args"]["seeds"] == [0, 1] and len(saved["summaries"]["gmvae"]) == 2
    # A second call with the same budget reuses the finished runs instead of retraining.
    before = (out / "gmvae" / "seed0" / "summary.json").stat().st_mtime_ns
    script.main(argv)
    assert (out / "gmvae" / "seed0" / "summary.json").stat().st_mtime_ns == before


def test_compare_guides(fake_mnist, tmp_path):
    script = load_script("compare_guides")
    out = tmp_path / "guides"
    argv = ["--models", "m2", "gmvae_w", "--guides", "mean_field", "relaxed", "--epochs", "1",
            "--seeds", "0", "1", "--limit", "100", "--test-limit", "50", "--hidden", "8",
            "--z-dim", "2", "--batch-size", "50", "--iw-samples", "2", "--workers", "2",
            "--data-dir", str(fake_mnist), "--device", "cpu", "--out", str(out)]  # fmt: skip
    summaries = script.main(argv)
    # gmvae_w's own guide stands in for mean_field; the relaxed guide does not fit it.
    assert list(summaries) == ["m2/mean_field", "m2/relaxed", "gmvae_w/exact_posterior"]
    config = json.loads((out / "m2" / "relaxed" / "seed1" / "config.json").read_text())
    assert (config["estimator"], config["seed"], config["test_limit"]) == ("relaxed", 1, 50)
    check_png(out / "curves.png")
    text = (out / "results.md").read_text()
    assert "relaxed: estimator 'relaxed'" in text and "S = 2" in text
    rows = table_rows(text)
    assert [r[:3] for r in rows] == [["m2", "mean_field", "2"], ["m2", "relaxed", "2"],
                                     ["gmvae_w", "exact_posterior", "2"]]  # fmt: skip
    for row, runs in zip(rows, summaries.values()):
        # Columns 3 and 8: Hungarian accuracy in %, −log p̂ (the IW bound) in nats.
        hungarian = [100 * r["acc_hungarian"] for r in runs]
        assert float(row[3].split("±")[0]) == pytest.approx(np.mean(hungarian), abs=0.006)
        iw = [-r["test_iw_bound"] for r in runs]
        assert float(row[8].split("±")[1]) == pytest.approx(np.std(iw), abs=0.006)
    saved = json.loads((out / "results.json").read_text())
    assert saved["args"]["guides"] == ["mean_field", "relaxed"]
    assert len(saved["summaries"]["gmvae_w/exact_posterior"]) == 2
    # A second call with the same budget reuses the finished runs instead of retraining.
    before = (out / "m2" / "relaxed" / "seed0" / "summary.json").stat().st_mtime_ns
    script.main(argv)
    assert (out / "m2" / "relaxed" / "seed0" / "summary.json").stat().st_mtime_ns == before


def test_synthetic_arcs(tmp_path):
    script = load_script("synthetic_arcs")
    out = tmp_path / "arcs"
    finals = script.main(["--epochs", "3", "--snapshots", "1", "3", "--n", "400", "--hidden", "8",
                          "--batch-size", "100", "--lr", "1e-3", "--density-samples", "2000",
                          "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert set(finals) == {"no_fb", "fb"}
    for key in ("no_fb", "fb"):
        rows = read_metrics(out / key)
        # Chunked training with resume gives one evaluation per epoch, in order, with the KL.
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert all(r["cluster_kl"] >= 0 for r in rows)
        cfg = json.loads((out / key / "config.json").read_text())
        assert (cfg["k"], cfg["latent_dim"], cfg["w_dim"]) == (8, 2, 2)
        assert cfg["free_bits"] == (0.5 if key == "fb" else 0.0)
        for epoch in (1, 3):
            snap = np.load(out / key / f"snapshot_{epoch:04d}.npz")
            assert snap["x_mean"].shape == (80, 2)  # the test set is make_arcs(n // 5)
            assert snap["comp_loc"].shape == snap["comp_scale"].shape == (8, 2)
            assert (snap["comp_scale"] > 0).all()
    for name in ("latents", "zprior", "density"):
        check_png(out / f"{name}.png")
    saved = json.loads((out / "results.json").read_text())
    assert 0 < saved["density"]["samples_in_view"] <= 1
    assert len(table_rows((out / "results.md").read_text())) == 2


def test_table1(fake_mnist, tmp_path):
    script = load_script("table1")
    out = tmp_path / "table1"
    results = script.main(["--mode", "reduced", "--ks", "10", "16", "--ms", "1", "2",
                           "--seeds", "0", "1", "--epochs", "1", "--limit", "100",
                           "--test-limit", "50", "--hidden", "8", "--x-dim", "2", "--w-dim", "2",
                           "--batch-size", "50", "--data-dir", str(fake_mnist), "--device", "cpu",
                           "--out", str(out)])  # fmt: skip
    assert list(results) == [(10, 1), (10, 2), (16, 1), (16, 2)]
    cfg = json.loads((out / "K16_M2" / "seed1" / "config.json").read_text())
    assert (cfg["k"], cfg["mc_samples"], cfg["seed"], cfg["free_bits"]) == (16, 2, 1, 0.5)
    assert cfg["test_limit"] == 50
    rows = table_rows((out / "table1.md").read_text())
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("10", "1", "2"), ("10", "2", "2"), ("16", "1", "2"), ("16", "2", "2")
    ]  # fmt: skip
    assert rows[0][4] == "87.31 / 77.78 ± 5.75" and rows[1][4] == "—"
    for row, rows_of_cell in zip(rows, results.values()):
        best, rest = row[3].split("/")
        aae = [100 * r["acc_aae"] for r in rows_of_cell]
        assert float(best) == pytest.approx(max(aae), abs=0.006)
        assert float(rest.split("±")[0]) == pytest.approx(np.mean(aae), abs=0.006)
    saved = json.loads((out / "table1.json").read_text())
    assert len(saved["results"]["K10_M1"]) == 2


def test_table1_modes():
    script = load_script("table1")
    full = script.parse_args(["--mode", "full"])
    assert (full.x_dim, full.w_dim, full.hidden, full.batch_size, full.lr, full.epochs) == (
        200, 150, 1000, 50, 1e-4, 100
    )  # fmt: skip
    assert full.limit is None and full.test_limit is None
    assert script.parse_args(["--mode", "reduced", "--epochs", "7"]).epochs == 7


def write_svhn(path, n, seed=0):
    """A fake SVHN .mat in the real layout: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0."""
    import scipy.io

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
    scipy.io.savemat(path, {"X": x, "y": y})


def test_svhn(tmp_path, monkeypatch):
    for split, n in (("train", 40), ("test", 20)):
        url, filename, _ = torchvision.datasets.SVHN.split_list[split]
        write_svhn(tmp_path / filename, n, seed=len(split))
        # torchvision checks the .mat against the real file's md5; use the fake file's.
        md5 = hashlib.md5((tmp_path / filename).read_bytes()).hexdigest()
        monkeypatch.setitem(torchvision.datasets.SVHN.split_list, split, [url, filename, md5])
    script = load_script("svhn")
    out = tmp_path / "svhn"
    summary = script.main(["--k", "3", "--epochs", "1", "--x-dim", "4", "--w-dim", "2",
                           "--hidden", "8", "--batch-size", "20", "--cols", "4", "--test-limit",
                           "10", "--data-dir", str(tmp_path), "--device", "cpu",
                           "--out", str(out)])  # fmt: skip
    cfg = json.loads((out / "run" / "config.json").read_text())
    assert (cfg["arch"], cfg["likelihood"], cfg["binarize"]) == ("conv", "gaussian", "none")
    assert cfg["test_limit"] == 10  # SVHN is not binarised: cut as it is loaded
    assert summary["epoch"] == 1 and math.isfinite(summary["test_elbo"])
    check_png(out / "samples.png")
    assert json.loads((out / "summary.json").read_text())["k"] == 3


def test_conv_shapes():
    """The paper's conv nets map 28x28x1 and 32x32x3 images (with enumeration-style leading
    dims) to features and back to one output per pixel and parameter."""
    from pyro_gmvae.nets import ConvDecoder, ConvEncoder

    for shape in ((1, 28, 28), (3, 32, 32)):
        d = math.prod(shape)
        enc = ConvEncoder(shape, out_features=12)
        assert enc(torch.rand(2, 5, d)).shape == (2, 5, 12)
        dec = ConvDecoder(6, shape, out_channels=2 * shape[0], hidden=10)
        assert dec(torch.randn(3, 5, 6)).shape == (3, 5, 2 * d)
