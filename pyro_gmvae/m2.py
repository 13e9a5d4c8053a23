"""Kingma et al. (2014) M2 used without labels, and Rui Shu's modified M2."""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .base import MixtureVAE
from .nets import (
    JointLinear,
    decoder_out_features,
    mean_image,
    mlp,
    observation_dist,
    positive,
    xavier_init,
)


class M2(MixtureVAE):
    r"""Unsupervised M2 (Kingma et al. 2014, "Semi-supervised learning with deep generative models").

    .. math::
        y \sim \mathrm{Cat}(1/K), \quad z \sim \mathcal N(0, I), \quad
        x \mid y, z \sim \mathrm{Bernoulli}(f_\theta(z, y))

    Shu's analysis: nothing forces the decoder to use y, so with the default guide
    q(y|x) q(z|x,y) the optimum is q(y|x) uniform (H(Y|X) -> log K) and clustering collapses.
    """

    name = "m2"

    def __init__(
        self, data_dim=784, k=10, z_dim=64, hidden=(512, 512), likelihood="bernoulli", min_var=1e-4
    ):
        super().__init__(data_dim, k, likelihood)
        self.z_dim, self.hidden, self.min_var = z_dim, tuple(hidden), min_var
        self.decoder_in = JointLinear(z_dim, k, hidden[0])  # first layer on [z, y]
        self.decoder = mlp(
            [*hidden, decoder_out_features(data_dim, likelihood)], final_activation=False
        )
        xavier_init(self.decoder)

    def decode(self, z, y):
        """Decoder output (logits, or mean and raw variance) for z and one-hot y; broadcasts."""
        return self.decoder(torch.relu(self.decoder_in(z, y)))

    def model(self, x):
        self.check(x)
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            # Summed out exactly by enumeration: y is (K, 1, K) below.
            y = self.sample_cluster()
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", observation_dist(self.decode(z, y), self.likelihood), obs=x)

    @torch.no_grad()
    def sample(self, y, z=None):
        """Decoder means for one-hot y (N, K) and z (N, z_dim) (drawn from the prior if None)."""
        y = y.to(self.cluster_logits)  # F.one_hot gives int64; a float64 model needs float64
        if z is None:
            z = torch.randn(y.shape[0], self.z_dim, dtype=y.dtype, device=y.device)
        return mean_image(self.decode(z, y), self.likelihood)


class ModifiedM2(M2):
    r"""Shu's modified M2: the decoder's first layer is a per-cluster affine map of z.

    .. math::
        h = \mu(y) + \mathrm{diag}\big(\sqrt{\mathrm{softplus}(W_s y)}\big)\, z, \quad
        x \mid y, z \sim \mathrm{Bernoulli}(f_\theta(a(h)))

    so h is a Gaussian mixture with a positive-definite scale per cluster. ``h_activation`` is
    Shu's "relu" (his blog's choice) or "identity". The variance carries a floor: every logged run
    of Shu's unfloored version reached NaN between epochs 218 and 401.
    """

    name = "modified_m2"

    def __init__(self, data_dim=784, k=10, z_dim=64, hidden=(512, 512), likelihood="bernoulli",
                 min_var=1e-4, h_activation="relu"):  # fmt: skip
        if h_activation not in ("relu", "identity"):
            raise ValueError(f"h_activation must be 'relu' or 'identity', got {h_activation!r}")
        super().__init__(data_dim, k, z_dim, hidden, likelihood, min_var)
        del self.decoder_in
        self.h_loc = nn.Linear(k, z_dim)
        self.h_var = nn.Linear(k, z_dim)
        self.h_activation = h_activation
        self.decoder = mlp(
            [z_dim, *hidden, decoder_out_features(data_dim, likelihood)], final_activation=False
        )
        xavier_init(self)

    def decode(self, z, y):
        h = self.h_loc(y) + positive(self.h_var(y), self.min_var).sqrt() * z
        return self.decoder(torch.relu(h) if self.h_activation == "relu" else h)
