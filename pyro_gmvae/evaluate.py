"""Test-set evaluation: cluster posteriors, the ELBO, an importance-weighted bound, clustering metrics."""

import pyro.poutine as poutine
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from .estimators import make_estimator
from .metrics import clustering_report
from .nets import prepare_data
from .objectives import cluster_kl


def _batches(x, batch_size):
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]


class _EvalMode:
    """Puts modules in eval mode (BatchNorm uses running statistics) and restores their mode."""

    def __init__(self, *modules):
        self.modules = modules

    def __enter__(self):
        self.was_training = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.modules, self.was_training):
            m.train(mode)


@torch.no_grad()
def cluster_probs(guide, x, batch_size=1000) -> torch.Tensor:
    """The guide's cluster posterior for every row of x, shape (N, K), in eval mode.

    ``x``: a tensor, NumPy array or images, converted as ``model.prepare`` does."""
    x = _prepare(guide, x)
    with _EvalMode(guide):
        return torch.cat([guide.cluster_probs(b) for b in _batches(x, batch_size)])


def _prepare(guide, x) -> torch.Tensor:
    model = getattr(guide, "model", None)  # the guides of gmvae_w and VaDE keep one
    if model is not None:
        return model.prepare(x)
    return prepare_data(x, guide.data_dim, next(guide.parameters()))


@torch.no_grad()
def elbo(model, guide, x, batch_size=1000, num_particles=1) -> float:
    """The plain ELBO (cluster summed exactly) in nats per data point, in eval mode."""
    x = model.prepare(x)
    estimator = TraceEnum_ELBO(
        max_plate_nesting=1, num_particles=num_particles, vectorize_particles=num_particles > 1
    )
    # The cluster is summed exactly: its sites are enumerated in parallel, in model and guide.
    model_fn, guide_fn = config_enumerate(model.model), config_enumerate(guide)
    total = 0.0
    with _EvalMode(model, guide):
        for b in _batches(x, batch_size):
            with model.shared_pass():
                total -= estimator.loss(model_fn, guide_fn, b)
    return total / x.shape[0]


@torch.no_grad()
def elbo_per_point(model, guide, x):
    r"""The ELBO of each row of x (B,), the cluster summed exactly, one draw of z per point.

    What ``TraceEnum_ELBO`` computes for the whole batch, kept per point: the guide runs with
    its cluster site enumerated in parallel (values (K, 1, K)), the model replays it, and

    .. math::
        \mathrm{ELBO}(x) = \sum_y q(y \mid \cdot) \big[\log p(x, y, z) - \log q(y, z \mid x)\big]

    with every site's log-density broadcast to (K, B). This holds for any guide that samples
    the cluster itself (VaDE's q(y|x,z), Shu's q(y|x), the flows, ``relaxed`` in eval mode).
    """
    enumerated = poutine.enum(config_enumerate(guide), first_available_dim=-2)
    guide_trace = poutine.trace(enumerated).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    log_p = sum(site["log_prob"] for site in model_trace.nodes.values() if site["type"] == "sample")
    log_q = sum(site["log_prob"] for site in guide_trace.nodes.values() if site["type"] == "sample")
    log_q_y = guide_trace.nodes[guide.cluster_site]["log_prob"]  # (K, B)
    return (log_q_y.exp() * (log_p - log_q)).sum(0)


@torch.no_grad()
def iw_log_likelihood(model, guide, x, num_samples=100, batch_size=100) -> float:
    r"""Importance-weighted bound on log p(x), nats per data point, with the cluster summed exactly.

    The bound the ``iwae-enum`` estimator trains on
    (:class:`~pyro_gmvae.estimators.IWAEEnumEstimator`), with S = ``num_samples`` draws per
    cluster, in eval mode:

    .. math::
        \log \hat p(x) = \log \sum_y \frac1S \sum_s \frac{p(x, y, z_{y,s})}{q(z_{y,s} \mid x, y)},

    an unbiased estimate of p(x) inside the log, so a lower bound on log p(x) that tightens as S
    grows (Burda et al. 2016). It needs only the guide's continuous sites; for gmvae_w (x and w,
    whose guide does not depend on c) the S draws are shared by the K clusters. A batch holds
    K·S·``batch_size`` decoder rows.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples (S) must be an integer >= 1, got {num_samples!r}")
    bound = make_estimator("iwae-enum", model=model, guide=guide, num_particles=num_samples)
    total = 0.0
    with _EvalMode(model, guide):
        for b in _batches(x, batch_size):
            with model.shared_pass():
                total -= bound.loss(model.model, guide, b).item()
    return total / x.shape[0]


@torch.no_grad()
def mean_cluster_kl(model, probs) -> float:
    """The cluster KL ("z-prior") term, mean over points of KL(q(y|x) || p(y)), in nats."""
    log_prior = model.cluster_log_prior().to(probs.device)
    return cluster_kl(torch.distributions.OneHotCategorical(probs=probs), log_prior).mean().item()


def evaluate(model, guide, x, labels, batch_size=1000, num_particles=1, iw_samples=0) -> dict:
    """Clustering metrics, test ELBO, cluster KL and (if ``iw_samples``) the IW bound on (x, labels)."""
    x = model.prepare(x)
    probs = cluster_probs(guide, x, batch_size)
    labels = torch.as_tensor(labels).cpu()
    if (labels < 0).any():  # unlabelled data: only the metrics that need no labels
        report = clustering_report(None, probs.cpu().double().numpy())
    else:
        report = clustering_report(labels.numpy(), probs.cpu().double().numpy())
    report["test_elbo"] = elbo(model, guide, x, batch_size, num_particles)
    report["cluster_kl"] = mean_cluster_kl(model, probs)
    if iw_samples:
        report["test_iw_bound"] = iw_log_likelihood(model, guide, x, iw_samples)
    return report
