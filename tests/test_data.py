import hashlib
import math
import os
import pathlib

import numpy as np
import pytest
import scipy.io
import torch
import torchvision

from pyro_gmvae.harness import data as D
from pyro_gmvae.train import iterate_minibatches

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_ROOT = pathlib.Path(os.environ.get(D.DATA_ENV_VAR) or REPO.parent / "shared" / "data")

needs_data = pytest.mark.skipif(
    not DATA_ROOT.is_dir(),
    reason=f"data root {DATA_ROOT} absent (set {D.DATA_ENV_VAR} to the MNIST/Fashion-MNIST root)",
)

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# --------------------------------------------------------------------------- real data


@needs_data
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_datasets(name):
    train = D.load_dataset(name, train=True, data_dir=DATA_ROOT, download=False)
    test = D.load_dataset(name, train=False, data_dir=DATA_ROOT, download=False)
    for ds, n in ((train, 60_000), (test, 10_000)):
        assert len(ds) == n
        assert ds.x.shape == (n, 784)
        assert ds.x.dtype == torch.float32
        assert ds.labels.dtype == torch.int64
        assert ds.image_shape == (1, 28, 28)
        assert ds.name == name
        assert 0.0 == ds.x.min().item() and ds.x.max().item() == 1.0
        # Grey levels are k / 255: a scaling bug (e.g. /256 or a missing /255) breaks this.
        assert torch.equal(ds.x[:100] * 255, (ds.x[:100] * 255).round())
    counts = torch.bincount(train.labels, minlength=10).tolist()
    if name == "mnist":
        assert counts == MNIST_TRAIN_COUNTS
    else:
        assert counts == [6000] * 10
        assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10


@needs_data
def test_limit_keeps_first_items_and_env_var(monkeypatch):
    full = D.load_dataset("mnist", train=False, data_dir=DATA_ROOT, download=False)
    monkeypatch.setenv(D.DATA_ENV_VAR, str(DATA_ROOT))
    small = D.load_dataset("mnist", train=False, download=False, limit=100)
    assert len(small) == 100
    assert torch.equal(small.x, full.x[:100])
    assert torch.equal(small.labels, full.labels[:100])


@needs_data
def test_gz_only_root_is_staged_in_cache_not_written(tmp_path, monkeypatch):
    # A root holding only the .gz files (like the shared read-only root): decompression must go
    # to the user cache, never next to the .gz files.
    src = DATA_ROOT / "MNIST" / "raw"
    if not all((src / gz).is_file() for gz, _ in torchvision.datasets.MNIST.resources):
        pytest.skip(f"{src} does not hold the .gz files")
    root = tmp_path / "root"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for gz, _ in torchvision.datasets.MNIST.resources:
        (root / "MNIST" / "raw" / gz).symlink_to(src / gz)
    before = sorted(p.name for p in (root / "MNIST" / "raw").iterdir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ds = D.load_dataset("mnist", train=False, data_dir=root, download=False)
    assert len(ds) == 10_000
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == before
    staged = list((tmp_path / "cache" / "pyro_gmvae").rglob("t10k-images-idx3-ubyte"))
    assert len(staged) == 1
    assert not any(p.name.startswith(".tmp") for p in staged[0].parent.iterdir())
    again = D.load_dataset("mnist", train=False, data_dir=root, download=False, limit=5)
    assert torch.equal(again.x, ds.x[:5])


def test_corrupt_gz_gives_clear_error(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz, _ in torchvision.datasets.MNIST.resources:
        (raw / gz).write_bytes(b"not a gzip file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(D.DatasetNotFoundError, match="corrupt"):
        D.load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("name", D.DATASETS)
def test_missing_files_give_one_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        D.load_dataset(name, data_dir=empty, download=False)
    msg = str(info.value)
    assert isinstance(info.value, D.DatasetNotFoundError)
    assert name in msg and str(empty) in msg
    assert "data_dir" in msg and D.DATA_ENV_VAR in msg and "download=True" in msg
    assert list(empty.iterdir()) == []


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="mnist, fashion-mnist, svhn"):
        D.load_dataset("cifar10")


def test_resolve_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path))
    assert D.resolve_data_root() == tmp_path
    assert D.resolve_data_root("/x/y") == pathlib.Path("/x/y")
    monkeypatch.delenv(D.DATA_ENV_VAR)
    assert D.resolve_data_root() == pathlib.Path("data")


# --------------------------------------------------------------------------- SVHN


def write_svhn(path, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 is digit 0
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


@pytest.mark.parametrize("train", [True, False])
def test_svhn_through_torchvision(train, tmp_path, monkeypatch):
    split = "train" if train else "test"
    url, filename, _ = torchvision.datasets.SVHN.split_list[split]
    x, y = write_svhn(tmp_path / filename, n=13)
    # torchvision.datasets.SVHN verifies the .mat against a hard-coded md5 of the real file,
    # which no fixture can match; swap in the fixture's md5 so that the unmodified torchvision
    # code path (integrity check, loadmat, 10 -> 0 relabelling, transpose) runs on it.
    md5 = hashlib.md5((tmp_path / filename).read_bytes()).hexdigest()
    monkeypatch.setitem(torchvision.datasets.SVHN.split_list, split, [url, filename, md5])
    ds = D.load_dataset("svhn", train=train, data_dir=tmp_path, download=False)
    assert ds.x.shape == (13, 3072) and ds.x.dtype == torch.float32
    assert ds.image_shape == (3, 32, 32)
    assert ds.labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    # Flattened in (C, H, W) order: pixel (h, w) of channel c of image i is X[h, w, c, i].
    img = ds.x[4].reshape(3, 32, 32)
    expected = torch.from_numpy(x[:, :, :, 4].transpose(2, 0, 1).astype(np.float32) / 255)
    assert torch.equal(img, expected)
    assert len(D.load_dataset("svhn", train=train, data_dir=tmp_path, download=False, limit=5)) == 5


def test_svhn_wrong_checksum_is_reported(tmp_path):
    write_svhn(tmp_path / "train_32x32.mat", n=3)
    with pytest.raises(D.DatasetNotFoundError, match="corrupt"):
        D.load_dataset("svhn", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- ArrayDataset


def test_array_dataset_subset_to_and_checks():
    ds = D.ArrayDataset(torch.rand(10, 6), torch.arange(10), (1, 2, 3), "toy")
    assert len(ds) == 10 and ds.dim == 6 and ds.num_classes == 10
    sub = ds.subset(4)
    assert len(sub) == 4 and torch.equal(sub.x, ds.x[:4]) and sub.image_shape == (1, 2, 3)
    assert len(ds.subset(100)) == 10
    moved = ds.to("cpu")
    assert moved.name == "toy" and torch.equal(moved.labels, ds.labels)
    with pytest.raises(ValueError):
        D.ArrayDataset(torch.rand(10, 6), torch.arange(9), None, "bad")
    with pytest.raises(ValueError):
        D.ArrayDataset(torch.rand(10, 6), torch.arange(10), (1, 2, 2), "bad")


# --------------------------------------------------------------------------- arcs


def rotate(points, angle):
    c, s = math.cos(angle), math.sin(angle)
    return points @ torch.tensor([[c, s], [-s, c]], dtype=points.dtype)  # row vectors


def test_arcs_shape_labels_and_balance():
    ds = D.make_arcs(n=10_003, seed=1)
    assert ds.x.shape == (10_003, 2) and ds.x.dtype == torch.float32
    assert ds.labels.dtype == torch.int64
    assert ds.image_shape is None and ds.name == "arcs"
    assert torch.bincount(ds.labels).tolist() == [2001, 2001, 2001, 2000, 2000]
    # Shuffled, so that subset() keeps every arc.
    assert set(ds.subset(50).labels.tolist()) == {0, 1, 2, 3, 4}


def test_arcs_radius():
    clean = D.make_arcs(n=5000, noise_std=0.0)
    r = clean.x.norm(dim=1)
    assert r.min() >= 0.2 - 1e-6 and r.max() <= 1.0 + 1e-6
    noisy = D.make_arcs(n=5000)
    r = noisy.x.norm(dim=1)
    assert r.min() >= 0.2 - 6 * 0.024 and r.max() <= 1.0 + 6 * 0.024
    assert ((r >= 0.2) & (r <= 1.0)).float().mean() > 0.99


def test_arcs_recipe_and_fivefold_symmetry():
    ds = D.make_arcs(n=10_000, seed=0)
    ref = ds.x[ds.labels == 0].double()
    # Arc 0: centre (0.6, 0); angle at the centre ~ N(pi/2, 0.25), so
    # E[x] = (0.6 + 0.4 E cos, 0.4 E sin) = (0.6, 0.4 exp(-0.125)).
    assert torch.allclose(
        ref.mean(0), torch.tensor([0.6, 0.4 * math.exp(-0.125)], dtype=torch.float64), atol=0.02
    )
    for k in range(1, 5):
        pts = rotate(ds.x[ds.labels == k].double(), -2 * math.pi * k / 5)
        assert torch.allclose(pts.mean(0), ref.mean(0), atol=0.025), k
        assert torch.allclose(pts.T.cov(), ref.T.cov(), atol=0.005), k
    clean = D.make_arcs(n=10_000, noise_std=0.0)
    pts = clean.x[clean.labels == 2].double()
    phi = 2 * math.pi * 2 / 5
    rel = pts - 0.6 * torch.tensor([math.cos(phi), math.sin(phi)], dtype=torch.float64)
    assert torch.allclose(rel.norm(dim=1), torch.full((len(rel),), 0.4, dtype=torch.float64))
    # Wrapped to [-pi/2, 3pi/2) so the N(pi/2, 0.5^2) tails do not straddle the cut.
    angle = torch.atan2(rel[:, 1], rel[:, 0]) - phi
    angle = torch.remainder(angle + math.pi / 2, 2 * math.pi) - math.pi / 2
    assert abs(angle.mean().item() - math.pi / 2) < 0.03
    assert abs(angle.std().item() - 0.5) < 0.03


def test_arcs_seeded():
    a, b, c = D.make_arcs(n=500, seed=3), D.make_arcs(n=500, seed=3), D.make_arcs(n=500, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.x, c.x)


# --------------------------------------------------------------------------- minibatches


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_minibatches_reproducible_from_generator():
    torch.manual_seed(1234)
    x = torch.rand(100, 7)
    for binarize in ("dynamic", "none"):
        a = list(iterate_minibatches(x, 16, gen(0), binarize=binarize))
        b = list(iterate_minibatches(x, 16, gen(0), binarize=binarize))
        c = list(iterate_minibatches(x, 16, gen(1), binarize=binarize))
        assert len(a) == 6 and all(t.shape == (16, 7) for t in a)
        assert all(torch.equal(s, t) for s, t in zip(a, b))
        assert not all(torch.equal(s, t) for s, t in zip(a, c))


def test_minibatches_draw_no_global_randomness_and_resume():
    torch.manual_seed(1234)
    x = torch.rand(50, 3)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    g = gen(5)
    list(iterate_minibatches(x, 8, g))
    assert torch.equal(torch.rand(1), expected)
    # The generator state is all a checkpoint needs to replay the next epoch.
    state = g.get_state()
    epoch2 = list(iterate_minibatches(x, 8, g))
    g2 = torch.Generator()
    g2.set_state(state)
    replay = list(iterate_minibatches(x, 8, g2))
    assert all(torch.equal(s, t) for s, t in zip(epoch2, replay))


def test_dynamic_binarization():
    torch.manual_seed(1234)
    x = torch.rand(2000, 50) * 0.6
    batches = torch.cat(list(iterate_minibatches(x, 100, gen(0), binarize="dynamic")))
    assert set(torch.unique(batches).tolist()) == {0.0, 1.0}
    assert batches.dtype == x.dtype
    assert abs(batches.mean().item() - x.mean().item()) < 0.01
    # Fresh draws every epoch.
    e1 = list(iterate_minibatches(x, 100, gen(0), binarize="dynamic", shuffle=False))
    g = gen(0)
    list(iterate_minibatches(x, 100, g, binarize="dynamic", shuffle=False))
    e2 = list(iterate_minibatches(x, 100, g, binarize="dynamic", shuffle=False))
    assert not torch.equal(e1[0], e2[0])


def test_every_row_once_per_epoch():
    x = torch.arange(103, dtype=torch.float32).unsqueeze(1)
    it = iterate_minibatches(x, 10, gen(0), binarize="none", drop_last=False)
    assert len(it) == 11
    batches = list(it)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(torch.cat(batches)[:, 0].long().tolist()) == list(range(103))
    assert torch.cat(batches)[:, 0].long().tolist() != list(range(103))  # shuffled
    dropped = iterate_minibatches(x, 10, gen(0), binarize="none")
    assert len(dropped) == 10
    rows = torch.cat(list(dropped))[:, 0].long().tolist()
    assert len(rows) == 100 and len(set(rows)) == 100
    ordered = torch.cat(list(iterate_minibatches(x, 10, gen(0), "none", shuffle=False)))
    assert ordered[:, 0].long().tolist() == list(range(100))


def test_minibatch_argument_errors():
    torch.manual_seed(1234)
    x = torch.rand(10, 2)
    with pytest.raises(ValueError, match="exceeds"):
        iterate_minibatches(x, 11, gen(0))
    with pytest.raises(ValueError, match="batch_size"):
        iterate_minibatches(x, 0, gen(0))
    with pytest.raises(ValueError, match="binarize"):
        iterate_minibatches(x, 5, gen(0), binarize="static")


def test_binarize_fixed():
    # Not seed 0: bernoulli compares uniforms with x, so x drawn from the very same stream as
    # the draws would give u < u everywhere (all zeros).
    torch.manual_seed(1234)
    x = torch.rand(300, 40)
    a, b, c = D.binarize_fixed(x, seed=0), D.binarize_fixed(x, seed=0), D.binarize_fixed(x, 1)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(torch.unique(a).tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - x.mean().item()) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_and_fixed_binarization():
    x = torch.rand(64, 5, generator=gen(0))
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = list(iterate_minibatches(x.cuda(), 8, g))
    assert len(batches) == 8 and all(b.is_cuda for b in batches)
    # The fixed test set is drawn on the CPU, so it is identical whatever the device.
    assert torch.equal(D.binarize_fixed(x.cuda(), seed=3).cpu(), D.binarize_fixed(x, seed=3))
