"""Evaluation: the ELBO and the importance-weighted bound against hand computations, metrics.

The hand computations use ``torch.distributions`` on the draws the guide actually made, recorded
by a small handler around the guide, and sum over the clusters with an explicit loop.
"""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.distributions as td
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.poutine.messenger import Messenger
from torch import nn

from pyro_gmvae import GMVAE, GMVAEW, make_guide
from pyro_gmvae.evaluate import cluster_probs, elbo, evaluate, iw_log_likelihood

D, K = 6, 3


class Record(Messenger):
    """Records the values of the named sample sites, in order."""

    def __init__(self, names):
        super().__init__()
        self.values = {name: [] for name in names}

    def _postprocess_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.values:
            self.values[msg["name"]].append(msg["value"].detach())


class RecordingGuide(nn.Module):
    """The guide, with its draws of ``names`` recorded (the model's replays are not)."""

    def __init__(self, guide, names):
        super().__init__()
        self.guide, self.names = guide, names
        self.record = None

    def forward(self, x):
        with Record(self.names) as self.record:
            return self.guide(x)


def binary_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, D), 0.3), generator=g)


def gmvae_pair(seed=0):
    pyro.set_rng_seed(seed)
    model = GMVAE(data_dim=D, k=K, z_dim=2, hidden=(8, 8))
    return model, make_guide("mean_field", model)


def gmvae_w_pair(seed=0, cluster="exact_posterior"):
    pyro.set_rng_seed(seed)
    model = GMVAEW(data_dim=D, k=K, x_dim=2, w_dim=2, hidden=8)
    guide = make_guide(cluster, model)
    # Non-trivial BatchNorm running statistics, so eval mode differs from train mode.
    guide.train()
    with torch.no_grad():
        guide.recogniser(binary_data(64, seed=9))
    return model, guide


def one_hot(j, n):
    return torch.nn.functional.one_hot(torch.full((n,), j), K).float()


def bernoulli_log_lik(logits, x):
    return td.Bernoulli(logits=logits).log_prob(x).sum(-1)


def normal_log_prob(value, loc, scale):
    return td.Normal(loc, scale).log_prob(value).sum(-1)


# --------------------------------------------------------------------- the IW bound by hand


def gmvae_log_weights(model, guide, x, draws):
    """log p(x, y=j, z) - log q(z | x, y=j) for each recorded (S, B, z) draw, j = 0..K-1."""
    out = []
    for j, z in enumerate(draws):
        y = one_hot(j, x.shape[0])
        log_p = math.log(1 / K) + normal_log_prob(z, *model.prior(y))
        log_p = log_p + bernoulli_log_lik(model.decoder(z), x)
        out.append(log_p - normal_log_prob(z, *guide.z_params(x, y)))
    return torch.stack(out)  # (K, S, B)


def gmvae_w_log_weights(model, guide, obs, xs, ws):
    out = []
    q_x, q_w = guide.latent_dists(obs)
    for j, (x, w) in enumerate(zip(xs, ws)):
        loc, scale = model.components(w)  # (S, B, K, x_dim)
        log_p = normal_log_prob(w, torch.zeros_like(w), torch.ones_like(w)) + math.log(1 / K)
        log_p = log_p + normal_log_prob(x, loc[..., j, :], scale[..., j, :])
        log_p = log_p + bernoulli_log_lik(model.decoder(x), obs)
        log_q = normal_log_prob(x, q_x.base_dist.loc, q_x.base_dist.scale)
        log_q = log_q + normal_log_prob(w, q_w.base_dist.loc, q_w.base_dist.scale)
        out.append(log_p - log_q)
    return torch.stack(out)


def hand_iw(log_w):
    s = log_w.shape[1]
    return (log_w.flatten(0, 1).logsumexp(0) - math.log(s)).mean().item()


def _iw_with_draws(model, guide, x, s, names):
    """Run iw_log_likelihood on one batch and keep the guide's draws (one call, the cluster
    enumerated in parallel: a site that depends on it has a leading (K,) dim)."""
    calls = []

    class Keep(RecordingGuide):
        def forward(self, x):
            out = super().forward(x)
            calls.append(self.record.values)
            return out

    got = iw_log_likelihood(model, Keep(guide, names), x, num_samples=s, batch_size=x.shape[0])
    assert len(calls) == 1
    return got, {name: calls[0][name][0] for name in names}


@torch.no_grad()
def test_iw_bound_gmvae_equals_the_stratified_sum():
    model, guide = gmvae_pair()
    x, s = binary_data(10), 7
    got, draws = _iw_with_draws(model, guide, x, s, ["z"])
    z = draws["z"]  # z ~ q(z|x,y) for each y: S draws per cluster
    assert z.shape == (K, s, 10, 2)
    guide.eval(), model.eval()
    assert got == pytest.approx(hand_iw(gmvae_log_weights(model, guide, x, list(z))), abs=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("cluster", ["exact_posterior", "model_enum"])
def test_iw_bound_gmvae_w_equals_the_stratified_sum(cluster):
    model, guide = gmvae_w_pair(cluster=cluster)
    obs, s = binary_data(10), 5
    guide.train()  # evaluation must switch BatchNorm to its running statistics itself
    got, draws = _iw_with_draws(model, guide, obs, s, ["x", "w"])
    assert guide.training
    x, w = draws["x"], draws["w"]  # q(x, w | obs) does not depend on c: one set for all K
    assert x.shape == (s, 10, 2) and w.shape == (s, 10, 2)
    guide.eval()
    expected = hand_iw(gmvae_w_log_weights(model, guide, obs, [x] * K, [w] * K))
    assert got == pytest.approx(expected, abs=1e-5)


@torch.no_grad()
def test_elbo_matches_trace_enum_and_hand_computation():
    model, guide = gmvae_pair()
    x = binary_data(12)
    pyro.set_rng_seed(3)
    got = elbo(model, guide, x, batch_size=5)
    # The same draws, batch by batch, through TraceEnum_ELBO directly.
    pyro.set_rng_seed(3)
    loss = sum(
        TraceEnum_ELBO(max_plate_nesting=1).loss(
            config_enumerate(model.model), config_enumerate(guide), b
        )
        for b in x.split(5)
    )
    assert got == pytest.approx(-loss / 12, abs=1e-5)
    # By hand: Σ_y q(y|x) [log p(y) + log p(z_y|y) + log p(x|z_y) - log q(z_y|x,y) - log q(y|x)].
    recording = RecordingGuide(guide, ["z"])
    pyro.set_rng_seed(3)
    got = elbo(model, recording, x, batch_size=12)
    z = recording.record.values["z"][0]  # parallel enumeration: (K, B, z_dim)
    assert z.shape == (K, 12, 2)
    q = guide.cluster_probs(x)
    log_w = gmvae_log_weights(model, guide, x, list(z.unsqueeze(1)))[:, 0]  # (K, B)
    expected = (q.T * (log_w - q.T.log())).sum(0).mean().item()
    assert got == pytest.approx(expected, abs=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("pair", [gmvae_pair, gmvae_w_pair])
def test_iw_bound_is_above_the_elbo_and_grows_with_s(pair):
    model, guide = pair()
    x = binary_data(300, seed=4)
    pyro.set_rng_seed(0)
    plain = elbo(model, guide, x)
    s1, s8, s100 = (iw_log_likelihood(model, guide, x, s, batch_size=300) for s in (1, 8, 100))
    # Each value averages 300 points: its Monte-Carlo noise (~0.01 nats) is far below the gaps
    # (>= 0.04 nats on these untrained nets).
    assert s1 < s8 < s100 < 0
    assert plain < s8
    if pair is gmvae_pair:
        # With a learned q(y|x), the stratified bound at S = 1 is already >= the ELBO (Jensen
        # over y). gmvae_w's ELBO sums c exactly given shared (x, w), so it has no such order.
        assert plain < s1


def test_evaluate_keys_and_ranges():
    model, guide = gmvae_pair()
    x = binary_data(60)
    labels = torch.arange(60) % 4
    guide.train(), model.train()
    report = evaluate(model, guide, x, labels, batch_size=25, iw_samples=3)
    assert guide.training and model.training  # modes restored
    keys = {"acc_hungarian", "acc_majority", "acc_aae", "nmi", "ari", "cond_entropy",
            "usage_entropy", "clusters_used", "test_elbo", "cluster_kl", "test_iw_bound"}  # fmt: skip
    assert set(report) == keys
    for key in ("acc_hungarian", "acc_majority", "acc_aae", "nmi"):
        assert 0 <= report[key] <= 1
    assert -1 <= report["ari"] <= 1
    for key in ("cond_entropy", "usage_entropy", "cluster_kl"):
        assert 0 <= report[key] <= math.log(K) + 1e-6
    assert isinstance(report["clusters_used"], int) and 1 <= report["clusters_used"] <= K
    # Bernoulli data: log p(x) <= 0, and the IW bound is the tighter one.
    assert report["test_elbo"] < report["test_iw_bound"] < 0
    q = cluster_probs(guide, x)
    kl = (q * (q.log() + math.log(K))).sum(-1).mean().item()
    assert report["cluster_kl"] == pytest.approx(kl, abs=1e-5)
    assert "test_iw_bound" not in evaluate(model, guide, x, labels)


def test_evaluation_restores_modes_also_on_error():
    model, guide = gmvae_w_pair()
    model.train(), guide.eval()
    for fn in (
        lambda: cluster_probs(guide, binary_data(4)),
        lambda: elbo(model, guide, binary_data(4)),
        lambda: iw_log_likelihood(model, guide, binary_data(4), 2),
    ):
        fn()
        assert model.training and not guide.training
    guide.train()
    with pytest.raises(ValueError, match="shape"):
        elbo(model, guide, torch.zeros(4, D + 1))
    assert model.training and guide.training


@pytest.mark.parametrize("s", [0, -1, 2.5])
def test_iw_bound_refuses_a_bad_sample_count(s):
    model, guide = gmvae_pair()
    with pytest.raises(ValueError, match="num_samples"):
        iw_log_likelihood(model, guide, binary_data(4), s)


@torch.no_grad()
def test_cluster_probs_use_running_statistics():
    """Eval mode: a point's posterior does not depend on its batch, even a batch of one."""
    model, guide = gmvae_w_pair()
    x = binary_data(20, seed=5)
    full = cluster_probs(guide, x)
    assert torch.allclose(full.sum(-1), torch.ones(20))
    single = torch.cat([cluster_probs(guide, x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(single, full[:3])
    torch.testing.assert_close(cluster_probs(guide, x, batch_size=7), full)
    guide.train()
    with poutine.block():
        train_mode = guide.cluster_probs(x)  # batch statistics
    assert not torch.allclose(train_mode, full, atol=1e-4)
