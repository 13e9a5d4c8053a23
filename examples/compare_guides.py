"""Swappable variational families: does a richer q(z|x,y) make unsupervised M2 use y?

Rui Shu (2016) explained why unsupervised M2 collapses — q(y|x) becomes uniform, H(Y|X) = log K —
while GMVAE clusters: M2 "prefers a mixture variational family over mixture data manifolds". A
uniform q(y|x) costs no KL and makes q(z|x) = (1/K) Σ_y q(z|x,y) a mixture of K Gaussians: M2
spends y on a richer posterior approximation rather than on the clusters of the data. If that is
the reason, a guide whose q(z|x,y) is flexible without y (normalizing flows: Rezende & Mohamed
2015; IAF, Kingma et al. 2016; neural splines, Durkan et al. 2019) removes that use of y, and y
may then capture the clusters: H(Y|X) below log K, accuracy above the majority-class rate. For
GMVAE the flows should not hurt clustering. The relaxed cluster guide
(Gumbel-softmax / Concrete; Jang et al. 2017; Maddison et al. 2017) swaps exact enumeration of
y for one reparameterised draw, as jariasf/GMVAE does (τ annealed 1.0 -> 0.5).

The script trains every (model, guide) pair that fits, with several seeds, through
:func:`pyro_gmvae.harness.run.run` (one run directory each, so an interrupted comparison resumes), then
writes to ``--out``:

* ``curves.png``: Hungarian test accuracy, H(Y|X) and test −ELBO against epoch, one row per
  model, one line per guide (mean across seeds, ±1 std band);
* ``results.md``: the final numbers, mean ± std across seeds;
* ``results.json``: every run's final summary.

Guides (see :mod:`pyro_gmvae.guides`): ``mean_field`` (Shu's), ``iaf``, ``spline``,
``cond_iaf``, ``cond_spline`` (two flow layers, Pyro's default widths capped at 512, on q(z|x,y); on
q(x|obs) and q(w|obs) for gmvae_w) and ``relaxed`` (trained with the ``relaxed`` estimator; the
others with exact enumeration, ``enum``). The test −ELBO of a relaxed run is the discrete ELBO
of the same networks, so all rows are comparable.

Example (a reduced CPU budget)::

    python examples/compare_guides.py --models m2 gmvae --limit 10000 --epochs 4 --seeds 0 1 \\
        --test-limit 2000 --out runs/compare_guides
"""

import argparse
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
from pyro_gmvae.harness.run import RunConfig

MODELS = ("m2", "modified_m2", "gmvae", "gmvae_w")
GUIDES = ("mean_field", "iaf", "spline", "cond_iaf", "cond_spline", "relaxed")
DEFAULT_GUIDES = ("mean_field", "iaf", "cond_iaf", "cond_spline", "relaxed")
# (metrics key, column title, scale): accuracies in %, the rest as they are.
TABLE = (
    ("acc_hungarian", "acc. Hungarian (%)", 100),
    ("acc_majority", "acc. majority (%)", 100),
    ("nmi", "NMI", 1),
    ("cond_entropy", r"H(Y\|X) (nats)", 1),  # the pipe escaped for markdown
    ("neg_test_elbo", "test −ELBO (nats)", 1),
    ("neg_test_iw_bound", "test −log p̂ (nats)", 1),
    ("clusters_used", "clusters used", 1),
    ("wall_time_s", "wall time (s)", 1),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["m2", "gmvae"], choices=MODELS)
    p.add_argument(
        "--guides", nargs="+", default=list(DEFAULT_GUIDES), choices=GUIDES + ("exact_posterior",)
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=1,
                   help="runs at once, one thread each (up to the cores; several per GPU)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="first N training images (None: all)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hidden", type=int, default=None, help="hidden width (default: the model's)")
    p.add_argument("--z-dim", type=int, default=None, help="latent size (default: the model's)")
    p.add_argument(
        "--test-limit", type=int, default=None, help="evaluate on the first N test images"
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--iw-samples", type=int, default=0, help="S of the final test IW bound (0: skip)"
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/compare_guides")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    return p.parse_args(argv)


def pairs(models, guides):
    """The (model, guide) pairs that fit; gmvae_w's own guide stands in for mean_field."""
    from pyro_gmvae.guides import GUIDE_FITS

    out = []
    for model in models:
        for guide in guides:
            if guide == "mean_field" and model == "gmvae_w":
                guide = "exact_posterior"
            if model in GUIDE_FITS[guide]:
                out.append((model, guide))
            else:
                print(f"skipping {guide} for {model}: it does not fit")
    return list(dict.fromkeys(out))


def train_all(args) -> dict:
    """{(model, guide): [run_dir per seed]}; a finished run is reused, an interrupted one resumed.
    ``--workers`` runs at once, one thread each: the same numbers as one by one."""
    dirs, configs = {}, []
    for model, guide in pairs(args.models, args.guides):
        dirs[model, guide] = []
        for seed in args.seeds:
            run_dir = Path(args.out) / model / guide / f"seed{seed}"
            dirs[model, guide].append(run_dir)
            configs.append(RunConfig(
                model=model, guide=guide, estimator="relaxed" if guide == "relaxed" else "enum",
                k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                hidden=args.hidden, latent_dim=args.z_dim, dataset=args.dataset,
                data_dir=args.data_dir, limit=args.limit, test_limit=args.test_limit,
                device=args.device, seed=seed, out=str(run_dir), iw_samples=args.iw_samples,
                progress=args.progress,
            ))  # fmt: skip
    for cfg, (summary, trained) in zip(configs, run_many(configs, args.workers)):
        if trained:
            print(run_line(f"{cfg.model:11s} {cfg.guide:15s} seed {cfg.seed}", summary), flush=True)
    return dirs


def plot_curves(dirs, k, path):
    """One row per model: Hungarian accuracy, H(Y|X), test −ELBO against epoch, a line per guide."""
    colors = dict(zip(GUIDES + ("exact_posterior",), matplotlib.colormaps["tab10"].colors))
    colors["exact_posterior"] = colors["mean_field"]
    panels = (("acc_hungarian", "epoch", "test accuracy (Hungarian)"),
              ("cond_entropy", "epoch", "H(Y|X) (nats)"),
              ("neg_test_elbo", "epoch", "test −ELBO (nats)"))  # fmt: skip
    plot_comparison(comparison_curves(dirs, panels), panels, k, path, colors)


def final_table(dirs) -> tuple[str, dict]:
    """A markdown table of the final numbers (mean ± std over seeds) and the raw summaries."""
    summaries = {
        f"{model}/{guide}": [read_summary(d) for d in run_dirs]
        for (model, guide), run_dirs in dirs.items()
    }
    groups = {tuple(name.split("/")): rows for name, rows in summaries.items()}
    return markdown_table(groups, TABLE, ["model", "guide"]), summaries


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = train_all(args)
    plot_curves(dirs, args.k, out / "curves.png")
    table, summaries = final_table(dirs)
    test = f"first {args.test_limit} test images" if args.test_limit else "the full test set"
    note = f"Final epoch {args.epochs}, {test}; mean ± population std over seeds {args.seeds}. "
    if args.iw_samples:
        note += f"test −log p̂: the IW bound with S = {args.iw_samples} per cluster. "
    note += "Flow guides: 2 layers, Pyro's default widths capped at 512"
    note += (
        "; relaxed: estimator 'relaxed', τ 1.0 -> 0.5.\n\n" if "relaxed" in args.guides else ".\n\n"
    )
    write_results(out, note + table, {"args": vars(args), "summaries": summaries})
    print(table)
    return summaries


if __name__ == "__main__":
    main()
