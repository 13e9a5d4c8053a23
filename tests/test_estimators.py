"""Estimators for the discrete cluster: hand-computed losses, unbiasedness, training, refusals.

Tiny models (D=6, K=3, 2-d latents, 8 hidden units) on CPU; every number checked here is
recomputed by hand from the draws the estimator made (recorded with a Messenger) or compared
with ``enum`` on the same random draws.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.messenger import Messenger

from pyro_gmvae import make_guide, make_model
from pyro_gmvae.estimators import ESTIMATORS, cluster_placement, make_estimator
from pyro_gmvae.objectives import cluster_objective

D, K = 6, 3


def data(n=16, seed=0):
    """Two binary prototypes with 10 % of the bits flipped: a clear two-cluster structure."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.tensor([[1.0, 1, 1, 0, 0, 0], [0.0, 0, 0, 1, 1, 1]])
    x = protos[torch.arange(n) % 2]
    flip = torch.rand(n, D, generator=g) < 0.1
    return torch.where(flip, 1 - x, x)


def tiny(model_name="gmvae", guide_name=None, seed=0, **guide_kw):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    if model_name == "gmvae_w":
        model = make_model("gmvae_w", data_dim=D, k=K, x_dim=2, w_dim=2, hidden=8)
    else:
        model = make_model(model_name, data_dim=D, k=K, z_dim=2, hidden=(8,))
    return model, make_guide(guide_name, model, **guide_kw)


def cluster_encoder(model, guide):
    """The parameters that define the cluster posterior: q(y|x)'s net, or gmvae_w's p(c|x,w)."""
    if model.name == "gmvae_w":
        return [
            *model.prior_net.parameters(),
            *model.prior_loc.parameters(),
            *model.prior_var.parameters(),
        ]
    return list(guide.y_net.parameters())


def zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


class Record(Messenger):
    """Keeps the value and distribution of every sample site the wrapped guide draws."""

    def __init__(self):
        super().__init__()
        self.values, self.fns = {}, {}

    def _postprocess_message(self, msg):
        if msg["type"] == "sample":
            self.values[msg["name"]], self.fns[msg["name"]] = msg["value"], msg["fn"]


# Which (model, guide) pairs each estimator accepts; the first is the one trained below.
ACCEPTED = {
    "enum": [("gmvae", "mean_field"), ("gmvae_w", "exact_posterior"), ("gmvae_w", "model_enum")],
    "enum-jit": [("gmvae", "mean_field"), ("gmvae_w", "model_enum")],
    "score": [("gmvae", "mean_field"), ("gmvae_w", "exact_posterior")],
    "graph": [("gmvae", "mean_field"), ("gmvae_w", "exact_posterior")],
    "relaxed": [("gmvae", "relaxed")],
    "tmc": [("gmvae_w", "model_enum"), ("gmvae_w", "exact_posterior")],
    "iwae-enum": [
        ("gmvae", "mean_field"),
        ("gmvae_w", "exact_posterior"),
        ("gmvae_w", "model_enum"),
    ],
    "rws": [("gmvae", "mean_field"), ("gmvae_w", "exact_posterior")],
}
PARTICLES = {"rws": 3, "iwae-enum": 3, "tmc": 2}


def test_every_registered_estimator_is_covered():
    assert set(ACCEPTED) == set(ESTIMATORS)


@pytest.mark.parametrize(
    "name,model_name,guide_name", [(n, m, g) for n, pairs in ACCEPTED.items() for m, g in pairs]
)
def test_gradient_reaches_the_cluster_encoder(name, model_name, guide_name, monkeypatch):
    model, guide = tiny(model_name, guide_name)
    est = make_estimator(name, model, guide, num_particles=PARTICLES.get(name, 1))
    est.loss_and_grads(model.model, guide, data())  # enum-jit compiles here
    zero_grads(model, guide)

    def item(self):
        raise AssertionError("loss_and_grads read a value back to the host (.item())")

    monkeypatch.setattr(torch.Tensor, "item", item)
    loss = est.loss_and_grads(model.model, guide, data())
    monkeypatch.undo()
    assert torch.is_tensor(loss) and loss.dim() == 0 and not loss.requires_grad
    assert torch.isfinite(loss)
    grads = [p.grad for p in cluster_encoder(model, guide)]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 1e-6


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_training_moves_the_cluster_encoder_and_lowers_the_loss(name):
    model_name, guide_name = ACCEPTED[name][0]
    model, guide = tiny(model_name, guide_name)
    est = make_estimator(name, model, guide, num_particles=PARTICLES.get(name, 1))
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=0.03)
    before = [p.detach().clone() for p in cluster_encoder(model, guide)]
    x, losses = data(), []
    for _ in range(40):
        losses.append(est.loss_and_grads(model.model, guide, x))
        opt.step()
        opt.zero_grad()
    losses = torch.stack(losses)
    assert torch.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-5:].mean()
    assert last < first - 0.1 * first.abs(), (name, first.item(), last.item())
    moved = sum((p.detach() - b).abs().sum() for p, b in zip(cluster_encoder(model, guide), before))
    assert moved > 1e-3


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,model_name,guide_name,match",
    [
        ("tmc", "gmvae", "mean_field", "zero gradient"),
        ("tmc", "gmvae", "relaxed", "zero gradient"),
        ("score", "gmvae_w", "model_enum", "leaves the cluster to the model"),
        ("graph", "gmvae_w", "model_enum", "leaves the cluster to the model"),
        ("rws", "gmvae_w", "model_enum", "leaves the cluster to the model"),
        ("relaxed", "gmvae_w", "model_enum", "leaves the cluster to the model"),
    ],
)
def test_refused_at_construction(name, model_name, guide_name, match):
    model, guide = tiny(model_name, guide_name)
    with pytest.raises(ValueError, match=match):
        make_estimator(name, model, guide, num_particles=PARTICLES.get(name, 1))


@pytest.mark.parametrize(
    "name,model_name,guide_name,match",
    [
        ("relaxed", "gmvae", "mean_field", "reparameterised RelaxedOneHotCategorical"),
        ("relaxed", "gmvae_w", "exact_posterior", "reparameterised RelaxedOneHotCategorical"),
        ("enum", "gmvae", "relaxed", "use estimator 'relaxed'"),
        ("enum-jit", "gmvae", "relaxed", "use estimator 'relaxed'"),
        ("score", "gmvae", "relaxed", "use estimator 'relaxed'"),
        ("iwae-enum", "gmvae", "relaxed", "use estimator 'relaxed'"),
        ("rws", "gmvae", "relaxed", "use estimator 'relaxed'"),
    ],
)
def test_refused_at_the_first_call(name, model_name, guide_name, match):
    model, guide = tiny(model_name, guide_name)
    est = make_estimator(name, model, guide, num_particles=PARTICLES.get(name, 1))
    with pytest.raises(ValueError, match=match):
        est.loss_and_grads(model.model, guide, data())


def test_refused_when_the_guide_is_only_known_at_call_time():
    model, guide = tiny("gmvae", "mean_field")
    est = make_estimator("tmc")  # no model or guide: the guide module is checked when passed
    with pytest.raises(ValueError, match="zero gradient"):
        est.loss(model.model, guide, data())
    with pytest.raises(ValueError, match="must know the guide"):
        est.loss(model.model, lambda x: guide(x), data())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown estimator"):
        make_estimator("reinforce")
    with pytest.raises(ValueError, match="num_particles"):
        make_estimator("enum", num_particles=0)
    with pytest.raises(ValueError, match="rws.*>= 2"):
        make_estimator("rws", num_particles=1)
    with pytest.raises(ValueError, match="unexpected options"):
        make_estimator("score", baseline_beta=0.5)
    with pytest.raises(ValueError, match="baseline_beta"):
        make_estimator("graph", baseline_beta=1.0)


@pytest.mark.parametrize("name", ["score", "graph", "rws", "iwae-enum", "tmc"])
@pytest.mark.parametrize("kl_weight,free_bits", [(0.5, 0.0), (1.0, 0.2)])
def test_cluster_objective_refused(name, kl_weight, free_bits):
    model_name, guide_name = (
        ("gmvae_w", "exact_posterior") if name == "tmc" else ("gmvae", "mean_field")
    )
    model, guide = tiny(model_name, guide_name)
    est = make_estimator(name, model, guide, num_particles=PARTICLES.get(name, 1))
    assert not est.supports_cluster_objective
    with pytest.raises(ValueError, match="KL weight or free bits"):
        est.check_cluster_objective(kl_weight, free_bits)
    est.check_cluster_objective(1.0, 0.0)
    # Even if the trainer did not ask, the wrapped model/guide are caught at the first call.
    model_fn, guide_fn = cluster_objective(
        model.model, guide, model.cluster_site, model.cluster_log_prior, kl_weight, free_bits
    )
    with pytest.raises(ValueError, match="KL weight or free bits"):
        est.loss_and_grads(model_fn, guide_fn, data())


@pytest.mark.filterwarnings("ignore:at guide site")  # objectives.py explains why it is harmless
@pytest.mark.parametrize("name,guide_name", [("enum", "mean_field"), ("relaxed", "relaxed")])
def test_cluster_objective_accepted(name, guide_name):
    model, guide = tiny("gmvae", guide_name)
    est = make_estimator(name, model, guide)
    est.check_cluster_objective(0.5, 0.2)
    model_fn, guide_fn = cluster_objective(
        model.model, guide, model.cluster_site, model.cluster_log_prior, 0.5, 0.2
    )
    assert torch.isfinite(est.loss_and_grads(model_fn, guide_fn, data()))
    assert guide.y_net[-1].bias.grad.abs().sum() > 0


def test_placements():
    assert cluster_placement(tiny("gmvae", "mean_field")[1]) == "learned"
    assert cluster_placement(tiny("gmvae", "relaxed")[1]) == "learned"
    assert cluster_placement(tiny("gmvae_w", "exact_posterior")[1]) == "exact"
    assert cluster_placement(tiny("gmvae_w", "iaf")[1]) == "exact"
    assert cluster_placement(tiny("gmvae_w", "model_enum")[1]) == "model"
    assert cluster_placement(lambda x: None) is None


# --- enum-jit --------------------------------------------------------------------------------


@pytest.mark.parametrize("guide_name", ["exact_posterior", "model_enum"])
def test_enum_jit_equals_enum_in_float64(guide_name):
    """No float32 constant creeps into a traced float64 loss (e.g. from a traced shape)."""
    model, guide = tiny("gmvae_w", guide_name)
    model, guide, x = model.double(), guide.double(), data().double()
    enum, jit = make_estimator("enum", model, guide), make_estimator("enum-jit", model, guide)
    jit.loss_and_grads(model.model, guide, x)  # compiles (its own draws)
    pyro.set_rng_seed(1)
    loss_jit = jit.loss_and_grads(model.model, guide, x)
    pyro.set_rng_seed(1)
    loss_enum = enum.loss(model.model, guide, x)
    assert loss_jit.dtype == torch.float64
    torch.testing.assert_close(loss_jit, torch.as_tensor(loss_enum).detach(), rtol=1e-12, atol=0)


def test_enum_jit_equals_enum_on_the_same_draws_and_trains_every_parameter():
    model, guide = tiny("gmvae", "mean_field")
    x = data()
    enum, jit = make_estimator("enum", model, guide), make_estimator("enum-jit", model, guide)
    named = [*model.named_parameters(), *guide.named_parameters()]
    jit.loss_and_grads(model.model, guide, x)  # compiles (its own draws)
    results = []
    for est in (enum, jit):
        zero_grads(model, guide)
        pyro.set_rng_seed(1)
        loss = est.loss_and_grads(model.model, guide, x)
        results.append((loss, [p.grad.clone() for _, p in named]))
    (loss_e, grads_e), (loss_j, grads_j) = results
    assert torch.allclose(loss_e, loss_j, rtol=1e-5)
    for (n, _), ge, gj in zip(named, grads_e, grads_j):
        assert torch.allclose(ge, gj, atol=1e-5, rtol=1e-4), n
        assert gj.abs().sum() > 0, f"jit gave {n} no gradient (baked in as a constant?)"
    # A step changes the compiled loss at the same draws: parameters are inputs, not constants.
    torch.optim.SGD([p for _, p in named], lr=0.05).step()
    pyro.set_rng_seed(1)
    after = jit.loss_and_grads(model.model, guide, x)
    pyro.set_rng_seed(1)
    assert torch.allclose(after, enum.loss(model.model, guide, x).detach(), rtol=1e-5)
    assert not torch.allclose(after, loss_j)
    # A ragged batch compiles its own graph; a new wrapper (new KL weight) its own ELBO.
    for model_fn, guide_fn, xb in [
        (model.model, guide, x[:5]),
        (*cluster_objective(model.model, guide, "y", model.cluster_log_prior, 0.5), x),
    ]:
        jit.loss_and_grads(model_fn, guide_fn, xb)
        pyro.set_rng_seed(2)
        a = jit.loss_and_grads(model_fn, guide_fn, xb)
        pyro.set_rng_seed(2)
        assert torch.allclose(a, enum.loss(model_fn, guide_fn, xb).detach(), rtol=1e-5)


# --- unbiasedness of the score-function estimators -------------------------------------------


def test_score_and_graph_gradients_of_the_cluster_encoder_are_unbiased():
    """Means over many draws of the cluster encoder's gradient match enum's (whose z-noise is
    averaged the same way) within 4 standard errors per coordinate."""
    model, guide = tiny("gmvae", "mean_field", seed=3)
    x = data(8)
    reps, particles = 30, 100

    def draws(name):
        est = make_estimator(name, model, guide, num_particles=particles)
        out = []
        for _ in range(reps):
            zero_grads(model, guide)
            est.loss_and_grads(model.model, guide, x)
            last = guide.y_net[-1]
            out.append(torch.cat([last.bias.grad, last.weight.grad[:, :2].flatten()]))
        out = torch.stack(out)
        return out.mean(0), out.std(0) / math.sqrt(reps)

    pyro.set_rng_seed(0)
    mean_e, se_e = draws("enum")
    # The test has power: the exact gradient is clearly non-zero on some coordinates.
    assert ((mean_e.abs() / se_e) > 8).sum() >= 3
    for name in ("score", "graph"):
        mean_s, se_s = draws(name)
        z = (mean_s - mean_e).abs() / (se_s**2 + se_e**2).sqrt()
        assert (z < 4).all(), (name, z)


# --- hand computations --------------------------------------------------------------------


def normal_lp(value, loc, scale):
    return torch.distributions.Normal(loc, scale).log_prob(value).sum(-1)


def gmvae_log_joint(model, x, y, z):
    """log p(y) + log p(z|y) + log p(x|z) for the GMVAE with one-hot or relaxed y."""
    loc, scale = model.prior(y)
    log_px = torch.distributions.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
    return model.cluster_log_prior()[y.argmax(-1)] + normal_lp(z, loc, scale) + log_px


def relaxed_elbo(model, guide, x, y, z, tau_q, tau_p):
    """The relaxed ELBO by hand: Concrete densities at the guide's and the prior's temperature."""
    relaxed = torch.distributions.RelaxedOneHotCategorical
    prior = relaxed(torch.tensor(tau_p), logits=model.cluster_log_prior())
    post = relaxed(torch.tensor(tau_q), logits=guide.cluster_logits(x))
    loc, scale = model.prior(y)
    log_px = torch.distributions.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
    elbo = prior.log_prob(y) + normal_lp(z, loc, scale) + log_px
    return elbo - post.log_prob(y) - normal_lp(z, *guide.z_params(x, y))


def test_relaxed_loss_is_the_relaxed_elbo_of_its_draws():
    model, guide = tiny("gmvae", "relaxed", temperature=0.7)
    x = data()
    est, rec = make_estimator("relaxed", model, guide), Record()
    loss = est.loss(model.model, rec(guide), x)
    y, z = rec.values["y"], rec.values["z"]
    elbo = relaxed_elbo(model, guide, x, y, z, 0.7, 0.7)
    assert torch.allclose(loss, -elbo.sum(), rtol=1e-5)
    # Pathwise: the cluster encoder's gradient is that of the hand ELBO.
    (g_est,) = torch.autograd.grad(loss, guide.y_net[-1].bias, retain_graph=True)
    (g_hand,) = torch.autograd.grad(-elbo.sum(), guide.y_net[-1].bias)
    assert torch.allclose(g_est, g_hand, atol=1e-4)
    # The prior follows the guide's annealed temperature, unless prior_temperature fixes it.
    guide.temperature = 0.5
    fixed = make_estimator("relaxed", model, guide, prior_temperature=0.3)
    for estimator, tau_p in [(est, 0.5), (fixed, 0.3)]:
        rec = Record()
        loss = estimator.loss(model.model, rec(guide), x)
        elbo = relaxed_elbo(model, guide, x, rec.values["y"], rec.values["z"], 0.5, tau_p)
        assert torch.allclose(loss, -elbo.sum(), rtol=1e-5)


def test_iwae_enum_is_the_stratified_bound_and_trains_q_y_by_wake_phi():
    model, guide = tiny("gmvae", "mean_field")
    x, s = data(), 4
    est, rec = make_estimator("iwae-enum", model, guide, num_particles=s), Record()
    loss = est.loss(model.model, rec(guide), x)
    z = rec.values["z"]  # (K, S, B, z_dim): S draws per cluster
    assert z.shape == (K, s, x.shape[0], 2)
    log_w = torch.empty(K, s, x.shape[0])
    for k in range(K):
        y = torch.nn.functional.one_hot(torch.tensor(k), K).float().expand(x.shape[0], K)
        for j in range(s):
            log_q = normal_lp(z[k, j], *guide.z_params(x, y))
            log_w[k, j] = gmvae_log_joint(model, x, y, z[k, j]) - log_q
    bound = log_w.reshape(K * s, -1).logsumexp(0) - math.log(s)
    assert torch.allclose(loss, -bound.sum(), rtol=1e-5)
    # q(y|x) is absent from the bound; its gradient is wake-phi's, to the fixed weights.
    weights = (log_w.logsumexp(1) - math.log(s)).softmax(0).detach()  # (K, B)
    cross_entropy = -(weights.T * guide.cluster_logits(x).log_softmax(-1)).sum()
    bias = guide.y_net[-1].bias
    (g_est,) = torch.autograd.grad(loss, bias, retain_graph=True)
    (g_hand,) = torch.autograd.grad(cross_entropy, bias)
    assert torch.allclose(g_est, g_hand, atol=1e-5)
    # The bound is at least the ELBO on average (same model, many draws).
    pyro.set_rng_seed(0)
    elbo = make_estimator("enum", model, guide, num_particles=200).loss(model.model, guide, x)
    iw = make_estimator("iwae-enum", model, guide, num_particles=200).loss(model.model, guide, x)
    assert iw < elbo


def test_iwae_enum_and_tmc_agree_between_guide_and_model_enumeration():
    """gmvae_w: c summed in the guide (exact posterior) or in the model gives the same bound."""
    model, exact = tiny("gmvae_w", "exact_posterior")
    model_enum = make_guide("model_enum", model)
    model_enum.load_state_dict(exact.state_dict())
    x = data()
    for name, s in [("iwae-enum", 3), ("tmc", 2), ("tmc", 1)]:
        losses = []
        for guide in (exact, model_enum):
            pyro.set_rng_seed(5)
            losses.append(
                make_estimator(name, model, guide, num_particles=s).loss(model.model, guide, x)
            )
        assert torch.allclose(*losses, rtol=1e-5), name
    # With one sample, TMC's bound is the ELBO with c summed exactly: enum on the same draws.
    pyro.set_rng_seed(5)
    enum = make_estimator("enum", model, model_enum).loss(model.model, model_enum, x)
    assert torch.allclose(losses[1], enum, rtol=1e-5)


def test_tmc_is_the_tensor_monte_carlo_bound_of_its_draws():
    model, guide = tiny("gmvae_w", "model_enum")
    obs, s = data(), 2
    est, rec = make_estimator("tmc", model, guide, num_particles=s), Record()
    loss = est.loss(model.model, rec(guide), obs)
    b = obs.shape[0]
    xs, ws = rec.values["x"].reshape(s, b, 2), rec.values["w"].reshape(s, b, 2)
    q_x, q_w = guide.latent_dists(obs)
    terms = []
    for i in range(s):
        for j in range(s):
            loc, scale = model.components(ws[j])  # (B, K, x_dim)
            log_px_c = normal_lp(xs[i].unsqueeze(-2), loc, scale)  # (B, K)
            log_obs = (
                torch.distributions.Bernoulli(logits=model.decoder(xs[i])).log_prob(obs).sum(-1)
            )
            log_pw = normal_lp(ws[j], torch.zeros(2), torch.ones(2))
            joint = (model.cluster_log_prior() + log_px_c).logsumexp(-1) + log_pw + log_obs
            terms.append(joint - q_x.log_prob(xs[i]) - q_w.log_prob(ws[j]))
    bound = torch.stack(terms).logsumexp(0) - 2 * math.log(s)
    assert torch.allclose(loss, -bound.sum(), rtol=1e-5)


def test_rws_weights_each_point_and_trains_q_y_by_wake_phi():
    model, guide = tiny("gmvae", "mean_field")
    x, s = data(), 3
    est, rec = make_estimator("rws", model, guide, num_particles=s), Record()
    loss = est.loss(model.model, rec(guide), x)
    y, z = rec.values["y"].detach(), rec.values["z"].detach()  # (S, B, K), (S, B, z_dim)
    assert y.shape == (s, x.shape[0], K) and ((y == 0) | (y == 1)).all()  # sampled, one-hot
    log_qy = (y * guide.cluster_logits(x).log_softmax(-1)).sum(-1)
    log_q = log_qy + normal_lp(z, *guide.z_params(x, y))
    log_w = (gmvae_log_joint(model, x, y, z) - log_q).detach()
    bound = log_w.logsumexp(0) - math.log(s)  # per data point, not per batch
    assert torch.allclose(loss, -bound.sum(), rtol=1e-5)
    weights = (log_w - log_w.logsumexp(0)).exp()
    bias = guide.y_net[-1].bias
    (g_est,) = torch.autograd.grad(loss, bias)
    (g_hand,) = torch.autograd.grad(-(weights * log_qy).sum(), bias)
    assert torch.allclose(g_est, g_hand, atol=1e-5)


def test_rws_leaves_the_exact_cluster_posterior_to_wake_theta():
    """gmvae_w: q(c|x,w) is the model's own posterior, so the model's parameters get the
    wake-theta gradient only (no wake-phi term through q(c))."""
    model, guide = tiny("gmvae_w", "exact_posterior")
    x = data()
    est = make_estimator("rws", model, guide, num_particles=3)
    pyro.set_rng_seed(0)
    est.loss_and_grads(model.model, guide, x)
    grads = [p.grad.clone() for p in model.parameters()]
    pyro.set_rng_seed(0)
    wake_theta, _ = est.elbo.losses(model.model, est._guard(guide)(guide), (x,), {})
    hand = torch.autograd.grad(wake_theta, list(model.parameters()), allow_unused=True)
    for g, h in zip(grads, hand):
        assert torch.allclose(g, torch.zeros_like(g) if h is None else h, atol=1e-5)


def test_graph_baseline_is_one_number_that_survives_ragged_batches_and_checkpoints():
    model, guide = tiny("gmvae", "mean_field")
    est = make_estimator("graph", model, guide, baseline_beta=0.5)
    assert est.state_dict() == {}
    x = data()
    for xb in (x, x, x[:5]):
        assert torch.isfinite(est.loss_and_grads(model.model, guide, xb))
    state = est.state_dict()
    assert state["baseline"].dim() == 0 and state["baseline"] < 0  # ELBO terms: negative
    # Evaluating does not move it.
    est.loss(model.model, guide, x)
    assert torch.equal(est.state_dict()["baseline"], state["baseline"])
    pyro.clear_param_store()
    fresh = make_estimator("graph", model, guide, baseline_beta=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state_dict()["baseline"], state["baseline"])


def test_sampled_estimators_sample_a_one_hot_cluster():
    model, guide = tiny("gmvae", "mean_field")
    for name in ("score", "graph"):
        rec = Record()
        make_estimator(name, model, guide).loss(model.model, rec(guide), data())
        y = rec.values["y"]
        assert y.shape == (16, K) and (y.sum(-1) == 1).all()
        assert isinstance(rec.fns["y"], dist.OneHotCategorical)


# --- the comparison script ------------------------------------------------------------------


def test_compare_elbos_script(tmp_path):
    """examples/compare_elbos.py end to end on the 2-D arcs with tiny networks: runs, refusals,
    the gradient study and its outputs."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "compare_elbos.py"
    spec = importlib.util.spec_from_file_location("compare_elbos", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "out"
    result = script.main(
        ["--dataset", "arcs", "--models", "gmvae", "--estimators", "enum", "score", "tmc",
         "--k", "3", "--limit", "200", "--epochs", "1", "--seeds", "0", "--hidden", "4",
         "--latent-dim", "2", "--batch-size", "100", "--grad-draws", "3", "--test-limit", "30",
         "--out", str(out)]
    )  # fmt: skip
    config = json.loads((out / "gmvae" / "enum" / "seed0" / "config.json").read_text())
    assert config["test_limit"] == 30  # --test-limit reaches the run
    assert set(result["summaries"]) == {"gmvae/enum", "gmvae/score"}
    assert "zero gradient" in result["refused"]["gmvae/tmc"]
    grads = result["gradients"]["gmvae"]
    assert grads["enum"]["cosine_to_enum"] == pytest.approx(1.0)
    assert math.isfinite(grads["score"]["snr_median"]) and grads["score"]["ms_per_gradient"] > 0
    text = (out / "results.md").read_text()
    assert "| gmvae | score | 1 |" in text and "gmvae / tmc" in text
    assert json.loads((out / "results.json").read_text())["refused"] == result["refused"]
    assert (out / "curves.png").stat().st_size > 1000


# --- gmvae_w's fast path against the straightforward model, under every estimator ------------


class PlainGMVAEW(type(make_model("gmvae_w", data_dim=2, k=2, x_dim=1, w_dim=1, hidden=2))):
    """GMVAE-w written the straightforward way: p(c|x,w) and p(x|c,w) each evaluate their own
    Normal densities, and the model gathers the selected component with Vindex."""

    def cluster_log_posterior(self, x, w):
        loc, scale = self.components(w)
        log_lik = dist.Normal(loc, scale).log_prob(x.unsqueeze(-2)).sum(-1)
        return (self.cluster_log_prior() + log_lik).log_softmax(-1)

    def model(self, obs):
        from pyro.ops.indexing import Vindex

        from pyro_gmvae.nets import observation_dist

        self.check(obs)
        pyro.module(self.name, self)
        with pyro.plate("data", obs.shape[0]):
            w = pyro.sample("w", dist.Normal(obs.new_zeros(self.w_dim), 1.0).to_event(1))
            idx = self.sample_cluster().argmax(-1)
            loc, scale = self.components(w)
            loc, scale = Vindex(loc)[..., idx, :], Vindex(scale)[..., idx, :]
            x = pyro.sample("x", dist.Normal(loc, scale).to_event(1))
            pyro.sample("obs", observation_dist(self.decoder(x), self.likelihood), obs=obs)


GMVAE_W_CASES = [
    (name, guide_name, particles)
    for name, pairs in ACCEPTED.items()
    for model_name, guide_name in pairs
    if model_name == "gmvae_w"
    for particles in sorted({1, PARTICLES.get(name, 1), 3} - ({1} if name == "rws" else set()))
]


@pytest.mark.parametrize("name, guide_name, particles", GMVAE_W_CASES)
@pytest.mark.parametrize("batch", [1, 6])
def test_gmvae_w_fast_path_equals_the_straightforward_model(name, guide_name, particles, batch):
    """The shared density table, ComponentNormal and index_select change no loss or gradient."""
    import copy

    model, guide = tiny("gmvae_w", guide_name)
    model, guide = model.double(), guide.double()
    guide.eval()  # BatchNorm: a batch of one needs the running statistics
    plain = copy.deepcopy(model)
    plain.__class__ = PlainGMVAEW
    plain_guide = copy.deepcopy(guide)
    plain_guide.__dict__["model"] = plain
    x = data(batch).double()
    results = []
    for m, g in ((model, guide), (plain, plain_guide)):
        # Each its own store: the same module names, and graph's baseline lives there.
        pyro.clear_param_store()
        est = make_estimator(name, m, g, num_particles=particles)
        if name == "enum-jit":
            est.loss_and_grads(m.model, g, x)  # compiles (its own draws)
            zero_grads(m, g)
        pyro.set_rng_seed(1)
        loss = est.loss_and_grads(m.model, g, x)
        grads = [p.grad.clone() for p in (*m.parameters(), *g.parameters()) if p.grad is not None]
        results.append((torch.as_tensor(loss), grads))
    (loss, grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(plain_grads) > 0
    for g, h in zip(grads, plain_grads):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10)
