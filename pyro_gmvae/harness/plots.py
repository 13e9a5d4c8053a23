"""Figures for a run directory: learning curves, samples per cluster, latent traversals,
reconstructions and the clusters-vs-labels confusion matrix.

Every ``plot_*`` function takes plain data (metrics rows, tensors, arrays) and a path, and writes
one PNG. The ``*_grid`` functions compute the images a model draws; :func:`make_figures` does
all of it for a trained model and guide. Figures are drawn on ``matplotlib.figure.Figure``
objects rendered by the Agg backend, never through ``pyplot``: no global backend is switched and
nothing needs a display.

The figures follow the sources: Rui Shu's three panels (test accuracy, H(Y|X), variational loss
against epoch, "Gaussian Mixture VAE: Lessons in Variational Inference, Generative Models, and
Deep Nets", 2016) and Dilokthanakul et al. 2016, Fig. 5 (a: one row of samples per cluster,
with x = μ_c(w) at w = 0 first; b: w varied along a line for each cluster).
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..guides import point_estimate
from ..metrics import contingency
from ..nets import mean_image

FIGURES = ("curves", "samples", "traversal", "reconstructions", "confusion")
ACCURACIES = (
    ("acc_hungarian", "Hungarian (one-to-one)"),
    ("acc_majority", "majority label (Shu)"),
    ("acc_aae", "AAE criterion (Dilokthanakul)"),
)


# --------------------------------------------------------------------------- plain-data plots


def plot_curves(rows, k, path, title=None):
    """Shu's three panels against epoch: test accuracy, H(Y|X) with its ceiling log K, and the
    variational loss (training objective per point and the negative test ELBO)."""
    if not rows:
        raise ValueError("no metrics rows to plot (metrics.jsonl is empty)")
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    acc, ent, loss = fig.subplots(1, 3)
    for key, label in ACCURACIES:
        if key in rows[0]:  # unlabelled data have no accuracy: the panel stays empty
            acc.plot(epochs, [r[key] for r in rows], "o-", ms=3, label=label)
    for ax in (acc, ent, loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1), title="clustering accuracy")
    if "acc_hungarian" in rows[0]:
        acc.legend(loc="lower right", fontsize=8)
    ent.plot(epochs, [r["cond_entropy"] for r in rows], "o-", ms=3, label="H(Y|X)")
    # The collapse line: H(Y|X) = log K when q(y|x) is uniform (Shu's M2 failure mode).
    ent.axhline(math.log(k), color="k", ls="--", lw=1, label=f"log K = {math.log(k):.2f}")
    ent.set(xlabel="epoch", ylabel="nats", ylim=(0, 1.05 * math.log(k)))
    ent.set_title("conditional entropy of the cluster posterior")
    ent.legend(loc="best", fontsize=8)
    # Epoch 0 (the initialisation stage, if any) has no training loss yet.
    train = [math.nan if r["train_loss"] is None else r["train_loss"] for r in rows]
    loss.plot(epochs, train, "o-", ms=3, label="train objective / point")
    loss.plot(epochs, [-r["test_elbo"] for r in rows], "o-", ms=3, label="−test ELBO / point")
    loss.set(xlabel="epoch", ylabel="nats", title="variational loss")
    loss.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_seed_bands(ax, xs, values, label=None, color=None, style="-"):
    """One line of the mean over runs (seeds) of ``values`` (runs, len(xs)) against ``xs``, in a
    band of ±1 population std across the runs."""
    values = np.asarray(values, dtype=float)
    mean, std = values.mean(0), values.std(0)
    ax.plot(xs, mean, style, color=color, label=label, marker=".")
    ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2)


def plot_comparison(curves, panels, k, path, colors):
    """One row of panels per model, one :func:`plot_seed_bands` line per variant in each panel.

    ``curves`` maps (model, variant) to {(metric key, x key): (xs, values)}, values of shape
    (seeds, evaluations) (:func:`pyro_gmvae.harness.compare.comparison_curves` reads them from run
    directories); ``panels`` is a sequence of (metric key, x key, title), the x key ``"epoch"``
    or ``"time_s"``; ``colors`` maps a variant to its colour. H(Y|X) panels get the collapse
    line log K.
    """
    models = list(dict.fromkeys(m for m, _ in curves))
    fig = Figure(figsize=(4.25 * len(panels), 3.6 * len(models)))
    axes = fig.subplots(len(models), len(panels), squeeze=False)
    for row, model in zip(axes, models):
        for ax, (key, x_key, title) in zip(row, panels):
            for (m, variant), of_variant in curves.items():
                if m == model:
                    xs, values = of_variant[key, x_key]
                    plot_seed_bands(ax, xs, values, label=variant, color=colors[variant])
            if key == "cond_entropy":
                ax.axhline(math.log(k), color="k", lw=0.8, ls=":", label="log K")
            ax.set_title(f"{model}: {title}")
            ax.set_xlabel(x_key.replace("time_s", "seconds"))
            if x_key == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return Path(path)


def plot_image_grid(images, path, image_shape, row_labels=None, title=None, xlabel=None):
    """A grid of images, ``images`` of shape (rows, cols, D) with D = C·H·W, one row per entry
    of ``row_labels``. Values are clamped to [0, 1]."""
    from torchvision.utils import make_grid  # imported here: torchvision's import is slow

    images = torch.as_tensor(images).detach().float().cpu()
    if images.dim() != 3:
        raise ValueError(f"images must be (rows, cols, D), got shape {tuple(images.shape)}")
    n_rows, n_cols, _ = images.shape
    pictures = images.reshape(n_rows * n_cols, *image_shape).clamp(0, 1)
    pad = 2
    grid = make_grid(pictures, nrow=n_cols, padding=pad, pad_value=1.0)
    h = image_shape[1] + pad
    fig = Figure(figsize=(0.55 * n_cols + 2.6, 0.55 * n_rows + 0.9), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks([pad + h * i + image_shape[1] / 2 for i in range(n_rows)], row_labels)
        ax.tick_params(axis="y", length=0, labelsize=8)
    else:
        ax.set_yticks([])
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path, tight=True)


def plot_confusion(counts, path, title=None):
    """The (clusters, classes) contingency matrix; rows sorted by their majority class so that a
    good clustering looks block-diagonal. Row ticks name the cluster index."""
    counts = np.asarray(counts)
    order = sorted(range(len(counts)), key=lambda c: (counts[c].argmax(), -counts[c].max()))
    shown = counts[order]
    fig = Figure(
        figsize=(0.5 * counts.shape[1] + 2.5, 0.4 * counts.shape[0] + 1.8), layout="constrained"
    )
    ax = fig.subplots()
    image = ax.imshow(shown, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, label="test points")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_yticks(range(len(order)), [f"cluster {c}" for c in order])
    ax.set(xlabel="true label", ylabel="cluster (sorted by majority label)")
    if counts.size <= 600:
        top = max(shown.max(), 1)
        for i, j in np.ndindex(*shown.shape):
            if shown[i, j]:
                color = "white" if shown[i, j] > top / 2 else "black"
                ax.text(j, i, str(shown[i, j]), ha="center", va="center", fontsize=7, color=color)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_scatter(points, clusters, path, title=None):
    """2-D data (e.g. the synthetic arcs) coloured by assigned cluster."""
    points, clusters = np.asarray(points), np.asarray(clusters)
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(points[:, 0], points[:, 1], c=clusters, cmap="tab20", s=4)
    ax.set(aspect="equal", xlabel="$x_1$", ylabel="$x_2$", title=title or "clusters")
    return _save(fig, path)


def _save(fig, path, tight=False):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" (a second draw) only where the constrained layout clips long row labels.
    fig.savefig(path, dpi=100, bbox_inches="tight" if tight else None)
    return path


# --------------------------------------------------------------------------- what a model draws


def _is_w_model(model) -> bool:
    return getattr(model, "w_dim", None) is not None


def _one_hot(index, k, like):
    """One-hot rows for cluster indices, with the device and dtype of tensor ``like``."""
    return F.one_hot(torch.as_tensor(index, device=like.device), k).to(like.dtype)


def _principal_direction(v):
    """First principal direction of the rows of v and the spread along it (its std)."""
    centred = v - v.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    return vh[0], (s[0] / math.sqrt(max(len(v) - 1, 1))).item()


@torch.no_grad()
def sample_grid(model, n_cols=10, seed=0) -> torch.Tensor:
    """(K, n_cols, D) decoder means, one row per cluster.

    GMVAE-w (Dilokthanakul et al., Fig. 5a): column 0 is x = μ_c(0), the component mean at w = 0;
    the other columns share one w ~ N(0, I) per column, with x = μ_c(w). Shu's models: y fixed to
    the row's cluster, z drawn from p(z|y) (GMVAE) or N(0, I) (M2, modified M2).
    """
    param = next(model.parameters())
    device = param.device
    rows = []
    # Seeded without touching the caller's RNG streams: figures must not perturb a run.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if _is_w_model(model):
            w = torch.randn(n_cols, model.w_dim, device=device, dtype=param.dtype)
            w[0] = 0.0
        for c in range(model.k):
            y = _one_hot([c] * n_cols, model.k, param)
            rows.append(
                model.sample(y, w=w, use_mean=True) if _is_w_model(model) else model.sample(y)
            )
    return torch.stack(rows)


@torch.no_grad()
def latent_means(guide, x, clusters, batch_size=1000) -> torch.Tensor:
    """The guide's point estimate of the continuous latent for each row of x: z at the given
    cluster for Shu's guides (q(z|x,y)), w for GMVAE-w guides (q(w|obs)). Shape (N, latent)."""
    out = []
    for i in range(0, len(x), batch_size):
        b = x[i : i + batch_size]
        if hasattr(guide, "latent_dists"):
            out.append(point_estimate(guide.latent_dists(b)[1]))
        else:
            y = _one_hot(clusters[i : i + batch_size], guide.k, x)
            out.append(point_estimate(guide.z_dist(b, y)))
    return torch.cat(out)


@torch.no_grad()
def reconstruct(model, guide, x, clusters) -> torch.Tensor:
    """Decoder means for x at the guide's point estimates: z from q(z|x,y) at the given (most
    probable) cluster for Shu's models, x from q(x|obs) for GMVAE-w. Shape like x."""
    if hasattr(guide, "latent_dists"):
        return mean_image(model.decoder(point_estimate(guide.latent_dists(x)[0])), model.likelihood)
    y = _one_hot(clusters, model.k, x)
    return model.sample(y, z=point_estimate(guide.z_dist(x, y)))


@torch.no_grad()
def traversal_grid(model, latents, clusters, n_cols=9, span=2.0) -> torch.Tensor:
    """(K, n_cols, D) decoder means along the first principal direction of the guide's latent
    means ``latents`` (N, dim), from −span to +span standard deviations.

    GMVAE-w (Fig. 5b): the same line of w for every cluster, x = μ_c(w). Shu's models: z moves
    along the line around the mean latent of the points assigned to the row's cluster (the
    overall mean for an empty cluster), decoded with y fixed to that cluster.
    """
    direction, std = _principal_direction(latents)
    steps = torch.linspace(-span, span, n_cols, device=latents.device, dtype=latents.dtype)
    line = steps[:, None] * std * direction  # (n_cols, dim)
    rows = []
    for c in range(model.k):
        y = _one_hot([c] * n_cols, model.k, latents)
        if _is_w_model(model):
            rows.append(model.sample(y, w=latents.mean(0) + line, use_mean=True))
        else:
            mine = latents[clusters == c]
            centre = (mine if len(mine) else latents).mean(0)
            rows.append(model.sample(y, z=centre + line))
    return torch.stack(rows)


@torch.no_grad()
def reconstruction_grid(model, guide, x, clusters, n_cols=10, n_rows=4) -> torch.Tensor:
    """(2·n_rows, n_cols, D): rows alternate between test images (taken round-robin over the
    used clusters, so every cluster shows) and their reconstructions (:func:`reconstruct`)."""
    shown = _examples_per_cluster(clusters, model.k, n_cols, n_rows)
    originals = x[shown].reshape(n_rows, n_cols, -1)
    recon = reconstruct(model, guide, x[shown], clusters[shown]).reshape(n_rows, n_cols, -1)
    return torch.stack([originals, recon], 1).flatten(0, 1)


# --------------------------------------------------------------------------- all of them


@torch.no_grad()
def make_figures(run_dir, model, guide, test_x, test_labels, image_shape, rows=(), n_cols=10,
                 seed=0):  # fmt: skip
    """Write every figure of a run into the folder ``run_dir``; returns {figure name: path}.

    ``model`` and ``guide`` are trained (e.g. from :func:`pyro_gmvae.load_run`), ``test_x``
    the evaluated test set (N, D), ``test_labels`` its labels and ``rows`` the run's evaluations
    (what ``metrics.jsonl`` holds; none: no curves). With ``image_shape`` None (vector data such
    as the arcs) the image figures are replaced by a scatter plot when D = 2.
    """
    run_dir = Path(run_dir)
    was_training = model.training, guide.training
    model.eval(), guide.eval()  # BatchNorm on running statistics, as in evaluation
    try:
        probs = torch.cat([guide.cluster_probs(b) for b in test_x.split(1000)])
        clusters = probs.argmax(-1)
        labels = torch.as_tensor(test_labels).cpu().numpy()
        labelled = bool((labels >= 0).all())  # own data may come without labels
        # Unlabelled: one column of cluster sizes, so the figures still say how big each is.
        counts = contingency(labels if labelled else np.zeros_like(labels),
                             clusters.cpu().numpy(), n_clusters=model.k,
                             n_classes=int(labels.max()) + 1 if labelled else 1)  # fmt: skip
        paths = {}
        rows = list(rows)
        name = f"{model.name}, K = {model.k}"
        if rows:
            paths["curves"] = plot_curves(rows, model.k, run_dir / "curves.png", title=name)
        last = rows[-1] if rows else {}
        acc = (
            f" — Hungarian accuracy {last['acc_hungarian']:.3f}" if "acc_hungarian" in last else ""
        )
        if labelled:
            paths["confusion"] = plot_confusion(
                counts, run_dir / "confusion.png", title=f"{name}: clusters vs labels (test){acc}"
            )
        if image_shape is None:
            if test_x.shape[1] == 2:
                paths["clusters"] = plot_scatter(
                    test_x.cpu(), clusters.cpu(), run_dir / "clusters.png", title=name
                )
            return paths
        row_labels = [_cluster_label(c, counts[c], labelled) for c in range(model.k)]
        if _is_w_model(model):
            what = "column 1: x = μ_c(0); others: x = μ_c(w), w ~ N(0, I) shared per column"
        else:
            what = (
                "y fixed per row; z ~ p(z|y)"
                if model.name == "gmvae"
                else "y fixed per row; z ~ N(0, I)"
            )
        paths["samples"] = plot_image_grid(
            sample_grid(model, n_cols, seed), run_dir / "samples.png", image_shape, row_labels,
            title=f"{name}: samples per cluster", xlabel=what,
        )  # fmt: skip
        latents = latent_means(guide, test_x, clusters)
        latent = "w" if _is_w_model(model) else "z"
        paths["traversal"] = plot_image_grid(
            traversal_grid(model, latents, clusters, n_cols - 1), run_dir / "traversal.png",
            image_shape, row_labels, title=f"{name}: {latent} along its first principal direction",
            xlabel=f"{latent} from −2 to +2 sd of the test posterior means, decoded in each cluster",
        )  # fmt: skip
        pairs = reconstruction_grid(model, guide, test_x, clusters, n_cols)
        pair_labels = [s for i in range(len(pairs) // 2) for s in (f"test {i + 1}", "recon.")]
        paths["reconstructions"] = plot_image_grid(
            pairs, run_dir / "reconstructions.png", image_shape, pair_labels,
            title=f"{name}: test images and reconstructions at the most probable cluster",
        )  # fmt: skip
        return paths
    finally:
        model.train(was_training[0]), guide.train(was_training[1])


def _cluster_label(c, counts_c, labelled=True):
    """'cluster 3: 1012 pts, mostly 7': what a row of cluster images stands for."""
    if not counts_c.sum():
        return f"cluster {c}: empty"
    mostly = f", mostly {counts_c.argmax()}" if labelled else ""
    return f"cluster {c}: {counts_c.sum()} pts{mostly}"


def _examples_per_cluster(clusters, k, n_cols, n_rows=4):
    """Indices of n_rows·n_cols test points, taken round-robin over the clusters that are used,
    so the reconstructions show every cluster."""
    pools = [torch.nonzero(clusters == c).flatten().tolist() for c in range(k)]
    pools = [p for p in pools if p]
    picked, depth = [], 0
    while len(picked) < n_rows * n_cols and depth < len(clusters):
        for p in pools:
            if depth < len(p) and len(picked) < n_rows * n_cols:
                picked.append(p[depth])
        depth += 1
    picked += [picked[i % len(picked)] for i in range(n_rows * n_cols - len(picked))]
    return torch.tensor(picked, device=clusters.device)
