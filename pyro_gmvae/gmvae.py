"""The "real" GMVAE of Rui Shu's analysis: a Gaussian mixture prior on z."""

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .base import MixtureVAE
from .nets import (
    GaussianHead,
    decoder_out_features,
    mean_image,
    mlp,
    observation_dist,
    xavier_init,
)


class GMVAE(MixtureVAE):
    r"""GMVAE with the mixture in latent space (Shu; cf. Dilokthanakul et al. 2016).

    .. math::
        y \sim \mathrm{Cat}(1/K), \quad z \mid y \sim \mathcal N(\mu(y), \sigma^2(y)), \quad
        x \mid z \sim \mathrm{Bernoulli}(f_\theta(z))

    μ(y) and σ²(y) are single linear layers on the one-hot y (softplus plus a floor for the
    variance), so column k of each layer is component k's mean (raw variance). Shu's guide is
    q(y|x) q(z|x,y); the VaDE guide (Jiang et al. 2017) takes q(y|x,z) = p(y|z) by Bayes' rule
    from this prior (:meth:`cluster_log_posterior`). ``learn_weights=True`` makes the mixture
    weights p(y) = softmax(logits) a parameter (VaDE); the sources keep p(y) uniform.

    ``covariance="full"`` gives each component a full covariance Σ_y = L_y L_yᵀ, with L_y the
    diagonal σ(y) above plus a learnt strictly lower triangle (zero at the start, so it starts as
    the diagonal model): clusters that are elongated and tilted in z, as a UMAP embedding's are,
    are then one component each instead of several.
    """

    name = "gmvae"

    def __init__(
        self,
        data_dim=784,
        k=10,
        z_dim=64,
        hidden=(512, 512),
        likelihood="bernoulli",
        min_var=1e-4,
        learn_weights=False,
        covariance="diag",
    ):
        super().__init__(data_dim, k, likelihood)
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
        self.covariance = covariance
        self.learn_weights = bool(learn_weights)
        if self.learn_weights:
            # A parameter instead of the uniform buffer: pyro.module registers it with the rest.
            logits = self.cluster_logits
            del self.cluster_logits
            self.cluster_logits = nn.Parameter(logits)
        self.z_dim, self.hidden, self.min_var = z_dim, tuple(hidden), min_var
        self.prior = GaussianHead(k, z_dim, min_var)  # p(z|y), linear in one-hot y
        if covariance == "full":
            # Strictly lower triangles of the K Cholesky factors (the diagonal is σ(y)).
            self.prior_tril = nn.Parameter(torch.zeros(k, z_dim, z_dim))
        self.decoder = mlp(
            [z_dim, *hidden, decoder_out_features(data_dim, likelihood)], final_activation=False
        )
        xavier_init(self)

    def model(self, x):
        self.check(x)
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            # Summed out exactly by enumeration: y is (K, 1, K) below.
            y = self.sample_cluster()
            z = pyro.sample("z", self.prior_dist(y))
            pyro.sample("x", observation_dist(self.decoder(z), self.likelihood), obs=x)

    def prior_dist(self, y):
        """p(z|y) for one-hot y of shape (..., K): batch shape (...), event (z_dim,)."""
        loc, scale = self.prior(y)
        if self.covariance == "diag":
            return dist.Normal(loc, scale).to_event(1)
        # The one-hot y picks its component's triangle; it may carry enumeration dims (K, 1, K).
        lower = torch.einsum("...k,kij->...ij", y, self.prior_tril.tril(-1))
        return dist.MultivariateNormal(loc, scale_tril=lower + torch.diag_embed(scale))

    def components(self):
        """The K prior components p(z|y=k) as one distribution of batch shape (K,)."""
        eye = torch.eye(self.k, dtype=self.cluster_logits.dtype, device=self.cluster_logits.device)
        return self.prior_dist(eye)

    def cluster_log_posterior(self, z):
        """log p(y | z) by Bayes' rule over the K components, shape (..., K), for z (..., z_dim)."""
        log_lik = self.components().log_prob(z.unsqueeze(-2))  # (..., K)
        return F.log_softmax(self.cluster_log_prior() + log_lik, dim=-1)

    @torch.no_grad()
    def set_mixture(self, means, covariances, weights=None):
        """Set p(z|y=k) = N(means[k], Σ_k) and, if given, p(y) = weights.

        ``covariances`` are variances (K, z_dim) for the diagonal model, matrices
        (K, z_dim, z_dim) for the full one (scikit-learn's ``covariances_`` of the same
        ``covariance_type``). Weights need ``learn_weights=True`` unless they are uniform (the
        sources' fixed p(y)).
        """
        means = torch.as_tensor(means, dtype=torch.float64)
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        shape = (self.k, self.z_dim) + ((self.z_dim,) if self.covariance == "full" else ())
        if means.shape != (self.k, self.z_dim) or covariances.shape != shape:
            raise ValueError(
                f"need means of shape ({self.k}, {self.z_dim}) and {self.covariance} covariances "
                f"of shape {shape}, got {tuple(means.shape)} and {tuple(covariances.shape)}"
            )
        if self.covariance == "full":
            cholesky = torch.linalg.cholesky(covariances)
            self.prior_tril.copy_(cholesky.tril(-1))
            variances = cholesky.diagonal(dim1=-2, dim2=-1) ** 2
        else:
            variances = covariances
        if not (variances > self.min_var).all():
            raise ValueError(f"every variance must exceed the floor min_var = {self.min_var}")
        device = self.cluster_logits.device
        self.prior.loc.weight.copy_(means.T)
        self.prior.loc.bias.zero_()
        # positive(raw) = softplus(raw) + floor, so raw = softplus⁻¹(var - floor) = log(expm1(.)).
        self.prior.var.weight.copy_(torch.log(torch.expm1(variances - self.min_var)).T)
        self.prior.var.bias.zero_()
        if weights is not None:
            logits = torch.as_tensor(weights, dtype=torch.float64).log()
            logits = logits.to(device, self.cluster_logits.dtype)
            uniform = torch.allclose(logits, torch.full_like(logits, -math.log(self.k)))
            if not self.learn_weights and not uniform:
                raise ValueError("non-uniform mixture weights need GMVAE(learn_weights=True)")
            self.cluster_logits.copy_(logits)

    @torch.no_grad()
    def sample(self, y, z=None):
        """Decoder means for one-hot y (N, K); z drawn from p(z|y) if None."""
        y = y.to(self.cluster_logits)  # F.one_hot gives int64; the linear prior needs floats
        if z is None:
            z = self.prior_dist(y).sample()
        return mean_image(self.decoder(z), self.likelihood)
