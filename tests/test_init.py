"""The VaDE guide and the initialisation stage, against hand computations on tiny cases.

- q(y|x,z) of the VaDE guide is Bayes' rule over the K prior components, computed here by a loop
  over k with ``torch.distributions``;
- TraceEnum_ELBO's loss and gradients with that guide equal the explicit sum over K with the
  same draw of z;
- ``initialise`` writes the fitted GaussianMixture into the prior exactly, is reproducible from
  its seed, and a tiny run of the default recipe clusters a synthetic mixture.
"""

import math

import numpy as np
import pyro
import pytest
import torch
import torch.distributions as tdist
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_gmvae import make_guide, make_model
from pyro_gmvae.guides import VaDEGuide
from pyro_gmvae.init import fit_mixture, initialise, pretrain_autoencoder
from pyro_gmvae.metrics import cluster_acc_hungarian

K, B = 3, 5


def tiny_vade(learn_weights=True, seed=0, covariance="diag"):
    torch.manual_seed(seed)
    model = make_model("gmvae", data_dim=6, k=K, z_dim=2, hidden=(8, 8),
                       learn_weights=learn_weights, covariance=covariance)  # fmt: skip
    with torch.no_grad():
        # Distinct, non-trivial components and weights, so a wrong formula shows.
        model.prior.loc.weight.normal_()
        model.prior.var.weight.normal_()
        if covariance == "full":
            model.prior_tril.normal_()
        if learn_weights:
            model.cluster_logits.copy_(torch.tensor([0.3, -0.5, 0.1]).log_softmax(-1))
    return model.double(), make_guide("vade", model).double()


def hand_component(model, k):
    """p(z | y = k) built by hand from the parameters: N(W_loc e_k, L_k L_kᵀ)."""
    one_hot = torch.zeros(K, dtype=torch.float64)
    one_hot[k] = 1.0
    loc = model.prior.loc(one_hot)
    std = (torch.nn.functional.softplus(model.prior.var(one_hot)) + model.min_var).sqrt()
    if model.covariance == "diag":
        return tdist.Independent(tdist.Normal(loc, std), 1)
    lower = torch.diag(std) + torch.tril(model.prior_tril[k], -1)
    return tdist.MultivariateNormal(loc, covariance_matrix=lower @ lower.T)


def hand_posterior(model, z):
    """log p(k | z) for z (B, z_dim), by a loop over k."""
    log_pi = model.cluster_logits.log_softmax(-1)
    joint = torch.stack([log_pi[k] + hand_component(model, k).log_prob(z) for k in range(K)], -1)
    return joint - joint.logsumexp(-1, keepdim=True)


COVARIANCES = ["diag", "full"]


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_vade_cluster_posterior_is_bayes_rule(binary_batch, covariance):
    model, guide = tiny_vade(covariance=covariance)
    z = torch.randn(B, 2, dtype=torch.float64)
    torch.testing.assert_close(model.cluster_log_posterior(z), hand_posterior(model, z))
    # cluster_probs: the posterior at the mean of q(z|x)
    torch.testing.assert_close(
        guide.cluster_probs(binary_batch), hand_posterior(model, guide.encode(binary_batch)).exp()
    )


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("learn_weights", [False, True])
def test_vade_elbo_and_gradients_equal_explicit_sum(binary_batch, learn_weights, covariance):
    model, guide = tiny_vade(learn_weights, covariance=covariance)
    x = binary_batch
    params = list(model.parameters()) + list(guide.parameters())
    pyro.set_rng_seed(4)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        config_enumerate(model.model), config_enumerate(guide), x
    )
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    pyro.set_rng_seed(4)  # the same draw of z: the ELBO traces the guide first
    z = (
        poutine.trace(poutine.enum(config_enumerate(guide), first_available_dim=-2))
        .get_trace(x)
        .nodes["z"]["value"]
    )
    assert z.shape == (B, 2)  # z does not depend on y: one draw per point
    log_q_y = hand_posterior(model, z)  # (B, K)
    log_pi = model.cluster_logits.log_softmax(-1)
    loc, scale = guide.z_head(guide.encoder(x))
    log_q_z = tdist.Normal(loc, scale).log_prob(z).sum(-1)
    log_p_x = tdist.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
    hand = 0.0
    for k in range(K):
        log_p_z = hand_component(model, k).log_prob(z)
        term = log_p_x + log_p_z + log_pi[k] - log_q_y[:, k] - log_q_z
        hand = hand - (log_q_y[:, k].exp() * term).sum()
    torch.testing.assert_close(loss, hand)
    hand_grads = torch.autograd.grad(hand, params, allow_unused=True)
    for a, b in zip(grads, hand_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)
    # The sum over y is log p(z) of the mixture: the ELBO is E_q(z|x)[log p(x|z) p(z) / q(z|x)].
    log_p_z_mix = _mixture_log_density(model, z)
    torch.testing.assert_close(loss, -(log_p_x + log_p_z_mix - log_q_z).sum())


def _mixture_log_density(model, z):
    """log Σ_k p(k) N(z; μ_k, Σ_k), from the hand-built components."""
    comp = torch.stack([hand_component(model, k).log_prob(z) for k in range(K)], -1)
    return (model.cluster_logits.log_softmax(-1) + comp).logsumexp(-1)


def test_shu_guide_with_full_covariance_prior_equals_explicit_sum(binary_batch):
    """Shu's guide q(y|x) q(z|x,y) with the full-covariance prior: the loss is the sum over K."""
    model, _ = tiny_vade(covariance="full")
    guide = make_guide("mean_field", model).double()
    x = binary_batch
    pyro.set_rng_seed(5)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        config_enumerate(model.model), config_enumerate(guide), x
    )
    pyro.set_rng_seed(5)
    z = (
        poutine.trace(poutine.enum(config_enumerate(guide), first_available_dim=-2))
        .get_trace(x)
        .nodes["z"]["value"]
    )
    log_q_y = guide.cluster_logits(x).log_softmax(-1)
    log_pi = model.cluster_logits.log_softmax(-1)
    hand = 0.0
    for k in range(K):
        y = torch.zeros(B, K, dtype=torch.float64)
        y[:, k] = 1.0
        z_k = z[k]
        log_q_z = guide.z_dist(x, y).log_prob(z_k)
        log_p_x = tdist.Bernoulli(logits=model.decoder(z_k)).log_prob(x).sum(-1)
        term = (
            log_p_x + hand_component(model, k).log_prob(z_k) + log_pi[k] - log_q_y[:, k] - log_q_z
        )
        hand = hand - (log_q_y[:, k].exp() * term).sum()
    torch.testing.assert_close(loss, hand)


def test_vade_decoder_runs_once_per_point(binary_batch):
    model, guide = tiny_vade()
    calls = []
    model.decoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    TraceEnum_ELBO(max_plate_nesting=1).loss(
        config_enumerate(model.model), config_enumerate(guide), binary_batch
    )
    assert calls == [torch.Size([B, 2])]


def test_vade_guide_fits_gmvae_only():
    model = make_model("m2", data_dim=6, k=K, z_dim=2, hidden=(8, 8))
    with pytest.raises(ValueError, match="does not fit model 'm2'"):
        make_guide("vade", model)
    assert isinstance(make_guide("vade", make_model("gmvae", data_dim=6, k=K)), VaDEGuide)


# --- the mixture prior -------------------------------------------------------------------------


def test_set_mixture_sets_prior_exactly():
    model, _ = tiny_vade()
    rng = np.random.default_rng(0)
    means, variances = rng.normal(size=(K, 2)), rng.uniform(0.1, 2.0, size=(K, 2))
    weights = np.array([0.5, 0.3, 0.2])
    model.set_mixture(means, variances, weights)
    torch.testing.assert_close(model.components().mean, torch.tensor(means))
    torch.testing.assert_close(model.components().variance, torch.tensor(variances))
    torch.testing.assert_close(model.cluster_log_prior().exp(), torch.tensor(weights))


def test_set_mixture_sets_full_covariances_exactly():
    model, _ = tiny_vade(covariance="full")
    rng = np.random.default_rng(1)
    a = rng.normal(size=(K, 2, 2))
    covariances = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(2)
    means = rng.normal(size=(K, 2))
    model.set_mixture(means, covariances)
    torch.testing.assert_close(model.components().mean, torch.tensor(means))
    torch.testing.assert_close(model.components().covariance_matrix, torch.tensor(covariances))
    for k in range(K):  # and the density, against one built by hand from the parameters
        z = torch.randn(4, 2, dtype=torch.float64)
        expected = tdist.MultivariateNormal(torch.tensor(means[k]), torch.tensor(covariances[k]))
        torch.testing.assert_close(hand_component(model, k).log_prob(z), expected.log_prob(z))


def test_set_mixture_refuses_weights_without_learnable_prior():
    model, _ = tiny_vade(learn_weights=False)
    ok = np.ones((K, 2))
    model.set_mixture(ok, ok, np.full(K, 1 / K))  # uniform: what the fixed prior already is
    with pytest.raises(ValueError, match="learn_weights=True"):
        model.set_mixture(ok, ok, np.array([0.5, 0.3, 0.2]))
    with pytest.raises(ValueError, match="shape"):
        model.set_mixture(np.ones((K, 3)), np.ones((K, 3)))
    with pytest.raises(ValueError, match="floor"):
        model.set_mixture(ok, np.zeros((K, 2)))


def mixture_data(n=300, d=12, seed=0):
    """K binary prototypes with 10 % of pixels flipped; grey levels = the flip probabilities."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(K, d, generator=g) < 0.5).double()
    labels = torch.randint(K, (n,), generator=g)
    grey = 0.1 + 0.8 * protos[labels]
    return grey, labels


@pytest.mark.parametrize("guide_name", ["vade", "mean_field"])
def test_initialise_gmm_writes_the_fitted_mixture(guide_name):
    torch.manual_seed(0)
    model = make_model(
        "gmvae", data_dim=12, k=K, z_dim=2, hidden=(16,), learn_weights=True
    ).double()
    guide = make_guide(guide_name, model).double()
    x, _ = mixture_data()
    report = initialise(model, guide, x, "gmm", pretrain_epochs=2, batch_size=50, seed=1,
                        encoder_epochs=40)  # fmt: skip
    assert len(report["pretrain_loss"]) == 2
    codes = guide_codes(guide, x)
    gmm = fit_mixture(codes, K, n_init=5, seed=1, min_var=model.min_var)  # the same fit, again
    torch.testing.assert_close(model.components().mean, torch.tensor(gmm.means_))
    torch.testing.assert_close(model.components().variance, torch.tensor(gmm.covariances_))
    torch.testing.assert_close(model.cluster_log_prior().exp(), torch.tensor(gmm.weights_))
    if guide_name == "mean_field":
        # q(z|x,y) starts as the pretrained encoder for every y; q(y|x) follows the mixture.
        assert guide.z_in.linear_b.weight.abs().sum() == 0
        agree = guide.cluster_probs(x).argmax(-1) == torch.as_tensor(gmm.predict(codes))
        assert agree.double().mean() > 0.8


def guide_codes(guide, x):
    with torch.no_grad():
        return guide.encode(x).numpy()


@pytest.mark.parametrize("method", ["gmm", "umap"])
def test_initialise_is_reproducible_from_its_seed(method):
    x, _ = mixture_data()
    states = []
    for draw in range(2):
        torch.manual_seed(123)  # the networks' initial weights
        model = make_model("gmvae", data_dim=12, k=K, z_dim=2, hidden=(16,), learn_weights=True,
                           covariance="full")  # fmt: skip
        guide = make_guide("vade", model)
        torch.manual_seed(999 + draw)  # global RNG state that initialise must not depend on
        np.random.seed(draw)
        initialise(model, guide, x.float(), method, pretrain_epochs=2, batch_size=50, seed=7,
                   umap_neighbors=10)  # fmt: skip
        states.append({**model.state_dict(), **guide.state_dict()})
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_pretraining_reduces_reconstruction_loss():
    torch.manual_seed(0)
    model = make_model("gmvae", data_dim=12, k=K, z_dim=2, hidden=(16,))
    guide = make_guide("vade", model)
    x, _ = mixture_data()
    losses = pretrain_autoencoder(model, guide, x.float(), epochs=5, batch_size=50)
    assert losses[-1] < losses[0]


def test_initialise_refuses_a_model_without_mixture_prior():
    model = make_model("m2", data_dim=12, k=K, z_dim=2, hidden=(16,))
    guide = make_guide("mean_field", model)
    with pytest.raises(ValueError, match="has none"):
        initialise(model, guide, mixture_data()[0].float(), "gmm", pretrain_epochs=0)
    with pytest.raises(ValueError, match="unknown init method"):
        initialise(model, guide, mixture_data()[0].float(), "kmeans")


def test_initialise_umap_embeds_and_clusters():
    """N2D's path: UMAP of the codes becomes the latent space; the mixture is fitted there."""
    torch.manual_seed(0)
    model = make_model("gmvae", data_dim=12, k=K, z_dim=2, hidden=(16,), learn_weights=True)
    guide = make_guide("vade", model)
    x, labels = mixture_data()
    report = initialise(model, guide, x.float(), "umap", pretrain_epochs=30, batch_size=50,
                        seed=0, umap_neighbors=10)  # fmt: skip
    assert report["umap_s"] > 0 and math.isfinite(report["gmm_log_likelihood"])
    pred = guide.cluster_probs(x.float()).argmax(-1)
    assert cluster_acc_hungarian(labels, pred) > 0.9


# --- the stage inside a run ---------------------------------------------------------------------


def run_config(out, **overrides):
    """A tiny run of a recipe on 200 arcs points (K = 5), 4 steps per epoch."""
    from pyro_gmvae.harness.run import RECIPES, RunConfig

    recipe = overrides.pop("recipe", "vade")
    base = {**RECIPES[recipe], "recipe": recipe, "k": 5, "dataset": "arcs", "binarize": "none",
            "hidden": 16, "latent_dim": 2, "limit": 200, "batch_size": 50, "eval_batch_size": 100,
            "epochs": 2, "pretrain_epochs": 3, "progress": False, "out": str(out)}  # fmt: skip
    return RunConfig(**{**base, **overrides})


def test_run_evaluates_the_initialised_model_as_epoch_0(tmp_path):
    from pyro_gmvae.harness.run import read_metrics, run

    run(run_config(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["step"] == 0 and rows[0]["train_loss"] is None
    assert rows[0]["init_s"] > 0 and math.isfinite(rows[0]["gmm_log_likelihood"])


def test_resume_after_the_initialisation_stage_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from pyro_gmvae.harness.run import read_metrics, run
    from pyro_gmvae.train import Trainer

    class Killed(Exception):
        pass

    def rows(out):
        return [
            {k: v for k, v in r.items() if k not in ("time_s", "init_s")} for r in read_metrics(out)
        ]

    run(run_config(tmp_path / "whole"))
    step = Trainer.step

    def dying_step(self, x):
        raise Killed  # the process dies at the first SVI step, after the stage's checkpoint

    monkeypatch.setattr(Trainer, "step", dying_step)
    with pytest.raises(Killed):
        run(run_config(tmp_path / "cut"))
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut")] == [0]
    monkeypatch.setattr(Trainer, "step", step)
    calls = []
    monkeypatch.setattr("pyro_gmvae.harness.run.initialise", lambda *a, **k: calls.append(1))
    run(run_config(tmp_path / "cut"), resume=True)
    assert not calls  # the stage is not repeated
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_default_recipe_clusters_a_synthetic_mixture(tmp_path):
    """The main job's default recipe, end to end at tiny size, beats chance on the arcs."""
    from pyro_gmvae.harness.run import DEFAULT_RECIPE, run

    summary = run(run_config(tmp_path, recipe=DEFAULT_RECIPE, limit=500, epochs=3))
    # Chance is 0.2 for 5 equal clusters; a collapse to one cluster scores exactly that.
    assert summary["acc_hungarian"] > 0.4 and summary["clusters_used"] >= 4


def test_fit_mixture_from_a_partition_starts_at_its_groups():
    """Given a hard partition of well-separated groups, the mixture is the groups' own:
    weights, means and (full) covariances computed by hand from each group (EM has nothing
    to move), and its assignments are the partition."""
    from pyro_gmvae.init import fit_mixture

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    sizes = [30, 50, 20]
    codes = np.concatenate([c + rng.normal(size=(n, 2)) for c, n in zip(centres, sizes)])
    labels = np.repeat([2, 0, 1], sizes)  # the partition's own numbering, not the data's order
    gmm = fit_mixture(codes, 3, "full", seed=0, min_var=1e-6, responsibilities=np.eye(3)[labels])
    for j in range(3):
        group = codes[labels == j]
        np.testing.assert_allclose(gmm.weights_[j], len(group) / len(codes), atol=1e-6)
        np.testing.assert_allclose(gmm.means_[j], group.mean(0), atol=1e-6)
        np.testing.assert_allclose(gmm.covariances_[j], np.cov(group.T, bias=True), atol=1e-4)
    assert (gmm.predict(codes) == labels).all()
