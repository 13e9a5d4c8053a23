"""The trainer: Pyro's SVI step with a global gradient clip, NaN guards and exact state; the
epoch loop over a dataset held as one tensor; data parallelism over ``torch.distributed``.

One step is what ``pyro.infer.SVI.step`` does — the estimator's ``loss_and_grads`` and an
optimiser update — except that gradients are clipped by their *global* norm
(``torch.nn.utils.clip_grad_norm_``; ``pyro.optim``'s clip arguments act per tensor or per
element) and the optimiser is a plain ``torch.optim`` one, so its state is checkpointed exactly.

A :class:`Trainer` touches no global state: it keeps its parameters in a Pyro param store of
its own (``ParamStoreDict.scope``, Pyro's way to hold several models in one process) and draws
from a random stream of its own, seeded by its ``seed``.

Under ``torch.distributed`` (``torchrun``) each process holds a replica: the model and guide are
wrapped, as one module whose ``forward`` returns the estimator's differentiable training loss,
in ``DistributedDataParallel``, which all-reduces the gradients during the backward pass. Every
process draws the same global batch order and takes its own slice of each batch.
"""

import collections
import contextlib
import copy
import math
import warnings
from collections.abc import Iterator

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro.infer.util import is_validation_enabled
from torch import nn
from tqdm.auto import tqdm

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
    return OPTIMIZERS[name](params, lr=lr, fused=_can_fuse(params))


def _can_fuse(params) -> bool:
    supported = _get_fused_kernels_supported_devices()
    return all(p.device.type in supported and torch.is_floating_point(p) for p in params)


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


_BINARIZE = ("dynamic", "none")


class _Minibatches:
    """Iterator over minibatches that also knows how many it will yield."""

    def __init__(self, x, batch_size, generator, binarize, order, drop_last):
        self._x, self._bs, self._g, self._binarize = x, batch_size, generator, binarize
        self._order = order
        n = len(x)
        self._len = n // batch_size if drop_last else -(-n // batch_size)
        self._i = 0

    def __len__(self):
        return self._len

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._i >= self._len:
            raise StopIteration
        start = self._i * self._bs
        idx = self._order[start : start + self._bs]
        self._i += 1
        batch = self._x[idx]
        if self._binarize == "dynamic":
            batch = torch.bernoulli(batch, generator=self._g)
        return batch


def iterate_minibatches(
    x, batch_size, generator, binarize="dynamic", shuffle=True, drop_last=True
) -> Iterator[torch.Tensor]:
    """One epoch of minibatches of the rows of ``x``.

    All randomness (the row order and the binarisation) is drawn from ``generator``, a
    ``torch.Generator`` on ``x``'s device, so saving its state in a checkpoint is enough to
    resume the exact same stream. The row permutation is drawn when this is called; the
    Bernoulli draws happen batch by batch as the iterator is consumed.

    Args:
        x: ``(N, D)`` tensor (grey levels in [0, 1] when binarising).
        batch_size: rows per batch, ``1 <= batch_size <= N``.
        generator: ``torch.Generator`` on ``x.device``.
        binarize: ``"dynamic"``: a fresh ``torch.bernoulli`` draw of every batch (the dynamic
            binarisation used by both Shu's and Dilokthanakul's code); ``"none"``: as is.
        shuffle: visit rows in a random order (else in order).
        drop_last: drop the final short batch, giving ``N // batch_size`` batches; otherwise
            ``ceil(N / batch_size)`` batches cover every row exactly once.

    Returns:
        An iterator of ``(batch, D)`` tensors that supports ``len()``.
    """
    if binarize not in _BINARIZE:
        raise ValueError(f"binarize must be one of {_BINARIZE}, got {binarize!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    n, batch_size = len(x), int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the number of rows N = {n}")
    if shuffle:
        order = torch.randperm(n, generator=generator, device=x.device)
    else:
        order = torch.arange(n, device=x.device)
    return _Minibatches(x, batch_size, generator, binarize, order, drop_last)


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


class TrainingInterrupted(KeyboardInterrupt):
    """:meth:`Trainer.fit` stopped mid-epoch because ``stop()`` said so (after a checkpoint)."""


class _Objective(nn.Module):
    """Model and guide as one module whose ``forward`` is the estimator's training loss: what
    ``DistributedDataParallel`` wraps (its hooks all-reduce the gradients that the backward pass
    of that loss produces)."""

    def __init__(self, model, guide, estimator):
        super().__init__()
        self.model, self.guide, self.estimator = model, guide, estimator

    def forward(self, model_fn, guide_fn, x):
        return self.estimator.training_loss(model_fn, guide_fn, x)


def _stream_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s random stream: ``seed`` itself for rank 0 (one process),
    an independent one per other rank (numpy's ``SeedSequence`` spawns them)."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), rank]).generate_state(1, np.uint64)[0] >> 1)


class Trainer:
    """Trains a model/guide pair by stochastic variational inference.

    Args:
        model: a :class:`~pyro_gmvae.base.MixtureVAE`.
        guide: a guide module, a registered guide name, or None for the model's default.
        estimator: an estimator name from :mod:`pyro_gmvae.estimators` or an ``Estimator``.
        optimizer, lr: a ``torch.optim`` optimiser by name and its learning rate; ``lr_decay``
            multiplies it by ``lr_decay ** epoch`` in :meth:`fit`.
        clip_norm: clip gradients to this global L2 norm (None: no clipping).
        kl_weight, free_bits: β and λ on the cluster KL term (:mod:`pyro_gmvae.objectives`);
            ``kl_warmup_epochs``: :meth:`fit` raises β linearly to ``kl_weight`` over them.
        num_particles: M, the Monte-Carlo samples of the continuous latents per data point.
        device: "cuda", "cpu" or None (CUDA when available).
        seed: seeds the trainer's own random stream (the draws of its steps) and its data
            order; a CPU run is reproducible from it. The global RNGs are left alone: seed those
            before building the model, whose initial weights they draw.
        on_nan: "raise" stops with :class:`NonFiniteLossError`; "rollback" restores the last
            good state and goes on, but stops all the same after ``max_rollbacks`` rollbacks in a
            row or when more than ``max_rollback_fraction`` of the last ``rollback_window``
            steps rolled back (a learning rate so high that good and bad steps alternate never
            trains: each rollback undoes the step before it). ``rollbacks_total`` counts them.
        nan_check_every: check the loss every this many steps (None: every step on CPU, every 20
            on CUDA, since each check reads the loss back from the device).

        data_parallel: be one replica of a data-parallel run over the initialised
            ``torch.distributed`` process group (see the module docstring). Construct it on every
            rank with the same arguments, and call :meth:`step`, :meth:`fit` and
            :meth:`state_dict` on every rank alike: they hold collectives. A step's loss is that
            of the union of the ranks' batches.
    """

    def __init__(self, model, guide=None, estimator="enum", optimizer="adam", lr=1e-3, clip_norm=None,
                 kl_weight=1.0, free_bits=0.0, num_particles=1, device=None, seed=0, on_nan="raise",
                 max_rollbacks=10, nan_check_every=None, max_rollback_fraction=0.1,
                 rollback_window=100, lr_decay=1.0, kl_warmup_epochs=0, data_parallel=False):  # fmt: skip
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan must be one of {ON_NAN}, got {on_nan!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if not lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {lr}")
        if not lr_decay > 0:
            raise ValueError(f"lr_decay must be > 0, got {lr_decay}")
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
        if data_parallel and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("data_parallel=True needs an initialised torch.distributed process "
                             "group (torchrun, then torch.distributed.init_process_group)")  # fmt: skip
        self.rank = dist.get_rank() if data_parallel else 0
        self.world_size = dist.get_world_size() if data_parallel else 1
        self._rng = self._seeded_stream(_stream_seed(seed, self.rank))
        # A param store of its own: another model's entries under the same names cannot shadow
        # this one's parameters (JitTraceEnum_ELBO and graph's baseline read them from the store).
        self._param_state = {"params": {}, "constraints": {}}
        self._in_context = False
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
        self.base_kl_weight, self.kl_warmup_epochs = kl_weight, kl_warmup_epochs
        self.set_kl_weight(kl_weight_schedule(0, kl_weight, kl_warmup_epochs))
        self.params = list({id(p): p for m in (model, guide) for p in m.parameters()}.values())
        self.base_lr, self.lr_decay = lr, lr_decay
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
        # The data stream of fit(): the batch order and binarisation draws (the same on every
        # rank), and where in it training stands: whole epochs done and, within the next epoch,
        # the batches done, the generator state the epoch started from and its loss so far.
        self.batches = torch.Generator(device=self.device).manual_seed(seed)
        self.position = {"epoch": 0, "batch": 0, "epoch_start": None, "loss_sum": 0.0, "n": 0}
        self._ddp = None  # the DistributedDataParallel wrapper, made at the first step

    # --- the trainer's own random stream and param store ---------------------------------------

    def _seeded_stream(self, seed: int) -> dict:
        state = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.Generator(self.device).manual_seed(seed).get_state()
        return state

    def _current_stream(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @contextlib.contextmanager
    def context(self, advance: bool = True, stream: bool = True):
        """Run the enclosed code with this trainer's param store and random stream (what
        :meth:`step` and :meth:`loss` do); the global RNG and param store are restored after.
        ``advance=False`` leaves the trainer's stream where it was (e.g. to repeat a step's
        draws, or to time one); ``stream=False`` draws from the global RNG instead.
        Nested in another, it adds nothing: the outer one owns the stream."""
        if self._in_context:
            yield
            return
        # Saved and set by hand rather than by torch.random.fork_rng: this runs every step, and
        # fork_rng's device discovery costs more than the copies themselves.
        outer = self._current_stream() if stream else None
        with pyro.get_param_store().scope(self._param_state):
            self._in_context = True
            try:
                if stream:
                    self._set_stream(self._rng)
                yield
                if stream and advance:
                    self._rng = self._current_stream()
            finally:
                self._in_context = False
                if stream:
                    self._set_stream(outer)

    def _set_stream(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # --- settings -------------------------------------------------------------------------------

    def set_kl_weight(self, kl_weight: float) -> None:
        """Set β (e.g. once per epoch for KL annealing); λ stays as given."""
        if getattr(self, "kl_weight", None) == kl_weight:
            return  # new wrappers would make enum-jit compile again
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

    # --- one step -------------------------------------------------------------------------------

    def loss(self, x) -> torch.Tensor:
        """The training objective on a batch, summed over its points, without gradients."""
        x = self.model.prepare(x)
        with self.context(), self.model.shared_pass():
            # Not under no_grad: TraceEnum_ELBO's differentiable_loss refuses a loss without a graph.
            return self.estimator.loss(self.model_fn, self.guide_fn, x).detach()

    def step(self, x) -> torch.Tensor:
        """One SVI step on batch x; returns the loss (summed over the batch) as a device tensor,
        NaN for a step rolled back (``on_nan="rollback"``). ``x``: see ``model.prepare``.
        Data-parallel: x is this rank's part of the batch, and the loss is the whole batch's."""
        x = self.model.prepare(x)
        if not (self.model.training and self.guide.training):  # walking the modules costs
            self.model.train(), self.guide.train()
        # One shared pass per step (gmvae_w's guide and model share the prior network's output).
        with self.context(), self.model.shared_pass():
            try:
                loss = self._loss_and_grads(x)
            except ValueError as err:
                # With Pyro's validation on (its default), a NaN or inf reaching a distribution's
                # parameters or observed value raises here, before any loss exists.
                if not _is_nonfinite_value_error(err) or self.world_size > 1:
                    raise
                self._handle_nonfinite(torch.tensor(math.nan), cause=err)
                return torch.tensor(math.nan, device=x.device)
        grad_norm = None
        if self.clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if self.step_count % self.nan_check_every == 0:
            # Data-parallel, the loss and the gradients are the same on every rank: so is this.
            if _nonfinite(loss, self.params, grad_norm):
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

    def _loss_and_grads(self, x):
        if self.world_size == 1:
            return self.estimator.loss_and_grads(self.model_fn, self.guide_fn, x)
        if self._ddp is None:
            # Made here, not in __init__: a backward pass outside the wrapper (rank 0's
            # initialisation stage, a timing) must not reach its hooks. It broadcasts rank 0's
            # parameters and buffers, so every replica starts alike. The graph is the same every
            # step (static_graph): parameters that an estimator leaves without a gradient (e.g. a
            # guide's unused head) are found once, not every step.
            ids = None
            if self.device.type == "cuda":  # "cuda" without an index: the current device
                index = self.device.index
                ids = [torch.cuda.current_device() if index is None else index]
            self._ddp = nn.parallel.DistributedDataParallel(
                _Objective(self.model, self.guide, self.estimator),
                device_ids=ids,
                static_graph=True,
            )
        loss = self._ddp(self.model_fn, self.guide_fn, x)
        # DDP averages the ranks' gradients; the union's loss is the sum of theirs.
        (loss * self.world_size).backward()
        loss = loss.detach()
        dist.all_reduce(loss)
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

    # --- the epoch loop -------------------------------------------------------------------------

    def fit(self, x, epochs: int, batch_size: int = 100, *, binarize: str = "none",
            eval_every: int = 1, evaluate=None, checkpoint=None, stop=None, progress=False,
            desc="training"):  # fmt: skip
        """Train from where the trainer stands (``position``) to the end of epoch ``epochs``.

        Every epoch visits ``len(x) // batch_size`` batches of the rows of ``x`` (the whole
        training set, on the device) in an order drawn from ``batches``, each binarised afresh
        with ``binarize="dynamic"``; β and the learning rate follow their schedules per epoch.

        Args:
            evaluate: ``evaluate(epoch, train_loss) -> dict``, called every ``eval_every``
                epochs and after the last (``train_loss``: the epoch's mean loss per point).
                Data-parallel, it is called on rank 0 only. The last result is returned.
            checkpoint: ``checkpoint()``, called after each evaluation and before an interrupt,
                when :meth:`state_dict` is complete (data-parallel: on every rank).
            stop: ``stop() -> bool``, polled after each step; True (on any rank) records the
                position, calls ``checkpoint()`` and raises :class:`TrainingInterrupted`.
        """
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the "
                             f"{self.world_size} data-parallel processes")  # fmt: skip
        part = batch_size // self.world_size
        pos, last = self.position, None
        # Pyro's own checks (distribution arguments and supports) also read back, about 25
        # times a step: they run on the first step, which catches a model or guide that is
        # wrong, and then stop; the NaN guard covers the loss and gradients from there on.
        pyro_checks = is_validation_enabled()
        bar = tqdm(range(pos["epoch"], epochs), desc=desc, unit="epoch", initial=pos["epoch"],
                   total=epochs, disable=not progress)  # fmt: skip
        for epoch in bar:
            self.set_kl_weight(
                kl_weight_schedule(epoch, self.base_kl_weight, self.kl_warmup_epochs)
            )
            self.set_lr(self.base_lr * self.lr_decay**epoch)
            if hasattr(self.guide, "set_epoch"):
                self.guide.set_epoch(epoch)
            skip = pos["batch"]
            if not skip:
                pos["epoch_start"] = self.batches.get_state()
            loss_sum = torch.tensor(pos["loss_sum"], device=self.device)
            n = torch.tensor(pos["n"], device=self.device, dtype=loss_sum.dtype)
            taken, rollbacks_before = 0, self.rollbacks_total
            steps = iterate_minibatches(x, batch_size, self.batches, binarize=binarize)
            for b, xb in enumerate(tqdm(steps, initial=skip, leave=False, disable=not progress,
                                        unit="step")):  # fmt: skip
                if b < skip:
                    continue  # replayed (its binarisation drawn) to reach the interrupted position
                if self.world_size > 1:
                    xb = xb[self.rank * part : (self.rank + 1) * part]
                with pyro.validation_enabled(pyro_checks):
                    loss = self.step(xb)
                pyro_checks = False
                # A step rolled back returns its non-finite loss: leave it out of the epoch's
                # mean. Kept on the device: no host sync per step.
                finite = torch.isfinite(loss)
                loss_sum += torch.where(finite, loss, 0.0)
                n += finite * batch_size
                taken += 1
                # Data-parallel, every nan_check_every steps (the same steps on every rank): the
                # agreement is a collective, and on CUDA a read-back.
                poll = self.world_size == 1 or self.step_count % self.nan_check_every == 0
                if stop is not None and poll and self._any_rank(stop()):
                    pos.update(epoch=epoch, batch=b + 1, loss_sum=loss_sum.item(), n=n.item())
                    if checkpoint is not None:
                        checkpoint()
                    raise TrainingInterrupted(f"stopped in epoch {epoch + 1} after batch {b + 1}")
            pos.update(epoch=epoch + 1, batch=0, epoch_start=None, loss_sum=0.0, n=0)
            rolled_back = self.rollbacks_total - rollbacks_before
            if rolled_back and rolled_back >= taken:
                raise NonFiniteLossError(
                    f"epoch {epoch + 1}: every step rolled back ({rolled_back}); the model did not "
                    "train. Lower the learning rate or clip the gradients (--clip-norm)"
                )
            done = epoch + 1
            if done % eval_every == 0 or done == epochs:
                train_loss = (loss_sum / n).item() if n.item() > 0 else None
                if evaluate is not None and self.rank == 0:
                    last = evaluate(done, train_loss)
                    acc = (last or {}).get("acc_hungarian", math.nan)
                    bar.set_postfix(loss=f"{train_loss or math.nan:.2f}", acc=f"{acc:.3f}")
                if checkpoint is not None:
                    checkpoint()
        return last

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` on one process; data-parallel, whether it is set on any rank (all agree)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # --- state ----------------------------------------------------------------------------------

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
        """Model, guide, optimiser, step count, β, the random stream and the data position:
        enough to continue exactly. Data-parallel, it is a collective (call it on every rank):
        it gathers every rank's random stream."""
        state = {
            **self._train_state(),
            "step": self.step_count,
            "rollbacks_total": self.rollbacks_total,
            "recent_rollbacks": list(self._recent),
            "kl_weight": self.kl_weight,
            "rng": self._rng,
            "batches": self.batches.get_state(),
            "position": dict(self.position),
        }
        if self.world_size > 1:
            streams = [None] * self.world_size
            dist.all_gather_object(streams, {k: v.cpu() for k, v in self._rng.items()})
            state["rng_ranks"] = streams
        with self.context(stream=False):  # e.g. graph's baseline, kept in the param store
            state["estimator"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._load_train_state(state)
        with self.context(stream=False):  # into the trainer's param store
            self.estimator.load_state_dict(state.get("estimator", {}))
        self.step_count = state["step"]
        self.rollbacks_total = state.get("rollbacks_total", 0)
        self._recent.clear()
        self._recent.extend(state.get("recent_rollbacks", []))
        self.set_kl_weight(state["kl_weight"])
        self._rng = self._loaded_stream(state)
        if "position" in state:
            self.position = dict(state["position"])
        if "batches" in state:
            self._load_batches(state)
        # A rollback must go back to the loaded state, never to one from before the load.
        self.rollbacks = 0
        self._good_state = copy.deepcopy(self._train_state()) if self.on_nan == "rollback" else None

    def _loaded_stream(self, state: dict) -> dict:
        ranks = state.get("rng_ranks")
        fresh = None  # why this process cannot continue its own saved stream
        if ranks is not None and len(ranks) != self.world_size:
            fresh = f"resuming {len(ranks)} data-parallel processes' state with {self.world_size}"
        elif ranks is None and self.rank > 0:
            fresh = "resuming a one-process state data-parallel"
        if fresh:
            warnings.warn(f"{fresh}: the random draws continue from fresh seeds, so the run will "
                          "not match an uninterrupted one exactly", stacklevel=3)  # fmt: skip
            return self._seeded_stream(_stream_seed(self.seed + self.step_count, self.rank))
        saved = ranks[self.rank] if ranks is not None else state["rng"]
        if "pyro" in saved:  # written before the trainer had its own stream: the global one
            saved = {"torch": saved["pyro"]["torch"], "cuda": (saved.get("cuda") or [None])[0]}
        stream = {"torch": saved["torch"].cpu()}
        if self.device.type == "cuda":
            cuda = saved.get("cuda")
            stream["cuda"] = cuda.cpu() if cuda is not None else self._current_stream()["cuda"]
        return stream

    def _load_batches(self, state: dict) -> None:
        # Mid-epoch, the epoch is replayed from its start up to the position.
        saved = self.position["epoch_start"] if self.position["batch"] else state["batches"]
        try:
            # Every generator, a CUDA one too, takes its state as a CPU ByteTensor.
            self.batches.set_state(saved.cpu())
        except RuntimeError:
            # Saved on another device type: CPU and CUDA generators keep states of different
            # kinds, so reseed, reproducibly.
            warnings.warn(
                "resuming on another device type: the data order continues from a fresh seed, so "
                "this run will not match an uninterrupted one exactly",
                stacklevel=3,
            )
            self.batches.manual_seed(self.seed + self.position["epoch"])
            self.position.update(batch=0, loss_sum=0.0, n=0)


def _is_nonfinite_value_error(err: BaseException) -> bool:
    """Whether ``err`` (or an error it wraps; Pyro re-raises with trace shapes) is torch's
    distribution-argument check failing on invalid (here: NaN/inf) parameters or values."""
    while err is not None:
        if isinstance(err, ValueError) and "but found invalid values" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _nonfinite(loss, params, grad_norm=None) -> bool:
    """Whether the loss or any gradient is NaN or infinite (one read-back from the device).

    A finite loss can still have NaN gradients: TraceEnum_ELBO drops terms whose enumeration
    weight q(y|x) is NaN from the loss value (its Dice factors mask prob > 0), not from the
    gradient, and one step on them would make every parameter NaN. ``grad_norm``, when clipping
    computed it, already says whether a gradient is non-finite.
    """
    bad = ~torch.isfinite(loss.sum())
    if grad_norm is not None:
        return bool(bad | ~torch.isfinite(grad_norm))
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return bool(bad)
    found = torch.zeros((), dtype=torch.float32, device=grads[0].device)  # the kernel's dtype
    # GradScaler's check: one fused pass over every gradient, instead of a norm per tensor (the
    # NaN guard's main cost at small sizes). "Unscaling" by exactly 1 leaves the gradients as
    # they are; ``found`` becomes 1 if any entry is NaN or infinite.
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones_like(found))
    return bool(bad | (found > 0))


def kl_weight_schedule(epoch: int, kl_weight: float, warmup_epochs: int) -> float:
    """β for an epoch: a linear warm-up from kl_weight/warmup_epochs to kl_weight, then constant."""
    if warmup_epochs <= 0:
        return kl_weight
    return kl_weight * min(1.0, (epoch + 1) / warmup_epochs)
