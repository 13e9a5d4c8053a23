"""Every use of a private Pyro name, each with the upstream behaviour it works around.

Pinned to the Pyro minor versions tested (``pyproject.toml``); when Pyro moves, this module is
the one to check. The bug reports behind the TMC and RWS work-arounds, written for upstream, are
in ``docs/upstream.md``.
"""

import math

import pyro
import pyro.infer
from pyro.infer.rws import ReweightedWakeSleep
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.tracetmc_elbo import _compute_tmc_factors
from pyro.infer.util import compute_site_dice_factor, is_identically_zero
from pyro.ops.contract import einsum


def require_data_plate(site, estimator):
    """Refuse a site outside the data plate (dim -1): weights per data point need one."""
    if not any(f.dim == -1 for f in site["cond_indep_stack"]):
        raise ValueError(
            f"estimator {estimator!r} weights each data point separately and needs every site "
            f"inside the data plate (dim -1); site {site['name']!r} is not"
        )


class TraceELBO(pyro.infer.Trace_ELBO):
    """Trace_ELBO's loss and surrogate as tensors.

    Works around: ``Trace_ELBO.loss_and_grads`` reads the loss back with ``.item()`` (a device
    sync every step) and ``_differentiable_loss_particle`` is private; this is the same particle
    loss, kept on the device. Uses the private ``_compute_log_r`` and ``ELBO._get_traces``.
    """

    def loss_and_surrogate(self, model, guide, args, kwargs):
        loss, surrogate = 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo, surr = 0.0, 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    elbo = elbo + site["log_prob_sum"]
                    surr = surr + site["log_prob_sum"]
            log_r = None
            for site in guide_trace.nodes.values():
                if site["type"] != "sample":
                    continue
                _, score_function, entropy = site["score_parts"]
                elbo = elbo - site["log_prob_sum"]
                if not is_identically_zero(entropy):
                    surr = surr - entropy.sum()
                if not is_identically_zero(score_function):
                    # REINFORCE term: ∇log q(y) times the (plate-local) detached log p/q.
                    if log_r is None:
                        log_r = _compute_log_r(model_trace, guide_trace)
                    surr = surr + (log_r.sum_to(site["cond_indep_stack"]) * score_function).sum()
            loss = loss - elbo / self.num_particles
            surrogate = surrogate - surr / self.num_particles
        return loss, surrogate


def tmc_dice_factors(model_trace, guide_trace):
    """TraceTMC_ELBO's DiCE factors, without one for an exhaustively enumerated model site.

    Pyro 1.9's version also gives such a site (c of gmvae_w with guide ``model_enum``) a DiCE
    factor log p(c) on top of its log-prob factor, so the bound sums p(c)² instead of p(c)
    (with a uniform prior: off by log K per point). Its log-prob factor is its whole weight.
    """
    log_probs = []
    for role, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if role == "model" and name in guide_trace:
                continue
            enumerated = site["infer"].get("enumerate") and site["infer"].get("num_samples") is None
            if role == "model" and enumerated:
                continue
            log_prob, log_denom = compute_site_dice_factor(site)
            if not is_identically_zero(log_denom):
                dims = log_prob._pyro_dims
                log_prob = log_prob - log_denom
                log_prob._pyro_dims = dims
            if not is_identically_zero(log_prob):
                log_probs.append(log_prob)
    return log_probs


class TraceTMC(pyro.infer.TraceTMC_ELBO):
    """TraceTMC_ELBO with :func:`tmc_dice_factors` (the contraction is Pyro's own).

    Works around: TraceTMC_ELBO counts a model-enumerated site's prior twice (docs/upstream.md,
    report 1). Uses the private ``_compute_tmc_factors`` and ``ELBO._get_traces``.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        elbo = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            factors = _compute_tmc_factors(model_trace, guide_trace)
            factors += tmc_dice_factors(model_trace, guide_trace)
            eqn = ",".join(f._pyro_dims for f in factors) + "->"
            plates = "".join(
                frozenset(model_trace.plate_to_symbol.values())
                | frozenset(guide_trace.plate_to_symbol.values())
            )
            (tmc,) = einsum(eqn, *factors, plates=plates, backend="pyro.ops.einsum.torch_log",
                            modulo_total=False)  # fmt: skip
            elbo = elbo + tmc
        return -elbo / self.num_particles


class PointwiseRWS(ReweightedWakeSleep):
    """ReweightedWakeSleep with importance weights per data point.

    Works around: Pyro's ReweightedWakeSleep sums the log-weights over the data plate before
    normalising, so one weight serves the whole minibatch and the weights degenerate as the batch
    grows (docs/upstream.md, report 2). Uses the private ``ELBO._get_traces``.
    """

    def losses(self, model, guide, args, kwargs, exclude_from_phi=()):
        s = self.num_particles
        model_trace, guide_trace = next(iter(self._get_traces(model, guide, args, kwargs)))
        log_p, log_q, log_q_phi = 0.0, 0.0, 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                require_data_plate(site, "rws")
                log_p = log_p + site["log_prob"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not site["is_observed"]:
                require_data_plate(site, "rws")
                log_q = log_q + site["log_prob"]
                if site["name"] not in exclude_from_phi:
                    log_q_phi = log_q_phi + site["log_prob"]
        # The traces are detached: wake-theta moves the model, wake-phi the guide.
        log_w = log_p - log_q.detach()
        log_w = log_w.expand(s, log_w.shape[-1])
        log_sum = log_w.logsumexp(0)
        wake_theta = -(log_sum - math.log(s)).sum()
        weights = (log_w - log_sum).exp().detach()
        wake_phi = -(weights * log_q_phi).sum()
        return wake_theta, wake_phi


class TraceGraph(pyro.infer.TraceGraph_ELBO):
    """TraceGraph_ELBO with its (ELBO, surrogate) pair public.

    Works around: ``TraceGraph_ELBO.loss_and_grads`` backpropagates and reads the loss back with
    ``.item()``; the estimator needs the tensors, which only the private
    ``_loss_and_surrogate_loss`` returns.
    """

    def elbo_and_surrogate(self, model, guide, args, kwargs):
        return self._loss_and_surrogate_loss(model, guide, args, kwargs)


def baseline_param_name(site: str) -> str:
    """Where TraceGraph_ELBO keeps a site's decaying-average baseline in the param store (an
    internal name: the estimator collapses and checkpoints that baseline)."""
    return "__baseline_avg_downstream_cost_" + site
