"""What every mixture VAE shares: the cluster prior, its site name and the input checks."""

import contextlib
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .nets import (
    check_data,
    check_k,
    check_likelihood,
    is_integer,
    prepare_data,
    validation_enabled,
)


class MixtureVAE(nn.Module):
    """Base class. A subclass defines ``model(x)`` and names its discrete cluster site.

    The cluster prior is uniform, p(y) = Cat(1/K), as in both sources.
    """

    name = "mixture_vae"
    cluster_site = "y"
    default_guide = "mean_field"

    def __init__(self, data_dim: int, k: int, likelihood: str):
        super().__init__()
        if not is_integer(data_dim) or data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim!r}")
        self.data_dim = int(data_dim)
        self.k = check_k(k)
        self.likelihood = check_likelihood(likelihood)
        self.register_buffer("cluster_logits", torch.full((self.k,), -math.log(self.k)))

    def cluster_log_prior(self) -> torch.Tensor:
        """log p(y), shape (K,)."""
        return self.cluster_logits.log_softmax(-1)

    def sample_cluster(self) -> torch.Tensor:
        """Sample the cluster site y ~ p(y), one-hot, inside the model's data plate.

        No inference choice is made here: where the objective sums y exactly, the estimator
        marks it for parallel enumeration (``config_enumerate``), and its value then has a
        leading enumeration dim, (K, 1, K), unless the guide supplies it (replayed).
        """
        return pyro.sample(self.cluster_site, dist.OneHotCategorical(logits=self.cluster_logits))

    @contextlib.contextmanager
    def shared_pass(self):
        """A scope for one evaluation of the objective (one ELBO call: the guide, then the model
        on the guide's draws), in which the model may compute a table both need once and reuse
        it, keyed on the very tensors it came from. It must not span a parameter update (the
        trainer opens one per step); outside it nothing is reused. This base shares nothing."""
        yield

    def prepare(self, x) -> torch.Tensor:
        """``x`` converted for this model (see :func:`~pyro_gmvae.nets.prepare_data`)."""
        return prepare_data(x, self.data_dim, self.cluster_logits)

    def check(self, x: torch.Tensor) -> None:
        check_data(x, self.data_dim, self.likelihood)
        if validation_enabled() and x.dtype != self.cluster_logits.dtype:
            raise TypeError(
                f"the data is {x.dtype} but the model is {self.cluster_logits.dtype}; "
                f"convert one of them (x.to({self.cluster_logits.dtype}) or model.to(x.dtype))"
            )

    def forward(self, x):
        return self.model(x)
