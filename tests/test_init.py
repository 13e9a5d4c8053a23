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
from pyro.infer import TraceEnum_ELBO

from pyro_gmvae import make_guide, make_model
from pyro_gmvae.guides import VaDEGuide
from pyro_gmvae.init import fit_mixture, initialise, pretrain_autoencoder
from pyro_gmvae.metrics import cluster_acc_hungarian

K, B = 3, 5


def tiny_vade(learn_weights=True, seed=0):
    torch.manual_seed(seed)
    model = make_model("gmvae", data_dim=6, k=K, z_dim=2, hidden=(8, 8), learn_weights=learn_weights)
    with torch.no_grad():
        # Distinct, non-trivial components and weights, so a wrong formula shows.
        model.prior.loc.weight.normal_()
        model.prior.var.weight.normal_()
        if learn_weights:
            model.cluster_logits.copy_(torch.tensor([0.3, -0.5, 0.1]).log_softmax(-1))
    return model.double(), make_guide("vade", model).double()


def hand_posterior(model, z):
    """log p(k | z) for z (B, z_dim), by a loop over k."""
    log_pi = model.cluster_logits.log_softmax(-1)
    cols = []
    for k in range(K):
        one_hot = torch.zeros(K, dtype=z.dtype)
        one_hot[k] = 1.0
        loc = model.prior.loc(one_hot)
        var = torch.nn.functional.softplus(model.prior.var(one_hot)) + model.min_var
        cols.append(log_pi[k] + tdist.Normal(loc, var.sqrt()).log_prob(z).sum(-1))
    joint = torch.stack(cols, -1)
    return joint - joint.logsumexp(-1, keepdim=True)


def test_vade_cluster_posterior_is_bayes_rule(binary_batch):
    model, guide = tiny_vade()
    z = torch.randn(B, 2, dtype=torch.float64)
    torch.testing.assert_close(model.cluster_log_posterior(z), hand_posterior(model, z))
    # cluster_probs: the posterior at the mean of q(z|x)
    torch.testing.assert_close(
        guide.cluster_probs(binary_batch), hand_posterior(model, guide.encode(binary_batch)).exp()
    )


@pytest.mark.parametrize("learn_weights", [False, True])
def test_vade_elbo_and_gradients_equal_explicit_sum(binary_batch, learn_weights):
    model, guide = tiny_vade(learn_weights)
    x = binary_batch
    params = list(model.parameters()) + list(guide.parameters())
    pyro.set_rng_seed(4)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model.model, guide, x)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    pyro.set_rng_seed(4)  # the same draw of z: the ELBO traces the guide first
    z = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(x).nodes["z"]["value"]
    assert z.shape == (B, 2)  # z does not depend on y: one draw per point
    log_q_y = hand_posterior(model, z)  # (B, K)
    log_pi = model.cluster_logits.log_softmax(-1)
    loc, scale = guide.z_head(guide.encoder(x))
    log_q_z = tdist.Normal(loc, scale).log_prob(z).sum(-1)
    log_p_x = tdist.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
    hand = 0.0
    for k in range(K):
        one_hot = torch.zeros(K, dtype=z.dtype)
        one_hot[k] = 1.0
        var = torch.nn.functional.softplus(model.prior.var(one_hot)) + model.min_var
        log_p_z = tdist.Normal(model.prior.loc(one_hot), var.sqrt()).log_prob(z).sum(-1)
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
    loc, scale = model.components()
    comp = tdist.Normal(loc, scale).log_prob(z.unsqueeze(-2)).sum(-1)
    return (model.cluster_logits.log_softmax(-1) + comp).logsumexp(-1)


def test_vade_decoder_runs_once_per_point(binary_batch):
    model, guide = tiny_vade()
    calls = []
    model.decoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, guide, binary_batch)
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
    loc, scale = model.components()
    torch.testing.assert_close(loc, torch.tensor(means))
    torch.testing.assert_close(scale**2, torch.tensor(variances))
    torch.testing.assert_close(model.cluster_log_prior().exp(), torch.tensor(weights))


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
    model = make_model("gmvae", data_dim=12, k=K, z_dim=2, hidden=(16,), learn_weights=True).double()
    guide = make_guide(guide_name, model).double()
    x, _ = mixture_data()
    report = initialise(model, guide, x, "gmm", pretrain_epochs=2, batch_size=50, seed=1,
                        encoder_epochs=40)  # fmt: skip
    assert len(report["pretrain_loss"]) == 2
    codes = guide_codes(guide, x)
    gmm = fit_mixture(codes, K, n_init=5, seed=1, min_var=model.min_var)  # the same fit, again
    loc, scale = model.components()
    torch.testing.assert_close(loc, torch.tensor(gmm.means_))
    torch.testing.assert_close(scale**2, torch.tensor(gmm.covariances_))
    torch.testing.assert_close(model.cluster_log_prior().exp(), torch.tensor(gmm.weights_))
    if guide_name == "mean_field":
        # q(z|x,y) starts as the pretrained encoder for every y; q(y|x) follows the mixture.
        assert guide.z_in.linear_b.weight.abs().sum() == 0
        agree = guide.cluster_probs(x).argmax(-1) == torch.as_tensor(gmm.predict(codes))
        assert agree.double().mean() > 0.8


def guide_codes(guide, x):
    with torch.no_grad():
        return guide.encode(x).numpy()


def test_initialise_is_reproducible_from_its_seed():
    x, _ = mixture_data()
    states = []
    for _ in range(2):
        torch.manual_seed(123)  # the networks' initial weights
        model = make_model("gmvae", data_dim=12, k=K, z_dim=2, hidden=(16,), learn_weights=True)
        guide = make_guide("vade", model)
        torch.manual_seed(999)  # global RNG state that initialise must not depend on
        initialise(model, guide, x.float(), "gmm", pretrain_epochs=2, batch_size=50, seed=7)
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
    report = initialise(model, guide, x.float(), "umap", pretrain_epochs=3, batch_size=50,
                        seed=0, umap_neighbors=10, embed_epochs=30)  # fmt: skip
    assert len(report["embed_loss"]) == 30 and math.isfinite(report["gmm_log_likelihood"])
    pred = guide.cluster_probs(x.float()).argmax(-1)
    assert cluster_acc_hungarian(labels, pred) > 0.9


# --- the stage inside a run ---------------------------------------------------------------------


def run_config(out, **overrides):
    """A tiny run of a recipe on 200 arcs points (K = 5), 4 steps per epoch."""
    from pyro_gmvae.run import RECIPES, RunConfig

    recipe = overrides.pop("recipe", "vade")
    base = {**RECIPES[recipe], "recipe": recipe, "k": 5, "dataset": "arcs", "binarize": "none",
            "hidden": 16, "latent_dim": 2, "limit": 200, "batch_size": 50, "eval_batch_size": 100,
            "epochs": 2, "pretrain_epochs": 3, "progress": False, "out": str(out)}  # fmt: skip
    return RunConfig(**{**base, **overrides})


def test_run_evaluates_the_initialised_model_as_epoch_0(tmp_path):
    from pyro_gmvae.run import read_metrics, run

    run(run_config(tmp_path))
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["step"] == 0 and rows[0]["train_loss"] is None
    assert rows[0]["init_s"] > 0 and math.isfinite(rows[0]["gmm_log_likelihood"])


def test_resume_after_the_initialisation_stage_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from pyro_gmvae.run import read_metrics, run
    from pyro_gmvae.train import Trainer

    class Killed(Exception):
        pass

    def rows(out):
        return [{k: v for k, v in r.items() if k not in ("time_s", "init_s")} for r in read_metrics(out)]

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
    monkeypatch.setattr("pyro_gmvae.run.initialise", lambda *a, **k: calls.append(1))
    run(run_config(tmp_path / "cut"), resume=True)
    assert not calls  # the stage is not repeated
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_default_recipe_clusters_a_synthetic_mixture(tmp_path):
    """The main job's default recipe, end to end at tiny size, beats chance on the arcs."""
    from pyro_gmvae.run import DEFAULT_RECIPE, run

    summary = run(run_config(tmp_path, recipe=DEFAULT_RECIPE, limit=500, epochs=3))
    assert summary["acc_hungarian"] > 0.5  # chance: 0.2 for 5 equal clusters
