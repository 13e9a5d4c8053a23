"""Shared fixtures: tiny models with their default guides and a seeded binary batch.

Everything here is CPU-sized (D = 6, K = 3, 2-d latents, 8 hidden units) so that a test that
needs a model costs milliseconds. Use float64 where a test compares against a hand computation.
"""

import pyro
import pytest
import torch

from pyro_gmvae import make_guide, make_model, nets

# Constructor arguments of the tiny version of every registered model.
TINY = {
    "m2": dict(data_dim=6, k=3, z_dim=2, hidden=(8, 8)),
    "modified_m2": dict(data_dim=6, k=3, z_dim=2, hidden=(8, 8)),
    "gmvae": dict(data_dim=6, k=3, z_dim=2, hidden=(8, 8)),
    "gmvae_w": dict(data_dim=6, k=3, x_dim=2, w_dim=2, hidden=8),
}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on the shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Each test starts with an empty param store and with the models' input checks on."""
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    nets.set_validation(True)


@pytest.fixture
def make_tiny():
    """Factory: ``make_tiny(name, guide=None, dtype=torch.float64, seed=0, **overrides)`` returns
    a tiny ``(model, guide)`` pair (the model's default guide unless ``guide`` names another),
    with parameters drawn under ``seed``."""

    def build(name, guide=None, dtype=torch.float64, seed=0, **overrides):
        torch.manual_seed(seed)
        model = make_model(name, **{**TINY[name], **overrides})
        return model.to(dtype), make_guide(guide, model).to(dtype)

    return build


@pytest.fixture
def binary_batch():
    """A seeded (5, 6) float64 batch of 0/1 values, every column holding both values."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 6, generator=g) < 0.5).double()
    x[0], x[1] = 0.0, 1.0  # both values in every column, whatever the seed draws
    return x
