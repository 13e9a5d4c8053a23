"""The objective Pyro optimises equals an independent hand computation, loss and gradients.

Every hand computation below loops over the K clusters with ``torch.distributions`` on the
networks' raw layers (no Pyro, none of the models' ``model``/``decode`` code paths for the
concatenations) and reuses the guide's own reparameterised draws: the guide is traced inside the
ELBO call, the standard-normal noise eps = (z - μ)/σ is read back and z = μ + σ·eps is rebuilt in
a fresh graph, so losses and gradients are comparable exactly (float64).
"""

import math

import pytest
import torch
import torch.distributions as td
import torch.nn.functional as F
from pyro import poutine

from pyro_gmvae.estimators import make_estimator
from pyro_gmvae.guides import GMVAEWGuide
from pyro_gmvae.objectives import cluster_objective

Y_Z_MODELS = [("m2", {}), ("modified_m2", {}), ("modified_m2", {"h_activation": "identity"}),
              ("gmvae", {})]  # fmt: skip
RTOL, ATOL = 1e-6, 1e-9  # float64: the two computations differ only by rounding

# The free-bits penalty sits in the guide's data plate, so TraceEnum_ELBO's dependency check
# has nothing to warn about: any such warning fails these tests.
pytestmark = pytest.mark.filterwarnings("error:at guide site:RuntimeWarning")


# --- Pyro side --------------------------------------------------------------------------------


def pyro_loss(model_fn, guide, x, num_particles=1, kl_weight=1.0, free_bits=0.0, site="y",
              log_prior=None):  # fmt: skip
    """TraceEnum_ELBO's differentiable loss and the guide's sampled values in that very call."""
    guide_fn = tracer = poutine.trace(guide)
    if kl_weight != 1.0 or free_bits != 0.0:
        model_fn, guide_fn = cluster_objective(
            model_fn, tracer, site, log_prior, kl_weight, free_bits
        )
    loss = make_estimator("enum", num_particles=num_particles).loss(model_fn, guide_fn, x)
    draws = {n: s["value"] for n, s in tracer.trace.nodes.items() if s["type"] == "sample"}
    return loss, draws


def params_of(model, guide):
    return [*model.named_parameters(prefix="model"), *guide.named_parameters(prefix="guide")]


def grads(loss, named):
    out = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, out)}


def assert_same_loss_and_grads(loss, ref, named, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=atol)
    g, g_ref = grads(loss, named), grads(ref, named)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=rtol, atol=atol, msg=name)
    assert sum(v.abs().sum() for v in g.values()) > 0
    return g


# --- Hand side: y/z models (m2, modified_m2, gmvae) with the mean-field guide ---------------


def concat_linear(joint, a, b):
    """A JointLinear as one linear map on the concatenation [a, b] (not its forward)."""
    b = b.expand(*a.shape[:-1], b.shape[-1])
    weight = torch.cat([joint.linear_a.weight, joint.linear_b.weight], -1)
    return F.linear(torch.cat([a, b], -1), weight, joint.linear_a.bias)


def gaussian(head, h):
    """Location and scale of a GaussianHead: linear mean, softplus variance plus its floor."""
    return head.loc(h), (F.softplus(head.var(h)) + head.min_var).sqrt()


def reparam(loc, scale, draw):
    """The guide's draw rebuilt from its noise in a new graph, with its log-density."""
    z = loc + scale * ((draw - loc) / scale).detach()
    return z, td.Normal(loc, scale).log_prob(z).sum(-1)


def decoder_logits(model, z, y):
    y = y.expand(*z.shape[:-1], y.shape[-1])
    if model.name == "m2":
        return model.decoder(torch.relu(concat_linear(model.decoder_in, z, y)))
    if model.name == "modified_m2":
        h = model.h_loc(y) + (F.softplus(model.h_var(y)) + model.min_var).sqrt() * z
        return model.decoder(torch.relu(h) if model.h_activation == "relu" else h)
    return model.decoder(z)


def log_pz(model, z, y):
    if model.name == "gmvae":
        return td.Normal(*gaussian(model.prior, y)).log_prob(z).sum(-1)
    return td.Normal(0.0, 1.0).log_prob(z).sum(-1)


def mean_field_terms(model, guide, x, z_draws):
    """log q(y|x) (B, K) and, with the guide's draws z_k, the per-cluster terms (..., B, K)
    f_k = log p(x|z_k, k) + log p(z_k|k) - log q(z_k|x, k); log p(y) = -log K is left out."""
    batch, k = x.shape[0], model.k
    log_q = F.log_softmax(guide.y_net(x), -1)
    terms = []
    for c in range(k):
        y = F.one_hot(torch.full((batch,), c), k).to(x)
        h = guide.z_net(torch.relu(concat_linear(guide.z_in, x, y)))
        z, log_qz = reparam(*gaussian(guide.z_head, h), z_draws[c])
        log_px = td.Bernoulli(logits=decoder_logits(model, z, y)).log_prob(x).sum(-1)
        terms.append(log_px + log_pz(model, z, y) - log_qz)
    return log_q, torch.stack(terms, -1)


def shu_loss(log_q, f, k):
    """Σ_b Σ_y q(y|x)[-log p(x|z_y) + log q(z_y|x,y) - log p(z_y|y) - log p(y)] + Σ q log q,
    averaged over any leading particle dims."""
    q = log_q.exp()
    per_particle = (q * (-f + math.log(k))).sum((-2, -1)) + (q * log_q).sum()
    return per_particle.mean()


def hand_cluster_objective(log_q, f, k, kl_weight, free_bits):
    """-Σ_b E_q(y)[f] + β·B·max(λ, mean_b KL(q(y|x_b) || U(K)))."""
    kl = (log_q.exp() * (log_q + math.log(k))).sum(-1)
    recon = (log_q.exp() * f).sum((-2, -1)).mean()
    return -recon + kl_weight * kl.shape[-1] * torch.clamp(kl.mean(), min=free_bits), kl


def check_enumerated_y(draws, k):
    y = draws["y"].reshape(k, -1, k)[:, 0]  # (K, 1, K) or (K, 1, 1, K)
    torch.testing.assert_close(y, torch.eye(k, dtype=y.dtype))


# --- Hand side: gmvae_w --------------------------------------------------------------------


def gmvae_w_terms(model, guide, obs, x_draw, w_draw):
    """With the guide's draws of x and w:
    base (..., B) = log p(obs|x) + log p(w) - log q(x|obs) - log q(w|obs) and
    log_joint (..., B, K) = log π_c + log N(x | μ_c(w), σ²_c(w)), one cluster at a time."""
    h = guide.recogniser(obs)
    x, log_qx = reparam(*gaussian(guide.x_head, h), x_draw)
    w, log_qw = reparam(*gaussian(guide.w_head, h), w_draw)
    log_pobs = td.Bernoulli(logits=model.decoder(x)).log_prob(obs).sum(-1)
    log_pw = td.Normal(0.0, 1.0).log_prob(w).sum(-1)
    hw = model.prior_net(w)
    locs, variances = model.prior_loc(hw), F.softplus(model.prior_var(hw)) + model.min_var
    d = model.x_dim
    log_joint = torch.stack(
        [
            -math.log(model.k)
            + td.Normal(locs[..., c * d : (c + 1) * d], variances[..., c * d : (c + 1) * d].sqrt())
            .log_prob(x)
            .sum(-1)
            for c in range(model.k)
        ],
        -1,
    )
    return log_pobs + log_pw - log_qx - log_qw, log_joint


def gmvae_w_marginal_loss(base, log_joint):
    """-[log p(obs|x) + log p(w) - log q(x) - log q(w) + log Σ_c π_c N(x|μ_c(w), σ²_c(w))]."""
    return -(base + torch.logsumexp(log_joint, -1)).sum(-1).mean()


def gmvae_w_posterior_loss(base, log_joint):
    """-Σ_c p(c|x,w)[log p(obs|x) + log p(w) + log p(x, c|w) - log q(x) - log q(w) - log p(c|x,w)]
    with p(c|x,w) normalised by an explicit sum over c."""
    joint = log_joint.exp()
    post = joint / sum(joint[..., c : c + 1] for c in range(joint.shape[-1]))
    return -(post * (base.unsqueeze(-1) + log_joint - post.log())).sum((-2, -1)).mean()


def gmvae_w_free_bits_loss(base, log_joint, kl_weight, free_bits):
    """-Σ_b E_p(c|x,w)[base + log N(x|μ_c, σ²_c)] + β·B·max(λ, mean KL(p(c|x,w) || U(K))), the
    mean over the batch and the particles alike."""
    log_post = log_joint.log_softmax(-1)
    post, log_pi = log_post.exp(), -math.log(log_joint.shape[-1])
    recon = (post * (base.unsqueeze(-1) + log_joint - log_pi)).sum((-2, -1)).mean()
    kl = (post * (log_post - log_pi)).sum(-1)
    return -recon + kl_weight * kl.shape[-1] * torch.clamp(kl.mean(), min=free_bits), kl


def gmvae_w_pair(make_tiny):
    """gmvae_w with its guide-side (exact posterior) and model-side guides, same weights."""
    model, guide = make_tiny("gmvae_w")
    model_side = GMVAEWGuide(model, cluster="model").to(torch.float64)
    model_side.load_state_dict(guide.state_dict())
    return model, guide, model_side


def cluster_encoder_params(model, guide):
    """The parameters of the cluster posterior: q(y|x)'s net, or gmvae_w's prior network, which
    defines p(c|x,w)."""
    if model.name == "gmvae_w":
        found = {n: p for n, p in params_of(model, guide) if n.split(".")[1].startswith("prior")}
    else:
        found = {n: p for n, p in params_of(model, guide) if n.startswith("guide.y_net")}
    assert len(found) >= 4, list(found)
    return found


# --- 1-2: the ELBO for every model --------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,num_particles", [(n, kw, 1) for n, kw in Y_Z_MODELS] + [("gmvae", {}, 3)]
)
def test_enum_elbo_equals_shu_objective(make_tiny, binary_batch, name, kwargs, num_particles):
    model, guide = make_tiny(name, **kwargs)
    loss, draws = pyro_loss(model.model, guide, binary_batch, num_particles)
    check_enumerated_y(draws, model.k)
    assert draws["z"].shape == (model.k, *([num_particles] if num_particles > 1 else []), 5, 2)
    ref = shu_loss(*mean_field_terms(model, guide, binary_batch, draws["z"]), model.k)
    named = params_of(model, guide)
    g = assert_same_loss_and_grads(loss, ref, named)
    # The cluster encoder q(y|x) is trained: every one of its tensors gets a gradient.
    for n in cluster_encoder_params(model, guide):
        assert g[n].abs().sum() > 0, n


@pytest.mark.parametrize("num_particles", [1, 3])
def test_gmvae_w_elbo_both_forms(make_tiny, binary_batch, num_particles):
    model, guide, model_side = gmvae_w_pair(make_tiny)
    for g_fn in (guide, model_side):
        named = params_of(model, g_fn)
        loss, draws = pyro_loss(model.model, g_fn, binary_batch, num_particles)
        if g_fn is guide:
            assert draws["c"].shape == (model.k, *([1] * (1 + (num_particles > 1))), model.k)
        base, log_joint = gmvae_w_terms(model, g_fn, binary_batch, draws["x"], draws["w"])
        for ref in (
            gmvae_w_marginal_loss(base, log_joint),
            gmvae_w_posterior_loss(base, log_joint),
        ):
            g = assert_same_loss_and_grads(loss, ref, named)
        for n in cluster_encoder_params(model, guide):
            assert g[n].abs().sum() > 0, n


def test_gmvae_w_cluster_posterior_is_bayes_rule(make_tiny, binary_batch):
    model, guide = make_tiny("gmvae_w")
    x, w = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    _, log_joint = gmvae_w_terms(model, guide, binary_batch, x, w)  # x, w used as given
    torch.testing.assert_close(model.cluster_log_posterior(x, w), log_joint.log_softmax(-1))


# --- 3: gmvae_w, cluster in the guide (exact posterior) vs enumerated in the model ---------------


@pytest.mark.parametrize("num_particles", [1, 3])
def test_gmvae_w_guide_side_equals_model_side(make_tiny, binary_batch, num_particles):
    model, guide, model_side = gmvae_w_pair(make_tiny)
    results = []
    for g_fn in (guide, model_side):
        torch.manual_seed(7)  # the same draws of x and w: c is enumerated, never drawn
        loss, draws = pyro_loss(model.model, g_fn, binary_batch, num_particles)
        named = [*model.named_parameters(prefix="model"), *g_fn.named_parameters(prefix="guide")]
        results.append((loss, draws["x"], grads(loss, named)))
    (loss_g, x_g, grads_g), (loss_m, x_m, grads_m) = results
    torch.testing.assert_close(x_g, x_m, rtol=0, atol=0)
    torch.testing.assert_close(loss_g, loss_m, rtol=RTOL, atol=ATOL)
    assert grads_g.keys() == grads_m.keys()
    for n in grads_g:
        torch.testing.assert_close(grads_g[n], grads_m[n], rtol=RTOL, atol=ATOL, msg=n)


# --- 4: KL weight β and free bits λ on the cluster KL ------------------------------------------


def mean_kl(model, guide, x):
    """The batch-mean KL(q(y|x) || p(y)) at the current parameters (no sampling involved)."""
    log_q = F.log_softmax(guide.y_net(x), -1)
    return (log_q.exp() * (log_q + math.log(model.k))).sum(-1).mean().item()


@pytest.mark.parametrize("kl_weight", [1.0, 0.3, 2.0])
@pytest.mark.parametrize("threshold", ["below", "above"])
@pytest.mark.parametrize("name", ["m2", "gmvae"])
def test_free_bits_equals_hand_objective(make_tiny, binary_batch, name, threshold, kl_weight):
    model, guide = make_tiny(name)
    named = params_of(model, guide)
    kl0 = mean_kl(model, guide, binary_batch)
    assert kl0 > 0
    free_bits = 0.5 * kl0 if threshold == "below" else kl0 + 0.5
    loss, draws = pyro_loss(model.model, guide, binary_batch, kl_weight=kl_weight,
                            free_bits=free_bits, log_prior=model.cluster_log_prior)  # fmt: skip
    log_q, f = mean_field_terms(model, guide, binary_batch, draws["z"])
    recon = (log_q.exp() * f).sum()
    kl = (log_q.exp() * (log_q + math.log(model.k))).sum(-1)
    if threshold == "below":  # max(λ, mean KL) = mean KL: β times the exact cluster KL
        ref = -recon + kl_weight * kl.sum()
    else:  # max(λ, mean KL) = λ: a constant, no gradient from the KL
        ref = -recon + kl_weight * 5 * free_bits
    g = assert_same_loss_and_grads(loss, ref, named)
    encoder = cluster_encoder_params(model, guide)
    for n in encoder:
        assert g[n].abs().sum() > 0, n  # still trained, through the enumeration weights
    if threshold == "above":
        # Above λ the encoder's gradient is the ELBO's minus the KL's: check that it changed.
        elbo = -recon + kl.sum()
        g_elbo = grads(elbo, named)
        assert any(not torch.allclose(g[n], g_elbo[n]) for n in encoder)


def test_lambda0_beta1_is_the_elbo(make_tiny, binary_batch):
    model, guide = make_tiny("gmvae")
    wrapped = cluster_objective(model.model, guide, "y", model.cluster_log_prior, 1.0, 0.0)
    assert wrapped == (model.model, guide)  # handed back untouched
    torch.manual_seed(1)
    loss, _ = pyro_loss(*wrapped, binary_batch)
    torch.manual_seed(1)
    elbo, _ = pyro_loss(model.model, guide, binary_batch)
    torch.testing.assert_close(loss, elbo, rtol=0, atol=0)


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 2.0])
def test_kl_weight_scales_the_cluster_kl_only(make_tiny, binary_batch, kl_weight):
    model, guide = make_tiny("gmvae")
    named = params_of(model, guide)
    torch.manual_seed(2)
    elbo, draws = pyro_loss(model.model, guide, binary_batch)
    torch.manual_seed(2)
    loss, draws_beta = pyro_loss(model.model, guide, binary_batch, kl_weight=kl_weight,
                                 log_prior=model.cluster_log_prior)  # fmt: skip
    torch.testing.assert_close(draws["z"], draws_beta["z"], rtol=0, atol=0)
    log_q = F.log_softmax(guide.y_net(binary_batch), -1)
    kl_sum = (log_q.exp() * (log_q + math.log(model.k))).sum()
    # loss(β) - loss(1) = (β - 1)·Σ_b KL_b, in value and in gradient.
    torch.testing.assert_close(loss - elbo, (kl_weight - 1.0) * kl_sum, rtol=RTOL, atol=ATOL)
    g, g_elbo, g_kl = grads(loss, named), grads(elbo, named), grads(kl_sum, named)
    for n in g:
        torch.testing.assert_close(g[n] - g_elbo[n], (kl_weight - 1.0) * g_kl[n], rtol=RTOL,
                                   atol=ATOL, msg=n)  # fmt: skip
    # and against the hand objective directly
    ref, _ = hand_cluster_objective(*mean_field_terms(model, guide, binary_batch, draws["z"]),
                                    model.k, kl_weight, 0.0)  # fmt: skip
    assert_same_loss_and_grads(loss, ref, named)


@pytest.mark.parametrize("kl_weight,free_bits", [(-0.5, 0.0), (1.0, -0.1), (-1.0, 1.0)])
def test_negative_weight_or_threshold_raises(make_tiny, kl_weight, free_bits):
    model, guide = make_tiny("gmvae")
    with pytest.raises(ValueError, match="must be >= 0"):
        cluster_objective(model.model, guide, "y", model.cluster_log_prior, kl_weight, free_bits)


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("kl_weight,free_bits", [(0.5, 0.0), (1.0, 1e-9), (0.7, 1e-9),
                                                 (1.0, 10.0), (2.0, 10.0), (0.0, 0.0)])  # fmt: skip
def test_gmvae_w_free_bits_equals_hand_objective(make_tiny, binary_batch, num_particles, kl_weight,
                                                 free_bits):  # fmt: skip
    model, guide = make_tiny("gmvae_w")
    named = params_of(model, guide)
    loss, draws = pyro_loss(model.model, guide, binary_batch, num_particles, kl_weight, free_bits,
                            site="c", log_prior=model.cluster_log_prior)  # fmt: skip
    base, log_joint = gmvae_w_terms(model, guide, binary_batch, draws["x"], draws["w"])
    ref, kl = gmvae_w_free_bits_loss(base, log_joint, kl_weight, free_bits)
    assert kl.shape == (*([num_particles] if num_particles > 1 else []), 5)
    # 1e-9 is below the mean KL and 10 > log K is above any KL: both branches of the max.
    assert free_bits < kl.mean() if free_bits < 1 else free_bits > math.log(model.k)
    g = assert_same_loss_and_grads(loss, ref, named)
    for n in cluster_encoder_params(model, guide):
        assert g[n].abs().sum() > 0, n


@pytest.mark.parametrize("kl_weight,free_bits", [(0.5, 0.0), (1.0, 0.1), (0.0, 0.0)])
def test_model_side_cluster_refuses_kl_weight_and_free_bits(make_tiny, kl_weight, free_bits):
    model, _, model_side = gmvae_w_pair(make_tiny)
    with pytest.raises(ValueError, match="model-side enumeration"):
        cluster_objective(model.model, model_side, model_side.cluster_site,
                          model.cluster_log_prior, kl_weight, free_bits)  # fmt: skip
