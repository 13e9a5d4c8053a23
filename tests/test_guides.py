"""Guides: flow densities against an autograd Jacobian, every model x guide pair trains, the
relaxed cluster guide (simplex, reparameterised, annealed) and its Concrete prior handler."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from torch.autograd.functional import jacobian
from torch.distributions.utils import clamp_probs

from pyro_gmvae import make_model
from pyro_gmvae.estimators import cluster_placement, make_estimator
from pyro_gmvae.guides import (
    FLOWS,
    GUIDE_FITS,
    GUIDES,
    FlowGMVAEWGuide,
    FlowGuide,
    Guide,
    RelaxedGuide,
    make_guide,
    relax_cluster_prior,
)

D, K, B = 5, 3, 4
TINY = {
    "m2": dict(z_dim=3, hidden=(8,)),
    "modified_m2": dict(z_dim=3, hidden=(8,)),
    "gmvae": dict(z_dim=3, hidden=(8,)),
    "gmvae_w": dict(x_dim=3, w_dim=2, hidden=8),
}
FLOW_KW = dict(depth=2, flow_hidden=(8,))


def tiny_model(name):
    return make_model(name, data_dim=D, k=K, **TINY[name])


def binary_data(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, D, generator=g) < 0.5).to(torch.get_default_dtype())


def guide_kwargs(guide_name):
    return FLOW_KW if guide_name in FLOWS else {}


def model_fn(model, guide):
    """The model callable for a guide: with the cluster prior made Concrete for relaxed guides."""
    if isinstance(guide, RelaxedGuide):
        return relax_cluster_prior(model.model, guide.cluster_site, lambda: guide.temperature)
    return model.model


@pytest.fixture(autouse=True)
def seeded():
    # conftest clears the param store; these tests also want a fixed RNG per test.
    pyro.set_rng_seed(0)
    yield


# --- Flow densities ---------------------------------------------------------------------------


@pytest.fixture
def float64():
    """Double precision for exact comparisons; as the default dtype, because Pyro's autoregressive
    inverses build their buffers with the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def check_flow_density(d, base_loc, base_scale):
    """log q(z) of a sample = log N(u) at the inverted point u - log|det d f(u)/du|, with the
    Jacobian of the forward map u -> z taken by autograd (not from the transforms' own terms)."""
    transforms = d.transforms

    def forward_map(u):
        for t in transforms:
            u = t(u)
        return u

    z = d.rsample()
    log_q_cached = d.log_prob(z)  # the guide's own sample: Pyro reuses the cached inverse
    log_q_fresh = d.log_prob(z.detach().clone())  # forces the flows' inverse to be computed
    u = z.detach().clone()
    for t in reversed(transforms):
        u = t.inv(u)
    torch.testing.assert_close(forward_map(u), z.detach(), atol=1e-8, rtol=1e-8)

    batch, dim = z.shape[:-1], z.shape[-1]
    n = batch.numel()
    jac = jacobian(forward_map, u).reshape(n, dim, n, dim)
    blocks = torch.stack([jac[i, :, i, :] for i in range(n)])
    off_diagonal = jac.clone()
    for i in range(n):
        off_diagonal[i, :, i, :] = 0
    assert off_diagonal.abs().max() == 0, "the flow mixes different batch / enumeration entries"
    log_det = torch.linalg.slogdet(blocks)[1].reshape(batch)
    assert log_det.abs().max() > 1e-3, (
        "the flow is (close to) the identity: the test could not fail"
    )
    log_base = dist.Normal(base_loc, base_scale).log_prob(u).sum(-1)
    expected = log_base - log_det
    torch.testing.assert_close(log_q_cached.detach(), expected, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(log_q_fresh.detach(), expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("flow", FLOWS)
def test_flow_density_with_enumerated_y(flow, float64):
    model = tiny_model("gmvae")
    guide = make_guide(flow, model, **FLOW_KW)
    assert isinstance(guide, FlowGuide) and guide.name == flow
    x = binary_data()
    y = torch.eye(K).reshape(K, 1, K)  # the enumerated cluster's shape
    d = guide.z_dist(x, y)
    assert d.batch_shape == (K, B) and d.event_shape == (model.z_dim,)
    check_flow_density(d, *guide.z_params(x, y))


@pytest.mark.parametrize("flow", FLOWS)
def test_flow_density_gmvae_w(flow, float64):
    model = tiny_model("gmvae_w")
    guide = make_guide(flow, model, **FLOW_KW).eval()
    assert isinstance(guide, FlowGMVAEWGuide)
    obs = binary_data()
    q_x, q_w = guide.latent_dists(obs)
    h = guide.recogniser(obs)
    assert q_x.batch_shape == (B,) and q_x.event_shape == (model.x_dim,)
    check_flow_density(q_x, *guide.x_head(h))
    check_flow_density(q_w, *guide.w_head(h))


@pytest.mark.parametrize("flow", ["iaf", "cond_spline"])
def test_flow_guide_enum_elbo_equals_hand_sum(flow, float64):
    """TraceEnum_ELBO with a flow guide = the explicit sum over K with the same draws of z."""
    model = tiny_model("gmvae")
    guide = make_guide(flow, model, **FLOW_KW)
    x = binary_data()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(config_enumerate(model.model), config_enumerate(guide), x)
    pyro.set_rng_seed(3)  # the same draws: the ELBO traces the enumerated guide first
    trace = poutine.trace(poutine.enum(config_enumerate(guide), first_available_dim=-2)).get_trace(
        x
    )
    z = trace.nodes["z"]["value"]  # (K, B, z_dim)
    y = torch.eye(K).reshape(K, 1, K)
    log_q_y = guide.cluster_logits(x).log_softmax(-1)  # (B, K)
    log_q_z = guide.z_dist(x, y).log_prob(z)  # (K, B); checked against autograd above
    log_p_z = dist.Normal(*model.prior(y)).log_prob(z).sum(-1)
    log_p_x = dist.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
    per_k = log_p_x + log_p_z - log_q_z + (-math.log(K) - log_q_y.T)  # (K, B)
    hand = -(log_q_y.exp().T * per_k).sum()
    torch.testing.assert_close(loss, hand)


# --- Every model x guide pair trains ------------------------------------------------------------

PAIRS = [(g, m) for g, fits in GUIDE_FITS.items() for m in fits]
PAIRS += [("relaxed", "gmvae", {"straight_through": True}), ("relaxed", "m2", {"flow": "cond_iaf"})]
PAIRS += [("cond_spline", "gmvae_w", {"cluster": "model", **FLOW_KW})]


def nonzero_grads(*modules):
    missing = [
        (type(m).__name__, n)
        for m in modules
        for n, p in m.named_parameters()
        if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(str(v) for v in p))
def test_every_pair_trains_under_enumeration(pair):
    guide_name, model_name, *extra = pair
    kwargs = extra[0] if extra else guide_kwargs(guide_name)
    model = tiny_model(model_name)
    guide = make_guide(guide_name, model, **kwargs)
    x = binary_data()
    if isinstance(guide, RelaxedGuide):
        # Plain TraceEnum_ELBO: the "enum" estimator refuses a relaxed cluster (by design).
        elbo = TraceEnum_ELBO(max_plate_nesting=1)
        step_loss = lambda: elbo.differentiable_loss(model_fn(model, guide), guide, x)  # noqa: E731
    else:
        estimator = make_estimator("enum")
        step_loss = lambda: estimator.loss(model.model, guide, x)  # noqa: E731
    params = list(model.parameters()) + list(guide.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        # The relaxed guide enumerates nothing, which TraceEnum_ELBO warns about.
        warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites")
        for step in range(2):
            opt.zero_grad()
            loss = step_loss()
            loss.backward()
            assert torch.isfinite(loss)
            if step == 0:
                nonzero_grads(guide, model)
            opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    # pyro.module("guide", self) registered every guide parameter, flows included.
    store = pyro.get_param_store()
    assert all(f"guide$$${n}" in store for n, _ in guide.named_parameters())
    probs = guide.cluster_probs(x)
    assert probs.shape == (B, K)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B))


@pytest.mark.parametrize(
    "guide_name,model_name", [("cond_spline", "gmvae"), ("cond_iaf", "gmvae_w")]
)
def test_flow_guides_with_vectorised_particles(guide_name, model_name):
    """M = 2 particles add a dim left of the data plate: (K, M, B) batch shapes, context expanded."""
    model = tiny_model(model_name)
    guide = make_guide(guide_name, model, **FLOW_KW)
    loss = make_estimator("enum", num_particles=2).loss_and_grads(model.model, guide, binary_data())
    assert torch.isfinite(loss)
    nonzero_grads(guide)


def test_flows_are_submodules_and_configurable():
    model = tiny_model("gmvae")
    guide = make_guide("spline", model, depth=3, flow_hidden=(6, 7), count_bins=4, bound=2.0)
    assert len(guide.flow.layers) == 3
    flow_params = {id(p) for p in guide.flow.parameters()}
    assert flow_params and flow_params <= {id(p) for p in guide.parameters()}
    widths = [
        m.out_features for m in guide.flow.layers[0].modules() if isinstance(m, torch.nn.Linear)
    ]
    assert widths[:2] == [6, 7]
    assert guide.flow.layers[0].spline.count_bins == 4 and guide.flow.layers[0].spline.bound == 2.0
    with pytest.raises(ValueError, match="depth"):
        make_guide("iaf", model, depth=0)


# --- Clear errors for guides that do not fit ----------------------------------------------------


@pytest.mark.parametrize(
    "guide_name,model_name",
    [
        ("relaxed", "gmvae_w"),
        ("mean_field", "gmvae_w"),
        ("exact_posterior", "gmvae"),
        ("model_enum", "m2"),
    ],
)
def test_misfit_guide_gives_clear_error(guide_name, model_name):
    model = tiny_model(model_name)
    fitting = sorted(g for g, fits in GUIDE_FITS.items() if model_name in fits)
    with pytest.raises(ValueError) as err:
        make_guide(guide_name, model)
    message = str(err.value)
    assert f"guide {guide_name!r} does not fit model {model_name!r}" in message
    assert str(fitting) in message and guide_name not in fitting


def test_unknown_guide_and_registry():
    with pytest.raises(ValueError, match="unknown guide 'nope'"):
        make_guide("nope", tiny_model("gmvae"))
    assert set(GUIDES) == set(GUIDE_FITS)
    assert {
        "iaf",
        "spline",
        "cond_iaf",
        "cond_spline",
        "relaxed",
        "exact_posterior",
        "model_enum",
    } <= set(GUIDES)
    assert make_guide(None, tiny_model("gmvae_w")).name == "exact_posterior"


# --- The relaxed cluster guide ------------------------------------------------------------------


def test_relaxed_sample_is_gumbel_softmax_on_simplex_and_reparameterised():
    model = tiny_model("gmvae")
    guide = make_guide("relaxed", model, temperature=0.7)
    x = binary_data()
    pyro.set_rng_seed(5)
    trace = poutine.trace(guide).get_trace(x)
    site = trace.nodes["y"]
    y = site["value"]
    assert "enumerate" not in site["infer"] and site["fn"].has_rsample
    assert (y > 0).all() and (y < 1).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(B))
    # The same Gumbel noise by hand: y = softmax((logits + g) / tau).
    pyro.set_rng_seed(5)
    logits = guide.cluster_logits(x)
    u = clamp_probs(torch.rand(B, K))  # as torch's ExpRelaxedCategorical.rsample draws it
    y_hand = ((logits.log_softmax(-1) - (-u.log()).log()) / 0.7).softmax(-1)
    torch.testing.assert_close(y, y_hand)
    # The gradient reaches q(y|x)'s logits through the sample (pathwise, not score function).
    c = torch.randn(K)
    (grad,) = torch.autograd.grad((y * c).sum(), guide.y_net[-1].weight)
    (grad_hand,) = torch.autograd.grad((y_hand * c).sum(), guide.y_net[-1].weight)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, grad_hand)


def test_relaxed_straight_through_is_one_hot_with_soft_gradient():
    model = tiny_model("gmvae")
    guide = make_guide("relaxed", model, straight_through=True)
    trace = poutine.trace(guide).get_trace(binary_data())
    y = trace.nodes["y"]["value"]
    assert ((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all()
    soft = y._unquantize
    assert (soft > 0).all() and (soft < 1).all()
    (grad,) = torch.autograd.grad((y * torch.randn(K)).sum(), guide.y_net[-1].weight)
    assert grad.abs().sum() > 0


def test_temperature_annealing():
    guide = make_guide("relaxed", tiny_model("m2"))
    assert guide.temperature == 1.0
    assert guide.set_epoch(0) == 1.0
    assert guide.set_epoch(10) == pytest.approx(2 ** (-10 / 50))
    assert guide.set_epoch(50) == pytest.approx(0.5)  # jariasf/GMVAE's 1.0 -> 0.5
    assert guide.set_epoch(500) == 0.5  # floored at temperature_min
    guide = make_guide(
        "relaxed", tiny_model("m2"), temperature=2.0, temperature_min=0.1, anneal_rate=0.1
    )
    guide.set_epoch(3)
    assert guide.temperature == pytest.approx(2.0 * math.exp(-0.3))
    assert guide.cluster_dist(binary_data()).temperature.item() == pytest.approx(guide.temperature)
    guide.temperature = 0.3  # a trainer may also set it directly
    assert guide.cluster_dist(binary_data()).temperature.item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="temperature"):
        guide.temperature = 0.0


def concrete_log_density(y, log_pi, tau):
    """Maddison et al. 2017, eq. (2): the Concrete density on the simplex, by hand."""
    k = y.shape[-1]
    return (
        math.lgamma(k)
        + (k - 1) * math.log(tau)
        + (log_pi - (tau + 1) * y.log()).sum(-1)
        - k * torch.logsumexp(log_pi - tau * y.log(), -1)
    )


def test_relax_cluster_prior_scores_concrete_density_and_follows_temperature():
    model = tiny_model("gmvae")
    guide = make_guide("relaxed", model, temperature=0.8)
    x = binary_data()
    relaxed_model = relax_cluster_prior(model.model, "y", lambda: guide.temperature)
    for tau in (0.8, 0.55):
        guide.temperature = tau
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(relaxed_model, trace=guide_trace)).get_trace(x)
        site = model_trace.nodes["y"]
        assert "enumerate" not in site["infer"]
        y = guide_trace.nodes["y"]["value"]
        log_p = site["fn"].log_prob(y)
        hand = concrete_log_density(y, torch.full((K,), -math.log(K)), tau)
        torch.testing.assert_close(log_p, hand)
        log_q = guide_trace.nodes["y"]["fn"].log_prob(y)
        torch.testing.assert_close(
            log_q, concrete_log_density(y, guide.cluster_logits(x).log_softmax(-1), tau)
        )


@pytest.mark.parametrize("straight_through", [False, True])
def test_relaxed_guide_trains_with_trace_elbo(straight_through):
    model = tiny_model("gmvae")
    guide = make_guide("relaxed", model, straight_through=straight_through)
    x = binary_data()
    elbo = Trace_ELBO(max_plate_nesting=1)
    opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-2)
    for epoch in range(3):
        guide.set_epoch(epoch * 25)
        opt.zero_grad()
        loss = elbo.differentiable_loss(model_fn(model, guide), guide, x)
        loss.backward()
        assert torch.isfinite(loss)
        nonzero_grads(guide, model)
        opt.step()
    assert guide.temperature == pytest.approx(2 ** (-1))


def test_relaxed_guide_in_eval_mode_is_the_discrete_guide():
    """guide.eval() turns the relaxation off: the discrete ELBO of the same networks, with the
    unmodified model, equal to that of a mean-field guide holding the same weights."""
    model = tiny_model("gmvae")
    guide = make_guide("relaxed", model).eval()
    x = binary_data()
    site = (
        poutine.trace(poutine.enum(config_enumerate(guide), first_available_dim=-2))
        .get_trace(x)
        .nodes["y"]
    )
    assert isinstance(site["fn"], dist.OneHotCategorical)
    assert site["infer"]["enumerate"] == "parallel" and site["value"].shape == (K, 1, K)
    mean_field = make_guide("mean_field", model)
    mean_field.load_state_dict(guide.state_dict())
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(1)
    loss = elbo.loss(config_enumerate(model.model), config_enumerate(guide), x)
    pyro.set_rng_seed(1)
    assert loss == pytest.approx(
        elbo.loss(config_enumerate(model.model), config_enumerate(mean_field), x), rel=1e-6
    )
    guide.train()
    assert not poutine.trace(guide).get_trace(x).nodes["y"]["infer"].get("enumerate")


def test_default_flow_widths_are_capped():
    model = make_model("gmvae_w", data_dim=D, k=K, x_dim=60, w_dim=2, hidden=8)
    guide = make_guide("cond_spline", model)
    widths = [
        m.out_features for m in guide.x_flow.layers[0].modules() if isinstance(m, torch.nn.Linear)
    ]
    assert widths[:2] == [512, 512]
    guide = make_guide("iaf", tiny_model("gmvae"))
    widths = [
        m.out_features for m in guide.flow.layers[0].modules() if isinstance(m, torch.nn.Linear)
    ]
    assert widths[0] == 3 * 3 + 1  # Pyro's default, under the cap


@pytest.mark.parametrize(
    "guide_name,model_name", [("cond_spline", "gmvae"), ("cond_iaf", "gmvae_w"), ("relaxed", "m2")]
)
def test_evaluation_works_with_flow_and_relaxed_guides(guide_name, model_name):
    """The harness's test ELBO and importance-weighted bound (S draws in a plate left of the
    data plate, cluster fixed by conditioning) accept flow and relaxed guides."""
    from pyro_gmvae.evaluate import elbo, iw_log_likelihood

    model = tiny_model(model_name)
    guide = make_guide(guide_name, model, **guide_kwargs(guide_name))
    x = binary_data()
    test_elbo, bound = elbo(model, guide, x), iw_log_likelihood(model, guide, x, num_samples=3)
    assert math.isfinite(test_elbo) and math.isfinite(bound)
    assert guide.training  # evaluation restores the mode


@pytest.mark.parametrize("name", sorted(GUIDE_FITS))
def test_every_registered_guide_meets_the_guide_protocol(name):
    """Each guide, built for every model it fits, has the attributes the Guide protocol names,
    and its placement of the cluster is read from them (no table of names)."""
    for model_name in GUIDE_FITS[name]:
        guide = make_guide(name, tiny_model(model_name), **guide_kwargs(name))
        assert isinstance(guide, Guide)
        assert model_name in guide.fits and isinstance(guide.exact_cluster_posterior, bool)
        exact = model_name == "gmvae_w" or name == "vade"  # p(c|x,w), p(y|z): no encoder
        expected = "model" if name == "model_enum" else "exact" if exact else "learned"
        assert cluster_placement(guide) == expected
