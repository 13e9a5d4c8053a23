"""Rui Shu's comparison: M2, modified M2 and GMVAE trained unsupervised on MNIST, same budget.

Shu ("Gaussian Mixture VAE: Lessons in Variational Inference, Generative Models, and Deep Nets",
2016) trained the three models with the same networks, optimiser and budget and reported that

* unsupervised M2 drives H(Y|X) to log K: q(y|x) becomes uniform and its test accuracy collapses
  to the majority-class rate, although it reaches the best variational loss;
* modified M2 (a per-cluster affine map of z before the decoder) clusters better, with a worse loss;
* GMVAE (a per-cluster Gaussian prior p(z|y)) clusters best.

This script trains each model with several seeds through :func:`pyro_gmvae.harness.run.run` (one run
directory per model and seed, so an interrupted comparison resumes), then writes

* ``curves.png``: test accuracy (majority label, Shu's metric, solid; Hungarian, dashed),
  H(Y|X) and the test negative ELBO against epoch, mean and a ±1 std band across seeds;
* ``results.md``: the final numbers, mean ± std across seeds;
* ``results.json``: every run's final summary.

Example (the reduced CPU budget of docs/results.md)::

    python examples/compare_models.py --limit 10000 --epochs 4 --seeds 0 1 --out runs/compare
"""

import argparse
import math
from pathlib import Path

from pyro_gmvae.harness.compare import (
    markdown_table,
    metric_curves,
    read_summary,
    run_line,
    run_many,
    write_results,
)
from pyro_gmvae.harness.plots import plot_seed_bands
from pyro_gmvae.harness.run import RunConfig

MODELS = ("m2", "modified_m2", "gmvae")
LABELS = {"m2": "M2", "modified_m2": "modified M2", "gmvae": "GMVAE"}
COLORS = {"m2": "tab:red", "modified_m2": "tab:orange", "gmvae": "tab:blue"}
# (metrics key, column title, scale): accuracies in %, the rest as they are.
TABLE = (
    ("acc_majority", "acc. majority (%)", 100),
    ("acc_hungarian", "acc. Hungarian (%)", 100),
    ("nmi", "NMI", 1),
    ("cond_entropy", "H(Y\\|X) (nats)", 1),  # the pipe escaped for markdown
    ("neg_test_elbo", "test −ELBO (nats)", 1),
    ("clusters_used", "clusters used", 1),
    ("wall_time_s", "wall time (s)", 1),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--limit", type=int, default=None, help="first N training images (None: 60k)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hidden", type=int, default=None, help="hidden width (default Shu's 512)")
    p.add_argument("--z-dim", type=int, default=None, help="z dimension (default Shu's 64)")
    p.add_argument(
        "--test-limit",
        type=int,
        default=None,
        help="evaluate on the first N test images (None: all 10k); a CPU budget measure",
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/compare_models")
    p.add_argument("--progress", action="store_true", help="show tqdm bars")
    p.add_argument("--workers", type=int, default=1,
                   help="runs at once, one thread each (up to the cores; several per GPU)")  # fmt: skip
    return p.parse_args(argv)


def train_all(args) -> dict:
    """{model: [run_dir per seed]}; a finished run is reused, an interrupted one resumed."""
    out = Path(args.out)
    dirs, configs = {}, []
    for name in args.models:
        dirs[name] = []
        for seed in args.seeds:
            run_dir = out / name / f"seed{seed}"
            dirs[name].append(run_dir)
            configs.append(RunConfig(
                model=name, k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                hidden=args.hidden, latent_dim=args.z_dim, dataset=args.dataset,
                data_dir=args.data_dir, limit=args.limit, test_limit=args.test_limit,
                device=args.device, seed=seed, out=str(run_dir), progress=args.progress,
            ))  # fmt: skip
    # --workers runs at once, one thread each; the same numbers as one by one.
    for cfg, (summary, trained) in zip(configs, run_many(configs, args.workers)):
        if trained:
            label = f"{cfg.model:12s} seed {cfg.seed}: acc majority {summary['acc_majority']:.3f}"
            print(run_line(label, summary), flush=True)
    return dirs


def plot_curves(dirs, k, path):
    """Three panels against epoch: accuracies, H(Y|X), test −ELBO; mean and ±1 std band."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    panels = (
        (axes[0], (("acc_majority", "-"), ("acc_hungarian", "--")), "test accuracy"),
        (axes[1], (("cond_entropy", "-"),), "H(Y|X) (nats)"),
        (axes[2], (("neg_test_elbo", "-"),), "test −ELBO (nats)"),
    )
    for ax, keys, title in panels:
        for name, run_dirs in dirs.items():
            for key, style in keys:
                epochs, values = metric_curves(run_dirs, key)
                label = LABELS[name] + (" (Hungarian)" if key == "acc_hungarian" else "")
                plot_seed_bands(ax, epochs, values, label, COLORS[name], style)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylim(0, 1.05 * math.log(k))
    axes[1].axhline(math.log(k), color="k", lw=0.8, ls=":", label=f"log K = {math.log(k):.2f}")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("solid: majority label (Shu's metric); dashed: Hungarian; band: ±1 std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def final_table(dirs) -> tuple[str, dict]:
    """A markdown table of the final numbers (mean ± std over seeds) and the raw summaries."""
    summaries = {name: [read_summary(d) for d in run_dirs] for name, run_dirs in dirs.items()}
    groups = {LABELS[name]: rows for name, rows in summaries.items()}
    return markdown_table(groups, TABLE, ["model"]), summaries


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = train_all(args)
    plot_curves(dirs, args.k, out / "curves.png")
    table, summaries = final_table(dirs)
    std = "population std (numpy default)"
    test = f"first {args.test_limit} test images" if args.test_limit else "the 10k test images"
    note = f"Final epoch {args.epochs}, {test}; mean ± {std} over seeds {args.seeds}.\n\n"
    write_results(out, note + table, {"args": vars(args), "summaries": summaries})
    print(table)
    return summaries


if __name__ == "__main__":
    main()
