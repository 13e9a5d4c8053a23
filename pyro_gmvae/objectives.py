r"""The cluster KL term of the ELBO, reweighted (β) and thresholded (free bits) by Pyro handlers.

With the cluster y enumerated in the guide, TraceEnum_ELBO's objective splits as

.. math::
    \mathcal L = \mathbb E_{q(y|x)}\big[\mathbb E_{q(z|x,y)} \log p(x, z \mid y) - \log q(z|x,y)\big]
                 - \mathrm{KL}\big(q(y|x) \,\|\, p(y)\big),

and the last term is the log-prob of the cluster site in the model minus that in the guide.
:func:`cluster_objective` replaces it (summed over the batch of B points) by

.. math:: \beta \, B \, \max\big(\lambda, \tfrac1B \textstyle\sum_b \mathrm{KL}_b\big),

the minimum-information constraint of Dilokthanakul et al. 2016 (eq. 7; "free bits", Kingma et
al. 2016) with the KL taken as the minibatch mean: no gradient while the mean KL is below λ.
λ = 0 and β = 1 return the model and guide untouched (the plain ELBO).
"""

import pyro
import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame, IndepMessenger
from pyro.poutine.messenger import Messenger
from torch.distributions import Categorical, kl_divergence

from .nets import base_distribution


def cluster_kl(fn, log_prior: torch.Tensor) -> torch.Tensor:
    """KL(q(y|x) || p(y)) per point, from a categorical-like guide distribution ``fn``."""
    logits = base_distribution(fn, lambda d: hasattr(d, "logits")).logits
    return kl_divergence(Categorical(logits=logits), Categorical(logits=log_prior))


class SiteScaleMask(Messenger):
    """Scale or mask the log-prob of one named site only (``poutine.scale`` acts on all sites)."""

    def __init__(self, site: str, scale: float = 1.0, mask: bool | None = None):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (use mask to drop a term), got {scale}")
        self.site, self.scale, self.mask = site, scale, mask

    def _process_message(self, msg):
        if msg["name"] != self.site:
            return
        msg["scale"] = self.scale * msg["scale"]
        if self.mask is not None:
            msg["mask"] = self.mask if msg["mask"] is None else msg["mask"] & self.mask


class RecordClusterKL(Messenger):
    """Records KL(q(y|x) || p(y)) per point when the guide samples the cluster site."""

    def __init__(self, site: str, log_prior: torch.Tensor):
        super().__init__()
        self.site, self.log_prior, self.kl, self.plate = site, log_prior, None, None

    def _postprocess_message(self, msg):
        if msg["name"] == self.site and msg["type"] == "sample":
            self.kl = cluster_kl(msg["fn"], self.log_prior)
            # The site's data plate (dim -1): the penalty goes into the same plate.
            self.plate = next(
                (f for f in msg["cond_indep_stack"] if f.vectorized and f.dim == -1), None
            )


def cluster_objective(model, guide, cluster_site: str, log_prior, kl_weight=1.0, free_bits=0.0):
    """Return (model, guide) callables whose ELBO weights the cluster KL by β and floors it at λ.

    Args:
        model, guide: callables with the same signature; the guide must sample ``cluster_site``.
        cluster_site: the discrete cluster site's name ("y", or "c" for gmvae_w).
        log_prior: a callable returning log p(y) of shape (K,), or that tensor.
        kl_weight: β >= 0 (annealing); β = 0 drops the term.
        free_bits: λ >= 0 in nats per data point.
    """
    if kl_weight < 0 or free_bits < 0:
        raise ValueError(f"kl_weight and free_bits must be >= 0, got {kl_weight} and {free_bits}")
    if kl_weight == 1.0 and free_bits == 0.0:
        return model, guide
    if cluster_site is None:
        raise ValueError(
            "a KL weight or free bits act on the cluster site of the guide, but this guide leaves "
            "the cluster to the model (model-side enumeration); use a guide that samples it"
        )
    if free_bits == 0.0 and kl_weight > 0:
        # Scaling both cluster sites scales exactly E_q[log p(y) - log q(y|x)] = -KL.
        return SiteScaleMask(cluster_site, scale=kl_weight)(model), SiteScaleMask(
            cluster_site, scale=kl_weight
        )(guide)

    def thresholded_guide(*args, **kwargs):
        get_prior = log_prior if callable(log_prior) else (lambda: log_prior)
        # Masking removes the exact KL term while q(y|x) still weights every other term.
        with (
            RecordClusterKL(cluster_site, get_prior()) as record,
            SiteScaleMask(cluster_site, mask=False),
        ):
            out = guide(*args, **kwargs)
        if record.kl is None:
            raise ValueError(f"the guide did not sample the cluster site {cluster_site!r}")
        if kl_weight > 0:
            batch = record.kl.shape[-1]
            penalty = kl_weight * torch.clamp(record.kl.mean(), min=free_bits)
            # Spread over the guide's data plate (β·max(λ, mean KL) per point, B·β·max(λ, mean KL)
            # in all): a site inside the plate of the enumerated cluster, after it, is a valid
            # dependency for TraceEnum_ELBO. A guide factor f subtracts f from the ELBO;
            # has_rsample=True keeps it pathwise (no score-function term).
            plate = record.plate or CondIndepStackFrame("data", -1, batch, 0)
            # The plate's frame without a second subsample site (the guide's plate has one).
            with IndepMessenger(plate.name, plate.size, dim=plate.dim):
                pyro.factor("cluster_kl_penalty", penalty.expand(batch), has_rsample=True)
        return out

    return SiteScaleMask(cluster_site, mask=False)(model), thresholded_guide
