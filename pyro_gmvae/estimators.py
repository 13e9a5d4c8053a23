r"""ELBO estimators for the discrete cluster variable, one name each.

Every estimator trains the same kind of pair: a model p(x, y, z) with a discrete cluster y and
a guide q(y|x) q(z|x,y) (or gmvae_w's q(x, w|obs) with c exact or left to the model). They
differ in how the sum over y is handled:

=============  ========================================  ================================  =====
name           objective (per data point)                gradient for the cluster encoder  cost
=============  ========================================  ================================  =====
``enum``       ELBO, y summed exactly (TraceEnum_ELBO)   exact (sum over K)                K·M
``enum-jit``   the same, compiled (JitTraceEnum_ELBO)    exact                             K·M
``score``      ELBO, y ~ q(y|x) sampled (Trace_ELBO)     score function (REINFORCE)        M
``graph``      ELBO, y sampled (TraceGraph_ELBO)         score function with a baseline    M
``relaxed``    relaxed ELBO, y ~ Concrete(q(y|x), τ)     pathwise (biased for the ELBO)    M
``tmc``        tensor Monte Carlo bound (TraceTMC_ELBO)  zero for a q(y|x): refused        K·S^n
``iwae-enum``  stratified IW bound, y summed exactly     wake-phi, KL(w ‖ q(y|x))          K·S
``rws``        IW bound, y sampled (wake-sleep)          wake-phi                          S
=============  ========================================  ================================  =====

(cost: decoder passes per data point; M = ``num_particles`` ELBO draws, S = ``num_particles``
importance samples, n = the number of continuous guide sites.)

Rule: no estimator silently leaves the cluster encoder untrained. A model/guide pair an
estimator cannot train is refused with a ``ValueError`` by :func:`make_estimator` (when given the
model and guide) or at the first call.

API used by the trainer: ``make_estimator(name, model, guide, num_particles)`` and, on the
returned :class:`Estimator`, ``loss`` / ``training_loss`` (differentiable) /
``loss_and_grads`` (a detached loss tensor: no host sync), ``check_cluster_objective(kl_weight, free_bits)`` (a KL weight or free bits are refused
by the estimators whose gradients they would silently corrupt), ``state_dict`` /
``load_state_dict`` (``graph`` keeps its baseline there), and the flags
``supports_cluster_objective`` and ``enumerates_cluster`` (the exact estimators mark the discrete
sites for parallel enumeration with Pyro's ``config_enumerate`` where the ELBO is built; the
models and guides make no inference choice).
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.infer
import torch
from pyro.infer import config_enumerate
from pyro.infer.enum import get_importance_trace
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger

from .guides import RelaxClusterPrior
from .nets import base_distribution
from .pyro_internals import (
    PointwiseRWS,
    TraceELBO,
    TraceGraph,
    TraceTMC,
    baseline_param_name,
    require_data_plate,
)

_DISCRETE = (dist.OneHotCategorical, dist.Categorical)
_RELAXED = (dist.RelaxedOneHotCategorical, dist.RelaxedBernoulli)


def cluster_placement(guide):
    """Where a guide puts the cluster: "model" (left to the model, enumerated there), "exact"
    (sampled from the model's exact posterior, no parameters of its own: gmvae_w's guides),
    "learned" (its own encoder q(y|x)), or None for a callable without ``cluster_site``.

    Read from the guide's :class:`~pyro_gmvae.guides.Guide` attributes ``cluster_site`` and
    ``exact_cluster_posterior``.
    """
    if guide is None or not hasattr(guide, "cluster_site"):
        return None
    if guide.cluster_site is None:
        return "model"
    if getattr(guide, "exact_cluster_posterior", False):
        return "exact"
    return "learned"


def _base(fn):
    """The distribution under Independent / expanded / masked wrappers."""
    return base_distribution(fn, lambda d: isinstance(d, _DISCRETE + _RELAXED))


def _is_scaled_or_masked(msg):
    scale = msg["scale"]
    return msg["mask"] is not None or torch.is_tensor(scale) or scale != 1.0


class ClusterGuard(Messenger):
    """Checks, and configures for one estimator, the guide's cluster site.

    ``mode`` is "enumerated" (the cluster must be discrete: summed exactly), "sampled" (discrete,
    drawn from q(y|x); ``baseline`` adds TraceGraph baseline options) or "relaxed" (it must be
    reparameterised; its temperature is recorded).
    ``refuse_objective`` raises when :func:`~pyro_gmvae.objectives.cluster_objective` has scaled,
    masked or thresholded the cluster term, which the estimator's gradient cannot carry.
    """

    def __init__(self, estimator, site, mode, refuse_objective=False, baseline=None):
        super().__init__()
        self.estimator, self.site, self.mode = estimator, site, mode
        self.refuse_objective, self.baseline = refuse_objective, baseline
        self.seen, self.site_name, self.temperature = False, site, None

    def __enter__(self):
        self.seen, self.temperature = False, None
        return super().__enter__()

    def _is_cluster(self, msg):
        if msg["type"] != "sample" or msg["is_observed"]:
            return False
        if self.site is not None:
            return msg["name"] == self.site
        return isinstance(_base(msg["fn"]), _DISCRETE + _RELAXED)  # unknown name: go by type

    def _process_message(self, msg):
        if not self._is_cluster(msg):
            return
        self.seen, self.site_name = True, msg["name"]
        fn, name = _base(msg["fn"]), self.estimator.name
        relaxed = bool(getattr(msg["fn"], "has_rsample", False))
        if self.mode == "relaxed":
            if not relaxed:
                raise ValueError(
                    f"estimator {name!r} needs a guide whose cluster site {msg['name']!r} is a "
                    f"reparameterised RelaxedOneHotCategorical (a relaxed guide); this guide's is "
                    f"{type(fn).__name__} (the relaxed guide is discrete in eval mode: evaluate "
                    "with 'enum')"
                )
            self.temperature = getattr(fn, "temperature", None)
            return
        if relaxed:
            raise ValueError(
                f"estimator {name!r} needs a discrete cluster site in the guide, but {msg['name']!r} "
                f"is a relaxed (continuous) {type(fn).__name__}; use estimator 'relaxed' with it"
            )
        if self.mode == "sampled" and self.baseline is not None:
            msg["infer"] = {**msg["infer"], "baseline": dict(self.baseline)}

    def _postprocess_message(self, msg):
        if not self._is_cluster(msg):
            return
        if self.refuse_objective and _is_scaled_or_masked(msg):
            raise ValueError(self.estimator._objective_error())
        if self.baseline is not None:
            self.estimator._collapse_baseline(msg)


def _callable_key(fn):
    """Identity of a callable; a bound method is re-created at each attribute access."""
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        return id(fn.__self__), fn.__func__
    return id(fn)


class Estimator:
    r"""A Pyro ELBO behind one name.

    ``loss(model, guide, *args)`` returns a tensor whose value is the reported loss (the negative
    bound, summed over the batch) and whose gradient is the estimator's gradient;
    ``loss_and_grads`` back-propagates it and returns it detached, without reading it back to the
    host, so GPU training does not synchronise every step.

    This base class is ``enum``: TraceEnum_ELBO, the cluster summed exactly,

    .. math::
        \mathcal L(x) = \sum_y q(y|x)\Big(\mathbb E_{q(z|x,y)}\big[\log p(x,z|y) - \log q(z|x,y)\big]
                        + \log p(y) - \log q(y|x)\Big),

    with M = ``num_particles`` draws of z per cluster (vectorised) averaged. Exact gradients for
    q(y|x), reparameterised ones for q(z|x,y); each step costs K decoder passes per draw.
    It accepts every guide whose cluster site is discrete or left to the model, and a KL weight
    or free bits (:mod:`~pyro_gmvae.objectives`).
    """

    #: True if objectives.cluster_objective (KL weight β, free bits λ) may wrap model and guide.
    supports_cluster_objective = True
    #: True if the objective sums the cluster exactly: its discrete sites are then enumerated in
    #: parallel (Pyro's ``config_enumerate``, applied here rather than in the models and guides).
    enumerates_cluster = True
    #: Cluster placements (see :func:`cluster_placement`) this estimator refuses, with the reason.
    refused_placements: dict = {}
    _guard_mode = "enumerated"

    def __init__(self, name="enum", elbo=None, model=None, guide=None, num_particles=1):
        self.name, self.num_particles = name, num_particles
        self.elbo = self._make_elbo() if elbo is None else elbo
        # The cluster site's name (the guide's is the model's); None: the guard finds it by type.
        self.cluster_site = getattr(model, "cluster_site", None) or getattr(
            guide, "cluster_site", None
        )
        self._placement = cluster_placement(guide)
        self._checked = set()
        if guide is not None:
            self.check_guide(guide)

    def _make_elbo(self):
        # max_plate_nesting=1: the data plate is dim -1, so enumeration uses dims -2 and left.
        m = self.num_particles
        return pyro.infer.TraceEnum_ELBO(
            max_plate_nesting=1, num_particles=m, vectorize_particles=m > 1
        )

    # --- checks -----------------------------------------------------------------------------

    def check_guide(self, guide):
        """Refuse (ValueError) a guide whose cluster encoder this estimator would not train."""
        placement = cluster_placement(guide)
        if placement in self.refused_placements:
            what = {"model": "leaves the cluster to the model", "exact": "samples the cluster from the "
                    "exact posterior", "learned": "has its own cluster encoder q(y|x)"}[placement]  # fmt: skip
            raise ValueError(
                f"estimator {self.name!r} refuses this guide ({type(guide).__name__}, which {what}): "
                f"{self.refused_placements[placement]}"
            )

    def _check_call(self, guide):
        """Check the guide passed at call time (once), or rely on the one given at construction."""
        key = _callable_key(guide)
        if key in self._checked:
            return
        if cluster_placement(guide) is not None:
            self.check_guide(guide)
        elif self.refused_placements and self._placement is None:
            raise ValueError(
                f"estimator {self.name!r} must know the guide to check it: call "
                f"make_estimator({self.name!r}, model=model, guide=guide)"
            )
        self._checked.add(key)

    def check_cluster_objective(self, kl_weight=1.0, free_bits=0.0):
        """Raise a clear error if a KL weight or free bits are asked of an estimator without them."""
        if not self.supports_cluster_objective and (kl_weight != 1.0 or free_bits != 0.0):
            raise ValueError(self._objective_error())

    def _objective_error(self):
        return (
            f"estimator {self.name!r} does not support a KL weight or free bits on the cluster term "
            "(they would corrupt its gradient for q(y|x)); use kl_weight=1 and free_bits=0, or "
            "estimator 'enum', 'enum-jit' or 'relaxed'"
        )

    # --- losses -------------------------------------------------------------------------------

    def _guard(self, guide, **kw):
        return ClusterGuard(self, self.cluster_site, self._guard_mode,
                            refuse_objective=not self.supports_cluster_objective, **kw)  # fmt: skip

    def _configure(self, model, guide, guard=None):
        """(model, guide) as this objective runs them: the guide checked by ``guard`` and, for
        the exact estimators, every discrete site of both marked for parallel enumeration."""
        guide = (guard or self._guard(guide))(guide)
        if not self.enumerates_cluster:
            return model, guide
        # The model's cluster is enumerated when the guide leaves it there (model_enum), and
        # replayed from the guide otherwise.
        return config_enumerate(model, "parallel"), config_enumerate(guide, "parallel")

    def loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        return self.elbo.differentiable_loss(*self._configure(model, guide), *args, **kwargs)

    def training_loss(self, model, guide, *args, **kwargs):
        """The objective a training step differentiates: its value is the loss, its gradient
        the estimator's. ``loss_and_grads`` back-propagates it; a data-parallel wrapper
        (:class:`~pyro_gmvae.train.Trainer` under ``torch.distributed``) returns it from its
        ``forward`` and back-propagates it itself."""
        return self.loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.training_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.detach()

    def state_dict(self) -> dict:
        """Estimator state that a checkpoint must keep (only ``graph``'s baseline has any)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class JitEnumEstimator(Estimator):
    r"""``enum-jit``: the ``enum`` objective and gradients, compiled by JitTraceEnum_ELBO.

    The traced graph bakes in everything that is not a tensor argument, so it is compiled once
    per (model, guide, batch shape) and rebuilt when any of them changes: a ragged last batch
    costs one extra compilation, and re-wrapping the model for a new KL weight (annealing)
    recompiles. Parameters reach the graph through the param store (the models and guides call
    ``pyro.module``). Only the training loss (``training_loss``, ``loss_and_grads``) is
    compiled; ``loss`` (evaluation, often under ``no_grad`` and in eval mode, which a trace would
    bake in) runs the plain TraceEnum_ELBO.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plain = super()._make_elbo()
        self._compiled_key, self._compiled, self._traced = None, None, set()

    def _make_elbo(self):
        m = self.num_particles
        return pyro.infer.JitTraceEnum_ELBO(
            max_plate_nesting=1,
            num_particles=m,
            vectorize_particles=m > 1,
            ignore_jit_warnings=True,
        )

    def loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        return self._plain.differentiable_loss(*self._configure(model, guide), *args, **kwargs)

    def training_loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        key = (_callable_key(model), _callable_key(guide))
        if key != self._compiled_key:
            # The compiled closure keeps the first model and guide it saw, so a new pair (e.g. a
            # new KL weight) needs a new ELBO; the shape kwarg below makes one graph per shape.
            configured_model, configured_guide = self._configure(model, guide)

            def model_fn(*a, _shapes=None, **k):
                return configured_model(*a, **k)

            def guide_fn(*a, _shapes=None, **k):
                return configured_guide(*a, **k)

            self._compiled_key, self._compiled = key, (self._make_elbo(), model_fn, guide_fn)
            self._traced = set()
        elbo, model_fn, guide_fn = self._compiled
        shapes = tuple(tuple(a.shape) for a in args if torch.is_tensor(a))
        with warnings.catch_warnings():
            # Scoped to this call: torch.jit.trace, which JitTraceEnum_ELBO compiles with, is
            # deprecated on recent torch (FutureWarning) and still works.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            if shapes not in self._traced:
                # Compiling runs the model and guide, and their draws, more than once: compile on
                # a fork of the RNG, so that every step draws what the eager enum step draws (a
                # resumed run, which compiles again, then continues exactly).
                cuda = [a.device for a in args if torch.is_tensor(a) and a.is_cuda][:1]
                with torch.random.fork_rng(devices=cuda):
                    elbo.differentiable_loss(model_fn, guide_fn, *args, _shapes=shapes, **kwargs)
                self._traced.add(shapes)
            return elbo.differentiable_loss(model_fn, guide_fn, *args, _shapes=shapes, **kwargs)


def _value_with_grad_of(value, surrogate):
    """A tensor equal to ``value`` whose gradient is that of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


class ScoreEstimator(Estimator):
    r"""``score``: the ELBO with the cluster *sampled*, y ~ q(y|x) (Trace_ELBO).

    .. math::
        \nabla_\phi \mathcal L = \mathbb E_{q(y|x)\,q(z|x,y)}\big[\nabla_\phi \log q(y|x)\,
        (\log p(x,y,z) - \log q(y,z|x)) + \text{pathwise terms}\big]

    the score-function (REINFORCE; Williams 1992, Ranganath et al. 2014 "Black box variational
    inference") estimator: unbiased, no baseline, variance growing with the spread of the
    per-point ELBO; one decoder pass per draw instead of K. Refuses guides that leave the cluster
    to the model (``model_enum``: nothing to sample) and relaxed guides, and a KL weight or free
    bits (scaling or masking log q(y|x) would scale or remove its score term).
    """

    supports_cluster_objective = False
    enumerates_cluster = False
    refused_placements = {
        "model": "the cluster is enumerated in the model, and this estimator samples it from the "
        "guide; use a guide that samples the cluster (for gmvae_w: 'exact_posterior')"
    }
    _guard_mode = "sampled"

    def _make_elbo(self):
        m = self.num_particles
        return TraceELBO(max_plate_nesting=1, num_particles=m, vectorize_particles=m > 1)

    def _loss_and_surrogate(self, model, guide, args, kwargs):
        self._check_call(guide)
        guard = self._guard(guide)
        loss, surrogate = self.elbo.loss_and_surrogate(model, guard(guide), args, kwargs)
        self._require_seen(guard)
        return loss, surrogate

    def _require_seen(self, guard):
        if not guard.seen:
            raise ValueError(
                f"estimator {self.name!r} needs the guide to sample the cluster site "
                f"{self.cluster_site!r}, but it did not"
            )

    def loss(self, model, guide, *args, **kwargs):
        return _value_with_grad_of(*self._loss_and_surrogate(model, guide, args, kwargs))


class GraphEstimator(ScoreEstimator):
    r"""``graph``: ``score`` with Rao-Blackwellisation and a baseline (TraceGraph_ELBO).

    The score term of y multiplies only the costs downstream of y (Schulman et al. 2015,
    "Gradient estimation using stochastic computation graphs"), minus a baseline b: a decaying
    average of the per-point downstream cost, b ← β b + (1 − β) mean_batch(cost) with
    β = ``baseline_beta`` (Mnih & Gregor 2014, NVIL). Pyro keeps that average per batch
    position; here it is collapsed to one scalar before each step, so any batch size works and the
    baseline is one number (``state_dict`` holds it for checkpoints). The baseline does not depend
    on the current draw, so the gradient stays unbiased. Same cost and refusals as ``score``.
    ``loss`` (evaluation) is ``score``'s, so that evaluating never moves the baseline.
    """

    def __init__(self, *args, baseline_beta=0.9, **kwargs):
        if not 0.0 <= baseline_beta < 1.0:
            raise ValueError(f"baseline_beta must be in [0, 1), got {baseline_beta}")
        self.baseline_beta = baseline_beta
        super().__init__(*args, **kwargs)
        self._score = TraceELBO(max_plate_nesting=1, num_particles=self.num_particles,
                                 vectorize_particles=self.num_particles > 1)  # fmt: skip

    def _make_elbo(self):
        m = self.num_particles
        return TraceGraph(max_plate_nesting=1, num_particles=m, vectorize_particles=m > 1)

    def _collapse_baseline(self, msg):
        store, name = pyro.get_param_store(), baseline_param_name(msg["name"])
        self._site = msg["name"]
        if name in store:
            value = store[name].detach()
            store[name] = value.mean().expand(msg["fn"].batch_shape).clone()

    def loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        guard = self._guard(guide)  # no baseline: evaluation must not move it
        loss, surrogate = self._score.loss_and_surrogate(model, guard(guide), args, kwargs)
        self._require_seen(guard)
        return _value_with_grad_of(loss, surrogate)

    def training_loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        baseline = {"use_decaying_avg_baseline": True, "baseline_beta": self.baseline_beta}
        guard = self._guard(guide, baseline=baseline)
        elbo, surrogate = self.elbo.elbo_and_surrogate(model, guard(guide), args, kwargs)
        self._require_seen(guard)
        return _value_with_grad_of(-elbo, surrogate)

    def state_dict(self):
        site = getattr(self, "_site", None)
        store = pyro.get_param_store()
        if site is None or baseline_param_name(site) not in store:
            return {}
        return {"site": site, "baseline": store[baseline_param_name(site)].detach().mean().clone()}

    def load_state_dict(self, state):
        store = pyro.get_param_store()
        if state:
            self._site = state["site"]
            store[baseline_param_name(state["site"])] = state["baseline"].clone()
        elif getattr(self, "_site", None) is not None:
            # No baseline yet in that state: forget one made since (e.g. by a timed step).
            if baseline_param_name(self._site) in store:
                del store[baseline_param_name(self._site)]
            self._site = None


class RelaxedEstimator(Estimator):
    r"""``relaxed``: the Gumbel-softmax / Concrete relaxation (Trace_ELBO, all pathwise).

    The guide draws a relaxed ỹ ~ Concrete(q(y|x), τ) by reparameterisation; the model's cluster
    prior is swapped for Concrete(p(y), τ_p) (:class:`RelaxClusterPrior`) and the decoder reads
    ỹ. Objective: the relaxed ELBO
    E[log p_τ(ỹ) + log p(x, z|ỹ) − log q_τ(ỹ|x) − log q(z|x, ỹ)], a different (relaxed) model,
    so its gradients are biased for the discrete ELBO, low-variance, and one decoder pass per draw.
    τ is read from the guide's cluster site at every call (the guide owns the schedule);
    ``prior_temperature`` fixes τ_p instead (Maddison et al. suggest a lower one for the prior).
    A KL weight scales the relaxed log-density ratio; free bits replace it by the exact discrete
    KL(q(y|x) ‖ p(y)), floored (as in jariasf/GMVAE). Refuses guides whose cluster site is
    discrete (enumerated or sampled) and model-side clusters. Straight-through guides work
    (the prior scores the relaxed sample behind the one-hot value).
    """

    refused_placements = {"model": "the cluster is enumerated in the model; use a relaxed guide"}
    enumerates_cluster = False
    _guard_mode = "relaxed"

    def __init__(self, *args, prior_temperature=None, **kwargs):
        if prior_temperature is not None and not float(prior_temperature) > 0:
            raise ValueError(f"prior_temperature must be > 0, got {prior_temperature}")
        self.prior_temperature = prior_temperature
        super().__init__(*args, **kwargs)

    def _make_elbo(self):
        m = self.num_particles
        return TraceELBO(max_plate_nesting=1, num_particles=m, vectorize_particles=m > 1)

    def loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        guard = self._guard(guide)

        def temperature():
            if self.prior_temperature is not None:
                return self.prior_temperature
            if guard.temperature is None:
                raise ValueError(
                    "the guide's cluster site has no temperature; pass prior_temperature"
                )
            return guard.temperature

        site = self.cluster_site or getattr(guide, "cluster_site", None)
        site = site or getattr(getattr(model, "__self__", None), "cluster_site", None)
        if site is None:
            raise ValueError(
                "estimator 'relaxed' must know the cluster site: call "
                "make_estimator('relaxed', model=model, guide=guide)"
            )
        relax = RelaxClusterPrior(site, temperature)  # the guides' Concrete-prior handler
        loss, surrogate = self.elbo.loss_and_surrogate(relax(model), guard(guide), args, kwargs)
        if not guard.seen:
            raise ValueError(
                f"estimator {self.name!r} needs the guide to sample a relaxed cluster site"
            )
        return _value_with_grad_of(loss, surrogate)


class _ParticleSamples(Messenger):
    """Marks the guide's continuous sites for S parallel draws (TraceTMC_ELBO's num_samples)."""

    def __init__(self, num_samples):
        super().__init__()
        self.num_samples = num_samples

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"] and not msg["infer"].get("enumerate"):
            msg["infer"] = {**msg["infer"], "enumerate": "parallel", "num_samples": self.num_samples,
                            "expand": False}  # fmt: skip


_UNTRAINED_ENCODER = (
    "this bound sums the cluster exactly and does not depend on q(y|x), so the guide's cluster "
    "encoder would get exactly zero gradient; use 'iwae-enum' (the same bound plus a wake-phi "
    "term for q(y|x)) or a guide without a cluster encoder (gmvae_w's 'exact_posterior' or "
    "'model_enum')"
)


class TMCEstimator(Estimator):
    r"""``tmc``: the tensor Monte Carlo bound (Aitchison 2019; TraceTMC_ELBO).

    S = ``num_particles`` draws of every continuous guide site, the cluster summed exactly, and
    all S^n combinations of the n sampled sites averaged inside the log (for gmvae_w's x and w:
    S² pairs), e.g. with the cluster in the model

    .. math:: \log \frac1{S^2}\sum_{s,t} \sum_c \frac{p(\mathrm{obs}, x_s, w_t, c)}{q(x_s, w_t|\mathrm{obs})},

    a lower bound on log p(obs) that tightens with S; pathwise gradients. An enumerated guide
    cluster cancels out of the estimate (q(c) weights its own p/q), so this estimator accepts
    only guides without their own cluster encoder: gmvae_w's ``exact_posterior`` (q(c) is the
    model's exact posterior, trained through the model's terms) and ``model_enum``. The
    mean-field guide's q(y|x) would get zero gradient: refused. No KL weight or free bits.
    Pyro's TraceTMC_ELBO counts a model-enumerated cluster's prior twice; :class:`~pyro_gmvae.pyro_internals.TraceTMC`
    fixes that (the test checks the bound against a hand computation).
    """

    supports_cluster_objective = False
    refused_placements = {"learned": _UNTRAINED_ENCODER}

    def _make_elbo(self):
        return TraceTMC(max_plate_nesting=1)

    def loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        model, guide = self._configure(model, guide)
        if self.num_particles > 1:
            # After config_enumerate (inner): the cluster is summed, the rest drawn S times.
            guide = _ParticleSamples(self.num_particles)(guide)
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)


class IWAEEnumEstimator(Estimator):
    r"""``iwae-enum``: the importance-weighted bound with the cluster summed exactly (stratified).

    With z_{y,s} ~ q(z|x,y), s = 1..S (S = ``num_particles``) for each cluster y,

    .. math::
        \mathcal L_S(x) = \log \sum_y \frac1S \sum_{s=1}^S
            \frac{p(x, y, z_{y,s})}{q(z_{y,s} \mid x, y)}
        \;\ge\; \mathrm{ELBO}(x), \qquad \mathcal L_S \to \log p(x) \ (S \to \infty),

    (Burda et al. 2016, "Importance weighted autoencoders", stratified over y). Pathwise
    gradients for the model and q(z|x,y); K·S decoder passes per point. The bound does not
    depend on q(y|x), so a learned cluster encoder is trained by the wake-phi term of reweighted
    wake-sleep (Bornschein & Bengio 2015): KL(w̄ ‖ q(y|x)) with the self-normalised weights
    w̄_y ∝ (1/S) Σ_s p(x,y,z_{y,s}) / q(z_{y,s}|x,y), a consistent estimate of p(y|x), held fixed.
    That term moves the gradient of q(y|x) only: the reported loss is −Σ_batch L_S exactly.
    Guides whose cluster is exact (gmvae_w) or left to the model need no such term (the sum over c
    is then the marginal). Implemented with Pyro's machinery: a particle plate at dim −2, the
    cluster enumerated in parallel, log weights from the two traces. Refuses non-reparameterised
    continuous sites, unplated sites, a relaxed cluster, a KL weight and free bits.
    """

    supports_cluster_objective = False

    def loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        s = self.num_particles
        model_fn, guide_fn = self._configure(model, guide)
        particles = pyro.plate("iwae_particles", s, dim=-2)
        # As TraceTMC_ELBO: the guide enumerates from dim -3; the model continues its allocation.
        guide_fn = EnumMessenger(first_available_dim=-3)(particles(guide_fn))
        model_fn = EnumMessenger()(pyro.plate("iwae_particles", s, dim=-2)(model_fn))
        model_trace, guide_trace = get_importance_trace("flat", 2, model_fn, guide_fn, args, kwargs)
        log_w, cluster = 0.0, None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                require_data_plate(site, self.name)
                log_w = log_w + site["log_prob"]
        for site in guide_trace.nodes.values():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            require_data_plate(site, self.name)
            if site["infer"].get("_enumerate_dim") is not None:
                cluster = site  # summed exactly: its q is not part of the weight
                continue
            if not site["fn"].has_rsample:
                raise ValueError(f"estimator {self.name!r} needs reparameterised continuous sites; "
                                 f"{site['name']!r} is not")  # fmt: skip
            log_w = log_w - site["log_prob"]
        batch = log_w.shape[-1]
        log_w = log_w.expand(*log_w.shape[:-2], s, batch)
        bound = log_w.reshape(-1, batch).logsumexp(0) - math.log(s)
        loss = -bound.sum()
        if cluster is None or cluster_placement_of(self, guide) != "learned":
            return loss
        # Wake-phi for q(y|x): cross-entropy to the fixed self-normalised cluster weights.
        dim = cluster["infer"]["_enumerate_dim"]
        per_y = log_w.movedim(dim, 0)
        k = per_y.shape[0]
        log_marg = per_y.reshape(k, -1, batch).logsumexp(1)  # (K, B)
        weights = log_marg.softmax(0).detach()
        log_q = (
            cluster["log_prob"].expand(log_w.shape).movedim(dim, 0).reshape(k, -1, batch).mean(1)
        )
        cross_entropy = -(weights * log_q).sum()
        return loss + (cross_entropy - cross_entropy.detach())


def cluster_placement_of(estimator, guide):
    """The placement of the guide passed at call time, else the one known at construction."""
    placement = cluster_placement(guide)
    return placement if placement is not None else estimator._placement


class RWSEstimator(Estimator):
    r"""``rws``: reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019), y sampled.

    S = ``num_particles`` ≥ 2 joint draws (y_s, z_s) ~ q(y|x) q(z|x,y) per data point, weights
    w_s = p(x, y_s, z_s) / q(y_s, z_s|x). Wake-theta: the model ascends
    L_S = log (1/S) Σ_s w_s (the IWAE bound, with the cluster sampled); wake-phi: the guide
    descends KL(p(y,z|x) ‖ q) estimated as −Σ_s w̄_s log q(y_s, z_s|x) with fixed normalised
    weights w̄_s, which trains q(y|x) without a score function. Reported loss: the wake-theta loss
    −Σ_batch L_S (the quantity the model optimises; the wake-phi loss is not a bound). Weights are
    per data point (Pyro's ReweightedWakeSleep weighs whole minibatches, which degenerates).
    Sleep-phi is not used (the guides take x positionally). With gmvae_w's exact posterior the
    cluster term is left out of wake-phi (it has no guide parameters: q(c) is the model's
    posterior, which wake-theta trains). Refuses ``model_enum`` guides, a KL weight, free bits.
    Cost: S decoder passes per point.
    """

    supports_cluster_objective = False
    enumerates_cluster = False
    refused_placements = ScoreEstimator.refused_placements
    _guard_mode = "sampled"

    def _make_elbo(self):
        if self.num_particles < 2:
            raise ValueError(
                f"estimator 'rws' needs num_particles (importance samples S) >= 2, got {self.num_particles}"
            )
        return PointwiseRWS(num_particles=self.num_particles, insomnia=1.0, max_plate_nesting=1,
                             vectorize_particles=True)  # fmt: skip

    def loss(self, model, guide, *args, **kwargs):
        self._check_call(guide)
        guard = self._guard(guide)
        exact = self.cluster_site if cluster_placement_of(self, guide) == "exact" else None
        wake_theta, wake_phi = self.elbo.losses(
            model, guard(guide), args, kwargs, exclude_from_phi=(exact,)
        )
        if not guard.seen:
            raise ValueError(
                f"estimator 'rws' needs the guide to sample the cluster site {self.cluster_site!r}"
            )
        return wake_theta + (wake_phi - wake_phi.detach())


ESTIMATORS = {
    "enum": Estimator,
    "enum-jit": JitEnumEstimator,
    "score": ScoreEstimator,
    "graph": GraphEstimator,
    "relaxed": RelaxedEstimator,
    "tmc": TMCEstimator,
    "iwae-enum": IWAEEnumEstimator,
    "rws": RWSEstimator,
}


def make_estimator(name="enum", model=None, guide=None, num_particles=1, **kwargs) -> Estimator:
    """The estimator registered as ``name`` (one clear error for an unknown name or a misfit).

    ``num_particles`` is M, the ELBO's averaged draws, for enum, enum-jit, score, graph and
    relaxed, and S, the importance samples inside the log, for tmc, iwae-enum and rws. Extra
    keyword options: ``baseline_beta`` (graph), ``prior_temperature`` (relaxed).
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    try:
        estimator = ESTIMATORS[name](
            name, model=model, guide=guide, num_particles=num_particles, **kwargs
        )
    except TypeError as e:
        if kwargs:
            raise ValueError(f"estimator {name!r} got unexpected options {sorted(kwargs)}") from e
        raise
    return estimator
