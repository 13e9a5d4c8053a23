"""What every mixture VAE shares: the cluster prior, its site name and the input checks."""

import math

import torch
from torch import nn

from .nets import check_data, check_k, check_likelihood


class MixtureVAE(nn.Module):
    """Base class. A subclass defines ``model(x)`` and names its discrete cluster site.

    The cluster prior is uniform, p(y) = Cat(1/K), as in both sources.
    """

    name = "mixture_vae"
    cluster_site = "y"
    default_guide = "mean_field"

    def __init__(self, data_dim: int, k: int, likelihood: str):
        super().__init__()
        if not isinstance(data_dim, int) or data_dim < 1:
            raise ValueError(f"data_dim must be a positive integer, got {data_dim!r}")
        self.data_dim = data_dim
        self.k = check_k(k)
        self.likelihood = check_likelihood(likelihood)
        self.register_buffer("cluster_logits", torch.full((k,), -math.log(k)))

    def cluster_log_prior(self) -> torch.Tensor:
        """log p(y), shape (K,)."""
        return self.cluster_logits.log_softmax(-1)

    def check(self, x: torch.Tensor) -> None:
        check_data(x, self.data_dim, self.likelihood)

    def forward(self, x):
        return self.model(x)
