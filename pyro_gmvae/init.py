r"""The initialisation stage: autoencoder pretraining and a mixture fitted to the codes.

A mixture VAE trained from random weights settles on whatever clusters its first epochs
suggest; on MNIST that is 55-65 % accuracy. VaDE (Jiang et al. 2017) and DEC (Xie et al. 2016)
start instead from an autoencoder: pretrain the encoder mean and the decoder on reconstruction,
fit a Gaussian mixture to the codes, and set the prior p(z|y) (means, variances; weights when
learnable) to that mixture. N2D (McConville et al. 2020) showed that clusters are found far
better on a manifold-learning embedding (UMAP) than by a mixture fitted directly. ``method="umap"``
makes that embedding the latent space itself: the data are embedded by UMAP into ``z_dim``
dimensions, and the autoencoder is pretrained with its encoder mean pulled onto the
(standardised) embedding while the decoder learns to reconstruct from it, so the GMVAE's z *is*
a space in which the clusters are compact; the mixture is fitted there (with full covariances
when the model has them: the embedded clusters are elongated and tilted). N2D embeds an
autoencoder's codes; on MNIST the pixels themselves served better at our budget
(docs/results.md). No labels are used anywhere.

=========  ======================================================================================
method     the stage
=========  ======================================================================================
``none``   ``pretrain_epochs`` of autoencoder training, or nothing (the sources' recipes)
``gmm``    autoencoder pretraining; a ``GaussianMixture`` on the codes sets p(z|y) (VaDE)
``umap``   data → UMAP (``z_dim`` components); pretraining with the encoder fitted to it; a
           ``GaussianMixture`` on the embedding, refined on the codes by EM, sets p(z|y)
=========  ======================================================================================

Guides with their own cluster encoder q(y|x) (Shu's ``mean_field`` and its flows) get it fitted
to the mixture's responsibilities; their q(z|x,y) starts as the pretrained encoder for every y.
"""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from .nets import observation_dist

INIT_METHODS = ("none", "gmm", "umap")


def _parameters(*modules):
    return list({id(p): p for m in modules for p in m.parameters()}.values())


def _minibatches(n, batch_size, generator):
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def random_affine(x, image_shape, generator, max_degrees=10.0, max_shift=0.1):
    """Each image of x (B, C·H·W) rotated by up to ``max_degrees`` and shifted by up to
    ``max_shift`` of its width and height, at random (bilinear; zero outside the image).

    The augmentation of DEC-DA (Guo et al. 2018), whose autoencoders trained on such images give
    codes that cluster by digit rather than by pose.
    """
    n = x.shape[0]
    u = torch.rand(n, 3, generator=generator).to(x) * 2 - 1
    angle = u[:, 0] * math.radians(max_degrees)
    cos, sin = angle.cos(), angle.sin()
    # affine_grid's coordinates run over [-1, 1]: a shift of s widths is 2s there.
    theta = torch.stack(
        [torch.stack([cos, -sin, 2 * max_shift * u[:, 1]], -1),
         torch.stack([sin, cos, 2 * max_shift * u[:, 2]], -1)], 1,
    )  # fmt: skip
    images = x.reshape(n, *image_shape)
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images, grid, align_corners=False).reshape(n, -1)


def autoencoder_loss(model, guide, x, target=None, target_weight=1.0) -> torch.Tensor:
    """−log p(x | z = encode(x)) [+ target_weight · ‖encode(x) − target‖²], summed over rows."""
    code = guide.encode(x)
    loss = -observation_dist(model.decoder(code), model.likelihood).log_prob(x).sum()
    if target is not None:
        loss = loss + target_weight * (code - target).pow(2).sum()
    return loss


def pretrain_autoencoder(model, guide, x, epochs, batch_size=256, lr=1e-3, seed=0, target=None,
                         target_weight=1.0, image_shape=None) -> list[float]:  # fmt: skip
    r"""Train ``guide.encode`` and ``model.decoder`` as an autoencoder; returns the epoch losses.

    The loss per point is :math:`-\log p(x \mid z = \mathrm{encode}(x))` under the model's
    likelihood (Bernoulli cross-entropy on grey levels in [0, 1], or the Gaussian), plus
    ``target_weight`` · ‖encode(x) − target‖² when a target embedding (N, z_dim) is given.
    With ``image_shape`` (C, H, W) every batch is augmented by :func:`random_affine` first.
    Batches are drawn from a CPU generator seeded with ``seed``, so the result is reproducible.
    """
    if epochs <= 0:
        return []
    params = _parameters(guide, model.decoder)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    guide.train(), model.train()
    for _ in range(epochs):
        total = torch.zeros((), device=x.device)
        for idx in _minibatches(x.shape[0], batch_size, generator):
            idx = idx.to(x.device)
            xb = x[idx]
            if image_shape is not None:
                xb = random_affine(xb, image_shape, generator)
            loss = autoencoder_loss(
                model, guide, xb, None if target is None else target[idx], target_weight
            )
            optimizer.zero_grad(set_to_none=True)
            (loss / xb.shape[0]).backward()
            optimizer.step()
            total += loss.detach()
        losses.append(total.item() / x.shape[0])
        # No stale gradient may reach the first SVI step, which accumulates into .grad.
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(
                f"autoencoder pretraining diverged (loss {losses[-1]}); try a lower learning rate"
            )
    return losses


@torch.no_grad()
def encode_all(guide, x, batch_size=1000) -> torch.Tensor:
    """``guide.encode`` on every row of x, in eval mode, shape (N, z_dim)."""
    was_training = guide.training
    guide.eval()
    try:
        return torch.cat(
            [guide.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        )
    finally:
        guide.train(was_training)


def fit_mixture(codes, k, covariance="diag", n_init=5, seed=0, min_var=1e-4,
                responsibilities=None) -> GaussianMixture:  # fmt: skip
    """A ``GaussianMixture`` on the codes (scikit-learn), with diagonal or full covariances.

    From k-means starts, of which (``n_init``) the fit of highest likelihood is kept; or, given
    ``responsibilities`` (N, k) of a partition found elsewhere, EM from the mixture that partition
    gives the codes (its weights, means and covariances on the codes: one M-step).
    """
    codes = np.asarray(codes, dtype=np.float64)
    # reg_covar bounds every eigenvalue, hence every conditional variance, away from the prior's
    # floor, so that set_mixture can represent the fit.
    reg = max(1e-6, 2 * min_var)
    options = dict(covariance_type=covariance, random_state=seed, reg_covar=reg)
    if responsibilities is None:
        return GaussianMixture(k, n_init=n_init, **options).fit(codes)
    resp = np.asarray(responsibilities, dtype=np.float64) + 10 * np.finfo(np.float64).eps
    counts = resp.sum(0)
    means = resp.T @ codes / counts[:, None]
    if covariance == "full":
        diff = codes[None] - means[:, None]  # (k, N, D)
        cov = np.einsum("kn,knd,kne->kde", resp.T, diff, diff) / counts[:, None, None]
        precisions = np.linalg.inv(cov + reg * np.eye(codes.shape[1]))
    else:
        precisions = 1.0 / (resp.T @ codes**2 / counts[:, None] - means**2 + reg)
    return GaussianMixture(
        k, weights_init=counts / counts.sum(), means_init=means, precisions_init=precisions,
        **options,
    ).fit(codes)  # fmt: skip


def umap_embedding(data, n_components, n_neighbors=30, seed=0) -> np.ndarray:
    """N2D's embedding: UMAP with ``min_dist=0`` (clusters packed tight), standardised per dim.

    ``random_state`` makes UMAP deterministic (and single-threaded).
    """
    import umap  # imported here: numba compiles on first import, which costs seconds

    n_neighbors = min(n_neighbors, len(data) - 1)
    emb = umap.UMAP(
        n_neighbors=n_neighbors,
        min_dist=0.0,
        n_components=n_components,
        random_state=seed,
        n_jobs=1,  # a random_state makes UMAP single-threaded anyway; said, it does not warn
    ).fit_transform(np.asarray(data, dtype=np.float32))
    return (emb - emb.mean(0)) / emb.std(0)


@torch.no_grad()
def narrow_posterior(guide, codes, fraction=0.1) -> None:
    """Start q(z|x) with a standard deviation of ``fraction`` of the codes' spread per dimension.

    ``codes``: :func:`encode_all` of the training data. Pretraining fits only the encoder mean; the variance head keeps its random weights, which
    give q(z|x) a standard deviation of about 0.8, as wide as the whole standardised UMAP
    embedding. SVI then starts from z's that say little about x (MNIST: a test ELBO of about
    -800 nats after the stage; digits: -342 against -56 narrowed), and on small data the mixture
    collapses to a few clusters before the encoder recovers. Narrowed, SVI starts where the
    initialisation left off. Guides without a ``z_head`` (a Gaussian q(z|·)) are left as they are.
    """
    head = getattr(guide, "z_head", None)
    if head is None:
        return
    variance = (fraction**2 * codes.var(dim=0)).clamp_min(2 * head.min_var)
    head.var.weight.zero_()
    # positive(raw) = softplus(raw) + floor, so raw = softplus⁻¹(var - floor).
    head.var.bias.copy_(torch.log(torch.expm1(variance - head.min_var)))


def fit_cluster_encoder(guide, x, responsibilities, epochs=2, batch_size=256, lr=1e-3, seed=0):
    """Fit q(y|x) (``guide.cluster_logits``) to the mixture's responsibilities (cross-entropy)."""
    optimizer = torch.optim.Adam(_parameters(guide), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in _minibatches(x.shape[0], batch_size, generator):
            idx = idx.to(x.device)
            log_q = guide.cluster_logits(x[idx]).log_softmax(-1)
            loss = -(responsibilities[idx] * log_q).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def initialise(model, guide, x, method="gmm", pretrain_epochs=10, batch_size=256, lr=1e-3,
               n_init=10, seed=0, umap_neighbors=30, target_weight=10.0, encoder_epochs=2,
               augment_shape=None) -> dict:  # fmt: skip
    """The initialisation stage on training data x (N, D); returns a report of what it did.

    Pretrains the autoencoder (``pretrain_epochs``; for ``umap`` with the encoder fitted to the
    embedding at the same time), then, by ``method`` (see the module doc),
    fits the mixture and writes it into the model's prior with ``model.set_mixture`` (weights
    too when ``model.learn_weights``), and fits a guide's own cluster encoder to the mixture's
    responsibilities. Everything is seeded from ``seed``.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {INIT_METHODS}")
    if method != "none" and not hasattr(model, "set_mixture"):
        raise ValueError(
            f"init={method!r} fits a Gaussian mixture prior p(z|y); model {model.name!r} has none "
            "(use gmvae, or init='none')"
        )
    if not hasattr(guide, "encode") and (pretrain_epochs > 0 or method != "none"):
        raise ValueError(f"guide {type(guide).__name__} has no encode(x) to pretrain")
    t0 = time.perf_counter()
    report = {"init": method, "pretrain_epochs": pretrain_epochs}
    torch.manual_seed(seed)
    target = None
    if method == "umap":
        target = umap_embedding(x.cpu().numpy(), model.z_dim, umap_neighbors, seed)
        target = torch.as_tensor(target, dtype=x.dtype, device=x.device)
        report["umap_s"] = time.perf_counter() - t0
    report["pretrain_loss"] = pretrain_autoencoder(
        model, guide, x, pretrain_epochs, batch_size, lr, seed, target, target_weight, augment_shape
    )
    codes = encode_all(guide, x) if pretrain_epochs > 0 or method != "none" else None
    if pretrain_epochs > 0:
        narrow_posterior(guide, codes)
    if method == "none":
        report["init_s"] = time.perf_counter() - t0
        return report
    codes = codes.cpu().numpy()
    partition = None
    if target is not None:
        # The clusters are found on the embedding itself, and their mixture re-estimated on the
        # codes (which only approximate it) by EM from that partition: a mixture fitted afresh to
        # the codes can settle on a likelier but worse one (docs/results.md, MNIST seed 3).
        embedded = target.cpu().numpy()
        on_embedding = fit_mixture(embedded, model.k, model.covariance, n_init, seed, model.min_var)
        partition = on_embedding.predict_proba(embedded)
        report["embedding_log_likelihood"] = float(on_embedding.score(embedded))
    gmm = fit_mixture(codes, model.k, model.covariance, n_init, seed, model.min_var, partition)
    model.set_mixture(gmm.means_, gmm.covariances_, gmm.weights_ if model.learn_weights else None)
    report["gmm_log_likelihood"] = float(gmm.score(codes))
    if hasattr(guide, "cluster_logits") and hasattr(guide, "z_in"):
        with torch.no_grad():
            # q(z|x,y) starts as the pretrained encoder for every y.
            guide.z_in.linear_b.weight.zero_()
        resp = torch.as_tensor(gmm.predict_proba(codes), dtype=x.dtype, device=x.device)
        fit_cluster_encoder(guide, x, resp, encoder_epochs, batch_size, lr, seed + 2)
    report["init_s"] = time.perf_counter() - t0
    return report
