"""The trainer: reproducibility, global-norm clipping, NaN guards, exact state, the KL weight.

Tiny networks (D = 6, K = 3, z 2-d, hidden 8) on fixed binary data, a few steps each.
"""

import copy
import io
import math

import pyro
import pytest
import torch

from pyro_gmvae import GMVAE
from pyro_gmvae.guides import make_guide
from pyro_gmvae.nets import set_validation
from pyro_gmvae.train import (
    OPTIMIZERS,
    NonFiniteLossError,
    Trainer,
    TrainingInterrupted,
    _nonfinite,
    kl_weight_schedule,
)

D, K, B = 6, 3, 16


def tiny_model(seed=0):
    pyro.set_rng_seed(seed)
    return GMVAE(data_dim=D, k=K, z_dim=2, hidden=(8, 8))


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(torch.full((B, D), 0.4), generator=g) for _ in range(n)]


def params_of(trainer):
    return [p.detach().clone() for p in trainer.params]


def assert_params_equal(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.equal(p, q) or (torch.isnan(p).any() and torch.allclose(p, q, equal_nan=True))


def test_seed_makes_a_cpu_run_reproducible():
    runs = []
    for seed in (0, 0, 1):
        trainer = Trainer(tiny_model(), seed=seed)
        losses = [trainer.step(x).item() for x in batches()]
        runs.append((losses, params_of(trainer)))
    assert runs[0][0] == runs[1][0]
    assert_params_equal(runs[0][1], runs[1][1])
    # The seed drives the z draws: another seed gives another trajectory.
    assert runs[0][0][1:] != runs[2][0][1:]


@pytest.mark.parametrize("estimator", ["enum", "enum-jit", "graph"])
def test_a_trainer_keeps_its_own_param_store_and_random_stream(estimator):
    """No global side effect: the global RNG and param store are as they were, and another
    model's entries under the same names in the global store change nothing (enum-jit and
    graph read parameters and the baseline from the store)."""
    model, x = tiny_model(), batches(1)[0]
    guide = make_guide(None, model)
    reference = Trainer(copy.deepcopy(model), copy.deepcopy(guide), estimator=estimator)
    expected = [reference.step(x).item() for _ in range(3)]
    pyro.clear_param_store()
    for name, p in model.named_parameters():  # stale entries, as a model trained before left
        pyro.param(f"{model.name}$$${name}", torch.full_like(p, 3.0))
    keys = set(pyro.get_param_store().keys())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    trainer = Trainer(model, guide, estimator=estimator)
    assert [trainer.step(x).item() for _ in range(3)] == expected
    trainer.loss(x), trainer.state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert set(pyro.get_param_store().keys()) == keys


@pytest.mark.parametrize("estimator", ["enum", "enum-jit"])
def test_fit_resumed_mid_epoch_equals_an_uninterrupted_fit(estimator):
    """fit() from a state saved by a stop() mid-epoch continues the same data stream and draws
    (enum-jit compiles again after the resume, without drawing from the stream)."""
    x = torch.cat(batches(5))  # 80 rows: 5 batches of 16 per epoch
    full = Trainer(tiny_model(), estimator=estimator)
    rows = []
    full.fit(x, 3, B, evaluate=lambda epoch, loss: rows.append((epoch, loss)))

    saved, polls = [], iter(range(10**6))
    first = Trainer(tiny_model(), estimator=estimator)
    with pytest.raises(TrainingInterrupted):
        first.fit(x, 3, B, evaluate=lambda *a: None, checkpoint=lambda: saved.append(
            copy.deepcopy(first.state_dict())), stop=lambda: next(polls) == 7)  # fmt: skip
    assert first.position["epoch"] == 1 and first.position["batch"] == 3
    second = Trainer(tiny_model(seed=5), estimator=estimator, seed=9)  # all from the state
    second.load_state_dict(saved[-1])
    resumed = []
    second.fit(x, 3, B, evaluate=lambda epoch, loss: resumed.append((epoch, loss)))
    assert resumed == rows[1:]
    assert_params_equal(params_of(full), params_of(second))


def raw_grads(trainer, x):
    """The unclipped gradients of a step on x, from the same random draws as the next step."""
    with trainer.context(advance=False):  # the trainer's stream, left where it was
        trainer.estimator.loss_and_grads(trainer.model_fn, trainer.guide_fn, x)
    raw = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)
    return raw


def test_clipping_is_by_global_norm():
    clip = 0.05
    trainer = Trainer(tiny_model(), optimizer="sgd", lr=1.0, clip_norm=clip)
    x = batches(1)[0]
    raw = raw_grads(trainer, x)

    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.clone() for p in trainer.params])
    )
    before = params_of(trainer)
    trainer.step(x)

    total = torch.sqrt(sum((g**2).sum() for g in raw))
    assert total > 10 * clip  # the clip is active
    clipped = seen[0]
    for g, c in zip(raw, clipped):
        torch.testing.assert_close(c, g * (clip / total), rtol=1e-4, atol=1e-8)
    # Global: the clipped gradients together have norm `clip`; per-tensor clipping (PyroOptim's
    # clip_norm) would give each tensor norm min(|g_i|, clip) and a larger total.
    assert torch.sqrt(sum((c**2).sum() for c in clipped)).item() == pytest.approx(clip, rel=1e-4)
    per_tensor = torch.sqrt(sum(min(g.norm(), torch.tensor(clip)) ** 2 for g in raw))
    assert per_tensor > 1.5 * clip
    # SGD with lr = 1 subtracts exactly the clipped gradient.
    for p0, p1, c in zip(before, params_of(trainer), clipped):
        torch.testing.assert_close(p1, p0 - c)


def test_inactive_clip_leaves_gradients_alone():
    trainer = Trainer(tiny_model(), optimizer="sgd", lr=1.0, clip_norm=1e6)
    x = batches(1)[0]
    raw = raw_grads(trainer, x)
    before = params_of(trainer)
    trainer.step(x)
    for p0, p1, g in zip(before, params_of(trainer), raw):
        torch.testing.assert_close(p1, p0 - g)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fused_optimizer_matches_the_per_tensor_loop(optimizer):
    """The trainer's fused optimiser takes the same steps as torch's default implementation."""
    trainer = Trainer(tiny_model(), optimizer=optimizer, lr=0.01)
    assert trainer.optimizer.defaults["fused"]
    plain_params = [p.detach().clone().requires_grad_() for p in trainer.params]
    plain = OPTIMIZERS[optimizer](plain_params, lr=0.01, fused=False, foreach=False)
    before = params_of(trainer)
    for x in batches(3):
        grads = raw_grads(trainer, x)
        trainer.step(x)
        for p, g in zip(plain_params, grads):
            p.grad = g
        plain.step()
        for p, q in zip(trainer.params, plain_params):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, q) for p, q in zip(params_of(trainer), before))


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_parameter_raises_without_updating():
    trainer = Trainer(tiny_model())
    with torch.no_grad():
        trainer.model.decoder[-1].bias[0] = math.nan
    before = params_of(trainer)
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient .* at step 0"):
        trainer.step(batches(1)[0])
    assert_params_equal(before, params_of(trainer))
    assert not trainer.optimizer.state  # Adam never stepped
    assert all(p.grad is None for p in trainer.params)
    assert trainer.step_count == 0


@pytest.mark.parametrize("pyro_validation", [True, False])
def test_nan_data_raises_without_updating(pyro_validation):
    """With Pyro's validation on, the NaN stops a distribution's argument check in the forward
    pass. With it off, the loss is finite: TraceEnum_ELBO leaves out terms whose enumeration
    weight q(y|x) is NaN (its Dice keeps prob > 0), but the gradients are NaN. Both are a
    NonFiniteLossError."""
    trainer = Trainer(tiny_model())
    good, bad = batches(2)
    bad[3, 2] = math.nan
    trainer.step(good)
    before = params_of(trainer)
    adam = copy.deepcopy(trainer.optimizer.state_dict())
    set_validation(False)  # else the model's input check refuses the batch first
    try:
        with pyro.validation_enabled(pyro_validation):
            if not pyro_validation:
                assert torch.isfinite(trainer.loss(bad))  # the NaN hides from the loss
            with pytest.raises(NonFiniteLossError, match="clip_norm") as info:
                trainer.step(bad)
    finally:
        set_validation(True)
    assert ("invalid, e.g. NaN" in str(info.value)) == pyro_validation
    assert_params_equal(before, params_of(trainer))
    after = trainer.optimizer.state_dict()["state"]
    for i, s in adam["state"].items():
        assert torch.equal(s["exp_avg"], after[i]["exp_avg"])
        assert torch.equal(s["step"], after[i]["step"])
    assert trainer.step_count == 1


def test_nan_gradient_with_finite_loss_raises():
    """A NaN in the gradients alone must also stop the step (no clip, so no norm computed)."""
    trainer = Trainer(tiny_model())
    weight = trainer.model.decoder[0].weight
    weight.register_hook(lambda g: g * math.nan)
    before = params_of(trainer)
    with pytest.raises(NonFiniteLossError):
        trainer.step(batches(1)[0])
    assert_params_equal(before, params_of(trainer))


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_nan_guard_flags_any_nonfinite_gradient_and_leaves_them_unchanged(bad, dtype):
    """The fused check against a hand-written one: every entry of every gradient inspected, and
    large finite gradients (whose squared norm would overflow float32) are not flagged."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in [(3, 4), (5,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype) * 1e30
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    if bad is not None:
        params[2].grad[1, 0, 1] = bad
    before = [p.grad.clone() for p in params[:3]]
    expected = not all(torch.isfinite(p.grad).all() for p in params[:3])
    assert _nonfinite(torch.tensor(1.0), params) == expected
    for b, p in zip(before, params):
        assert torch.allclose(b, p.grad, rtol=0, atol=0, equal_nan=True)
    assert _nonfinite(torch.tensor([1.0, math.nan]), params[:2])  # a non-finite loss alone
    assert not _nonfinite(torch.tensor(1.0), params[3:])  # no gradients at all
    assert _nonfinite(torch.tensor(1.0), params[:2], grad_norm=torch.tensor(math.inf))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the check's own flag stays float32, as it must
    try:
        assert _nonfinite(torch.tensor(1.0), params) == expected
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("pyro_validation", [True, False])
def test_rollback_restores_the_last_good_state_and_gives_up_after_max_rollbacks(pyro_validation):
    trainer = Trainer(tiny_model(), on_nan="rollback", max_rollbacks=2)
    xs = batches(4)
    bad = xs[0].clone()
    bad[0, 0] = math.nan
    trainer.step(xs[0])
    good_params = params_of(trainer)  # the state the next (good) step starts from
    good_adam = copy.deepcopy(trainer.optimizer.state_dict())
    trainer.step(xs[1])
    assert trainer.step_count == 2
    set_validation(False)
    try:
        with pyro.validation_enabled(pyro_validation):
            _rollbacks(trainer, xs, bad, good_params, good_adam)
    finally:
        set_validation(True)


def _rollbacks(trainer, xs, bad, good_params, good_adam):
    """Two rollbacks to the state before the last good step, then the third NaN raises."""
    for attempt in (1, 2):
        loss = trainer.step(bad)
        assert not torch.isfinite(loss)
        assert trainer.rollbacks == attempt
        assert_params_equal(good_params, params_of(trainer))
        state = trainer.optimizer.state_dict()["state"]
        for i, s in good_adam["state"].items():
            assert torch.equal(s["exp_avg_sq"], state[i]["exp_avg_sq"])
    with pytest.raises(NonFiniteLossError, match="2 rollbacks in a row"):
        trainer.step(bad)
    # "In a row": a good step resets the count.
    trainer = Trainer(tiny_model(), on_nan="rollback", max_rollbacks=2)
    for x in (xs[0], bad, bad, xs[1], bad, bad, xs[2]):
        trainer.step(x)
    assert trainer.rollbacks == 0 and trainer.step_count == 3
    # No good state yet: nothing to go back to.
    with pytest.raises(NonFiniteLossError):
        Trainer(tiny_model(), on_nan="rollback").step(bad)


def test_other_errors_in_a_step_are_not_nan_errors():
    """Only NaN/inf are turned into NonFiniteLossError; a wrong input stays its own error."""
    trainer = Trainer(tiny_model(), on_nan="rollback")
    with pytest.raises(ValueError, match="features per row"):
        trainer.step(torch.zeros(4, D + 1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"lr": 0.0}, "learning rate"),
        ({"lr": -1e-3}, "learning rate"),
        ({"on_nan": "ignore"}, "on_nan"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"nan_check_every": 0}, "nan_check_every"),
        ({"max_rollbacks": -1}, "max_rollbacks"),
        ({"estimator": "nope"}, "estimator"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_model(), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_raises_clearly():
    with pytest.raises(ValueError, match="CUDA is not available"):
        Trainer(tiny_model(), device="cuda")


@pytest.mark.parametrize(
    "on_nan, estimator, kl_weight",
    [("raise", "enum", 0.7), ("rollback", "enum", 0.7), ("raise", "graph", 1.0)],
)
def test_state_dict_continues_exactly(on_nan, estimator, kl_weight):
    """Also the estimator's own state: graph's decaying baseline."""
    xs, k = batches(6), 3
    kw = dict(clip_norm=5.0, kl_weight=kl_weight, on_nan=on_nan, estimator=estimator)
    full = Trainer(tiny_model(), **kw)
    full_losses = [full.step(x).item() for x in xs]

    first = Trainer(tiny_model(), **kw)
    losses = [first.step(x).item() for x in xs[:k]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    del first
    # Another initialisation and seed: everything must come from the state.
    second = Trainer(tiny_model(seed=5), **{**kw, "kl_weight": 1.0}, seed=9)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    assert second.step_count == k and second.kl_weight == kl_weight
    losses += [second.step(x).item() for x in xs[k:]]

    assert losses == full_losses
    assert_params_equal(params_of(full), params_of(second))
    assert second.step_count == full.step_count == len(xs)


def test_a_checkpoint_of_an_unfused_optimizer_resumes_fused():
    """States saved before the optimiser was fused load, fuse again and take the same steps."""
    xs, k = batches(5), 3
    old = Trainer(tiny_model())
    old.optimizer = torch.optim.Adam(old.params, lr=1e-3)  # what the trainer used to build
    for x in xs[:k]:
        old.step(x)
    buffer = io.BytesIO()
    torch.save(old.state_dict(), buffer)
    buffer.seek(0)
    new = Trainer(tiny_model(seed=5))
    new.load_state_dict(torch.load(buffer, weights_only=False))
    assert all(group["fused"] for group in new.optimizer.param_groups)
    for x in xs[k:]:  # the same draws for both: the stream is part of the state
        old.step(x)
        new.step(x)
    for p, q in zip(params_of(old), params_of(new)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_rollback_after_load_returns_to_the_loaded_state():
    trainer = Trainer(tiny_model(), on_nan="rollback")
    xs = batches(3)
    trainer.step(xs[0])
    state = copy.deepcopy(trainer.state_dict())
    loaded = params_of(trainer)
    trainer.step(xs[1])
    trainer.load_state_dict(state)
    bad = xs[2].clone()
    bad[0, 0] = math.nan
    set_validation(False)
    try:
        trainer.step(bad)
    finally:
        set_validation(True)
    assert_params_equal(loaded, params_of(trainer))


def test_kl_weight_scales_the_cluster_kl_exactly():
    """loss(β) = reconstruction part + β Σ_b KL(q(y|x_b) || p(y)), with the same z draws."""
    trainer = Trainer(tiny_model())
    x = batches(1)[0]

    def loss_at(beta):
        trainer.set_kl_weight(beta)
        with trainer.context(advance=False):  # the same draws for every β
            return trainer.loss(x).item()

    losses = {beta: loss_at(beta) for beta in (0.0, 0.5, 1.0, 2.0, 3.0)}
    q = trainer.guide.cluster_probs(x)
    kl = (q * (q.log() - math.log(1 / K))).sum().item()  # prior uniform over K
    assert kl > 0.01
    for beta, value in losses.items():
        assert value - losses[0.0] == pytest.approx(beta * kl, abs=2e-4)
    # β also reaches the gradient step: a step's loss at β=2 is the same affine function.
    trainer.set_kl_weight(2.0)
    with trainer.context(advance=False):
        assert trainer.step(x).item() == pytest.approx(losses[2.0], abs=1e-4)


def test_free_bits_floor_the_cluster_kl():
    """With λ above the KL, the cluster term is B·λ whatever q(y|x) is."""
    model = tiny_model()
    x = batches(1)[0]
    guide = make_guide(None, model)
    plain = Trainer(model, guide, kl_weight=0.0, seed=7)  # β = 0: the reconstruction part only
    base = plain.loss(x).item()
    floored = Trainer(model, guide, free_bits=5.0, seed=7)  # the same seed: the same draws
    assert floored.loss(x).item() - base == pytest.approx(B * 5.0, abs=1e-3)


def test_kl_weight_refused_by_an_estimator_it_would_corrupt():
    with pytest.raises(ValueError, match="does not support a KL weight"):
        Trainer(tiny_model(), estimator="score", kl_weight=0.5)
    trainer = Trainer(tiny_model(), estimator="score")
    with pytest.raises(ValueError, match="does not support a KL weight"):
        trainer.set_kl_weight(0.5)


def test_kl_weight_schedule():
    assert [kl_weight_schedule(e, 1.0, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_weight_schedule(0, 2.0, 0) == 2.0


def test_the_compiled_default_takes_the_same_steps_as_enum():
    """The main job's estimator (enum-jit) is the enum objective compiled: same seed, same draws,
    the same losses and parameters step after step."""
    model, x = tiny_model(), batches(4)
    guide = make_guide(None, model)
    runs = []
    for estimator in ("enum", "enum-jit"):
        # enum-jit compiles at its first step, on a fork of the stream: the draws stay aligned.
        trainer = Trainer(copy.deepcopy(model), copy.deepcopy(guide), estimator=estimator)
        runs.append(([trainer.step(xb).item() for xb in x], params_of(trainer)))
    (losses_enum, params_enum), (losses_jit, params_jit) = runs
    assert losses_jit == pytest.approx(losses_enum, rel=1e-5)
    for p, q in zip(params_enum, params_jit):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_a_timed_step_leaves_the_stream_and_the_estimator_as_they_were():
    """What the duration estimate does: steps inside context(advance=False), the estimator's
    state (graph's baseline, none yet) put back after; the run then takes the same steps."""
    x = batches(3)
    plain = Trainer(tiny_model(), estimator="graph")
    expected = [plain.step(xb).item() for xb in x]
    timed = Trainer(tiny_model(), estimator="graph")
    with timed.context(advance=False):
        state = timed.estimator.state_dict()
        for _ in range(3):
            timed.estimator.loss_and_grads(timed.model_fn, timed.guide_fn, x[0])
        timed.estimator.load_state_dict(state)
    timed.optimizer.zero_grad(set_to_none=True)
    assert [timed.step(xb).item() for xb in x] == expected


def test_data_parallel_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        Trainer(tiny_model(), data_parallel=True)
