r"""Guides (variational families), separate from the models so that a user can swap them.

A guide is any callable with the model's signature that samples the model's latent sites. Each
guide here is an ``nn.Module`` that also exposes ``cluster_probs(x) -> (B, K)`` and
``cluster_site`` (None when the guide leaves the cluster to be enumerated in the model).

Registered guides (:data:`GUIDES`; which models each fits is in :data:`GUIDE_FITS`):

================  ==============================================================  ==================
name              variational family                                              fits
================  ==============================================================  ==================
``mean_field``    q(y|x) q(z|x,y), q(z|x,y) diagonal Gaussian, y enumerated        m2, modified_m2,
                                                                                   gmvae
``iaf``           base q(z|x,y) followed by ``depth`` affine autoregressive        all four (on x and
                  flows (IAF, Kingma et al. 2016)                                  w for gmvae_w)
``spline``        base followed by rational-quadratic spline autoregressive        all four
                  flows (Durkan et al. 2019)
``cond_iaf``      as ``iaf``, every flow also conditioned on a context h(x, y)     all four
``cond_spline``   as ``spline``, every flow conditioned on h(x, y)                 all four
``relaxed``       y ~ Concrete / Gumbel-softmax (Jang et al.; Maddison et al.      m2, modified_m2,
                  2017), sampled and reparameterised instead of enumerated         gmvae
``vade``          q(z|x) p(y|z): q(y|x,z) is the model's exact p(y|z) (VaDE, Jiang   gmvae
                  et al. 2017), y enumerated; the decoder runs once per point
``exact_posterior``  q(x|obs) q(w|obs) p(c|x,w), c enumerated in the guide          gmvae_w
``model_enum``    q(x|obs) q(w|obs), c enumerated in the model                     gmvae_w
================  ==============================================================  ==================

Normalizing flows (Rezende & Mohamed 2015) make q(z|x,y) richer than a diagonal Gaussian:

.. math::
    u \sim \mathcal N(\mu(x,y), \operatorname{diag}\sigma^2(x,y)), \quad
    z = f_T \circ \dots \circ f_1(u), \quad
    \log q(z|x,y) = \log \mathcal N(u) - \textstyle\sum_t \log\lvert\det \partial f_t/\partial u_{t-1}\rvert .

Shu's hypothesis for why unsupervised M2 collapses (q(y|x) uniform, H(Y|X) = log K): M2
"prefers a mixture variational family over mixture data manifolds". A uniform q(y|x) costs no
KL and makes q(z|x) = (1/K) Σ_y q(z|x,y) a K-component mixture of Gaussians, so M2 spends y on a
richer variational family instead of on the clusters of the data. A q(z|x,y) that is rich
already (flows) removes that use of y, which may let y capture the clusters
(``examples/compare_guides.py`` tests this).
"""

import math
from typing import Protocol, runtime_checkable

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.poutine.messenger import Messenger
from torch import nn

from .nets import (
    ConvEncoder,
    GaussianHead,
    JointLinear,
    base_distribution,
    mlp,
    xavier_init,
)

Y_Z_MODELS = ("m2", "modified_m2", "gmvae")
ALL_MODELS = (*Y_Z_MODELS, "gmvae_w")
FLOWS = ("iaf", "spline", "cond_iaf", "cond_spline")
JARIASF_ANNEAL_RATE = math.log(2) / 50  # jariasf/GMVAE's 0.013862944: τ halves in 50 epochs


@runtime_checkable
class Guide(Protocol):
    """What a guide provides: the interface the estimators, the trainer, evaluation and the
    initialisation stage rely on. A new guide is one class meeting it plus one line in
    :data:`GUIDES`.

    Calling ``guide(x)`` samples the model's latent sites inside a plate named ``"data"`` at
    dim -1, under the model's site names, with ``pyro.module`` registering its networks; it
    makes no inference choice (the exact estimators enumerate its discrete sites themselves).

    Optional, used where present: ``encode(x)`` (a point code, trained by autoencoder
    pretraining), ``z_head`` (a :class:`~pyro_gmvae.nets.GaussianHead`, narrowed after it),
    ``cluster_logits(x)`` (a cluster encoder, fitted to the initial mixture), ``set_epoch(epoch)``
    (a schedule, e.g. a relaxed guide's temperature; called by the trainer every epoch).
    """

    #: The models (by ``model.name``) this guide fits.
    fits: tuple
    #: Why it fits no other model: shown by :func:`make_guide` when asked to.
    misfit: str
    #: The guide's discrete cluster site, the model's name for it; None when the guide leaves the
    #: cluster to the model (which the exact estimators then enumerate there).
    cluster_site: str | None
    #: True when q(y|·) is the model's exact posterior, with no parameters of its own: no
    #: estimator then needs to train a cluster encoder.
    exact_cluster_posterior: bool

    def __call__(self, x) -> None: ...

    def cluster_probs(self, x) -> torch.Tensor:
        """q(y|x) (or the cluster posterior at point estimates of the latents), shape (B, K)."""
        ...


def _default_hidden(kind, dim, cap=512):
    """Pyro's default hidden widths for each flow kind, capped at ``cap`` units."""
    widths = {"iaf": [3 * dim + 1], "cond_iaf": [10 * dim]}.get(kind, [10 * dim, 10 * dim])
    return [min(w, cap) for w in widths]


class Flow(nn.Module):
    r"""``depth`` invertible maps from ``pyro.distributions.transforms`` on a ``dim``-vector.

    Kinds (all act on the last dim, so any leading batch or enumeration dims pass through):

    - ``iaf``: :func:`~pyro.distributions.transforms.affine_autoregressive`,
      :math:`u'_i = \mu_i(u_{<i}) + \sigma_i(u_{<i})\, u_i` (IAF; Kingma et al. 2016).
    - ``spline``: :func:`~pyro.distributions.transforms.spline_autoregressive`, a monotone
      rational-quadratic spline per dim whose knots depend on :math:`u_{<i}` (Durkan et al.
      2019); the identity outside :math:`[-\text{bound}, \text{bound}]`.
    - ``cond_iaf`` / ``cond_spline``: the conditional versions
      (:func:`~pyro.distributions.transforms.conditional_affine_autoregressive`,
      :func:`~pyro.distributions.transforms.conditional_spline_autoregressive`), whose networks
      also read a context vector of size ``context_dim``.

    Every layer draws its own random autoregressive order (Pyro's default), so stacked layers
    do not all condition on the same prefix. ``hidden`` None takes Pyro's default widths capped
    at 512 units (uncapped, a spline on gmvae_w's 200-d x would have two 2000-unit layers).
    """

    def __init__(self, kind, dim, depth=2, hidden=None, context_dim=None, count_bins=8, bound=5.0):
        super().__init__()
        if kind not in FLOWS:
            raise ValueError(f"unknown flow {kind!r}; choose one of {FLOWS}")
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"flow depth must be an integer >= 1, got {depth!r}")
        self.kind, self.conditional = kind, kind.startswith("cond_")
        if self.conditional and not context_dim:
            raise ValueError(f"flow {kind!r} needs a context_dim")
        hidden = _default_hidden(kind, dim) if hidden is None else [int(h) for h in hidden]
        spline = dict(count_bins=count_bins, bound=bound)
        make = {
            "iaf": lambda: T.affine_autoregressive(dim, hidden),
            "spline": lambda: T.spline_autoregressive(dim, hidden, **spline),
            "cond_iaf": lambda: T.conditional_affine_autoregressive(dim, context_dim, hidden),
            "cond_spline": lambda: T.conditional_spline_autoregressive(
                dim, context_dim, hidden, **spline
            ),
        }[kind]
        # A ModuleList, so guide.parameters() (the optimiser) and pyro.module see every layer.
        self.layers = nn.ModuleList(make() for _ in range(depth))

    def transforms(self, context=None):
        """The list of transforms, bound to ``context`` (shape (..., context_dim)) if conditional.

        Pyro's conditional networks expand the context to the input's leading dims, so a context
        of shape (K, B, C) or (B, C) serves inputs of shape (K, B, dim) or (K, M, B, dim).
        """
        if self.conditional:
            if context is None:
                raise ValueError(f"flow {self.kind!r} is conditional: pass a context")
            return [layer.condition(context) for layer in self.layers]
        return list(self.layers)

    def push(self, base, context=None):
        """The distribution of f(u) for u ~ base; batch and event shapes are the base's."""
        return dist.TransformedDistribution(base, self.transforms(context))


def point_estimate(d):
    """A point summary of q: the mean of a Gaussian, or the base mean pushed through the flows."""
    d = base_distribution(d, lambda fn: isinstance(fn, dist.TransformedDistribution))
    if isinstance(d, dist.TransformedDistribution):
        u = d.base_dist.mean
        for t in d.transforms:
            u = t(u)
        return u
    return d.mean


class MeanFieldGuide(nn.Module):
    r"""q(y|x) q(z|x,y) for M2, modified M2 and GMVAE (Shu's encoders).

    q(y|x) = Cat(π(x)) with a D-512-512-K ReLU net; q(z|x,y) = N(μ(x,y), σ²(x,y)) with a
    [x, y]-512-512 ReLU net and linear / softplus heads. The first layer on [x, y] is
    W_x x + W_y y, so under enumeration the x part is computed once, not K times.
    """

    name = "mean_field"
    fits = Y_Z_MODELS
    misfit = "it guides a cluster y and latent z; gmvae_w has w, c, x and an exact p(c|x,w)"
    exact_cluster_posterior = False

    def __init__(self, model, hidden=None, min_var=None):
        super().__init__()
        hidden = tuple(model.hidden if hidden is None else hidden)
        self.data_dim, self.k, self.likelihood = model.data_dim, model.k, model.likelihood
        self.z_dim = model.z_dim
        self.cluster_site = model.cluster_site
        self.y_net = mlp([model.data_dim, *hidden, model.k], final_activation=False)
        self.z_in = JointLinear(model.data_dim, model.k, hidden[0])
        self.z_net = mlp(list(hidden))
        self.z_head = GaussianHead(
            hidden[-1], model.z_dim, model.min_var if min_var is None else min_var
        )
        xavier_init(self.y_net), xavier_init(self.z_net), xavier_init(self.z_head)
        self._check = model.check

    def cluster_logits(self, x):
        return self.y_net(x)

    def z_features(self, x, y):
        """The last hidden layer h(x, y) of the q(z|x,y) net; y may carry enumeration dims."""
        return self.z_net(torch.relu(self.z_in(x, y)))

    def z_params(self, x, y):
        """Location and scale of q(z|x,y); y may carry leading enumeration dims."""
        return self.z_head(self.z_features(x, y))

    def encode(self, x):
        """The mean of q(z|x,y) with the y input at zero: the code autoencoder pretraining trains.

        :func:`pyro_gmvae.init.initialise` zeroes the y weights after pretraining, so the
        pretrained encoder is then the mean of q(z|x,y) for every y.
        """
        return self.z_head.loc(self.z_net(torch.relu(self.z_in.linear_a(x))))

    def z_dist(self, x, y):
        """q(z|x,y): batch shape (..., B) from x (B, D) and y (..., B or 1, K), event (z_dim,)."""
        return dist.Normal(*self.z_params(x, y)).to_event(1)

    def sample_cluster(self, x):
        # Enumerated in parallel by the exact estimators: y is then (K, 1, K), z (K, B, z_dim).
        return pyro.sample(self.cluster_site, dist.OneHotCategorical(logits=self.cluster_logits(x)))

    def forward(self, x):
        self._check(x)
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[0]):
            y = self.sample_cluster(x)
            pyro.sample("z", self.z_dist(x, y))

    @torch.no_grad()
    def cluster_probs(self, x):
        """q(y|x), shape (B, K)."""
        return self.cluster_logits(x).softmax(-1)


class FlowGuide(MeanFieldGuide):
    r"""q(y|x) q(z|x,y) with q(z|x,y) a normalizing flow on the mean-field Gaussian.

    .. math::
        u \sim \mathcal N(\mu(x,y), \sigma^2(x,y)), \qquad
        z = f_T \circ \dots \circ f_1(u) \quad (\text{conditional kinds: } f_t(\cdot\,; h(x,y)))

    (Rezende & Mohamed 2015; IAF, Kingma et al. 2016; neural splines, Durkan et al. 2019). The
    context of the conditional flows is h(x, y), the last hidden layer of the base's encoder: it
    is computed once on the (K, B) grid of the enumerated y (with the x part of its first layer
    computed once for all K), and the flows' networks broadcast it, instead of concatenating the
    raw x with each of the K values of y.

    The base is not standardised (its mean is amortised), so splines use ``bound=5`` by
    default: the identity outside [-bound, bound]. ``flow=None`` gives the plain mean-field
    guide. Sampling and scoring the guide's own samples is one network pass per layer: the
    log-density reuses the cached inverse.
    """

    fits = Y_Z_MODELS  # the flow names serve gmvae_w with FlowGMVAEWGuide

    def __init__(self, model, flow="iaf", depth=2, flow_hidden=None, count_bins=8, bound=5.0,
                 hidden=None, min_var=None):  # fmt: skip
        super().__init__(model, hidden, min_var)
        self.name = "mean_field" if flow is None else flow
        context = self.z_head.loc.in_features
        self.flow = (
            None
            if flow is None
            else Flow(flow, model.z_dim, depth, flow_hidden, context, count_bins, bound)
        )

    def z_dist(self, x, y):
        h = self.z_features(x, y)
        base = dist.Normal(*self.z_head(h)).to_event(1)
        return base if self.flow is None else self.flow.push(base, h)


class RelaxedGuide(FlowGuide):
    r"""q(y|x) as a Concrete / Gumbel-softmax distribution, sampled instead of enumerated.

    .. math::
        y = \operatorname{softmax}\big((\log \pi(x) + g) / \tau\big), \quad g_k \sim \text{Gumbel}(0, 1),
        \qquad z \sim q(z \mid x, y)

    (Jang et al. 2017; Maddison et al. 2017). y lies inside the simplex and is a differentiable
    function of the logits, so one sample per point gives a pathwise gradient instead of the K
    decoder passes of enumeration. ``straight_through=True`` passes the one-hot argmax forward
    and the relaxed sample's gradient backward; its log-density scores the relaxed sample.

    The temperature τ is an attribute (``guide.temperature``, a float) that a trainer may set,
    or :meth:`set_epoch` anneals it as τ = max(τ_min, τ0 exp(-rate · epoch)); the defaults
    1.0 → 0.5 with rate ln 2 / 50 (τ halves in 50 epochs) are jariasf/GMVAE's.

    The model's cluster site is a one-hot ``OneHotCategorical``, which cannot score a relaxed
    value: wrap the model with :func:`relax_cluster_prior` (same site, same temperature) so the
    KL term compares two Concrete densities at the same τ (the ``relaxed`` estimator does this).

    In eval mode (``guide.eval()``) the relaxation is off: y ~ q(y|x) is one-hot and enumerated
    exactly as in :class:`MeanFieldGuide`, so evaluation reports the discrete ELBO of the same
    networks with the unmodified model, comparable with every other guide.
    """

    name = "relaxed"
    fits = Y_Z_MODELS
    misfit = "gmvae_w's cluster posterior p(c|x,w) is exact, so there is nothing to relax"

    def __init__(self, model, temperature=1.0, temperature_min=0.5, anneal_rate=JARIASF_ANNEAL_RATE,
                 straight_through=False, flow=None, **flow_kwargs):  # fmt: skip
        super().__init__(model, flow=flow, **flow_kwargs)
        self.name = "relaxed"
        if not temperature_min > 0 or anneal_rate < 0:
            raise ValueError(
                f"need temperature_min > 0 and anneal_rate >= 0, got {temperature_min}, {anneal_rate}"
            )
        self.temperature = temperature
        self.temperature_init, self.temperature_min = float(temperature), float(temperature_min)
        self.anneal_rate, self.straight_through = float(anneal_rate), bool(straight_through)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        value = float(value)
        if not value > 0:
            raise ValueError(f"the relaxation temperature must be > 0, got {value}")
        self._temperature = value

    def set_epoch(self, epoch) -> float:
        """Anneal: τ = max(τ_min, τ0 · exp(-rate · epoch)); returns the new τ."""
        self.temperature = max(
            self.temperature_min, self.temperature_init * math.exp(-self.anneal_rate * epoch)
        )
        return self.temperature

    def cluster_dist(self, x):
        logits = self.cluster_logits(x)
        tau = torch.tensor(self.temperature, dtype=logits.dtype, device=logits.device)
        cls = (
            dist.RelaxedOneHotCategoricalStraightThrough
            if self.straight_through
            else dist.RelaxedOneHotCategorical
        )
        return cls(tau, logits=logits)

    def sample_cluster(self, x):
        if not self.training:
            # Evaluation scores the discrete model: y ~ q(y|x), enumerated as in MeanFieldGuide.
            return super().sample_cluster(x)
        # The relaxed y is continuous: a reparameterised draw, never enumerated.
        return pyro.sample(self.cluster_site, self.cluster_dist(x))


class RelaxClusterPrior(Messenger):
    """Replace the model's one-hot prior at ``site`` by a Concrete prior with the same logits.

    ``temperature`` is a float or a zero-argument callable read at every call (so it follows a
    guide's annealed ``guide.temperature``). The straight-through class is used because its
    log-density scores the relaxed sample behind a straight-through one-hot value, and equals
    ``RelaxedOneHotCategorical``'s for relaxed values.
    """

    def __init__(self, site, temperature):
        super().__init__()
        self.site, self.temperature = site, temperature

    def _process_message(self, msg):
        if msg["name"] != self.site or msg["type"] != "sample":
            return
        fn = msg["fn"]
        base = base_distribution(fn, lambda d: hasattr(d, "logits"))
        tau = self.temperature() if callable(self.temperature) else self.temperature
        tau = torch.as_tensor(tau, dtype=base.logits.dtype, device=base.logits.device)
        relaxed = dist.RelaxedOneHotCategoricalStraightThrough(tau, logits=base.logits)
        msg["fn"] = relaxed.expand(fn.batch_shape)


def relax_cluster_prior(model_fn, site, temperature):
    """``model_fn`` with its cluster prior at ``site`` made Concrete at ``temperature``.

    For use with :class:`RelaxedGuide`, e.g.
    ``relax_cluster_prior(model.model, guide.cluster_site, lambda: guide.temperature)``.
    """
    return RelaxClusterPrior(site, temperature)(model_fn)


class VaDEGuide(nn.Module):
    r"""q(z|x) q(y|x,z) for GMVAE with q(y|x,z) = p(y|z), the model's exact cluster posterior.

    .. math::
        z \sim \mathcal N(\mu(x), \operatorname{diag}\sigma^2(x)), \qquad
        q(y \mid x, z) = p(y \mid z) =
            \frac{p(y)\,\mathcal N(z; \mu_y, \sigma^2_y)}{\sum_k p(k)\,\mathcal N(z; \mu_k, \sigma^2_k)}

    (VaDE; Jiang et al. 2017, eq. 16). With this q(y|x,z) the sum over y inside the ELBO is the
    log-density of the mixture prior, so the ELBO is
    E_q(z|x)[log p(x|z) + log Σ_k p(k) p(z|k) − log q(z|x)]: the tightest bound for this q(z|x).
    z does not depend on y, so the decoder runs once per point instead of K times (Shu's guide),
    and y has no encoder of its own: it is trained through the prior's parameters.

    ``encode(x)`` (the mean of q(z|x)) is the code that autoencoder pretraining trains
    (:mod:`pyro_gmvae.init`).
    """

    name = "vade"
    fits = ("gmvae",)
    misfit = "q(y|x,z) is the Bayes posterior of a Gaussian mixture prior p(z|y): gmvae's"
    exact_cluster_posterior = True  # q(y|x,z) has no parameters of its own (estimators.py)

    def __init__(self, model, hidden=None, min_var=None):
        super().__init__()
        hidden = tuple(model.hidden if hidden is None else hidden)
        self.cluster_site, self.k = model.cluster_site, model.k
        # A plain reference: the prior's parameters belong to the model, not to this guide.
        self.__dict__["model"] = model
        self.encoder = mlp([model.data_dim, *hidden])
        self.z_head = GaussianHead(
            hidden[-1], model.z_dim, model.min_var if min_var is None else min_var
        )
        xavier_init(self)

    def z_dist(self, x, y=None):
        """q(z|x), batch shape (B,), event (z_dim,). ``y`` is ignored: z does not depend on it
        (accepted so that code written for q(z|x,y) guides works unchanged)."""
        return dist.Normal(*self.z_head(self.encoder(x))).to_event(1)

    def encode(self, x):
        """The mean of q(z|x)."""
        return self.z_head.loc(self.encoder(x))

    def forward(self, x):
        self.model.check(x)
        pyro.module("guide", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.z_dist(x))
            # q(y|x,z) = p(y|z) exactly; enumerated in parallel (K, 1, K), Σ_y is exact.
            logits = self.model.cluster_log_posterior(z)
            pyro.sample(self.cluster_site, dist.OneHotCategorical(logits=logits))

    @torch.no_grad()
    def cluster_probs(self, x):
        """p(y | z = mean of q(z|x)), shape (B, K)."""
        return self.model.cluster_log_posterior(self.encode(x)).exp()


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
    misfit = "it needs a model whose cluster posterior is exact given the latents (gmvae_w)"
    exact_cluster_posterior = True  # p(c|x,w): trained through the model's terms

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

    def latent_dists(self, obs):
        """q(x|obs) and q(w|obs), each with batch shape (B,)."""
        h = self.recogniser(obs)
        return dist.Normal(*self.x_head(h)).to_event(1), dist.Normal(*self.w_head(h)).to_event(1)

    def forward(self, obs):
        self.model.check(obs)
        pyro.module("guide", self)
        q_x, q_w = self.latent_dists(obs)
        with pyro.plate("data", obs.shape[0]):
            x = pyro.sample("x", q_x)
            w = pyro.sample("w", q_w)
            if self.cluster == "guide":
                # q(c|x,w) = p(c|x,w) exactly: its weights make Σ_c the exact marginal over c.
                logits = self.model.cluster_log_posterior(x, w)
                pyro.sample("c", dist.OneHotCategorical(logits=logits))

    @torch.no_grad()
    def cluster_probs(self, obs):
        """p(c | x, w) at point estimates of x and w (the encoder means), shape (B, K)."""
        q_x, q_w = self.latent_dists(obs)
        return self.model.cluster_log_posterior(point_estimate(q_x), point_estimate(q_w)).exp()


class FlowGMVAEWGuide(GMVAEWGuide):
    r"""The GMVAE-w guide with normalizing flows on q(x|obs) and q(w|obs).

    .. math::
        x = f^x_T \circ \dots \circ f^x_1(u_x),\ u_x \sim \mathcal N(\mu_x(h), \sigma_x^2(h)); \quad
        w = f^w_T \circ \dots \circ f^w_1(u_w),\ u_w \sim \mathcal N(\mu_w(h), \sigma_w^2(h))

    with h = the recogniser's features of obs, also the context of the conditional kinds. The
    cluster is handled as in :class:`GMVAEWGuide` (exact posterior; ``cluster="model"`` leaves it
    to the model). ``cluster_probs`` uses the base means pushed through the flows.
    """

    fits = ("gmvae_w",)

    def __init__(
        self, model, flow="iaf", depth=2, flow_hidden=None, count_bins=8, bound=5.0, cluster="guide"
    ):
        super().__init__(model, cluster)
        self.name = flow
        context = self.x_head.loc.in_features
        # Built after xavier_init: the flows keep Pyro's own initialisation.
        self.x_flow = Flow(flow, model.x_dim, depth, flow_hidden, context, count_bins, bound)
        self.w_flow = Flow(flow, model.w_dim, depth, flow_hidden, context, count_bins, bound)

    def latent_dists(self, obs):
        h = self.recogniser(obs)
        q_x = self.x_flow.push(dist.Normal(*self.x_head(h)).to_event(1), h)
        return q_x, self.w_flow.push(dist.Normal(*self.w_head(h)).to_event(1), h)


class ModelEnumGuide(GMVAEWGuide):
    """:class:`GMVAEWGuide` with c left to the model, where the exact estimators enumerate it."""

    name = "model_enum"

    def __init__(self, model):
        super().__init__(model, cluster="model")


def _flow_guide(flow):
    def build(model, **kwargs):
        cls = next(c for c in (FlowGuide, FlowGMVAEWGuide) if model.name in c.fits)
        return cls(model, flow=flow, **kwargs)

    build.__doc__ = f"The {flow!r} flow guide: FlowGuide, or FlowGMVAEWGuide for gmvae_w."
    build.fits = FlowGuide.fits + FlowGMVAEWGuide.fits
    return build


#: Every guide by name: a :class:`Guide` class, or a builder ``(model, **kwargs) -> Guide`` with
#: a ``fits`` attribute.
GUIDES = {
    "mean_field": MeanFieldGuide,
    **{flow: _flow_guide(flow) for flow in FLOWS},
    "relaxed": RelaxedGuide,
    "vade": VaDEGuide,
    "exact_posterior": GMVAEWGuide,
    "model_enum": ModelEnumGuide,
}
#: The models each guide fits, read from the guides themselves.
GUIDE_FITS = {name: tuple(guide.fits) for name, guide in GUIDES.items()}


class GuideError(ValueError):
    """An unknown guide name, or a guide that does not fit the model."""


def make_guide(name, model, **kwargs):
    """The guide registered as ``name`` for ``model`` (one clear error if it does not fit)."""
    if name is None:
        name = model.default_guide
    if name not in GUIDES:
        raise GuideError(f"unknown guide {name!r}; choose one of {sorted(GUIDES)}")
    if model.name not in GUIDE_FITS[name]:
        fitting = sorted(g for g, fits in GUIDE_FITS.items() if model.name in fits)
        misfit = getattr(GUIDES[name], "misfit", None)
        why = f" ({misfit})" if misfit else ""
        raise GuideError(
            f"guide {name!r} does not fit model {model.name!r}{why}; guides that fit: {fitting}"
        )
    return GUIDES[name](model, **kwargs)
