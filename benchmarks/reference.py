r"""Hand-written PyTorch losses for the four models: the speed (and correctness) reference.

Each function takes the *same* model and guide modules that Pyro trains and computes the negative
ELBO with the cluster summed out explicitly, vectorised over K by broadcasting, with no Pyro
machinery. For M2, modified M2 and GMVAE (guide q(y|x) q(z|x,y), one z draw per component):

.. math::
    -\mathcal L = \sum_b \sum_y q(y|x_b)\big[-\log p(x_b|z_y, y) + \log q(z_y|x_b, y)
                  - \log p(z_y|y) - \log p(y)\big] + \sum_b \sum_y q(y|x_b) \log q(y|x_b)

For GMVAE-w (guide q(x|obs) q(w|obs) and the exact posterior q(c|x,w) = p(c|x,w)):

.. math::
    -\mathcal L = \sum_b \Big[-\log p(obs_b|x) - \log p(w) + \log q(x|obs_b) + \log q(w|obs_b)
                  - \sum_c q(c|x,w)\big(\log \pi_c + \log \mathcal N(x|\mu_c(w), \sigma^2_c(w))
                  - \log q(c|x,w)\big)\Big]

The Gaussian draws come from the same generator calls in the same order as the Pyro guides, so
with a fixed seed the reference and Pyro's ``TraceEnum_ELBO`` see identical samples and must give
the same loss and gradients (``tests/test_speed_equivalence.py`` checks this).

``naive=True`` computes the first layer on [x, y] the straightforward way: broadcast x to
(K, B, D), concatenate the one-hot y and apply one ``nn.Linear``-shaped map, so the x part of
that layer is computed K times. The default is the factorised ``W_x x + W_y y``
(:class:`pyro_gmvae.nets.JointLinear`), which computes it once. Both read the same weights.
"""

import math

import torch
import torch.nn.functional as F
from torch.distributions.utils import _standard_normal

from pyro_gmvae.nets import positive

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def normal_log_prob(value, loc, scale):
    """log N(value | loc, scale²) summed over the last dim."""
    return (-0.5 * ((value - loc) / scale) ** 2 - scale.log() - _HALF_LOG_2PI).sum(-1)


def std_normal_log_prob(value):
    return (-0.5 * value**2 - _HALF_LOG_2PI).sum(-1)


def rsample(loc, scale):
    # The same draw as torch/Pyro's Normal.rsample, so a seeded run matches Pyro exactly.
    return loc + scale * _standard_normal(loc.shape, dtype=loc.dtype, device=loc.device)


def observation_log_prob(params, x, likelihood, min_var=1e-3):
    """log p(x | decoder output), summed over the data dim; matches ``nets.observation_dist``."""
    if likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(
            params, x.expand_as(params), reduction="none"
        ).sum(-1)
    loc, raw_var = params.chunk(2, dim=-1)
    return normal_log_prob(x, loc, positive(raw_var, min_var).sqrt())


def joint_linear(layer, a, b, naive):
    """``layer`` (a :class:`~pyro_gmvae.nets.JointLinear`) on [a, b] with a: (..., B, Da) and
    b: (K, 1, Db); factorised W_a a + W_b b, or (naive) one matmul on the broadcast concatenation."""
    if not naive:
        return layer(a, b)
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    ab = torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], dim=-1)
    weight = torch.cat([layer.linear_a.weight, layer.linear_b.weight], dim=-1)
    return F.linear(ab, weight, layer.linear_a.bias)


def mean_field_loss(model, guide, x, naive=False):
    """−ELBO (summed over the batch) of M2, modified M2 or GMVAE with a MeanFieldGuide."""
    k = model.k
    log_q_y = guide.y_net(x).log_softmax(-1)  # (B, K), computed once
    q_y = log_q_y.exp()
    y = torch.eye(k, dtype=x.dtype, device=x.device).unsqueeze(-2)  # (K, 1, K): every cluster
    h = torch.relu(joint_linear(guide.z_in, x, y, naive))  # (K, B, H)
    loc, scale = guide.z_head(guide.z_net(h))  # (K, B, Z)
    z = rsample(loc, scale)
    log_q_z = normal_log_prob(z, loc, scale)  # (K, B)
    if model.name == "gmvae":
        log_p_z = normal_log_prob(z, *model.prior(y))
        params = model.decoder(z)
    else:
        log_p_z = std_normal_log_prob(z)
        if model.name == "m2":
            params = model.decoder(torch.relu(joint_linear(model.decoder_in, z, y, naive)))
        else:  # modified M2: a per-cluster affine map of z, no concatenation
            params = model.decode(z, y)
    log_p_x = observation_log_prob(params, x, model.likelihood)  # (K, B)
    log_p_y = model.cluster_log_prior().unsqueeze(-1)  # (K, 1)
    per_cluster = -log_p_x + log_q_z - log_p_z - log_p_y + log_q_y.T  # (K, B)
    return (q_y.T * per_cluster).sum()


def gmvae_w_loss(model, guide, obs, naive=False):
    """−ELBO (summed over the batch) of GMVAE-w with the exact cluster posterior.

    ``naive`` has no meaning here (no layer takes a concatenated [data, cluster] input).
    """
    del naive
    h = guide.recogniser(obs)  # once: nothing here depends on c
    x_loc, x_scale = guide.x_head(h)
    x = rsample(x_loc, x_scale)  # guide order: x, then w
    w_loc, w_scale = guide.w_head(h)
    w = rsample(w_loc, w_scale)
    loc, scale = model.components(w)  # (B, K, x_dim), the prior network once
    log_p_x_c = normal_log_prob(x.unsqueeze(-2), loc, scale)  # (B, K)
    log_pi = model.cluster_log_prior()
    log_q_c = (log_pi + log_p_x_c).log_softmax(-1)  # exact posterior p(c | x, w)
    cluster_term = (log_q_c.exp() * (log_pi + log_p_x_c - log_q_c)).sum(-1)  # (B,)
    elbo = (
        observation_log_prob(model.decoder(x), obs, model.likelihood)
        + std_normal_log_prob(w)
        - normal_log_prob(x, x_loc, x_scale)
        - normal_log_prob(w, w_loc, w_scale)
        + cluster_term
    )
    return -elbo.sum()


def reference_loss(model, guide, x, naive=False):
    """The hand-written −ELBO for any of the four models (summed over the batch)."""
    if model.name == "gmvae_w":
        return gmvae_w_loss(model, guide, x, naive)
    if model.name in ("m2", "modified_m2", "gmvae"):
        return mean_field_loss(model, guide, x, naive)
    raise ValueError(f"no reference loss for model {model.name!r}")


def has_naive_variant(model) -> bool:
    """Whether a layer on a concatenated [data, cluster] input exists (all but gmvae_w)."""
    return model.name in ("m2", "modified_m2", "gmvae")
