"""Dilokthanakul et al. 2016, Sec. 4.1: GMVAE-w on the five synthetic arcs, with and without λ.

The paper trains its GMVAE (:class:`pyro_gmvae.GMVAEW`; K = 8, x_dim = w_dim = 2, hidden 100,
batch 200, Adam 1e-4, Gaussian likelihood, per its run.sh) on 2-D points lying on five arcs and
shows that

* without the minimum-information constraint the z-prior term KL(p(c|x,w) || U(K)) (``cluster_kl``
  in the metrics) is driven to ~0: the K components sit on top of each other (a poor optimum,
  Fig. 2d) and only later, if ever, spread out (Fig. 2e-f, Fig. 3a);
* with free bits λ (the z-prior gradient is dropped while the batch-mean KL is below λ; the
  official code's ``version2`` default λ = 0.5) the clusters separate early (Fig. 3b).

This script trains both runs through :func:`pyro_gmvae.harness.run.run`, in chunks: ``run`` is called
with ``resume=True`` and a growing ``epochs`` (exact: the resumed run continues the same random
streams), and between chunks the checkpoint is loaded with :func:`pyro_gmvae.harness.run.load_run` to
record a snapshot of the latent space (encoder means of x on the test points and the
components' means and standard deviations at w = 0, the prior's mode). It writes

* ``latents.png``: latent scatter coloured by true arc with each component's 2σ ellipse at
  w = 0, at each snapshot epoch, one row per run (Fig. 2d-f);
* ``zprior.png``: the z-prior term against epoch for both runs with the λ line (Fig. 3a/b);
* ``density.png``: the data, the model's density p(obs) and a scikit-learn ``GaussianMixture``
  (K components, full covariances) fitted to the same training points (Fig. 2b/c);
* ``results.md`` / ``results.json``: final test metrics of both runs.

The model's density is estimated by ancestral sampling: ``--density-samples`` draws of
w ~ N(0, I), c ~ U(K), x ~ N(μ_c(w), σ²_c(w)), obs ~ N(g(x), σ²(x)), binned into a 2-D histogram
normalised to a density. This is an unbiased (binned) estimate of p(obs) that needs no encoder;
an importance-weighted bound on a grid would be a *lower* bound whose slack depends on how well
q(x, w | obs) fits at points the encoder never saw (off the arcs).

Example (the reduced CPU budget of docs/results.md)::

    python examples/synthetic_arcs.py --epochs 60 --lr 1e-3 --out runs/arcs
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

RUNS = {"no_fb": "no free bits (λ = 0)", "fb": "free bits λ = {lam}"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=500, help="the paper's 500")
    p.add_argument("--snapshots", type=int, nargs="+", default=None,
                   help="epochs of the latent snapshots (default: ~2%%, ~20%% and 100%% of --epochs)")  # fmt: skip
    p.add_argument("--free-bits", type=float, default=0.5, help="λ of the second run")
    p.add_argument("--n", type=int, default=10_000, help="training points (the paper's 10k)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--x-dim", type=int, default=2)
    p.add_argument("--w-dim", type=int, default=2)
    p.add_argument("--hidden", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4, help="the paper's Adam 1e-4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--density-samples", type=int, default=100_000)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/synthetic_arcs")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.snapshots is None:
        args.snapshots = sorted(
            {max(1, round(args.epochs * f)) for f in (0.02, 0.2)} | {args.epochs}
        )
    if max(args.snapshots) > args.epochs or min(args.snapshots) < 1:
        p.error(f"--snapshots must lie in [1, --epochs={args.epochs}]")
    return args


def config(args, free_bits, out):
    from pyro_gmvae.harness.run import RunConfig

    return RunConfig(
        model="gmvae_w", dataset="arcs", k=args.k, latent_dim=args.x_dim, w_dim=args.w_dim,
        hidden=args.hidden, likelihood="gaussian", binarize="none", batch_size=args.batch_size,
        lr=args.lr, free_bits=free_bits, limit=args.n, seed=args.seed, device=args.device,
        epochs=args.epochs, eval_every=1, out=str(out), progress=args.progress,
    )  # fmt: skip


@torch.no_grad()
def snapshot(run_dir, test_x):
    """Encoder means of x on the test points, and the components at w = 0."""
    from pyro_gmvae.harness.run import load_run

    model, guide = load_run(run_dir)
    q_x, _ = guide.latent_dists(test_x)
    loc, scale = model.components(torch.zeros(1, model.w_dim))
    probs = guide.cluster_probs(test_x)
    return {
        "x_mean": q_x.mean.numpy(),
        "comp_loc": loc[0].numpy(),
        "comp_scale": scale[0].numpy(),
        "assigned": probs.argmax(-1).numpy(),
    }


def train_with_snapshots(args, key, free_bits):
    """Train one run in chunks ending at the snapshot epochs; returns {epoch: snapshot}."""
    from pyro_gmvae.harness.run import load_data, run
    from pyro_gmvae.train import resolve_device

    run_dir = Path(args.out) / key
    cfg = config(args, free_bits, run_dir)
    _, test = load_data(cfg, resolve_device("cpu"))
    snaps = {}
    for epoch in args.snapshots:
        path = run_dir / f"snapshot_{epoch:04d}.npz"
        if not path.exists():
            cfg.epochs = epoch
            done = _done_epochs(run_dir)
            if done < epoch:
                run(cfg, resume=done > 0)
            elif done > epoch:
                raise RuntimeError(f"{run_dir} is past epoch {epoch}; use a fresh --out")
            np.savez(path, **snapshot(run_dir, test.x))
        snaps[epoch] = dict(np.load(path))
    return snaps, test


def _done_epochs(run_dir):
    from pyro_gmvae.harness.run import read_metrics

    rows = read_metrics(run_dir) if (run_dir / "checkpoint.pt").exists() else []
    return rows[-1]["epoch"] if rows else 0


def _ellipses(ax, loc, scale, colors):
    from matplotlib.patches import Ellipse

    for j, (m, s) in enumerate(zip(loc, scale)):
        # Diagonal covariance: the 2σ ellipse is axis-aligned with half-axes 2σ_1, 2σ_2.
        ax.add_patch(Ellipse(m[:2], 4 * s[0], 4 * s[1], fill=False, color=colors(j), lw=1.5))
        ax.plot(*m[:2], "x", color=colors(j), ms=5)


def plot_latents(all_snaps, test_labels, labels, path):
    import matplotlib
    from matplotlib.figure import Figure

    rows, cols = len(all_snaps), max(len(s) for s in all_snaps.values())
    fig = Figure(figsize=(3.3 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    comp_colors = matplotlib.colormaps["tab10"]
    for r, (key, snaps) in enumerate(all_snaps.items()):
        for c, (epoch, s) in enumerate(snaps.items()):
            ax = axes[r, c]
            ax.scatter(*s["x_mean"][:, :2].T, c=test_labels, cmap="Set2", s=2, alpha=0.6)
            _ellipses(ax, s["comp_loc"], s["comp_scale"], comp_colors)
            ax.set_title(f"{labels[key]}\nepoch {epoch}", fontsize=8)
            ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle(
        "encoder means of x (colour: true arc); components' 2σ ellipses at w = 0", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def plot_zprior(run_dirs, labels, free_bits, path):
    from matplotlib.figure import Figure

    from pyro_gmvae.harness.run import read_metrics

    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    for key, run_dir in run_dirs.items():
        rows = read_metrics(run_dir)
        ax.plot([r["epoch"] for r in rows], [r["cluster_kl"] for r in rows], label=labels[key])
    ax.axhline(free_bits, color="k", ls=":", lw=1, label=f"λ = {free_bits}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("z-prior term KL(p(c|x,w) || U(K)) (nats)")
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylim(bottom=0)  # a KL: never negative
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


@torch.no_grad()
def sample_model(run_dir, n, seed=0):
    """n ancestral draws of obs from the trained generative model."""
    from pyro_gmvae.harness.run import load_run
    from pyro_gmvae.nets import observation_dist

    model, _ = load_run(run_dir)
    torch.manual_seed(seed)
    c = torch.nn.functional.one_hot(torch.randint(model.k, (n,)), model.k).float()
    w = torch.randn(n, model.w_dim)
    loc, scale = model.components(w)
    loc, scale = (c.unsqueeze(-1) * loc).sum(-2), (c.unsqueeze(-1) * scale).sum(-2)
    x = loc + scale * torch.randn_like(loc)
    return observation_dist(model.decoder(x), model.likelihood).sample().numpy()


def plot_density(train_x, samples, k, seed, path):
    """Data | the model's p(obs) (histogram of its samples) | a GaussianMixture's density."""
    from matplotlib.figure import Figure
    from sklearn.mixture import GaussianMixture

    lo, hi = train_x.min(0) - 0.2, train_x.max(0) + 0.2
    bins = 120
    gx, gy = np.linspace(lo[0], hi[0], bins), np.linspace(lo[1], hi[1], bins)
    gmm = GaussianMixture(k, covariance_type="full", random_state=seed).fit(train_x)
    grid = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    gmm_density = np.exp(gmm.score_samples(grid)).reshape(bins, bins)
    hist, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=[gx, gy], density=True)
    # Fraction of the model's samples that fall inside the plotted box (the rest are off-plot).
    inside = np.mean(np.all((samples >= lo) & (samples <= hi), axis=1))

    fig = Figure(figsize=(12, 4))
    axes = fig.subplots(1, 3)
    axes[0].scatter(*train_x[:5000].T, s=1, alpha=0.4)
    axes[0].set_title("training data")
    extent = (lo[0], hi[0], lo[1], hi[1])
    axes[1].imshow(hist.T, origin="lower", extent=extent, cmap="viridis", aspect="auto")
    axes[1].set_title(f"GMVAE p(obs), {len(samples)} draws ({inside:.0%} in view)")
    axes[2].imshow(gmm_density, origin="lower", extent=extent, cmap="viridis", aspect="auto")
    axes[2].set_title(f"GaussianMixture, K = {k}, full cov.")
    for ax in axes:
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    return {"gmm_train_loglik_per_point": float(gmm.score(train_x)), "samples_in_view": inside}


def main(argv=None):
    from pyro_gmvae.harness.run import load_data, read_metrics
    from pyro_gmvae.train import resolve_device

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = {"no_fb": RUNS["no_fb"], "fb": RUNS["fb"].format(lam=args.free_bits)}
    all_snaps, run_dirs = {}, {}
    for key, lam in (("no_fb", 0.0), ("fb", args.free_bits)):
        all_snaps[key], test = train_with_snapshots(args, key, lam)
        run_dirs[key] = out / key
    plot_latents(all_snaps, test.labels.numpy(), labels, out / "latents.png")
    plot_zprior(run_dirs, labels, args.free_bits, out / "zprior.png")
    train, _ = load_data(config(args, 0.0, out), resolve_device("cpu"))
    samples = sample_model(run_dirs["fb"], args.density_samples, args.seed)
    density = plot_density(train.x.numpy(), samples, args.k, args.seed, out / "density.png")

    keys = ("acc_hungarian", "acc_majority", "nmi", "cluster_kl", "clusters_used", "test_elbo")
    finals = {key: read_metrics(d)[-1] for key, d in run_dirs.items()}
    lines = ["| run | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for key, row in finals.items():
        lines.append(f"| {labels[key]} | " + " | ".join(_fmt(row[k]) for k in keys) + " |")
    first_escape = {key: _first_above(read_metrics(d), 0.1) for key, d in run_dirs.items()}
    note = (
        f"epoch {args.epochs}, {args.n} training points, test = make_arcs({args.n // 5}, seed+1); "
        f"5 true arcs, K = {args.k}. First epoch with cluster_kl > 0.1: {first_escape}.\n\n"
    )
    (out / "results.md").write_text(note + "\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "final": finals, "density": density,
                    "first_epoch_cluster_kl_above_0.1": first_escape}, indent=2) + "\n"
    )  # fmt: skip
    print(note + "\n".join(lines))
    return finals


def _first_above(rows, threshold):
    return next((r["epoch"] for r in rows if r["cluster_kl"] > threshold), None)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else str(v)


if __name__ == "__main__":
    main()
