"""The Gaussian-mixture VAE of Dilokthanakul et al. (2016), with latents w, x and cluster c."""

import contextlib
import functools
import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from pyro.ops.indexing import Vindex
from torch import nn

from . import nets
from .base import MixtureVAE
from .nets import ConvDecoder, decoder_out_features, mlp, observation_dist, positive, xavier_init

ARCHS = ("mlp", "conv")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class GMVAEW(MixtureVAE):
    r"""Dilokthanakul et al. 2016, "Deep Unsupervised Clustering with Gaussian Mixture VAEs".

    .. math::
        w \sim \mathcal N(0, I), \quad c \sim \mathrm{Cat}(1/K), \quad
        x \mid c, w \sim \mathcal N(\mu_c(w), \sigma^2_c(w)), \quad
        y \mid x \sim \mathrm{Bernoulli}(g_\theta(x))

    One tanh network emits all K means and variances (Appendix A). The observation site is
    named ``obs`` (the paper's y). The cluster's posterior is exact,

    .. math:: p(c \mid x, w) \propto \pi_c\, \mathcal N(x \mid \mu_c(w), \sigma^2_c(w)),

    so the guide needs only q(x|y) q(w|y) (:class:`~pyro_gmvae.guides.GMVAEWGuide`): it either
    enumerates c itself with that posterior, or leaves c to be enumerated in the model; the two
    losses are identical. ``arch="conv"`` uses the paper's convolutional decoder (Tables A.1-A.3).
    """

    name = "gmvae_w"
    cluster_site = "c"
    default_guide = "exact_posterior"

    def __init__(self, data_dim=784, k=10, x_dim=200, w_dim=150, hidden=1000, arch="mlp",
                 image_shape=None, likelihood="bernoulli", min_var=1e-4):  # fmt: skip
        super().__init__(data_dim, k, likelihood)
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
        if arch == "conv" and (image_shape is None or torch.Size(image_shape).numel() != data_dim):
            raise ValueError(f"arch='conv' needs an image_shape (C, H, W) with C*H*W = {data_dim}")
        self.x_dim, self.w_dim, self.hidden, self.min_var = x_dim, w_dim, hidden, min_var
        self.arch, self.image_shape = arch, None if image_shape is None else tuple(image_shape)
        self.prior_net = nn.Sequential(nn.Linear(w_dim, hidden), nn.Tanh())
        self.prior_loc = nn.Linear(hidden, k * x_dim)
        self.prior_var = nn.Linear(hidden, k * x_dim)
        out = decoder_out_features(data_dim, likelihood)
        if arch == "mlp":
            self.decoder = mlp([x_dim, hidden, hidden, out], final_activation=False)
        else:
            channels = out // (data_dim // self.image_shape[0])
            self.decoder = ConvDecoder(x_dim, self.image_shape, channels)
        xavier_init(self)
        self._shared = None  # the tables of the open shared_pass, if any

    @contextlib.contextmanager
    def shared_pass(self):
        """One ELBO evaluation's scope, in which the guide and the model share the prior
        network's pass and the component table.

        Under TraceEnum_ELBO the model replays the guide's w and x (the very tensors), so the
        guide's exact p(c|x,w) and the model's p(x|c,w) need the same μ_c(w), σ_c(w) (the
        network's largest layers) and the same (..., B, K, x_dim) table log N(x | μ_c, σ²_c), the
        largest elementwise work of a step. Inside the scope each is computed once per input
        tensors; the tables are dropped when it closes.
        """
        outer, self._shared = self._shared, {}
        try:
            yield
        finally:
            self._shared = outer

    def _reuse(self, name, inputs, compute):
        table = self._shared
        if table is None:
            return compute()
        key = (name, torch.is_grad_enabled(), *map(id, inputs))
        entry = table.get(key)
        # The inputs are kept with the result: an id is only unique while its tensor lives.
        if entry is None or any(a is not b for a, b in zip(entry[0], inputs)):
            entry = table[key] = (inputs, compute())
        return entry[1]

    def components(self, w):
        """μ_c(w) and σ_c(w) for every cluster: two tensors of shape (..., K, x_dim), computed
        once per ``w`` inside a :meth:`shared_pass`."""

        def compute():
            h = self.prior_net(w)
            shape = (*w.shape[:-1], self.k, self.x_dim)
            loc = self.prior_loc(h).reshape(shape)
            scale = positive(self.prior_var(h), self.min_var).sqrt().reshape(shape)
            return loc, scale

        return self._reuse("components", (w,), compute)

    def component_log_lik(self, x, w):
        """log N(x | μ_c(w), σ²_c(w)) for every cluster c, shape (..., B, K), computed once per
        ``(x, w)`` inside a :meth:`shared_pass`."""
        loc, scale = self.components(w)
        return self._reuse(
            "log_lik", (x, w), lambda: normal_log_density(x.unsqueeze(-2), loc, scale)
        )

    def cluster_log_posterior(self, x, w):
        """log p(c | x, w), shape (..., K): exact, from Bayes' rule over the K components."""
        return F.log_softmax(self.cluster_log_prior() + self.component_log_lik(x, w), dim=-1)

    def model(self, obs):
        self.check(obs)
        pyro.module(self.name, self)
        with pyro.plate("data", obs.shape[0]):
            w = pyro.sample("w", dist.Normal(obs.new_zeros(self.w_dim), 1.0).to_event(1))
            # Enumerated here unless the guide supplies c (then replayed from the guide).
            c = self.sample_cluster()
            loc, scale = self.components(w)  # (..., B, K, x_dim)
            # c is one-hot, enumerated as (K, 1, K): its argmax (K, 1) indexes the components.
            log_lik = functools.partial(self.component_log_lik, w=w)
            x = pyro.sample("x", ComponentNormal(loc, scale, c.argmax(-1), log_lik))
            pyro.sample("obs", observation_dist(self.decoder(x), self.likelihood), obs=obs)

    @torch.no_grad()
    def sample(self, c, w=None, use_mean=False):
        """Decoder means for one-hot c (N, K) and w (N, w_dim) (from the prior if None).

        With ``use_mean`` x is the component mean μ_c(w) rather than a draw (the paper's Fig. 5).
        """
        c = c.to(self.cluster_logits)  # F.one_hot gives int64; a float64 model needs float64
        if w is None:
            w = torch.randn(c.shape[0], self.w_dim, dtype=c.dtype, device=c.device)
        loc, scale = self.components(w)
        loc, scale = (c.unsqueeze(-1) * loc).sum(-2), (c.unsqueeze(-1) * scale).sum(-2)
        x = loc if use_mean else loc + scale * torch.randn_like(loc)
        return nets.mean_image(self.decoder(x), self.likelihood)


def select_component(params, idx):
    """``params[..., b, idx[..., b], :]`` for params (..., B, K, D) and cluster indices (..., B).

    Under enumeration idx is (K, 1), the same K clusters for every row: then one index_select
    (its backward an index_add) does it, about 10x faster on CPU than the advanced indexing of
    ``Vindex`` (whose backward is an accumulating index_put). Other shapes go through ``Vindex``.
    """
    if params.dim() == 3 and idx.dim() > 0 and idx.shape[-1] == 1:
        picked = params.index_select(-2, idx.reshape(-1))  # (B, n, D)
        return picked.transpose(0, 1).reshape(*idx.shape[:-1], params.shape[0], params.shape[-1])
    return Vindex(params)[..., idx, :]


def normal_log_density(x, loc, scale):
    """log N(x | loc, diag(scale²)), summed over the last dim (Normal(loc, scale).to_event(1))."""
    # The constant inside the sum: under torch.jit.trace a shape is a float32 tensor.
    return (-0.5 * ((x - loc) / scale) ** 2 - scale.log() - _HALF_LOG_2PI).sum(-1)


class ComponentNormal(TorchDistribution):
    r"""x ~ N(μ_c, diag σ²_c) for cluster indices c, given every component's loc and scale.

    ``loc`` and ``scale`` are (..., B, K, D), ``idx`` the clusters (..., B), under enumeration
    (K, 1). The density is read from the all-component table log N(x | μ_k, σ²_k), (..., B, K)
    (``log_lik(x)``, by default computed here), at k = c: no K-fold gather of loc and scale, and
    with :meth:`GMVAEW.component_log_lik` the table is the one p(c|x,w) already needed. It is
    not an ``Independent(Normal)``: reparametrisers that expect one (``LocScaleReparam``) do not
    apply to it; :meth:`selected` gives that distribution.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc, scale, idx, log_lik=None, validate_args=None):
        self.loc, self.scale, self.idx, self.log_lik = loc, scale, idx, log_lik
        batch_shape = torch.broadcast_shapes(idx.shape, loc.shape[:-2])
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ComponentNormal, _instance)
        new.loc, new.scale, new.log_lik = self.loc, self.scale, self.log_lik
        new.idx = self.idx.expand(batch_shape)
        super(ComponentNormal, new).__init__(
            torch.Size(batch_shape), self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def selected(self):
        """The same distribution as Normal(μ_c, σ_c).to_event(1), with the components gathered."""
        loc = select_component(self.loc, self.idx)
        scale = select_component(self.scale, self.idx)
        return dist.Normal(loc, scale).to_event(1).expand(self.batch_shape)

    def rsample(self, sample_shape=()):
        return self.selected().rsample(torch.Size(sample_shape))

    @property
    def mean(self):
        return self.selected().mean

    @property
    def variance(self):
        return self.selected().variance

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        if self.log_lik is None:
            table = normal_log_density(value.unsqueeze(-2), self.loc, self.scale)
        else:
            table = self.log_lik(value)
        return select_component(table.unsqueeze(-1), self.idx).squeeze(-1)
