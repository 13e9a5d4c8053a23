"""Rui Shu's comparison: M2, modified M2 and GMVAE trained unsupervised on MNIST, same budget.

Shu ("Gaussian Mixture VAE: Lessons in Variational Inference, Generative Models, and Deep Nets",
2016) trained the three models with the same networks, optimiser and budget and reported that

* unsupervised M2 drives H(Y|X) to log K: q(y|x) becomes uniform and its test accuracy collapses
  to the majority-class rate, although it reaches the best variational loss;
* modified M2 (a per-cluster affine map of z before the decoder) clusters better, with a worse loss;
* GMVAE (a per-cluster Gaussian prior p(z|y)) clusters best.

This script trains each model with several seeds through :func:`pyro_gmvae.run.run` (one run
directory per model and seed, so an interrupted comparison resumes), then writes

* ``curves.png``: test accuracy (majority label, Shu's metric, solid; Hungarian, dashed),
  H(Y|X) and the test negative ELBO against epoch, mean and a ±1 std band across seeds;
* ``results.md``: the final numbers, mean ± std across seeds;
* ``results.json``: every run's final summary.

Example (the reduced CPU budget of docs/results.md)::

    python examples/compare_models.py --limit 10000 --epochs 4 --seeds 0 1 --out runs/compare
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np

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
    return p.parse_args(argv)


def train_all(args) -> dict:
    """{model: [run_dir per seed]}; a finished run is reused, an interrupted one resumed."""
    from pyro_gmvae.run import RunConfig, run

    out = Path(args.out)
    dirs = {}
    for name in args.models:
        dirs[name] = []
        for seed in args.seeds:
            run_dir = out / name / f"seed{seed}"
            dirs[name].append(run_dir)
            cfg = RunConfig(
                model=name, k=args.k, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                hidden=args.hidden, latent_dim=args.z_dim, dataset=args.dataset,
                data_dir=args.data_dir, limit=args.limit, test_limit=args.test_limit,
                device=args.device, seed=seed, out=str(run_dir), progress=args.progress,
            )  # fmt: skip
            if (run_dir / "summary.json").exists():
                saved = json.loads((run_dir / "summary.json").read_text())
                if saved.get("epoch") == args.epochs:
                    continue
            resume = (run_dir / "checkpoint.pt").exists()
            summary = run(cfg, resume=resume)
            print(
                f"{name:12s} seed {seed}: acc majority {summary['acc_majority']:.3f}, "
                f"Hungarian {summary['acc_hungarian']:.3f}, H(Y|X) {summary['cond_entropy']:.3f}, "
                f"test -ELBO {-summary['test_elbo']:.2f}, {summary['wall_time_s']:.0f} s",
                flush=True,
            )
    return dirs


def curves(run_dirs, key):
    """(epochs, values of shape (seeds, epochs)) of one metric, truncated to the shortest run."""
    from pyro_gmvae.run import read_metrics

    rows = [read_metrics(d) for d in run_dirs]
    n = min(len(r) for r in rows)
    epochs = np.array([r["epoch"] for r in rows[0][:n]])
    values = np.array([[_value(row, key) for row in r[:n]] for r in rows], dtype=float)
    return epochs, values


def _value(row, key):
    return -row["test_elbo"] if key == "neg_test_elbo" else row[key]


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
                epochs, values = curves(run_dirs, key)
                mean, std = values.mean(0), values.std(0)
                label = LABELS[name] + (" (Hungarian)" if key == "acc_hungarian" else "")
                ax.plot(epochs, mean, style, color=COLORS[name], label=label, marker=".")
                ax.fill_between(epochs, mean - std, mean + std, color=COLORS[name], alpha=0.2)
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


def mean_std(values, scale=1.0, digits=2):
    values = np.asarray(values, dtype=float) * scale
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def final_table(dirs) -> tuple[str, dict]:
    """A markdown table of the final numbers (mean ± std over seeds) and the raw summaries."""
    summaries = {
        name: [json.loads((d / "summary.json").read_text()) for d in run_dirs]
        for name, run_dirs in dirs.items()
    }
    header = "| model | seeds | " + " | ".join(title for _, title, _ in TABLE) + " |"
    lines = [header, "|" + "---|" * (len(TABLE) + 2)]
    for name, rows in summaries.items():
        cells = [mean_std([_value(r, key) for r in rows], scale) for key, _, scale in TABLE]
        lines.append(f"| {LABELS[name]} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", summaries


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
    (out / "results.md").write_text(note + table)
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "summaries": summaries}, indent=2) + "\n"
    )
    print(table)
    return summaries


if __name__ == "__main__":
    main()
