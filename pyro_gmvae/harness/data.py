"""Datasets as device-resident tensors (minibatches are drawn by :mod:`pyro_gmvae.train`).

Image datasets (MNIST, Fashion-MNIST, SVHN) are read through the real ``torchvision.datasets``
classes and returned whole as one flattened float tensor with grey levels in [0, 1]; all of
MNIST fits on a GPU, so training slices batches out of that tensor instead of using a
``DataLoader``.

Data root
---------
``resolve_data_root`` picks the directory: an explicit ``data_dir``, else ``$PYRO_GMVAE_DATA``,
else ``./data``. The layout is torchvision's own: ``<root>/MNIST/raw``,
``<root>/FashionMNIST/raw`` and ``<root>/train_32x32.mat`` / ``<root>/test_32x32.mat`` (SVHN).

A shared data root is often read-only and may hold only the original ``.gz`` files. torchvision
would decompress them next to themselves (``<root>/MNIST/raw``), so instead the compressed files
are checked against torchvision's own md5 sums and decompressed into a private staging tree
under the user cache (``$XDG_CACHE_HOME/pyro_gmvae`` or ``~/.cache/pyro_gmvae``), which is then
handed to the same torchvision class with ``download=False``. The data root itself is never
written to unless a download was asked for and the files are absent.
"""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

DATA_ENV_VAR = "PYRO_GMVAE_DATA"
DATASETS = ("mnist", "fashion-mnist", "svhn")

# Folder names are torchvision's class names; they must match what ``raw_folder`` expects.
_MNIST_LIKE = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are absent (or corrupt) and could not be obtained."""


def resolve_data_root(data_dir=None) -> pathlib.Path:
    """The data root: ``data_dir`` if given, else ``$PYRO_GMVAE_DATA``, else ``./data``.

    ``~`` is expanded; the path is not required to exist.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV_VAR) or "data"
    return pathlib.Path(data_dir).expanduser()


@dataclass
class ArrayDataset:
    """A whole dataset as tensors.

    Attributes:
        x: ``(N, D)`` float32; images are flattened (C, H, W order) with grey levels in [0, 1].
        labels: ``(N,)`` int64 class labels (used only for evaluation).
        image_shape: ``(C, H, W)`` for image data, ``None`` for vector data.
        name: dataset name, e.g. ``"mnist"``.
    """

    x: torch.Tensor
    labels: torch.Tensor
    image_shape: tuple | None
    name: str

    def __post_init__(self):
        if self.x.dim() != 2:
            raise ValueError(f"x must be 2-D (N, D), got shape {tuple(self.x.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.x):
            raise ValueError(
                f"labels must be 1-D with one entry per row of x: x has {len(self.x)} rows, "
                f"labels has shape {tuple(self.labels.shape)}"
            )
        if self.image_shape is not None:
            self.image_shape = tuple(int(s) for s in self.image_shape)
            if math.prod(self.image_shape) != self.x.shape[1]:
                raise ValueError(
                    f"image_shape {self.image_shape} does not match D = {self.x.shape[1]}"
                )

    def __len__(self):
        return len(self.x)

    @property
    def dim(self) -> int:
        """D, the number of features per item."""
        return self.x.shape[1]

    @property
    def has_labels(self) -> bool:
        """Whether every item has a label (own data may come without)."""
        return bool((self.labels >= 0).all())

    @property
    def num_classes(self) -> int:
        """The number of distinct labels present."""
        return int(torch.unique(self.labels).numel())

    def to(self, device) -> ArrayDataset:
        """A copy with both tensors on ``device`` (no copy when already there)."""
        return ArrayDataset(self.x.to(device), self.labels.to(device), self.image_shape, self.name)

    def subset(self, n) -> ArrayDataset:
        """The first ``n`` items (all of them when ``n >= len(self)``, as with slicing)."""
        n = int(n)
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        return ArrayDataset(self.x[:n], self.labels[:n], self.image_shape, self.name)


# --------------------------------------------------------------------------- real datasets


def _cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "pyro_gmvae"


def _staging_root(root: pathlib.Path) -> pathlib.Path:
    # Keyed by the absolute data root so that two data roots never share (or clobber) a stage.
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return _cache_dir() / "staged" / key


def _how_to_provide(name, root) -> str:
    return (
        f"Provide it by passing data_dir=... to load_dataset, by setting ${DATA_ENV_VAR} to a "
        f"directory that holds it (looked in {root}), or by calling load_dataset({name!r}, "
        f"download=True) on a machine with internet access."
    )


def _mnist_files(cls):
    """(compressed name, md5, decompressed name) for each raw file torchvision needs."""
    return [(fn, md5, fn[: -len(".gz")]) for fn, md5 in cls.resources]


def _has_decompressed(root: pathlib.Path, cls) -> bool:
    raw = root / cls.__name__ / "raw"
    return all((raw / out).is_file() for _, _, out in _mnist_files(cls))


def _has_compressed(root: pathlib.Path, cls) -> bool:
    raw = root / cls.__name__ / "raw"
    return all((raw / gz).is_file() for gz, _, _ in _mnist_files(cls))


def _stage_mnist(name, cls, root: pathlib.Path) -> pathlib.Path:
    """Decompress ``root``'s ``.gz`` files into the staging tree; returns the staging root."""
    from torchvision.datasets.utils import check_integrity, extract_archive

    src = root / cls.__name__ / "raw"
    stage = _staging_root(root)
    dst = stage / cls.__name__ / "raw"
    if _has_decompressed(stage, cls):
        return stage
    dst.mkdir(parents=True, exist_ok=True)
    for gz, md5, out in _mnist_files(cls):
        if (dst / out).is_file():
            continue
        if not check_integrity(src / gz, md5):
            raise DatasetNotFoundError(
                f"{name}: {src / gz} is corrupt (md5 differs from torchvision's {md5}). "
                + _how_to_provide(name, root)
            )
        # Decompress beside the target and rename: a concurrent process (or a crash) must never
        # see a half-written file that torchvision's existence check would accept.
        tmp = pathlib.Path(tempfile.mkdtemp(dir=dst, prefix=".tmp-"))
        try:
            extract_archive(str(src / gz), str(tmp))
            os.replace(tmp / out, dst / out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return stage


def _load_mnist_like(name, train, root: pathlib.Path, download):
    from torchvision import datasets

    cls = getattr(datasets, _MNIST_LIKE[name])
    stage = _staging_root(root)
    if _has_decompressed(root, cls):
        where = root
    elif _has_compressed(root, cls):
        where = _stage_mnist(name, cls, root)
    elif _has_decompressed(stage, cls):
        # The .gz files have gone since they were staged; the staged copy is still valid.
        where = stage
    elif download:
        where = root
    else:
        raise DatasetNotFoundError(
            f"{name}: files not found in {root / cls.__name__ / 'raw'} "
            f"(need {', '.join(gz for gz, _, _ in _mnist_files(cls))}). "
            + _how_to_provide(name, root)
        )
    try:
        ds = cls(str(where), train=train, download=download and where == root)
    except Exception as err:  # torchvision raises RuntimeError / URLError / OSError
        raise DatasetNotFoundError(
            f"{name}: could not load or download into {root / cls.__name__ / 'raw'} ({err}). "
            + _how_to_provide(name, root)
        ) from err
    x = ds.data.reshape(len(ds.data), -1)
    return x, ds.targets, (1, *ds.data.shape[1:])


def _load_svhn(train, root: pathlib.Path, download):
    from torchvision import datasets

    split = "train" if train else "test"
    filename = datasets.SVHN.split_list[split][1]
    try:
        ds = datasets.SVHN(str(root), split=split, download=download)
    except Exception as err:  # RuntimeError("not found or corrupted"), URLError, OSError
        state = (
            "is corrupt or unreadable (md5 mismatch?)"
            if (root / filename).is_file()
            else "was not found"
        )
        raise DatasetNotFoundError(
            f"svhn: {root / filename} {state} ({err}). " + _how_to_provide("svhn", root)
        ) from err
    data = torch.from_numpy(np.ascontiguousarray(ds.data))  # (N, 3, 32, 32) uint8
    x = data.reshape(len(data), -1)
    return x, torch.as_tensor(ds.labels, dtype=torch.int64), tuple(data.shape[1:])


def load_dataset(
    name, train=True, data_dir=None, download=True, limit=None, device="cpu"
) -> ArrayDataset:
    """Load ``"mnist"``, ``"fashion-mnist"`` or ``"svhn"`` as an :class:`ArrayDataset`.

    The files are read by ``torchvision.datasets.MNIST`` / ``FashionMNIST`` / ``SVHN`` from the
    root given by :func:`resolve_data_root`; see the module docstring for how a read-only root
    holding only ``.gz`` files is handled. ``x`` is ``uint8 / 255`` as float32, flattened in
    (C, H, W) order; SVHN labels are 0..9 (torchvision maps the file's label 10 to digit 0).

    Args:
        name: one of :data:`DATASETS`.
        train: the training split if true, else the test split.
        data_dir: the data root (default: ``$PYRO_GMVAE_DATA``, else ``./data``).
        download: let torchvision download missing files into the data root.
        limit: keep only the first ``limit`` items.
        device: where the returned tensors live.

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: (a ``FileNotFoundError``) the files are missing or corrupt and
            could not be downloaded.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}")
    if limit is not None and int(limit) < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    root = resolve_data_root(data_dir)
    if name == "svhn":
        x, labels, image_shape = _load_svhn(train, root, download)
    else:
        x, labels, image_shape = _load_mnist_like(name, train, root, download)
    if limit is not None:
        # Cut before converting to float so a small subset never materialises the full set.
        x, labels = x[: int(limit)], labels[: int(limit)]
    x = x.to(device=device, dtype=torch.float32).div_(255.0)
    labels = labels.to(device=device, dtype=torch.int64)
    return ArrayDataset(x, labels, image_shape, name)


# --------------------------------------------------------------------------- your own data

NO_LABEL = -1  # the label of an item whose class is unknown
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_user_data(name) -> bool:
    """Whether a dataset name is a path to the user's own data (a file or a folder)."""
    text = str(name)
    return text not in DATASETS and (
        os.sep in text or text.endswith((".npy", ".npz")) or pathlib.Path(text).exists()
    )


def load_user_data(path, limit=None, device="cpu") -> ArrayDataset:
    """Your own data as an :class:`ArrayDataset`: a ``.npy``/``.npz`` array file, or a folder of
    PNG/JPEG images.

    - ``.npy``: one array (N, D), or images (N, H, W), (N, H, W, C) or (N, C, H, W).
    - ``.npz``: the data under ``x`` (or ``X``, ``data``, or its only array), labels under ``y``
      or ``labels`` if present.
    - a folder: every image in it, in sorted order, or in class subfolders (the subfolder's
      name is the label, as ``torchvision.datasets.ImageFolder`` reads them); read by Pillow,
      greyscale if every image is, else RGB, resized to the first image's size.

    uint8 values are scaled to [0, 1]; other values are kept as they are. Items without labels
    get :data:`NO_LABEL`. One clear error names a path that holds nothing usable.
    """
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        x, labels, image_shape = _read_image_folder(path)
    elif path.suffix in (".npy", ".npz"):
        x, labels, image_shape = _read_array_file(path)
    else:
        raise ValueError(f"{path}: expected a .npy or .npz file or a folder of images")
    if limit is not None:
        x, labels = x[: int(limit)], labels[: int(limit)]
    if x.shape[0] == 0:
        raise ValueError(f"{path}: holds no items")
    x = x.to(device=device, dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{path}: the data contain NaN or infinite values")
    return ArrayDataset(x, labels.to(device), image_shape, str(path))


def _as_items(array: np.ndarray, where) -> tuple[torch.Tensor, tuple | None]:
    """(N, D) float values of an array of items, and the image shape (C, H, W) if images."""
    if array.dtype == object or not np.issubdtype(array.dtype, np.number) and array.dtype != bool:
        raise ValueError(f"{where}: expected numbers, got an array of {array.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(array))
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    x = x.to(torch.float32) / scale
    if x.dim() == 2:
        return x, None
    if x.dim() == 3:  # (N, H, W): greyscale images
        return x.reshape(len(x), -1), (1, *x.shape[1:])
    if x.dim() == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)  # channels last -> (N, C, H, W)
        return x.reshape(len(x), -1), tuple(x.shape[1:])
    raise ValueError(
        f"{where}: expected rows (N, D) or images (N, H, W[, C]), got {tuple(x.shape)}"
    )


def _read_array_file(path: pathlib.Path):
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable NumPy file ({err})") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        key = next(
            (k for k in ("x", "X", "data") if k in keys), keys[0] if len(keys) == 1 else None
        )
        if key is None:
            raise ValueError(f"{path}: name the data 'x' (found {keys})")
        array = loaded[key]
        label_key = next((k for k in ("y", "labels") if k in keys), None)
        if label_key is not None:
            labels = torch.as_tensor(loaded[label_key].astype(np.int64))
    else:
        array = loaded
    x, image_shape = _as_items(array, path)
    if labels is None:
        labels = torch.full((len(x),), NO_LABEL, dtype=torch.int64)
    elif labels.shape != (len(x),):
        raise ValueError(f"{path}: {len(labels)} labels for {len(x)} items")
    return x, labels, image_shape


def _read_image_folder(path: pathlib.Path):
    from PIL import Image, UnidentifiedImageError  # Pillow comes with torchvision

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no PNG or JPEG images in this folder")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"{f}: not a readable image ({err})") from None
    mode = "L" if all(im.mode in ("1", "L", "LA", "I", "I;16") for im in images) else "RGB"
    size = images[0].size
    arrays = [np.asarray(im.convert(mode).resize(size, Image.BILINEAR)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).to(torch.float32) / 255.0
    x = x[:, None] if mode == "L" else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    classes = sorted({f.parent for f in files if f.parent != path})
    if classes and all(f.parent != path for f in files):
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[f.parent] for f in files], dtype=torch.int64)
    else:
        labels = torch.full((len(files),), NO_LABEL, dtype=torch.int64)
    return x.reshape(len(x), -1), labels, tuple(x.shape[1:])


# --------------------------------------------------------------------------- synthetic arcs


def make_arcs(
    n=10_000,
    seed=0,
    radius=0.4,
    centre_distance=0.6,
    angle_std=0.5,
    noise_std=0.024,
    num_arcs=5,
) -> ArrayDataset:
    """The synthetic 2-D arcs of Dilokthanakul et al. 2016 (GMVAE paper, Sec. 4.1).

    Arc ``k`` lies on a circle of radius ``radius`` whose centre sits ``centre_distance`` from
    the origin at angle ``phi_k = 2 pi k / num_arcs``. A point's angle along the arc, measured
    at the circle's centre from the direction ``phi_k``, is ``N(pi/2, angle_std^2)``; isotropic
    Gaussian noise of std ``noise_std`` is added. Points are split as evenly as possible among
    arcs (the first ``n % num_arcs`` arcs get one extra) and returned in a seeded random order,
    so that :meth:`ArrayDataset.subset` keeps all arcs. ``labels`` is the arc index.
    """
    n, num_arcs = int(n), int(num_arcs)
    if n < 1 or num_arcs < 1:
        raise ValueError(f"need n >= 1 and num_arcs >= 1, got n={n}, num_arcs={num_arcs}")
    g = torch.Generator().manual_seed(int(seed))
    counts = torch.full((num_arcs,), n // num_arcs, dtype=torch.int64)
    counts[: n % num_arcs] += 1
    labels = torch.repeat_interleave(torch.arange(num_arcs), counts)
    phi = labels.double() * (2 * math.pi / num_arcs)
    theta = phi + math.pi / 2 + angle_std * torch.randn(n, generator=g, dtype=torch.float64)
    centres = centre_distance * torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)
    x = centres + radius * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    x = x + noise_std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    order = torch.randperm(n, generator=g)
    return ArrayDataset(x[order].float(), labels[order], None, "arcs")


# --------------------------------------------------------------------------- binarisation


def binarize_fixed(x, seed=0) -> torch.Tensor:
    """One seeded Bernoulli draw of the grey levels ``x`` (a fixed, noise-free binary test set).

    The draw is made on the CPU and moved back, so the same ``seed`` gives the same binary
    images whatever device ``x`` lives on (CUDA generators produce different streams).
    """
    g = torch.Generator().manual_seed(int(seed))
    return torch.bernoulli(x.detach().to("cpu", torch.float32), generator=g).to(x.device, x.dtype)
