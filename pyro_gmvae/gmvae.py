"""The "real" GMVAE of Rui Shu's analysis: a Gaussian mixture prior on z."""

import pyro
import pyro.distributions as dist
import torch

from .base import MixtureVAE
from .m2 import _mean_image
from .nets import GaussianHead, decoder_out_features, mlp, observation_dist, xavier_init


class GMVAE(MixtureVAE):
    r"""GMVAE with the mixture in latent space (Shu; cf. Dilokthanakul et al. 2016).

    .. math::
        y \sim \mathrm{Cat}(1/K), \quad z \mid y \sim \mathcal N(\mu(y), \sigma^2(y)), \quad
        x \mid z \sim \mathrm{Bernoulli}(f_\theta(z))

    μ(y) and σ²(y) are single linear layers on the one-hot y (softplus plus a floor for the
    variance). With the guide q(y|x) q(z|x,y) and the plain ELBO this clusters MNIST at 80-95 %.
    """

    name = "gmvae"

    def __init__(
        self, data_dim=784, k=10, z_dim=64, hidden=(512, 512), likelihood="bernoulli", min_var=1e-4
    ):
        super().__init__(data_dim, k, likelihood)
        self.z_dim, self.hidden, self.min_var = z_dim, tuple(hidden), min_var
        self.prior = GaussianHead(k, z_dim, min_var)  # p(z|y), linear in one-hot y
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
            z = pyro.sample("z", dist.Normal(*self.prior(y)).to_event(1))
            pyro.sample("x", observation_dist(self.decoder(z), self.likelihood), obs=x)

    @torch.no_grad()
    def sample(self, y, z=None):
        """Decoder means for one-hot y (N, K); z drawn from p(z|y) if None."""
        y = y.to(self.cluster_logits)  # F.one_hot gives int64; the linear prior needs floats
        if z is None:
            loc, scale = self.prior(y)
            z = loc + scale * torch.randn_like(loc)
        return _mean_image(self.decoder(z), self.likelihood)
