"""A training run: data -> model/guide -> estimator -> trainer -> metrics, kept in a run directory.

The run directory holds ``config.json`` (every setting, the seed, package versions),
``metrics.jsonl`` (one JSON object per evaluation), ``checkpoint.pt`` (model, guide, optimiser,
RNG and data-order state, written atomically) and ``summary.json`` (final test metrics, time,
hardware). ``resume=True`` continues from the checkpoint and reproduces, on CPU, exactly the
``metrics.jsonl`` an uninterrupted run writes (up to the wall-clock ``time_s``).
"""

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import pyro
import torch

from .. import MODELS, make_model
from ..estimators import ESTIMATORS
from ..evaluate import evaluate, iw_log_likelihood
from ..guides import GUIDE_FITS, GUIDES, make_guide
from ..init import INIT_METHODS, autoencoder_loss, initialise
from ..nets import data_checks
from ..train import OPTIMIZERS, Trainer, TrainingInterrupted, resolve_device
from .data import (
    binarize_fixed,
    is_user_data,
    load_dataset,
    load_user_data,
    make_arcs,
)

DATASETS = ("mnist", "fashion-mnist", "svhn", "arcs")
BINARIZE = ("dynamic", "none")
CHECKPOINT = "checkpoint.pt"

# Named presets of RunConfig settings; a flag given beside --recipe overrides its value.
RECIPES = {
    # Shu's "real" GMVAE exactly as in his code: q(y|x) q(z|x,y), z of 64, Adam 1e-3, batch 100.
    "shu": {"model": "gmvae", "guide": "mean_field"},
    # Dilokthanakul et al.'s MNIST script: Adam 1e-4, batch 50, the z-prior gate λ = 0.5.
    "dilokthanakul": {"model": "gmvae_w", "lr": 1e-4, "batch_size": 50, "free_bits": 0.5},
    # VaDE (Jiang et al. 2017): z of 10, q(y|x,z) = p(y|z), p(y) learnt, the autoencoder
    # pretrained and a GaussianMixture on its codes initialising the prior.
    "vade": {
        "model": "gmvae",
        "guide": "vade",
        "latent_dim": 10,
        "learn_weights": True,
        "init": "gmm",
        "pretrain_epochs": 10,
        "epochs": 20,
    },  # fmt: skip
    # The default: VaDE initialised N2D's way (the mixture fitted on a UMAP embedding of the codes,
    # which the encoder is then fitted to). See docs/results.md for what each recipe measures.
    "vade-umap": {
        "model": "gmvae",
        "guide": "vade",
        "latent_dim": 10,
        "learn_weights": True,
        "covariance": "full",
        "init": "umap",
        "pretrain_epochs": 10,
        "epochs": 20,
    },  # fmt: skip
}
DEFAULT_RECIPE = "vade-umap"
# Settings that may change on resume without changing what the run computes.
RESUMABLE_CHANGES = ("epochs", "device", "progress", "data_dir", "out")


class SettingError(ValueError):
    """An invalid run setting: ``field`` names it (the CLI names its flag); the message is
    ``"field: what is wrong"``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def setting(default, help, group, *, choices=None, minimum=None, above=None, maximum=None,
            flag=None, widths=False):  # fmt: skip
    """A :class:`RunConfig` field and everything said about it once: its help, its group of
    command-line flags, its allowed values (a tuple, or a callable returning a registry) and its
    bounds (``minimum`` ≤ value, ``above`` < value, value ≤ ``maximum``). ``flag`` names a flag
    that is not ``--field-name``; ``widths`` marks the one field that takes ``500,500,2000``.
    The CLI's flags (:func:`pyro_gmvae.harness.cli.build_parser`) and :meth:`RunConfig.validate` are
    generated from these."""
    metadata = dict(help=help, group=group, choices=choices, minimum=minimum, above=above,
                    maximum=maximum, flag=flag, widths=widths)  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata)


MODEL, OBJECTIVE, DATA, RUN = "model and inference", "objective and optimisation", "data", "run"


@dataclasses.dataclass
class RunConfig:
    """Every setting of a run, each stated once: its default, help and constraints.

    The plain defaults are Shu's GMVAE on MNIST, K = 10; the main job starts from the default
    recipe (:data:`RECIPES`) instead."""

    recipe: str | None = setting(
        None, "a preset of the settings below, which flags given beside it override: vade-umap "
        "(the default) = VaDE initialised on a UMAP embedding (N2D), vade = VaDE (autoencoder + "
        "GMM initialisation), shu = Shu's GMVAE as in his code, dilokthanakul = the paper's "
        "gmvae_w script", MODEL, choices=lambda: RECIPES,
    )  # fmt: skip
    model: str = setting("gmvae", "generative model: gmvae is Shu's GMVAE, m2 collapses, "
                         "modified_m2 is Shu's fix, gmvae_w is Dilokthanakul et al.'s", MODEL,
                         choices=lambda: MODELS)  # fmt: skip
    guide: str | None = setting(None, "variational family (default: the model's own, mean_field "
                                "for Shu's models, exact_posterior for gmvae_w)", MODEL,
                                choices=lambda: GUIDES)  # fmt: skip
    # The compiled form of enum: the same objective and gradients, a fraction of Pyro's per-step
    # Python work (the batch shape is fixed: the last short batch of an epoch is dropped).
    estimator: str = setting("enum-jit", "ELBO estimator for the discrete cluster (enum-jit and "
                             "enum: summed exactly by parallel enumeration, compiled or not)",
                             MODEL, flag="--elbo", choices=lambda: ESTIMATORS)  # fmt: skip
    k: int = setting(10, "number of clusters K", MODEL, minimum=2)
    arch: str = setting("mlp", "networks; conv is the paper's convolutional nets, gmvae_w only",
                        MODEL, choices=("mlp", "conv"))  # fmt: skip
    hidden: int | list[int] | None = setting(
        None, "hidden width, or comma-separated widths per layer such as 500,500,2000 "
        "(default: the model's, 512,512 for Shu's models, 1000 for gmvae_w)", MODEL, widths=True,
    )  # fmt: skip
    latent_dim: int | None = setting(None, "dimension of z (Shu's models, default 64) or x "
                                     "(gmvae_w, default 200)", MODEL, minimum=1)  # fmt: skip
    w_dim: int | None = setting(None, "dimension of w (gmvae_w only, default 150)", MODEL,
                                minimum=1)  # fmt: skip
    likelihood: str | None = setting(None, "p(x|z) (default: bernoulli for binarised images, "
                                     "else gaussian)", MODEL,
                                     choices=("bernoulli", "gaussian"))  # fmt: skip
    learn_weights: bool = setting(False, "gmvae: learn the mixture weights p(y) (VaDE) instead "
                                  "of keeping them uniform", MODEL)  # fmt: skip
    covariance: str = setting("diag", "gmvae: covariance of each prior component p(z|y) (diag "
                              "is Shu's)", MODEL, choices=("diag", "full"))  # fmt: skip
    # The initialisation stage (pyro_gmvae.init): autoencoder pretraining, then "gmm" or "umap".
    init: str = setting("none", "initialisation stage after autoencoder pretraining (gmvae): "
                        "gmm = a GaussianMixture on the codes sets p(z|y); umap = the encoder "
                        "is fitted to a UMAP embedding of the data, the mixture found there",
                        MODEL, choices=INIT_METHODS)  # fmt: skip
    pretrain_epochs: int = setting(0, "epochs of autoencoder pretraining before the mixture "
                                   "VAE (gmvae)", MODEL, minimum=0)  # fmt: skip
    augment: bool = setting(False, "pretrain the autoencoder on randomly rotated (±10°) and "
                            "shifted (±10 %%) images (DEC-DA)", MODEL)  # fmt: skip
    epochs: int = setting(100, "passes over the training set", OBJECTIVE, minimum=1)
    batch_size: int = setting(100, "minibatch size", OBJECTIVE, minimum=1)
    lr: float = setting(1e-3, "learning rate", OBJECTIVE, above=0)
    lr_decay: float = setting(1.0, "multiply the learning rate by this every epoch", OBJECTIVE,
                              above=0, maximum=1)  # fmt: skip
    optimizer: str = setting("adam", "optimiser", OBJECTIVE, choices=lambda: OPTIMIZERS)
    clip_norm: float | None = setting(None, "clip gradients to this global L2 norm (default: no "
                                      "clipping)", OBJECTIVE, above=0)  # fmt: skip
    free_bits: float = setting(0.0, "λ, nats: the cluster KL term counts as max(λ, batch-mean "
                               "KL) (0.5 for gmvae_w, the paper's constraint)", OBJECTIVE,
                               minimum=0)  # fmt: skip
    kl_weight: float = setting(1.0, "β, weight of the cluster KL term", OBJECTIVE, minimum=0)
    kl_warmup_epochs: int = setting(0, "ramp β linearly over this many epochs", OBJECTIVE,
                                    minimum=0)  # fmt: skip
    mc_samples: int = setting(1, "M, Monte-Carlo samples of the continuous latents per point",
                              OBJECTIVE, minimum=1)  # fmt: skip
    on_nan: str = setting("raise", "on a non-finite loss stop, or restore the last good state "
                          "and go on", OBJECTIVE, choices=("raise", "rollback"))  # fmt: skip
    dataset: str = setting("mnist", f"one of {', '.join(DATASETS)}, or your own data: the path "
                           "of a .npy/.npz array file or of a folder of PNG/JPEG images",
                           DATA)  # fmt: skip
    data_dir: str | None = setting(None, "data root holding MNIST/raw etc. (default: "
                                   "$PYRO_GMVAE_DATA, else ./data)", DATA)  # fmt: skip
    limit: int | None = setting(None, "train on the first N training images only (smoke runs; "
                                "default: all)", DATA, minimum=1)  # fmt: skip
    # A budget measure: every evaluation costs K decoder passes per test point. It changes what
    # metrics.jsonl holds, so it is not resumable.
    test_limit: int | None = setting(None, "evaluate on the first N test images only (default: "
                                     "all); a resumed run keeps it", DATA, minimum=1)  # fmt: skip
    validation: int | None = setting(None, "hold out the last N training images and evaluate "
                                     "on them instead of the test split (to choose settings "
                                     "without the test labels)", DATA, minimum=1)  # fmt: skip
    binarize: str = setting("dynamic", "'dynamic': a fresh Bernoulli draw of every batch (both "
                            "sources); none for real-valued data such as arcs", DATA,
                            choices=BINARIZE)  # fmt: skip
    seed: int = setting(0, "random seed", RUN, minimum=0)
    device: str | None = setting(None, "cpu, cuda, cuda:N (default: cuda when available, else "
                                 "cpu)", RUN)  # fmt: skip
    eval_every: int = setting(1, "evaluate every N epochs (the last epoch is always evaluated)",
                              RUN, minimum=1)  # fmt: skip
    eval_batch_size: int = setting(1000, "test-set batch size", RUN, minimum=1)
    iw_samples: int = setting(0, "S for a final importance-weighted bound on log p(x) (0: "
                              "skipped; it costs K·S decoder passes per test image)", RUN,
                              minimum=0)  # fmt: skip
    out: str = setting("runs/latest", "run directory (default runs/DATASET-MODEL-kK-seedSEED; "
                       "runs/latest for run() called from Python)", RUN)  # fmt: skip
    progress: bool = setting(True, "progress bars", RUN, flag="--no-progress")

    def validate(self) -> "RunConfig":
        """One clear error (``ValueError("field: message")``) for an invalid setting or
        combination, before any work: each field against its own constraints, then the
        combinations."""

        def bad(field, message):
            raise SettingError(field, message)

        for f in dataclasses.fields(self):
            problem = _setting_problem(f, getattr(self, f.name))
            if problem:
                bad(f.name, problem)
        if self.dataset not in DATASETS and not is_user_data(self.dataset):
            bad("dataset", f"unknown dataset {self.dataset!r}; choose one of {DATASETS}, or give "
                "the path of a .npy/.npz file or of a folder of images")  # fmt: skip
        if self.dataset == "arcs" and self.binarize != "none":
            bad("binarize", "the arcs dataset is real-valued 2-D points; use binarize='none'")
        if self.arch == "conv" and self.model != "gmvae_w":
            bad("arch", "the convolutional networks (Dilokthanakul et al., Tables A.1-A.3) are "
                "for --model gmvae_w")  # fmt: skip
        if self.arch == "conv" and self.dataset == "arcs":
            bad("arch", "the arcs dataset is 2-D points, not images; use --arch mlp")
        if self.likelihood_name() == "bernoulli" and (
            self.binarize == "none" or self.dataset == "arcs"
        ):
            bad("likelihood", "a Bernoulli likelihood needs binarised data (binarize='dynamic', "
                "not arcs)")  # fmt: skip
        if isinstance(self.hidden, list) and self.model == "gmvae_w":
            bad("hidden", "gmvae_w takes one hidden width")
        if self.validation is not None and (self.dataset == "arcs" or is_user_data(self.dataset)):
            bad("validation", "a validation split is carved from a named dataset's training split")
        if self.w_dim is not None and self.model != "gmvae_w":
            bad("w_dim", "only --model gmvae_w has a w latent")
        if self.limit is not None and self.limit < self.batch_size:
            bad("limit", f"keeps {self.limit} points, fewer than one batch of {self.batch_size}")
        if self.guide is not None and self.model not in GUIDE_FITS[self.guide]:
            fitting = sorted(g for g, fits in GUIDE_FITS.items() if self.model in fits)
            bad("guide", f"{self.guide!r} does not fit model {self.model!r}; guides that fit: "
                f"{fitting}")  # fmt: skip
        gmvae_only = {
            "covariance": self.covariance != "diag", "learn_weights": self.learn_weights,
            "init": self.init != "none", "pretrain_epochs": self.pretrain_epochs > 0,
        }  # fmt: skip
        for name, used in gmvae_only.items():
            if used and self.model != "gmvae":
                bad(name, "it sets up the Gaussian mixture prior p(z|y) of --model gmvae")
        if self.augment and (self.dataset == "arcs" or not self.pretrain_epochs):
            bad("augment", "augments the images of autoencoder pretraining: needs an image "
                "dataset and pretrain_epochs > 0")  # fmt: skip
        return self

    def likelihood_name(self) -> str:
        if self.likelihood is not None:
            return self.likelihood
        return "bernoulli" if self.binarize == "dynamic" and self.dataset != "arcs" else "gaussian"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def setting_choices(f: dataclasses.Field):
    """The allowed values of a :func:`setting` field (None: any)."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def setting_kind(f: dataclasses.Field) -> type:
    """The type a :func:`setting` field's values take: bool, int, float or str."""
    if f.metadata.get("widths"):
        return int
    return next(t for t in (bool, int, float, str) if t.__name__ in str(f.type))


def _setting_problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with ``value`` for field ``f`` on its own, or None."""
    m = f.metadata
    if value is None:
        return None if f.default is None else "must be given, got None"
    choices = setting_choices(f)
    if choices is not None:
        return None if value in choices else f"choose one of {sorted(choices)}, got {value!r}"
    kind = setting_kind(f)
    if m.get("widths"):
        values = value if isinstance(value, list) else [value]
        ok = values and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
        )
        return None if ok else f"must be a positive integer or a list of them, got {value!r}"
    if kind is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        return f"must be an integer, got {value!r}"
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value)):  # fmt: skip
        return f"must be a finite number, got {value!r}"
    what = "an integer" if kind is int else "a number"
    if m.get("minimum") is not None and value < m["minimum"]:
        return f"must be {what} >= {m['minimum']}, got {value!r}"
    if m.get("above") is not None and not value > m["above"]:
        return f"must be {what} > {m['above']}, got {value!r}"
    if m.get("maximum") is not None and value > m["maximum"]:
        return f"must be {what} <= {m['maximum']}, got {value!r}"
    return None


def load_data(cfg: RunConfig, device):
    """(train, test) datasets on the device; the test set binarised once, with a fixed seed.

    ``cfg.test_limit`` keeps the first N test points (all of them when N exceeds the split),
    cut after the fixed binarisation, so they are exactly the first N of the full evaluation.
    The arcs test set is generated: N points are drawn when N exceeds its default size
    (``limit // 5``, at least K), else its first N are kept.
    """
    if cfg.dataset == "arcs":
        n = cfg.limit or 10_000
        n_test = max(n // 5, cfg.k, cfg.test_limit or 0)
        train, test = make_arcs(n, seed=cfg.seed), make_arcs(n_test, seed=cfg.seed + 1)
        if cfg.test_limit:
            test = test.subset(cfg.test_limit)
        return train.to(device), test.to(device)
    if is_user_data(cfg.dataset):
        # Own data have no test split: the clustering is evaluated on the data it clusters.
        train = load_user_data(cfg.dataset, limit=cfg.limit, device=device)
        test = train
        if cfg.binarize == "dynamic":
            test = dataclasses.replace(test, x=binarize_fixed(test.x, seed=cfg.seed))
        return train, test.subset(cfg.test_limit) if cfg.test_limit else test
    train = load_dataset(
        cfg.dataset, train=True, data_dir=cfg.data_dir, limit=cfg.limit, device=device
    )
    if cfg.validation:
        if cfg.validation >= len(train):
            raise ValueError(
                f"validation: {cfg.validation} images leave none of {len(train)} to train on"
            )
        n = len(train) - cfg.validation
        test = dataclasses.replace(train, x=train.x[n:], labels=train.labels[n:])
        train = train.subset(n)
    else:
        # Without binarisation the cut can happen at load time (SVHN's test split is 26k images).
        early = None if cfg.binarize == "dynamic" else cfg.test_limit
        test = load_dataset(cfg.dataset, train=False, data_dir=cfg.data_dir, limit=early,
                            device=device)  # fmt: skip
    if cfg.binarize == "dynamic":
        # A fixed draw keeps test metrics free of binarisation noise between evaluations.
        test = dataclasses.replace(test, x=binarize_fixed(test.x, seed=cfg.seed))
    if cfg.test_limit:
        test = test.subset(cfg.test_limit)
    return train, test


def build_model(cfg: RunConfig, data_dim: int, image_shape=None):
    """The model and guide a config describes."""
    kwargs = {"data_dim": data_dim, "k": cfg.k, "likelihood": cfg.likelihood_name()}
    if cfg.model == "gmvae_w":
        kwargs.update(arch=cfg.arch, image_shape=image_shape)
        if cfg.latent_dim:
            kwargs["x_dim"] = cfg.latent_dim
        if cfg.w_dim:
            kwargs["w_dim"] = cfg.w_dim
        if cfg.hidden:
            kwargs["hidden"] = cfg.hidden
    else:
        if cfg.latent_dim:
            kwargs["z_dim"] = cfg.latent_dim
        if cfg.hidden:
            kwargs["hidden"] = (
                tuple(cfg.hidden) if isinstance(cfg.hidden, list) else (cfg.hidden, cfg.hidden)
            )
        if cfg.model == "gmvae":
            kwargs.update(learn_weights=cfg.learn_weights, covariance=cfg.covariance)
    model = make_model(cfg.model, **kwargs)
    return model, make_guide(cfg.guide, model)


@functools.cache
def git_commit():
    """The commit of the git checkout this package runs from, with "+changes" when its working
    tree differs; None for an installed copy outside git. Read once, when this module is
    imported (the code a process runs), not again when the checkout moves on."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]  # the checkout: pyro_gmvae/harness/run.py -> repo
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


git_commit()  # at import: the commit of the code this process loaded


def package_versions() -> dict:
    import numpy
    import pyro
    import scipy
    import sklearn

    from .. import __version__

    return {
        "pyro_gmvae": __version__,
        "pyro": pyro.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def hardware(device) -> dict:
    info = {
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def atomic_save(obj, path: Path, previous: Path | None = None) -> None:
    """Write to a temporary file in the same directory, then rename: a reader never sees half a file.

    ``previous``: the file being replaced is first renamed to this path (kept, not lost).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; a run's files are for colleagues too (load_run).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(run_dir) -> list[dict]:
    """The evaluations of a run, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after checkpointing its exact state (``--resume``)."""

    def __init__(self, out):
        super().__init__(f"interrupted; the exact state is saved in {out}")
        self.out = out


class RunLockedError(RuntimeError):
    """Another live process is writing into the run directory."""


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold an OS lock on ``out/.lock`` while the run writes there; released on any exit, a
    crash or kill included (the kernel drops the lock with the process)."""
    import fcntl

    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunLockedError(
                f"{out} is in use by {holder}; wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {platform.node()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGTERM interrupt at once (KeyboardInterrupt) until the training loop arms the
    flag (``flag["armed"] = True``); from then on they set ``flag["stop"]``, which the loop reads
    after each step to checkpoint the exact state and raise RunInterrupted. A second signal
    interrupts at once. Only in the main thread (Python delivers signals there)."""
    import signal
    import threading

    flag = {"stop": False, "armed": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"] or not flag["armed"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class RunResult(dict):
    """The final summary of a run (what summary.json holds), carrying the trained model and
    guide as ``model_`` and ``guide_`` (in eval mode) and the data they were evaluated on as
    ``test_`` (binarised and cut as the run evaluates it), so no caller reloads or rebuilds
    them. ``rank_``: the process that returns it (0, or None without torch.distributed); only
    rank 0's holds the final metrics."""

    def __init__(self, summary: dict, model_, guide_, test_=None, rank_=0):
        super().__init__(summary)
        self.model_, self.guide_, self.test_, self.rank_ = model_, guide_, test_, rank_


def run(cfg: RunConfig, resume: bool = False, log=None) -> RunResult:
    """Train and evaluate as ``cfg`` says; returns the final summary (also in summary.json)
    with the trained model and guide (:class:`RunResult`).

    ``resume=True`` continues from the run directory's checkpoint (the exact state, mid-epoch
    after an interrupt); a directory whose run stopped before its first checkpoint starts over.
    ``log``: a callable given one line of text before training starts (device, threads and the
    estimated duration), e.g. ``print``; None says nothing.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), every process trains one
    replica of the model on its share of each batch (:class:`~pyro_gmvae.train.Trainer`; gloo
    on CPU, NCCL on GPUs, one GPU per process); rank 0 alone evaluates and writes the run
    directory, and the returned summary is rank 0's (``rank_`` says which process returns).
    """
    cfg.validate()
    out = Path(cfg.out)
    with _process_group(cfg) as (device, rank), contextlib.ExitStack() as held:
        lead = not rank  # rank 0, or the one process
        start, failure = None, None
        if lead:
            # Rank 0 alone makes, locks and reads the folder, and sends the other ranks what it
            # found (the checkpoint to resume from) or that it failed, so that every process
            # stops alike instead of waiting for one that has given up.
            try:
                out.mkdir(parents=True, exist_ok=True)
                held.enter_context(run_lock(out))  # held until the run ends
                start = _open_run_folder(out, cfg, resume, log)
            except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the others
                failure = err
        if rank is not None:
            start = _from_rank_zero(start, failure)
        if failure is not None:
            raise failure
        with _stop_on_signals() as stop:
            if lead:
                for stale in out.glob("*.tmp"):  # left by a kill between a write and its rename
                    stale.unlink()
            return _run(cfg, out, device, rank, start, log if lead else None, stop)


@contextlib.contextmanager
def _process_group(cfg: RunConfig):
    """(device, rank): under torchrun, this process's device and rank in a process group made
    here (and destroyed on exit); otherwise ``cfg.device`` and None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    if world == 1 or dist.is_initialized():
        device = resolve_device(cfg.device)
        yield device, (dist.get_rank() if dist.is_initialized() else None)
        return
    if cfg.batch_size % world:
        raise SettingError("batch_size", f"{cfg.batch_size} must be a multiple of the {world} "
                           "data-parallel processes (each takes an equal share of a batch)")  # fmt: skip
    device = resolve_device(cfg.device)
    backend = "gloo"
    if device.type == "cuda":
        index, backend = gpu_placement(int(os.environ.get("LOCAL_RANK", "0")),
                                       int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                       torch.cuda.device_count())  # fmt: skip
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    # Rank 0 alone runs the initialisation stage (pretraining, UMAP, the mixture fit) while the
    # others wait in a collective: allow it more than NCCL's default 10 minutes.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=3))
    try:
        yield device, dist.get_rank()
    finally:
        dist.destroy_process_group()


def gpu_placement(local_rank: int, processes_per_machine: int, gpus: int) -> tuple[int, str]:
    """(GPU index, backend) of a data-parallel process: one GPU each talks NCCL; with more
    processes than GPUs they share them round-robin over gloo (NCCL refuses two ranks on one
    device)."""
    if gpus < 1:
        raise RuntimeError("--device cuda under torchrun, but this machine has no GPU")
    return local_rank % gpus, "nccl" if processes_per_machine <= gpus else "gloo"


def _run(cfg, out, device, rank, start, log, stop):
    train, test = load_data(cfg, device)
    _check_training_data(train, test, cfg)
    # The networks' initial weights are drawn from the global RNG: seed it first, or two runs
    # with the same seed start from different weights.
    pyro.set_rng_seed(cfg.seed)
    model, guide = build_model(cfg, train.x.shape[1], train.image_shape)
    trainer = Trainer(
        model, guide, estimator=cfg.estimator, optimizer=cfg.optimizer, lr=cfg.lr, clip_norm=cfg.clip_norm,
        kl_weight=cfg.kl_weight, free_bits=cfg.free_bits, num_particles=cfg.mc_samples, device=device,
        seed=cfg.seed, on_nan=cfg.on_nan, lr_decay=cfg.lr_decay, kl_warmup_epochs=cfg.kl_warmup_epochs,
        data_parallel=rank is not None,
    )  # fmt: skip
    lead = trainer.rank == 0  # rank 0 alone writes the run directory
    if log is not None:
        log(describe_plan(cfg, trainer, train, done_epochs=start["epoch"] if start else 0))
    elapsed = 0.0
    # CPU seconds of this process (all its threads), counted on from a checkpoint's.
    cpu0 = time.process_time() - (start or {}).get("cpu_s", 0.0)

    def checkpoint():
        state = trainer.state_dict()  # data-parallel: gathers every rank's random stream
        if lead:
            _save_checkpoint(out, state, time.perf_counter() - t0, cfg, time.process_time() - cpu0)

    def evaluate_row(epoch, train_loss):
        row = _evaluate(cfg, trainer, test, epoch, train_loss, time.perf_counter() - t0)
        row["rollbacks"] = trainer.rollbacks_total
        _append_row(out, row)
        return row

    t0 = time.perf_counter()
    if start is None:
        if lead:
            write_json({**resolved_config(cfg, model, guide, device), "versions": package_versions(),
                        "hardware": hardware(device), "data_dim": train.dim,
                        "image_shape": train.image_shape}, out / "config.json")  # fmt: skip
            (out / "metrics.jsonl").write_text("")
        if cfg.init != "none" or cfg.pretrain_epochs:
            # The stage runs once, on rank 0; the replicas receive its result with the data-parallel
            # wrapper's broadcast at the first step.
            if lead:
                report = initialise(model, guide, train.x, cfg.init, cfg.pretrain_epochs, seed=cfg.seed,
                                    augment_shape=train.image_shape if cfg.augment else None)  # fmt: skip
                # The initialised model is evaluated as epoch 0 and checkpointed, so a resume
                # continues after the stage instead of repeating it.
                row = _evaluate(cfg, trainer, test, 0, None, time.perf_counter() - t0)
                row.update(
                    init_s=report["init_s"], gmm_log_likelihood=report.get("gmm_log_likelihood")
                )
                _append_row(out, row)
            checkpoint()
    else:
        trainer.load_state_dict(_trainer_state(start))
        elapsed = start["elapsed"]
        t0 -= elapsed
        if lead:
            _truncate_metrics(out, trainer.step_count)
            # Settings a resume may change (epochs, out, ...) are the run's settings from now on;
            # a later load_config or --resume must not see the old ones.
            path = out / "config.json"
            saved = json.loads(path.read_text()) if path.exists() else {}
            saved.setdefault("versions", package_versions())
            saved.setdefault("hardware", hardware(device))
            write_json({**saved, **resolved_config(cfg, model, guide, device)}, path)

    last = (read_metrics(out) or [{}])[-1] if lead else {}
    try:
        stop["armed"] = True
        # The data were checked once above; per-step checks would read back from the device.
        with data_checks(False):
            last = trainer.fit(
                train.x, cfg.epochs, cfg.batch_size, binarize=cfg.binarize, eval_every=cfg.eval_every,
                evaluate=evaluate_row, checkpoint=checkpoint, stop=lambda: stop["stop"],
                progress=cfg.progress and lead, desc=f"{cfg.model} K={cfg.k}",
            ) or last  # fmt: skip
    except TrainingInterrupted:
        raise RunInterrupted(out) from None
    finally:
        stop["armed"] = False

    trainer.model.eval(), trainer.guide.eval()
    if not lead:
        return RunResult(
            last, model_=trainer.model, guide_=trainer.guide, test_=test, rank_=trainer.rank
        )
    summary = dict(last)
    if cfg.iw_samples:
        with _evaluation_rng(cfg, device):
            summary["test_iw_bound"] = iw_log_likelihood(
                trainer.model, trainer.guide, test.x, cfg.iw_samples
            )
    summary.update(wall_time_s=time.perf_counter() - t0, cpu_time_s=time.process_time() - cpu0,
                   run_dir=str(out), hardware=hardware(device),
                   model=cfg.model, k=cfg.k, seed=cfg.seed, dataset=cfg.dataset,
                   rollbacks=trainer.rollbacks_total, complete=True,
                   processes=trainer.world_size)  # fmt: skip
    write_json(summary, out / "summary.json")
    return RunResult(summary, model_=trainer.model, guide_=trainer.guide, test_=test, rank_=0)


def _trainer_state(checkpoint: dict) -> dict:
    """The trainer's state in a checkpoint; older checkpoints kept the data position beside it."""
    state = dict(checkpoint["trainer"])
    if "position" not in state:
        blank = {"batch": 0, "epoch_start": None, "loss_sum": 0.0, "n": 0}
        state["position"] = checkpoint.get("position", {**blank, "epoch": checkpoint["epoch"]})
        state["batches"] = checkpoint["batches"]
    return state


def _append_row(out: Path, row: dict) -> None:
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def resolved_config(cfg: RunConfig, model, guide, device) -> dict:
    """Every setting with its default resolved (what the run actually used), and the threads."""
    values = cfg.to_dict()
    if getattr(guide, "name", None) and values["guide"] is None:
        values["guide"] = guide.name
    values["likelihood"] = model.likelihood
    values["device"] = str(device)
    if cfg.model == "gmvae_w":
        values["hidden"] = values["hidden"] or model.hidden
        values["latent_dim"] = values["latent_dim"] or model.x_dim
        values["w_dim"] = values["w_dim"] or model.w_dim
    else:
        values["hidden"] = values["hidden"] or list(model.hidden)
        values["latent_dim"] = values["latent_dim"] or model.z_dim
    values["threads"] = torch.get_num_threads()
    return values


# Seconds per training point of UMAP on 10-d codes, measured on the 2-core CPU of
# benchmarks/README.md (55k MNIST codes: 222 s, one thread, the other core busy).
UMAP_S_PER_POINT = 4e-3


def describe_plan(cfg: RunConfig, trainer, train, done_epochs=0) -> str:
    """One line: the device and threads, and how long the run should take on them.

    The estimate times two SVI steps (and two pretraining batches) on this machine without
    changing any state: parameters, gradients, estimator state and RNG streams are restored.
    """
    x = train.x[: cfg.batch_size // trainer.world_size]
    # The trainer's param store, and its random stream left where it was; the estimator's state
    # (graph's baseline) restored after.
    with trainer.context(advance=False), trainer.model.shared_pass():
        state = trainer.estimator.state_dict()
        xb = torch.bernoulli(x) if cfg.binarize == "dynamic" else x
        step_s = _time(
            lambda: trainer.estimator.loss_and_grads(trainer.model_fn, trainer.guide_fn, xb)
        )
        pre_s = 0.0
        if cfg.pretrain_epochs and hasattr(trainer.guide, "encode"):
            pre_s = _time(lambda: autoencoder_loss(trainer.model, trainer.guide, x).backward())
        trainer.estimator.load_state_dict(state)
    trainer.optimizer.zero_grad(set_to_none=True)
    steps = len(train) // cfg.batch_size
    stages = []
    if done_epochs == 0 and cfg.pretrain_epochs:
        # Pretraining batches are 256 points, and its AE loss is timed on batch_size points.
        stages.append(("pretraining", cfg.pretrain_epochs * len(train) / cfg.batch_size * pre_s))
    if done_epochs == 0 and cfg.init == "umap":
        stages.append(("UMAP", UMAP_S_PER_POINT * len(train)))
    epochs = cfg.epochs - done_epochs
    stages.append((f"{epochs} epochs", epochs * steps * step_s))
    total = sum(s for _, s in stages)
    parts = ", ".join(f"{name} {_minutes(s)}" for name, s in stages)
    return (
        f"{trainer.device} with {torch.get_num_threads()} threads: about {_minutes(total)} "
        f"({parts}; evaluations extra)"
    )


def _time(fn, repeats=2, warmup=3) -> float:
    # Warm-up: lazy initialisation, the allocator, and enum-jit's compilation and first
    # (profiling) runs of the compiled graph.
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _save_checkpoint(out: Path, state: dict, elapsed: float, cfg: RunConfig, cpu_s: float):
    """Write the exact state atomically; the checkpoint it replaces is kept as the previous one,
    to fall back to if the newest is ever unreadable."""
    atomic_save(
        {"trainer": state, "epoch": state["position"]["epoch"], "elapsed": elapsed, "cpu_s": cpu_s,
         "config": cfg.to_dict()},
        out / CHECKPOINT, previous=out / PREVIOUS,
    )  # fmt: skip


def _check_training_data(train, test, cfg: RunConfig) -> None:
    """One clear error for data this run cannot use, checked once over the whole set."""
    for split in (train, test):
        if not torch.isfinite(split.x).all():
            raise ValueError(f"{cfg.dataset}: the data contain NaN or infinite values")
    if cfg.binarize == "dynamic" and (train.x.min() < 0 or train.x.max() > 1):
        raise ValueError(f"{cfg.dataset}: dynamic binarisation needs grey levels in [0, 1]")
    if len(train) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(train)} training points")


@contextlib.contextmanager
def _evaluation_rng(cfg: RunConfig, device):
    """Evaluation draws from its own stream, the same at every evaluation (common random
    numbers across epochs), and leaves training's stream as it found it: the training run does
    not depend on when, or on how much data, it is evaluated."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        yield


def _evaluate(cfg, trainer, test, epoch, train_loss, time_s) -> dict:
    with _evaluation_rng(cfg, trainer.device):
        report = evaluate(trainer.model, trainer.guide, test.x, test.labels, cfg.eval_batch_size)
    row = {"epoch": epoch, "step": trainer.step_count, "time_s": time_s, "train_loss": train_loss}
    row.update(report)
    row["kl_weight"] = trainer.kl_weight
    return row


PREVIOUS = "checkpoint.prev.pt"


def _checkpoints(out: Path) -> list[Path]:
    """The run's checkpoints that exist, newest first."""
    return [p for p in (out / CHECKPOINT, out / PREVIOUS) if p.exists()]


def _read_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint's contents, or CorruptCheckpointError naming the file and what is wrong."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(state, dict) or not {"trainer", "config", "epoch"} <= set(state):
            raise ValueError("it lacks the trainer, config or epoch entry")
        return state
    except Exception as err:  # noqa: BLE001 - truncated zip, unpickling error, wrong content
        raise CorruptCheckpointError(f"{path} is unreadable ({type(err).__name__}: "
                                     f"{' '.join(str(err).split())[:200]})") from None  # fmt: skip


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupt or not a checkpoint."""


def _open_run_folder(out: Path, cfg: RunConfig, resume: bool, log=None) -> dict | None:
    """The checkpoint to resume from, or None to start afresh; raises what forbids the run."""
    if resume:
        return _load_checkpoint(out, cfg, log)
    if _checkpoints(out):
        raise FileExistsError(
            f"{out} already holds a run; pass resume=True (--resume) or another --out"
        )
    return None


class OtherRankError(RuntimeError):
    """On a data-parallel process: rank 0 could not open the run; the message is its error."""


def _from_rank_zero(value, failure: BaseException | None):
    """Rank 0's ``value`` on every process of the group (pickled; tensors on the CPU). Where
    rank 0 has a ``failure``, the other processes raise :class:`OtherRankError` naming it (the
    error itself is sent as text: not every exception survives pickling)."""
    if failure is None:
        box = [("ok", value)]
    else:
        box = [("failed", f"{type(failure).__name__}: {failure}")]
    torch.distributed.broadcast_object_list(box, src=0)
    if failure is None and box[0][0] == "failed":
        raise OtherRankError(f"rank 0 stopped: {box[0][1]}")
    return box[0][1]


def _load_checkpoint(out: Path, cfg: RunConfig, log=None) -> dict | None:
    """The newest readable checkpoint (falling back to the previous one, and saying so), or None
    for a run that stopped before its first checkpoint (it then starts over)."""
    paths = _checkpoints(out)
    if not paths:
        if (out / "config.json").exists():
            return None
        raise FileNotFoundError(f"--resume: no run in {out} (no checkpoint, no config.json)")
    state, errors = None, []
    for path in paths:
        try:
            state = _read_checkpoint(path)
            break
        except CorruptCheckpointError as err:
            errors.append(str(err))
    if state is None:
        raise CorruptCheckpointError("; ".join(errors) + "; no checkpoint is left to resume from")
    if errors:
        message = f"{errors[0]}; resuming from the previous checkpoint (epoch {state['epoch']})"
        warnings.warn(message, stacklevel=3)
        if log is not None:
            log(message)
    changed = changed_settings(state["config"], cfg)
    if changed:
        raise ValueError(f"--resume: settings differ from the checkpointed run: {changed}")
    if cfg.epochs < state["epoch"]:
        raise ValueError(
            f"--resume: --epochs {cfg.epochs} is fewer than the {state['epoch']} epochs this run "
            "has done; pass at least that many"
        )
    return state


# Estimators that compute the same objective and gradient (one compiled): a resume may switch.
SAME_OBJECTIVE = {"enum-jit": "enum"}


def changed_settings(saved: dict, cfg: RunConfig) -> list[str]:
    """The settings of ``cfg`` that differ from a run's ``saved`` ones and may not change on
    resume (all but :data:`RESUMABLE_CHANGES`), sorted."""
    now = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES}
    # None is "the default" for these, which config.json records resolved: compare explicit ones.
    resolved = ("guide", "likelihood", "hidden", "latent_dim", "w_dim")

    def same(k):
        a, b = saved.get(k), now[k]
        if k == "estimator":
            a, b = SAME_OBJECTIVE.get(a, a), SAME_OBJECTIVE.get(b, b)
        return a == b or (k in resolved and None in (a, b))

    return sorted(k for k in now if not same(k))


def _truncate_metrics(out: Path, step: int) -> None:
    """Drop evaluations written after the checkpoint (a run killed between the two writes)."""
    path, rows = out / "metrics.jsonl", []
    for line in (path.read_text() if path.exists() else "").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by the kill: the last one, written after the checkpoint
        if row["step"] <= step:
            rows.append(row)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "metrics.jsonl")


def load_config(run_dir) -> RunConfig:
    """The run's settings, from its config.json (or, if that is unreadable, its checkpoint)."""
    path = Path(run_dir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        paths = _checkpoints(Path(run_dir))
        if not paths:
            raise CorruptCheckpointError(f"{path} is unreadable ({err}) and no checkpoint holds "
                                         "the settings") from None  # fmt: skip
        saved = _read_checkpoint(paths[0])["config"]
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in saved.items() if k in fields})


def run_status(run_dir) -> dict:
    """How far a run got: ``{"epoch": done, "epochs": asked, "complete": bool}``."""
    run_dir = Path(run_dir)
    paths = _checkpoints(run_dir)
    if not paths:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    cfg = load_config(run_dir)
    state = _read_checkpoint(paths[0])
    position = _trainer_state(state)["position"]
    complete = (run_dir / "summary.json").exists() and state["epoch"] >= cfg.epochs
    return {
        "epoch": state["epoch"],
        "epochs": cfg.epochs,
        "complete": complete and not position["batch"],
    }


class IncompleteRunWarning(UserWarning):
    """load_run was given a run that has not finished its epochs."""


def load_run(run_dir, device="cpu"):
    """The trained model and guide of a run directory, in eval mode, ready for ``cluster_probs``.

    A run that has not finished gives its latest checkpoint with an
    :class:`IncompleteRunWarning` naming the epoch (:func:`run_status` tells without loading).
    """
    run_dir = Path(run_dir)
    device = resolve_device(device)
    paths = _checkpoints(run_dir)
    if not paths:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    cfg = load_config(run_dir)
    state = _read_checkpoint(paths[0], map_location=device)
    status = run_status(run_dir)
    if not status["complete"]:
        warnings.warn(
            f"{run_dir} is incomplete: the model of epoch {status['epoch']} of {status['epochs']}",
            IncompleteRunWarning,
            stacklevel=2,
        )
    data_dim, image_shape = _data_shape(cfg, run_dir)
    model, guide = build_model(cfg, data_dim, image_shape)
    model.load_state_dict(state["trainer"]["model"])
    guide.load_state_dict(state["trainer"]["guide"])
    model.to(device).eval(), guide.to(device).eval()
    return model, guide


def _data_shape(cfg: RunConfig, run_dir=None):
    shapes = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "svhn": (3, 32, 32)}
    if cfg.dataset == "arcs":
        return 2, None
    if is_user_data(cfg.dataset):  # recorded in config.json by the run
        saved = json.loads((Path(run_dir) / "config.json").read_text())
        shape = saved.get("image_shape")
        return saved["data_dim"], tuple(shape) if shape else None
    shape = shapes[cfg.dataset]
    return shape[0] * shape[1] * shape[2], shape
