"""How the discrete cluster is handled: eight gradient estimators on the same models.

Every mixture VAE here has a discrete cluster y. The default estimator, ``enum``, sums it out
exactly (K decoder passes per point); the others sample it (``score``: REINFORCE, Williams 1992;
``graph``: with a baseline and Rao-Blackwellisation, Schulman et al. 2015), relax it
(``relaxed``: Gumbel-softmax / Concrete, Jang et al. 2017, Maddison et al. 2017), or change the
bound (``iwae-enum``: importance weighted with y summed, Burda et al. 2016; ``rws``: reweighted
wake-sleep, Bornschein & Bengio 2015; ``tmc``: tensor Monte Carlo, Aitchison 2019). See
:mod:`pyro_gmvae.estimators` for what each estimates and refuses.

The script does two things for every (model, estimator) pair that the estimator accepts:

1. trains it with several seeds through :func:`pyro_gmvae.harness.run.run` (one run directory each, so an
   interrupted comparison resumes), the same networks, learning rate and data for all;
2. at the parameters of the first seed's ``enum`` run, draws the cluster encoder's gradient
   (q(y|x), or gmvae_w's p(c|x,w)) ``--grad-draws`` times from each estimator on one fixed batch:
   its signal-to-noise ratio, its agreement with the exact (``enum``) gradient, and its cost.

Outputs in ``--out``: ``curves.png`` (Hungarian accuracy, H(Y|X) and test −ELBO against epoch,
and test −ELBO against wall-clock time), ``results.md`` (final metrics, mean ± std over seeds,
then the gradient table), ``results.json``. The test −ELBO is always the discrete ELBO with y
summed exactly (``pyro_gmvae.evaluate``), so all rows are comparable; a relaxed run's guide
enumerates its y in eval mode.

Example (a reduced CPU budget)::

    python examples/compare_elbos.py --models gmvae --limit 5000 --epochs 3 --seeds 0 1 \\
        --test-limit 1000 --out runs/compare_elbos
"""

import argparse
import math
import time
from pathlib import Path

import matplotlib

from pyro_gmvae.harness.compare import (
    comparison_curves,
    markdown_table,
    read_summary,
    run_line,
    run_many,
    write_results,
)
from pyro_gmvae.harness.plots import plot_comparison

MODELS = ("m2", "modified_m2", "gmvae", "gmvae_w")
ESTIMATORS = ("enum", "enum-jit", "score", "graph", "relaxed", "tmc", "iwae-enum", "rws")
# Importance-sampling estimators: --samples is their S; the others average --particles ELBO draws.
IMPORTANCE = ("tmc", "iwae-enum", "rws")
TABLE = (
    ("acc_hungarian", "acc. Hungarian (%)", 100),
    ("nmi", "NMI", 1),
    ("cond_entropy", r"H(Y\|X) (nats)", 1),  # the pipe escaped for markdown
    ("neg_test_elbo", "test −ELBO (nats)", 1),
    ("neg_test_iw_bound", "test −log p̂ (nats)", 1),
    ("wall_time_s", "wall time (s)", 1),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gmvae", "gmvae_w"], choices=MODELS)
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--samples", type=int, default=5, help="S of tmc, iwae-enum and rws (>= 2)")
    p.add_argument("--particles", type=int, default=1, help="M of the ELBO estimators")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=1,
                   help="runs at once, one thread each (up to the cores; several per GPU)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N training images (None: all)")
    p.add_argument(
        "--test-limit", type=int, default=None, help="evaluate on the first N test images"
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hidden", type=int, default=None, help="hidden width (default: the model's)")
    p.add_argument(
        "--latent-dim", type=int, default=None, help="z (x for gmvae_w); default: the model's"
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--iw-samples", type=int, default=0, help="S of the final test IW bound (0: skip)"
    )
    p.add_argument(
        "--grad-draws", type=int, default=50, help="gradient draws per estimator (0: skip)"
    )
    p.add_argument(
        "--grad-warmup",
        type=int,
        default=30,
        help="draws run first and discarded: jit compilation, graph's baseline average",
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/compare_elbos")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    args = p.parse_args(argv)
    if args.samples < 2 or args.particles < 1:
        p.error("--samples must be >= 2 (rws) and --particles >= 1")
    if args.grad_draws < 0 or args.grad_warmup < 0:
        p.error("--grad-draws and --grad-warmup must be >= 0")
    return args


def guide_for(model_name, estimator):
    """The guide each estimator trains: the relaxed one for ``relaxed``, else the model's own."""
    return "relaxed" if estimator == "relaxed" else None


def num_particles(args, estimator):
    return args.samples if estimator in IMPORTANCE else args.particles


def config(args, model, estimator, seed, out):
    from pyro_gmvae.harness.run import RunConfig

    return RunConfig(
        model=model, guide=guide_for(model, estimator), estimator=estimator, k=args.k,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, hidden=args.hidden,
        latent_dim=args.latent_dim, mc_samples=num_particles(args, estimator), dataset=args.dataset,
        data_dir=args.data_dir, limit=args.limit, test_limit=args.test_limit, device=args.device,
        seed=seed, out=str(out), iw_samples=args.iw_samples, progress=args.progress,
        binarize="none" if args.dataset == "arcs" else "dynamic",
    )  # fmt: skip


def refusal(args, model, estimator):
    """Why ``estimator`` refuses the model's guide (None if it accepts it), from tiny networks."""
    from pyro_gmvae.estimators import make_estimator
    from pyro_gmvae.guides import GUIDE_FITS
    from pyro_gmvae.harness.run import build_model

    guide = guide_for(model, estimator)
    if guide is not None and model not in GUIDE_FITS[guide]:
        return f"guide {guide!r} does not fit {model}"
    cfg = config(args, model, estimator, 0, "unused")
    cfg.hidden, cfg.latent_dim, cfg.dataset = 4, 2, "arcs"
    tiny_model, tiny_guide = build_model(cfg, 2)
    try:
        make_estimator(estimator, tiny_model, tiny_guide, num_particles(args, estimator))
    except ValueError as err:
        return str(err)
    return None


def train_all(args):
    """({(model, estimator): [run_dir per seed]}, {(model, estimator): why it was refused})."""
    dirs, refused, configs = {}, {}, []
    for model in args.models:
        for estimator in args.estimators:
            why = refusal(args, model, estimator)
            if why is not None:
                refused[model, estimator] = why
                print(f"skipping {estimator} for {model}: {why}", flush=True)
                continue
            dirs[model, estimator] = []
            for seed in args.seeds:
                run_dir = Path(args.out) / model / estimator / f"seed{seed}"
                dirs[model, estimator].append(run_dir)
                configs.append(config(args, model, estimator, seed, run_dir))
    # --workers runs at once, one thread each: the same numbers as one by one.
    for cfg, (summary, trained) in zip(configs, run_many(configs, args.workers)):
        if trained:
            label = f"{cfg.model:11s} {cfg.estimator:9s} seed {cfg.seed}"
            print(run_line(label, summary), flush=True)
    return dirs, refused


# --- gradient study --------------------------------------------------------------------------


def cluster_encoder(model, guide):
    """The parameters of the cluster posterior: the guide's q(y|x) net, or gmvae_w's p(c|x,w)."""
    if model.name == "gmvae_w":
        return [
            p for m in (model.prior_net, model.prior_loc, model.prior_var) for p in m.parameters()
        ]
    return list(guide.y_net.parameters())


def _gradient(est, model, guide, x, params):
    """One draw of the estimator's gradient of ``params``, flattened into one vector."""
    import torch

    for p in [*model.parameters(), *guide.parameters()]:
        p.grad = None
    est.loss_and_grads(model.model, guide, x)
    return torch.cat([p.grad.flatten() for p in params])


def gradient_study(args, dirs):
    """{model: {estimator: stats}} of the cluster encoder's gradient at the enum run's parameters."""
    import pyro
    import torch

    from pyro_gmvae.estimators import make_estimator
    from pyro_gmvae.guides import make_guide
    from pyro_gmvae.harness.data import binarize_fixed
    from pyro_gmvae.harness.run import load_config, load_data, load_run

    results = {}
    for model_name in args.models:
        if (model_name, "enum") not in dirs:
            continue
        run_dir = dirs[model_name, "enum"][0]
        cfg = load_config(run_dir)
        train, _ = load_data(cfg, torch.device("cpu"))
        x = train.x[: args.batch_size]
        x = binarize_fixed(x, seed=0) if cfg.likelihood_name() == "bernoulli" else x
        results[model_name], exact = {}, None
        # enum first: the others are compared with its (exact) mean gradient.
        estimators = sorted((e for m, e in dirs if m == model_name), key=lambda e: e != "enum")
        for estimator in estimators:
            pyro.clear_param_store()
            model, guide = load_run(run_dir)
            if guide_for(model_name, estimator) is not None:
                # Same networks: the relaxed guide has the mean-field guide's modules.
                relaxed = make_guide(guide_for(model_name, estimator), model)
                relaxed.load_state_dict(guide.state_dict())
                guide = relaxed
            model.train(), guide.train()
            est = make_estimator(estimator, model, guide, num_particles(args, estimator))
            params = cluster_encoder(model, guide)
            pyro.set_rng_seed(0)
            # Neither enum-jit's compilation nor graph's decaying-average baseline, which starts
            # at 0 (a β = 0.9 average needs ~30 draws to forget it), belongs in the statistics.
            for _ in range(args.grad_warmup):
                _gradient(est, model, guide, x, params)
            start = time.perf_counter()
            draws = [_gradient(est, model, guide, x, params) for _ in range(args.grad_draws)]
            seconds = (time.perf_counter() - start) / args.grad_draws
            draws = torch.stack(draws)
            mean, std = draws.mean(0), draws.std(0)
            # Coordinates that are zero in every draw carry no signal and no noise: first-layer
            # weights of pixels that are 0 in every image of the batch (MNIST's borders) and of
            # dead ReLU units. Most of q(y|x)'s weights are such on MNIST, so they would make the
            # median SNR 0 for every estimator; the median is over the others.
            live = (draws != 0).any(0)
            snr = (mean.abs() / std.clamp_min(1e-12))[live]
            if estimator == "enum":
                exact = mean
            cosine = (
                float(torch.nn.functional.cosine_similarity(mean, exact, dim=0))
                if exact is not None
                else math.nan
            )
            results[model_name][estimator] = {
                "snr_median": float(snr.median()) if live.any() else math.nan,
                "coords_live": int(live.sum()),
                "coords_total": live.numel(),
                "norm_mean": float(mean.norm()),
                "std_total": float(std.norm()),
                "cosine_to_enum": cosine,
                "ms_per_gradient": 1000 * seconds,
            }
    return results


# --- report ------------------------------------------------------------------------------


def plot_curves(dirs, k, path):
    """One row per model: Hungarian accuracy, H(Y|X) and test −ELBO against epoch, and test −ELBO
    against wall-clock time; a line per estimator."""
    colors = dict(zip(ESTIMATORS, matplotlib.colormaps["tab10"].colors))
    panels = (("acc_hungarian", "epoch", "test accuracy (Hungarian)"),
              ("cond_entropy", "epoch", "H(Y|X) (nats)"),
              ("neg_test_elbo", "epoch", "test −ELBO (nats)"),
              ("neg_test_elbo", "time_s", "test −ELBO (nats) vs wall time (s)"))  # fmt: skip
    plot_comparison(comparison_curves(dirs, panels), panels, k, path, colors)


def final_table(dirs):
    """A markdown table of the final numbers (mean ± std over seeds) and the raw summaries."""
    summaries = {
        f"{model}/{estimator}": [read_summary(d) for d in run_dirs]
        for (model, estimator), run_dirs in dirs.items()
    }
    groups = {tuple(name.split("/")): rows for name, rows in summaries.items()}
    return markdown_table(groups, TABLE, ["model", "estimator"]), summaries


def gradient_table(grads):
    lines = ["| model | estimator | median SNR per coordinate | nonzero coordinates | ‖mean‖ | ‖std‖ | cosine to enum | ms / gradient |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, rows in grads.items():
        for estimator, s in rows.items():
            lines.append(
                f"| {model} | {estimator} | {s['snr_median']:.2f} | "
                f"{s['coords_live']} / {s['coords_total']} | {s['norm_mean']:.3g} | "
                f"{s['std_total']:.3g} | {s['cosine_to_enum']:.3f} | {s['ms_per_gradient']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dirs, refused = train_all(args)
    plot_curves(dirs, args.k, out / "curves.png")
    table, summaries = final_table(dirs)
    grads = gradient_study(args, dirs) if args.grad_draws else {}
    test = f"first {args.test_limit} test images" if args.test_limit else "the full test set"
    text = (
        f"Final epoch {args.epochs}, {test}; mean ± population std over seeds {args.seeds}. "
        f"S = {args.samples} importance samples (tmc, iwae-enum, rws), M = {args.particles} "
        "ELBO draws (the others); relaxed: the relaxed guide, τ 1.0 -> 0.5.\n\n" + table
    )
    if refused:
        text += "\nRefused pairs (the estimator would not train the cluster encoder, or the guide does not fit):\n\n"
        text += "".join(f"* {m} / {e}: {why}\n" for (m, e), why in refused.items())
    if grads:
        text += (
            f"\nThe cluster encoder's gradient at the first seed's enum parameters, {args.grad_draws} "
            f"draws (after {args.grad_warmup} discarded) on one batch of {args.batch_size}: "
            "per-coordinate |mean|/std (median over the coordinates that are nonzero in some draw; with "
            f"{args.grad_draws} draws a coordinate without signal scores about "
            f"{0.6745 / math.sqrt(max(args.grad_draws, 1)):.2f}), the norms "
            "of the mean and of the per-coordinate std, the cosine of the mean with enum's (an "
            "unbiased estimator tends to 1 as its mean over the draws converges, i.e. once ‖std‖ / "
            "√draws is small beside ‖mean‖; relaxed and the IW estimators follow other objectives), "
            "and the time per gradient.\n\n" + gradient_table(grads)
        )
    refused_json = {f"{m}/{e}": why for (m, e), why in refused.items()}
    record = {"summaries": summaries, "refused": refused_json, "gradients": grads}
    write_results(out, text, {"args": vars(args), **record})
    print(text)
    return record


if __name__ == "__main__":
    main()
