"""The trainer: Pyro's SVI step with a global gradient clip, NaN guards and exact state.

One step is what ``pyro.infer.SVI.step`` does — the estimator's ``loss_and_grads`` and an
optimiser update — except that gradients are clipped by their *global* norm
(``torch.nn.utils.clip_grad_norm_``; ``pyro.optim``'s clip arguments act per tensor or per
element) and the optimiser is a plain ``torch.optim`` one, so its state is checkpointed exactly.
"""

import collections
import copy
import math

import pyro
import torch

try:  # torch's own list of devices with fused optimiser kernels (a private helper)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # pragma: no cover - the devices this project runs on

    def _get_fused_kernels_supported_devices():
        return ["cpu", "cuda"]


from .estimators import Estimator, make_estimator
from .guides import make_guide
from .objectives import cluster_objective

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimiser by name, fused (one kernel over all parameters) where it can be.

    The same update as the default per-tensor loop, several times faster: on the 2-core CPU of
    ``benchmarks/README.md`` an Adam step over GMVAE-w's 8.6 M parameters takes 8 ms fused
    against 62 ms (``benchmarks/bench_optimizer.py``), a large share of the whole SVI step.
    Devices without fused kernels get the default implementation.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    params = list(params)
    optimizer = OPTIMIZERS[name](params, lr=lr, fused=_can_fuse(params))
    # Fused kernels write the parameters without bumping their version counters, which caches
    # keyed on them (GMVAEW.components) and autograd's in-place checks rely on.
    optimizer.register_step_post_hook(_bump_versions)
    return optimizer


def _can_fuse(params) -> bool:
    supported = _get_fused_kernels_supported_devices()
    return all(p.device.type in supported and torch.is_floating_point(p) for p in params)


def _bump_versions(optimizer, args, kwargs):
    for group in optimizer.param_groups:
        if group.get("fused"):
            for p in group["params"]:
                torch.autograd.graph.increment_version(p)


def _fuse_again(optimizer) -> None:
    """Fuse again after loading a state saved unfused (a checkpoint from before fusing)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if "fused" not in optimizer.defaults or not _can_fuse(params):
        return
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
    for p, state in optimizer.state.items():
        if torch.is_tensor(state.get("step")):
            # Fused kernels keep the step count as float32 on the parameter's device.
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


ON_NAN = ("raise", "rollback")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or gradient)."""


def resolve_device(device=None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU; otherwise the named device, checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")
    return device


def rng_state() -> dict:
    """Every random state a run draws from (torch CPU and CUDA, plus numpy and random via Pyro)."""
    state = {"pyro": pyro.util.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    pyro.util.set_rng_state(state["pyro"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains a model/guide pair by stochastic variational inference.

    Args:
        model: a :class:`~pyro_gmvae.base.MixtureVAE`.
        guide: a guide module, a registered guide name, or None for the model's default.
        estimator: an estimator name from :mod:`pyro_gmvae.estimators` or an ``Estimator``.
        optimizer, lr: a ``torch.optim`` optimiser by name and its learning rate.
        clip_norm: clip gradients to this global L2 norm (None: no clipping).
        kl_weight, free_bits: β and λ on the cluster KL term (:mod:`pyro_gmvae.objectives`).
        num_particles: M, the Monte-Carlo samples of the continuous latents per data point.
        device: "cuda", "cpu" or None (CUDA when available).
        seed: seeds torch, numpy and random; a CPU run is reproducible from it.
        on_nan: "raise" stops with :class:`NonFiniteLossError`; "rollback" restores the last
            good state and goes on, but stops all the same after ``max_rollbacks`` rollbacks in a
            row or when more than ``max_rollback_fraction`` of the last ``rollback_window``
            steps rolled back (a learning rate so high that good and bad steps alternate never
            trains: each rollback undoes the step before it). ``rollbacks_total`` counts them.
        nan_check_every: check the loss every this many steps (None: every step on CPU, every 20
            on CUDA, since each check reads the loss back from the device).
    """

    def __init__(self, model, guide=None, estimator="enum", optimizer="adam", lr=1e-3, clip_norm=None,
                 kl_weight=1.0, free_bits=0.0, num_particles=1, device=None, seed=0, on_nan="raise",
                 max_rollbacks=10, nan_check_every=None, max_rollback_fraction=0.1,
                 rollback_window=100):  # fmt: skip
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan must be one of {ON_NAN}, got {on_nan!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if not lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {lr}")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        if nan_check_every is not None and (
            not isinstance(nan_check_every, int) or nan_check_every < 1
        ):
            raise ValueError(
                f"nan_check_every must be an integer >= 1 or None, got {nan_check_every!r}"
            )
        if not isinstance(max_rollbacks, int) or max_rollbacks < 0:
            raise ValueError(f"max_rollbacks must be an integer >= 0, got {max_rollbacks!r}")
        if not 0 <= max_rollback_fraction <= 1 or not (
            isinstance(rollback_window, int) and rollback_window >= 1
        ):
            raise ValueError(
                "need 0 <= max_rollback_fraction <= 1 and an integer rollback_window >= 1, got "
                f"{max_rollback_fraction!r} and {rollback_window!r}"
            )
        self.device = resolve_device(device)
        self.seed = seed
        pyro.set_rng_seed(seed)
        # Stale entries from an earlier model would shadow this one's parameters in the store.
        pyro.clear_param_store()
        self.model = model.to(self.device)
        if guide is None or isinstance(guide, str):
            guide = make_guide(guide, model)
        self.guide = guide.to(self.device)
        if not isinstance(estimator, Estimator):
            estimator = make_estimator(
                estimator, model=model, guide=guide, num_particles=num_particles
            )
        self.estimator = estimator
        self.free_bits = free_bits
        self.set_kl_weight(kl_weight)
        self.params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
        self.optimizer = make_optimizer(optimizer, self.params, lr)
        self.clip_norm = clip_norm
        self.on_nan, self.max_rollbacks = on_nan, max_rollbacks
        self.nan_check_every = nan_check_every or (1 if self.device.type == "cpu" else 20)
        self.max_rollback_fraction, self.rollback_window = max_rollback_fraction, rollback_window
        self.step_count = 0
        self.rollbacks = 0  # in a row
        self.rollbacks_total = 0
        self._recent = collections.deque(maxlen=rollback_window)  # True: the step rolled back
        self._good_state = None

    def set_kl_weight(self, kl_weight: float) -> None:
        """Set β (e.g. once per epoch for KL annealing); λ stays as given."""
        # One clear error now for an estimator whose gradients β or λ would corrupt.
        self.estimator.check_cluster_objective(kl_weight, self.free_bits)
        self.kl_weight = kl_weight
        self.model_fn, self.guide_fn = cluster_objective(
            self.model.model, self.guide, getattr(self.guide, "cluster_site", self.model.cluster_site),
            self.model.cluster_log_prior, kl_weight=kl_weight, free_bits=self.free_bits,
        )  # fmt: skip

    def set_lr(self, lr: float) -> None:
        """Set the learning rate (e.g. once per epoch for a decay schedule)."""
        if not lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {lr}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def loss(self, x) -> torch.Tensor:
        """The training objective on a batch, summed over its points, without gradients."""
        x = self.model.prepare(x)
        # Not under no_grad: TraceEnum_ELBO's differentiable_loss refuses a loss without a graph.
        return self.estimator.loss(self.model_fn, self.guide_fn, x).detach()

    def step(self, x) -> torch.Tensor:
        """One SVI step on batch x; returns the loss (summed over the batch) as a device tensor,
        NaN for a step rolled back (``on_nan="rollback"``). ``x``: see ``model.prepare``."""
        x = self.model.prepare(x)
        self.model.train(), self.guide.train()
        try:
            loss = self.estimator.loss_and_grads(self.model_fn, self.guide_fn, x)
        except ValueError as err:
            # With Pyro's validation on (its default), a NaN or inf reaching a distribution's
            # parameters or observed value raises here, before any loss exists.
            if not _is_nonfinite_value_error(err):
                raise
            self._handle_nonfinite(torch.tensor(math.nan), cause=err)
            return torch.tensor(math.nan, device=x.device)
        grad_norm = None
        if self.clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if self.step_count % self.nan_check_every == 0:
            if grad_norm is None:
                # A finite loss can still have NaN gradients: TraceEnum_ELBO drops terms whose
                # enumeration weight q(y|x) is NaN from the loss value (its Dice masks prob > 0),
                # not from the gradient. One step on them would make every parameter NaN.
                grad_norm = _global_grad_norm(self.params)
            bad = not torch.isfinite(loss).all() or not torch.isfinite(grad_norm)
            if bad:
                self._handle_nonfinite(loss)
                # Rolled back: NaN says no step was taken (the loss itself may look finite).
                return torch.full_like(loss, math.nan)
            self.rollbacks = 0
            if self.on_nan == "rollback":
                self._recent.append(False)
                self._good_state = copy.deepcopy(self._train_state())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return loss

    def _handle_nonfinite(self, loss, cause=None):
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item() if loss.numel() == 1 else loss
        where = (
            "" if cause is None else " (a distribution got invalid, e.g. NaN, parameters or values)"
        )
        remedies = "a lower learning rate or a gradient clip (clip_norm)"
        if self.on_nan == "raise":
            remedies += ", or on_nan='rollback'"
        message = f"non-finite loss or gradient ({value}) at step {self.step_count}{where}; try {remedies}"
        if self.on_nan == "raise":
            raise NonFiniteLossError(message) from cause
        if self._good_state is None:
            raise NonFiniteLossError(f"{message} (no good state to roll back to yet)") from cause
        self.rollbacks += 1
        self.rollbacks_total += 1
        self._recent.append(True)
        if self.rollbacks > self.max_rollbacks:
            raise NonFiniteLossError(
                f"{message} ({self.max_rollbacks} rollbacks in a row)"
            ) from cause
        share = sum(self._recent) / len(self._recent)
        if len(self._recent) == self.rollback_window and share > self.max_rollback_fraction:
            raise NonFiniteLossError(
                f"{message} ({sum(self._recent)} of the last {self.rollback_window} steps rolled "
                f"back, more than max_rollback_fraction = {self.max_rollback_fraction})"
            ) from cause
        self._load_train_state(self._good_state)

    def _train_state(self):
        return {
            "model": self.model.state_dict(),
            "guide": self.guide.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def _load_train_state(self, state):
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])
        _fuse_again(self.optimizer)

    def state_dict(self) -> dict:
        """Model, guide, optimiser, step count, β and RNG state: enough to continue exactly."""
        return {
            **self._train_state(),
            "estimator": self.estimator.state_dict(),  # e.g. graph's baseline
            "step": self.step_count,
            "rollbacks_total": self.rollbacks_total,
            "recent_rollbacks": list(self._recent),
            "kl_weight": self.kl_weight,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._load_train_state(state)
        self.estimator.load_state_dict(state.get("estimator", {}))
        self.step_count = state["step"]
        self.rollbacks_total = state.get("rollbacks_total", 0)
        self._recent.clear()
        self._recent.extend(state.get("recent_rollbacks", []))
        self.set_kl_weight(state["kl_weight"])
        set_rng_state(state["rng"])
        # A rollback must go back to the loaded state, never to one from before the load.
        self.rollbacks = 0
        self._good_state = copy.deepcopy(self._train_state()) if self.on_nan == "rollback" else None


def _is_nonfinite_value_error(err: BaseException) -> bool:
    """Whether ``err`` (or an error it wraps; Pyro re-raises with trace shapes) is torch's
    distribution-argument check failing on invalid (here: NaN/inf) parameters or values."""
    while err is not None:
        if isinstance(err, ValueError) and "but found invalid values" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _global_grad_norm(params) -> torch.Tensor:
    """The L2 norm of all gradients together (what ``clip_grad_norm_`` clips), on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def kl_weight_schedule(epoch: int, kl_weight: float, warmup_epochs: int) -> float:
    """β for an epoch: a linear warm-up from kl_weight/warmup_epochs to kl_weight, then constant."""
    if warmup_epochs <= 0:
        return kl_weight
    return kl_weight * min(1.0, (epoch + 1) / warmup_epochs)
