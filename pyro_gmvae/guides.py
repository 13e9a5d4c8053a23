"""Guides (variational families), separate from the models so that a user can swap them.

A guide is any callable with the model's signature that samples the model's latent sites. Each
guide here is an ``nn.Module`` that also exposes ``cluster_probs(x) -> (B, K)``.
"""

import torch
from torch import nn

import pyro
import pyro.distributions as dist

from .nets import ConvEncoder, GaussianHead, JointLinear, mlp, xavier_init


class MeanFieldGuide(nn.Module):
    r"""q(y|x) q(z|x,y) for M2, modified M2 and GMVAE (Shu's encoders).

    q(y|x) = Cat(π(x)) with a D-512-512-K ReLU net; q(z|x,y) = N(μ(x,y), σ²(x,y)) with a
    [x, y]-512-512 ReLU net and linear / softplus heads. The first layer on [x, y] is
    W_x x + W_y y, so under enumeration the x part is computed once, not K times.
    """

    name = "mean_field"
    fits = ("m2", "modified_m2", "gmvae")

    def __init__(self, model, hidden=None, min_var=None):
        super().__init__()
        hidden = tuple(model.hidden if hidden is None else hidden)
        self.data_dim, self.k, self.likelihood = model.data_dim, model.k, model.likelihood
        self.cluster_site = model.cluster_site
        self.y_net = mlp([model.data_dim, *hidden, model.k], final_activation=False)
        self.z_in = JointLinear(model.data_dim, model.k, hidden[0])
        self.z_net = mlp(list(hidden))
        self.z_head = GaussianHead(hidden[-1], model.z_dim, model.min_var if min_var is None else min_var)
        xavier_init(self.y_net), xavier_init(self.z_net), xavier_init(self.z_head)
        self._check = model.check

    def cluster_logits(self, x):
        return self.y_net(x)

    def z_params(self, x, y):
        """Location and scale of q(z|x,y); y may carry leading enumeration dims."""
        return self.z_head(self.z_net(torch.relu(self.z_in(x, y))))

    def forward(self, x):
        self._check(x)
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[0]):
            # Enumerated in parallel: y is (K, 1, K) here and z gets shape (K, B, z_dim).
            y = pyro.sample("y", dist.OneHotCategorical(logits=self.cluster_logits(x)), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.Normal(*self.z_params(x, y)).to_event(1))

    @torch.no_grad()
    def cluster_probs(self, x):
        """q(y|x), shape (B, K)."""
        return self.cluster_logits(x).softmax(-1)


class GMVAEWGuide(nn.Module):
    r"""q(x|y) q(w|y) for :class:`~pyro_gmvae.gmvae_w.GMVAEW`, with the cluster posterior exact.

    ``cluster="guide"`` (default) samples c in the guide from the exact posterior p(c|x,w),
    enumerated in parallel; ``cluster="model"`` leaves c to be enumerated in the model. The losses
    are identical; only the guide placement lets handlers scale or threshold the cluster KL.
    The recogniser is the paper's: D-H-H with BatchNorm and ReLU (or its conv net), then Gaussian
    heads for x and w.
    """

    name = "exact_posterior"
    fits = ("gmvae_w",)

    def __init__(self, model, cluster="guide"):
        super().__init__()
        if cluster not in ("guide", "model"):
            raise ValueError(f"cluster must be 'guide' or 'model', got {cluster!r}")
        self.cluster = cluster
        self.cluster_site = model.cluster_site if cluster == "guide" else None
        # A plain reference: the model's parameters belong to the model, not to this guide.
        self.__dict__["model"] = model
        if model.arch == "mlp":
            self.recogniser = mlp([model.data_dim, model.hidden, model.hidden], batchnorm=True)
            features = model.hidden
        else:
            self.recogniser = ConvEncoder(model.image_shape, out_features=500)
            features = 500
        self.x_head = GaussianHead(features, model.x_dim, model.min_var)
        self.w_head = GaussianHead(features, model.w_dim, model.min_var)
        xavier_init(self)

    def forward(self, obs):
        self.model.check(obs)
        pyro.module("guide", self)
        h = self.recogniser(obs)
        with pyro.plate("data", obs.shape[0]):
            x = pyro.sample("x", dist.Normal(*self.x_head(h)).to_event(1))
            w = pyro.sample("w", dist.Normal(*self.w_head(h)).to_event(1))
            if self.cluster == "guide":
                # q(c|x,w) = p(c|x,w) exactly: its weights make Σ_c the exact marginal over c.
                logits = self.model.cluster_log_posterior(x, w)
                pyro.sample("c", dist.OneHotCategorical(logits=logits), infer={"enumerate": "parallel"})

    @torch.no_grad()
    def cluster_probs(self, obs):
        """p(c | x, w) at the encoder means of x and w, shape (B, K)."""
        h = self.recogniser(obs)
        return self.model.cluster_log_posterior(self.x_head(h)[0], self.w_head(h)[0]).exp()


GUIDES = {
    "mean_field": MeanFieldGuide,
    "exact_posterior": GMVAEWGuide,
    "model_enum": lambda model: GMVAEWGuide(model, cluster="model"),
}
GUIDE_FITS = {"mean_field": MeanFieldGuide.fits, "exact_posterior": ("gmvae_w",), "model_enum": ("gmvae_w",)}


def make_guide(name, model, **kwargs):
    """The guide registered as ``name`` for ``model`` (one clear error if it does not fit)."""
    if name is None:
        name = model.default_guide
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of {sorted(GUIDES)}")
    if model.name not in GUIDE_FITS[name]:
        fitting = sorted(g for g, fits in GUIDE_FITS.items() if model.name in fits)
        raise ValueError(f"guide {name!r} does not fit model {model.name!r}; guides that fit: {fitting}")
    return GUIDES[name](model, **kwargs)
