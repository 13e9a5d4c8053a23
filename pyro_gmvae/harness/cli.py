"""The command line: ``pyro-gmvae train`` (the main job) and ``pyro-gmvae predict``.

``pyro-gmvae train [flags]`` (also ``python examples/mnist_unsup.py [flags]``) trains a mixture
VAE, evaluates it and draws its figures. With no flags it runs the default recipe, ``vade-umap``:
VaDE's model and guide on MNIST, K = 10, initialised N2D's way (a UMAP embedding of the images
becomes the latent space, a GaussianMixture there the prior), then the ELBO with the cluster
summed out exactly (TraceEnum_ELBO). ``--recipe shu`` and ``--recipe dilokthanakul`` are the
sources' own configurations. It leaves a run directory::

    runs/mnist-gmvae-k10-seed0/
        config.json        every setting (defaults resolved), threads, package versions, hardware
        metrics.jsonl      one line per evaluation: accuracies, NMI, ARI, H(Y|X), test ELBO, ...
        checkpoint.pt      model, guide, optimiser and RNG state (--resume continues from it)
        summary.json       the final test metrics and the wall time
        curves.png         accuracy, H(Y|X) and the variational loss against epoch (Shu's panels)
        samples.png        one row of samples per cluster (Dilokthanakul et al., Fig. 5a)
        traversal.png      the continuous latent moved along a line, per cluster (Fig. 5b)
        reconstructions.png  test images and their reconstructions at the most probable cluster
        confusion.png      clusters against true labels on the test set (labelled data)

``--dataset`` takes a named dataset or your own data: a ``.npy``/``.npz`` array file or a folder
of PNG/JPEG images (``pyro_gmvae.harness.data.load_user_data``); own data are evaluated on themselves,
and metrics that need labels are left out when there are none.

``pyro-gmvae predict RUN_DIR INPUT --out FILE`` writes, for every item of INPUT (a named
dataset's test split, an array file or an image folder), its cluster, the cluster probabilities
and the posterior mean of the continuous latent, as CSV or ``.npy``.

Every error in the flags is reported in one line, before any training.
"""

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path

import torch

from pyro_gmvae.guides import GuideError
from pyro_gmvae.harness.data import (
    DatasetNotFoundError,
    is_user_data,
    load_dataset,
    load_user_data,
)
from pyro_gmvae.harness.run import (
    CHECKPOINT,
    DATA,
    DEFAULT_RECIPE,
    RECIPES,
    RESUMABLE_CHANGES,
    RUN,
    CorruptCheckpointError,
    OtherRankError,
    RunConfig,
    RunInterrupted,
    RunLockedError,
    SettingError,
    build_model,
    changed_settings,
    load_config,
    load_run,
    read_metrics,
    run,
    run_lock,
    run_status,
    setting_choices,
    setting_kind,
)
from pyro_gmvae.train import (
    NonFiniteLossError,
    Trainer,
    resolve_device,
)

DEFAULTS = RunConfig()
FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
# Settings that differ from RunConfig's defaults for one model or dataset; a flag overrides them.
MODEL_DEFAULTS = {"gmvae_w": RECIPES["dilokthanakul"]}
DATASET_DEFAULTS = {"arcs": {"binarize": "none"}}  # real-valued 2-D points
IMAGE_SHAPES = {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "svhn": (3, 32, 32)}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block), so it is read, not scrolled past."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def widths(text):
    """ "512" -> 512; "500,500,2000" -> [500, 500, 2000]."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"widths must be >= 1, got {text}")
    return values[0] if len(values) == 1 else values


def float_in(low, strict=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value

    return parse


def flag(field: str) -> str:
    """The command-line flag of a RunConfig field."""
    return FIELDS[field].metadata.get("flag") or "--" + field.replace("_", "-")


def _argument(f: dataclasses.Field) -> dict:
    """argparse keywords for a RunConfig field, from its :func:`~pyro_gmvae.harness.run.setting`."""
    m, kind, choices = f.metadata, setting_kind(f), setting_choices(f)
    default = (
        ""
        if f.default is None or kind is bool
        else f" (default {f.default:g})"
        if kind is float
        else f" (default {f.default})"
    )
    if "default" in m["help"]:
        default = ""
    if kind is bool:
        if (m.get("flag") or "").startswith("--no-"):  # on by default: the flag turns it off
            return dict(dest=f.name, action="store_false", default=None, help="no " + m["help"])
        return dict(action=argparse.BooleanOptionalAction, help=m["help"])
    if choices is not None:
        return dict(choices=sorted(choices), help=m["help"] + default)
    if m.get("widths"):
        return dict(type=widths, help=m["help"])
    if kind is int:
        return dict(type=int_at_least(m.get("minimum") or 0), help=m["help"] + default)
    if kind is float:
        low = m["above"] if m.get("above") is not None else m.get("minimum")
        parse = float_in(low, strict=m.get("above") is not None) if low is not None else float
        return dict(type=parse, help=m["help"] + default)
    return dict(help=m["help"] + default)


def build_parser(prog="mnist_unsup.py") -> argparse.ArgumentParser:
    """The main job's flags, one per RunConfig field (generated from its ``setting``), plus
    ``--resume`` and ``--no-download``. Every flag defaults to None: a value is set only where
    the user gave one, so recipe and model defaults and ``--resume`` can tell given flags from
    defaults."""
    p = OneLineParser(
        prog=prog,
        description="Deep unsupervised clustering of MNIST with mixture VAEs (Pyro). The defaults "
        "shown are the plain settings'; a recipe sets its own.",
        epilog=f"Without --recipe or --model the recipe is {DEFAULT_RECIPE}. Run directory "
        "contents and examples: see the module docstring (README).",
    )
    groups = {}
    for f in dataclasses.fields(RunConfig):
        group = groups.get(f.metadata["group"]) or p.add_argument_group(f.metadata["group"])
        groups[f.metadata["group"]] = group
        names = [flag(f.name)] + (["-k"] if f.name == "k" else [])
        group.add_argument(*names, **{"dest": f.name, **_argument(f)})
    groups[DATA].add_argument(
        "--no-download", dest="download", action="store_false",
        help="never download: a missing dataset is an error (by default torchvision downloads "
        "a missing named dataset into the data root)",
    )  # fmt: skip
    groups[RUN].add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its checkpoint; only --epochs, --device, "
        "--data-dir and --no-progress may change",
    )  # fmt: skip
    return p


def default_out(values: dict) -> str:
    name = Path(values["dataset"]).stem if is_user_data(values["dataset"]) else values["dataset"]
    return f"runs/{name}-{values['model']}-k{values['k']}-seed{values['seed']}"


def user_data_defaults(path, parser) -> dict:
    """Own data outside [0, 1] cannot be binarised: they get a Gaussian likelihood."""
    data = read_user_data(path, parser)
    inside = bool(((data.x >= 0) & (data.x <= 1)).all())
    return {} if inside else {"binarize": "none", "likelihood": "gaussian"}


def read_user_data(path, parser, limit=None):
    try:
        return load_user_data(path, limit=limit)
    except (ValueError, DatasetNotFoundError) as err:
        parser.error(f"argument --dataset: {one_line(err)}")


def make_config(args, parser) -> RunConfig:
    """The run's settings: given flags over model/dataset defaults over RunConfig's, or, with
    --resume, given flags over the saved run's settings."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if not args.resume and "recipe" not in given and "model" not in given:
        given["recipe"] = DEFAULT_RECIPE
    recipe = RECIPES.get(given.get("recipe"), {})
    base = {k: given.get(k, recipe.get(k, getattr(DEFAULTS, k)))
            for k in ("model", "dataset", "k", "seed")}  # fmt: skip
    out = Path(given.get("out") or default_out(base))
    given["out"] = str(out)
    if (out / ".lock").exists():
        try:  # a run still writing there is the first thing to say
            with run_lock(out):
                pass
        except RunLockedError as err:
            sys.exit(f"{parser.prog}: {err}")
    if args.resume:
        if not (out / "config.json").exists() and not (out / CHECKPOINT).exists():
            parser.error(f"argument --resume: no run in {out} (pass the run's --out, "
                         "or start it without --resume)")  # fmt: skip
        try:
            saved = load_config(out)
        except CorruptCheckpointError as err:
            parser.error(f"argument --resume: {err}")
        changed = changed_settings(saved.to_dict(), dataclasses.replace(saved, **given))
        if changed:
            was = ", ".join(f"{flag(k)} {getattr(saved, k)!r} -> {given[k]!r}" for k in changed)
            allowed = ", ".join(flag(k) for k in RESUMABLE_CHANGES)
            parser.error(f"argument --resume: a resumed run keeps its settings ({was}); "
                         f"only {allowed} may change")  # fmt: skip
        done = done_epochs(out)
        if given.get("epochs", saved.epochs) < done:
            parser.error(f"argument --epochs: {given['epochs']} is fewer than the {done} epochs "
                         f"the run in {out} has done")  # fmt: skip
        return dataclasses.replace(saved, **given)
    if (out / CHECKPOINT).exists():
        parser.error(f"argument --out: {out} already holds a run; pass --resume to continue it, "
                     "or another --out")  # fmt: skip
    values = recipe or MODEL_DEFAULTS.get(base["model"], {})
    if is_user_data(base["dataset"]):
        values = {**values, **user_data_defaults(base["dataset"], parser)}
    values = {**values, **DATASET_DEFAULTS.get(base["dataset"], {})}
    return RunConfig(**{**values, **given})


def done_epochs(out: Path) -> int:
    """The epochs the run in ``out`` has checkpointed (0 if none, or unreadable: run() decides)."""
    try:
        return run_status(out)["epoch"]
    except (FileNotFoundError, CorruptCheckpointError):
        return 0


def check_config(cfg: RunConfig, parser, download=True):
    """Every check that can fail before training, each as a one-line error naming the flag.
    Returns the device and the raw test split (None for arcs)."""
    try:
        cfg.validate()
    except SettingError as err:
        parser.error(f"argument {flag(err.field)}: {one_line(err.message)}")
    try:
        device = resolve_device(cfg.device)
    except (ValueError, RuntimeError) as err:
        parser.error(f"argument --device: {err}")
    if is_user_data(cfg.dataset):
        data = read_user_data(cfg.dataset, parser, cfg.limit)
        dry_run(cfg, parser, data.dim, data.image_shape)
        return device, None
    dry_run(cfg, parser)
    if cfg.dataset == "arcs":
        return device, None
    try:
        test = load_dataset(cfg.dataset, train=False, data_dir=cfg.data_dir, download=download)
    except DatasetNotFoundError as err:
        parser.error(f"argument --data-dir: {data_message(err)}")
    return device, test


def dry_run(cfg: RunConfig, parser, data_dim=None, shape=None) -> None:
    """Build the model, guide and trainer on the CPU and compute the loss of one fake batch of
    two points: a guide or estimator that does not fit the model (or the KL weight / free bits)
    fails here, in one line, instead of after the data are loaded."""
    if data_dim is None:
        shape = IMAGE_SHAPES.get(cfg.dataset)
        data_dim = math.prod(shape) if shape else 2
    # fork_rng: the throwaway weights and draws must not consume the run's random stream.
    with torch.random.fork_rng(devices=[]):
        try:
            model, guide = build_model(cfg, data_dim, shape)
        except GuideError as err:
            parser.error(f"argument --guide: {one_line(err)}")
        except ValueError as err:
            parser.error(f"argument --model: {one_line(err)}")
        fake = torch.rand(2, data_dim)
        if model.likelihood == "bernoulli":
            fake = torch.bernoulli(fake)
        try:
            trainer = Trainer(
                model, guide, estimator=cfg.estimator, optimizer=cfg.optimizer, lr=cfg.lr,
                clip_norm=cfg.clip_norm, free_bits=cfg.free_bits, num_particles=cfg.mc_samples,
                kl_weight=cfg.kl_weight, kl_warmup_epochs=cfg.kl_warmup_epochs, lr_decay=cfg.lr_decay,
                device="cpu", seed=cfg.seed, on_nan=cfg.on_nan,
            )  # fmt: skip
            trainer.loss(fake)
        except ValueError as err:
            parser.error(f"argument --elbo: {one_line(err)}")


def one_line(err) -> str:
    # Pyro appends the trace's shape table to errors raised inside a model or guide.
    return " ".join(re.split(r"\n\s*Trace Shapes:", str(err))[0].split())


def data_message(err) -> str:
    text = " ".join(str(err).split())
    what = text.split(" Provide it")[0]
    return (f"{what} Point --data-dir or $PYRO_GMVAE_DATA at a folder that holds it, or pass "
            "run without --no-download on a machine with internet access.")  # fmt: skip


def format_duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{seconds:.1f}s"


def format_summary(summary: dict, cfg: RunConfig, figures: dict) -> str:
    k = cfg.k
    split = "its own data" if is_user_data(cfg.dataset) else "test set"
    if "acc_hungarian" in summary:
        scores = [
            f"accuracy   Hungarian {summary['acc_hungarian']:.4f}   majority "
            f"{summary['acc_majority']:.4f}   AAE {summary['acc_aae']:.4f}",
            f"NMI {summary['nmi']:.4f}   ARI {summary['ari']:.4f}   ",
        ]
    else:
        scores = ["no labels: accuracy, NMI, ARI and the confusion matrix are left out", ""]
    lines = [
        f"== {cfg.model}, K = {k}, on {cfg.dataset} ({split}), epoch {summary.get('epoch')}"
        f"/{cfg.epochs}, seed {cfg.seed} ==",
        scores[0],
        f"{scores[1]}H(Y|X) {summary['cond_entropy']:.4f}"
        f" nats (log K = {math.log(k):.4f})   clusters used {summary.get('clusters_used', '?')}/{k}",
        f"test ELBO {summary['test_elbo']:.2f} nats/point"
        + (
            f"   IW bound (S = {cfg.iw_samples}) {summary['test_iw_bound']:.2f}"
            if "test_iw_bound" in summary
            else ""
        ),  # fmt: skip
        f"wall time {format_duration(summary['wall_time_s'])}",
        f"run directory {cfg.out}: config.json metrics.jsonl checkpoint.pt summary.json "
        + " ".join(Path(p).name for p in figures.values()),
    ]
    return "\n".join(lines)


def main(argv=None, prog="mnist_unsup.py") -> dict:
    """The main job: train, evaluate, draw the figures (``pyro-gmvae train``)."""
    parser = build_parser(prog)
    again = f"python {sys.argv[0]}" if prog.endswith(".py") else prog
    args = parser.parse_args(argv)
    cfg = make_config(args, parser)
    device, test = check_config(cfg, parser, download=args.download)
    try:
        recipe = f"recipe {cfg.recipe}" if cfg.recipe else f"model {cfg.model}"
        summary = run(cfg, resume=args.resume,
                      log=lambda line: print(f"{recipe} on {line}", flush=True))  # fmt: skip
    except DatasetNotFoundError as err:  # e.g. a training split missing beside the test split
        parser.error(f"argument --data-dir: {data_message(err)}")
    except SettingError as err:  # e.g. under torchrun, a batch the processes cannot share
        parser.error(f"argument {flag(err.field)}: {one_line(err.message)}")
    except NonFiniteLossError as err:
        sys.exit(f"{parser.prog}: training stopped: {err}")
    except (RunLockedError, CorruptCheckpointError, OtherRankError) as err:
        sys.exit(f"{parser.prog}: {err}")
    except RunInterrupted:
        sys.exit(f"\ninterrupted; the exact state is saved. Continue with: "
                 f"{again} --resume --out {cfg.out}")  # fmt: skip
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted; continue from the last checkpoint (or start over, if there is "
                 f"none yet) with: {again} --resume --out {cfg.out}")  # fmt: skip
    if summary.rank_:  # a data-parallel replica: rank 0 draws and reports
        return summary
    # matplotlib and torchvision: only once needed
    from pyro_gmvae.harness.plots import make_figures

    model, guide, test = summary.model_, summary.guide_, summary.test_
    figures = make_figures(cfg.out, model, guide, test.x, test.labels, test.image_shape,
                           rows=read_metrics(cfg.out), seed=cfg.seed)  # fmt: skip
    print(format_summary(summary, cfg, figures), flush=True)
    return summary


def predict_main(argv=None, prog="pyro-gmvae predict") -> int:
    """``pyro-gmvae predict RUN_DIR INPUT --out FILE``: cluster new data with a trained run."""
    import numpy as np

    from pyro_gmvae.evaluate import cluster_probs
    from pyro_gmvae.harness.plots import latent_means

    parser = OneLineParser(prog=prog, description="Cluster new data with a trained run.")
    parser.add_argument("run_dir", help="a run directory (pyro-gmvae train --out)")
    parser.add_argument("input", help="a named dataset (its test split), a .npy/.npz file or a "
                        "folder of PNG/JPEG images")  # fmt: skip
    parser.add_argument("--out", required=True, help="output file: .csv or .npy")
    parser.add_argument("--data-dir", help="data root for a named dataset")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".csv", ".npy"):
        parser.error(f"argument --out: write a .csv or .npy file, got {out.name!r}")
    try:
        model, guide = load_run(args.run_dir, device=args.device)
    except (FileNotFoundError, CorruptCheckpointError, ValueError) as err:
        parser.error(f"argument run_dir: {one_line(err)}")
    if is_user_data(args.input):
        x = read_user_data(args.input, parser).x
    else:
        try:
            x = load_dataset(args.input, train=False, data_dir=args.data_dir, download=False).x
        except (ValueError, DatasetNotFoundError) as err:
            parser.error(f"argument input: {data_message(err)}")
    try:
        probs = cluster_probs(guide, x)
    except (ValueError, TypeError) as err:
        parser.error(f"argument input: {one_line(err)} (the run was trained on "
                     f"{model.data_dim} features)")  # fmt: skip
    clusters = probs.argmax(-1)
    latents = latent_means(guide, model.prepare(x), clusters)
    table = torch.cat([clusters[:, None].to(probs), probs, latents], 1).cpu().numpy()
    k, d = probs.shape[1], latents.shape[1]
    header = ["cluster", *(f"p{j}" for j in range(k)), *(f"z{j}" for j in range(d))]
    if out.suffix == ".csv":
        fmt = ["%d"] + ["%.6g"] * (k + d)
        np.savetxt(out, table, fmt=fmt, delimiter=",", header=",".join(header), comments="")
    else:
        np.save(out, table)
    print(f"{len(table)} rows ({', '.join(header[:2])}..{header[k]}, {header[k + 1]}..) "
          f"written to {out}")  # fmt: skip
    return 0


def console_main(argv=None) -> None:
    """The ``pyro-gmvae`` command: ``train`` (the main job's flags) or ``predict``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"train": main, "predict": predict_main}
    if not argv or argv[0] not in commands:
        sys.exit("usage: pyro-gmvae {train,predict} ... (pyro-gmvae train --help, "
                 "pyro-gmvae predict --help)")  # fmt: skip
    commands[argv[0]](argv[1:], prog=f"pyro-gmvae {argv[0]}")


if __name__ == "__main__":
    main()
