"""The speed benchmark's references compute the same objective as Pyro, and its --quick mode runs.

- The factorised first layer W_x x + W_y y (``nets.JointLinear``) and the naive one on the
  broadcast concatenation [x, y] give the same loss and gradients.
- The hand-written enumerated loss (``benchmarks/reference.py``) equals TraceEnum_ELBO's loss and
  gradients on the same random draws, for all four models, so the timed comparison is fair.
- ``benchmarks/bench_step.py --quick`` writes JSON with every documented key; so does
  ``benchmarks/bench_optimizer.py``.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from pyro_gmvae.estimators import make_estimator
from pyro_gmvae.nets import JointLinear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the benchmarks package

from benchmarks import bench_epoch, bench_optimizer, bench_step  # noqa: E402
from benchmarks.reference import joint_linear, reference_loss  # noqa: E402

MODELS = ("m2", "modified_m2", "gmvae", "gmvae_w")


def _params(model, guide):
    return list({id(p): p for m in (model, guide) for p in m.parameters()}.values())


def _loss_and_grads(fn, params, seed=7):
    torch.manual_seed(seed)  # the same z (or x, w) draws for every implementation
    loss = fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_joint_linear_factorised_equals_concatenation():
    torch.manual_seed(0)
    layer = JointLinear(6, 3, 5).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    y = torch.eye(3, dtype=torch.float64).unsqueeze(-2)  # (K, 1, K), as under enumeration
    weight = torch.cat([layer.linear_a.weight, layer.linear_b.weight], -1)  # nn.Linear on [x, y]
    by_hand = torch.cat([x.expand(3, 4, 6), y.expand(3, 4, 3)], -1) @ weight.T
    by_hand = by_hand + layer.linear_a.bias
    fact, naive = joint_linear(layer, x, y, naive=False), joint_linear(layer, x, y, naive=True)
    assert fact.shape == naive.shape == (3, 4, 5)
    torch.testing.assert_close(fact, by_hand)
    torch.testing.assert_close(naive, by_hand)
    # Gradients of a non-linear function of the output reach the same weights identically.
    params = list(layer.parameters())
    g_fact = torch.autograd.grad(fact.tanh().sum(), params)
    g_naive = torch.autograd.grad(joint_linear(layer, x, y, naive=True).tanh().sum(), params)
    for a, b in zip(g_fact, g_naive):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_reference_matches_pyro_loss_and_gradients(name, make_tiny, binary_batch):
    model, guide = make_tiny(name)
    params = _params(model, guide)
    estimator = make_estimator("enum", model=model, guide=guide)
    pyro_loss, pyro_grads = _loss_and_grads(
        lambda: estimator.loss(model.model, guide, binary_batch), params
    )
    variants = [False, True] if name != "gmvae_w" else [False]
    for naive in variants:
        ref_loss, ref_grads = _loss_and_grads(
            lambda n=naive: reference_loss(model, guide, binary_batch, n), params
        )
        torch.testing.assert_close(ref_loss, pyro_loss, rtol=1e-10, atol=1e-10)
        for p_grad, r_grad in zip(pyro_grads, ref_grads):
            torch.testing.assert_close(r_grad, p_grad, rtol=1e-9, atol=1e-10)
    # The comparison can fail: other draws give another loss.
    other, _ = _loss_and_grads(lambda: reference_loss(model, guide, binary_batch), params, seed=8)
    assert not torch.allclose(other, pyro_loss)


def test_reference_loss_is_the_explicit_sum_over_clusters(make_tiny, binary_batch):
    """The vectorised reference equals a loop over y, one cluster at a time (GMVAE)."""
    model, guide = make_tiny("gmvae")
    x, k = binary_batch, model.k
    torch.manual_seed(3)
    vectorised = reference_loss(model, guide, x)
    torch.manual_seed(3)
    eps = torch.randn(k, x.shape[0], model.z_dim, dtype=x.dtype)  # the same draws, in order
    log_q_y = guide.y_net(x).log_softmax(-1)
    total = (log_q_y.exp() * log_q_y).sum()
    for c in range(k):
        y = torch.nn.functional.one_hot(torch.full((x.shape[0],), c), k).to(x.dtype)
        loc, scale = guide.z_params(x, y)
        z = loc + scale * eps[c]
        p_loc, p_scale = model.prior(y)
        log_q_z = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_p_z = torch.distributions.Normal(p_loc, p_scale).log_prob(z).sum(-1)
        log_p_x = torch.distributions.Bernoulli(logits=model.decoder(z)).log_prob(x).sum(-1)
        per_point = -log_p_x + log_q_z - log_p_z - model.cluster_log_prior()[c]
        total = total + (log_q_y[:, c].exp() * per_point).sum()
    torch.testing.assert_close(vectorised, total)


def test_quick_benchmark_writes_documented_json(tmp_path):
    out = tmp_path / "quick.json"
    bench_step.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "matmul", "results", "targets"}
    for key in (
        "date_utc",
        "command",
        "torch",
        "pyro",
        "cpu_model",
        "device",
        "torch_threads",
        "loadavg_start",
    ):
        assert key in report["meta"]
    assert report["matmul"]["flops_per_s"] > 0
    assert [r["model"] for r in report["results"]] == list(MODELS)
    impl_keys = {"step_s", "epoch_s", "examples_per_s", "peak_mem_bytes", "flops_per_step", "flops_per_epoch",
                 "achieved_flops_per_s", "fraction_of_matmul", "host_reads_per_step", "loss", "first_call_s"}  # fmt: skip
    for r in report["results"]:
        only = {"naive"} if r["model"] != "gmvae_w" else {"pyro_model_enum"}
        expected = {"pyro", "pyro_noval", "reference"} | only
        assert set(r["impls"]) == expected
        for name, v in r["impls"].items():
            assert impl_keys <= set(v), name
            assert v["step_s"] > 0 and v["flops_per_step"] > 0 and v["peak_mem_bytes"] >= 0
            assert v["epoch_s"] == pytest.approx(v["step_s"] * r["steps_per_epoch"])
        assert "pyro/reference" in r["ratios"]
        # Same seeded draws: every implementation reports the same loss (float32).
        assert max(r["loss_rel_diff_vs_reference"].values()) < 1e-4
        # The reference reads nothing back to the host; Pyro's TraceEnum_ELBO does.
        assert r["impls"]["reference"]["host_reads_per_step"] == 0
    assert any(t["passed"] is None for t in report["targets"])  # quick: size targets are n/a


def test_optimizer_benchmark_writes_json(tmp_path):
    out = tmp_path / "adam.json"
    bench_optimizer.main(["--models", "gmvae", "--repeats", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "gmvae" and row["parameters"] > 1e6
    assert set(row["step_s"]) == {"fused", "per_tensor", "foreach"}
    assert all(t > 0 for t in row["step_s"].values())


def test_epoch_benchmark_times_the_training_loop(tmp_path):
    out = tmp_path / "epoch.json"
    argv = ["--synthetic", "--limit", "200", "--batch-sizes", "50", "--epochs", "2",
            "--max-steps", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    bench_epoch.main(argv)
    (result,) = json.loads(out.read_text())["results"]
    assert [r["epoch"] for r in result["epochs"]] == [0, 1]
    for row in result["epochs"]:
        assert (row["steps_timed"], row["steps_per_epoch"]) == (2, 4)
        assert row["epoch_s"] == pytest.approx(2 * row["seconds_timed"])  # scaled to 4 steps
        assert row["mean_loss"] > 0
    with pytest.raises(SystemExit):
        bench_epoch.main(["--epochs", "1"])
