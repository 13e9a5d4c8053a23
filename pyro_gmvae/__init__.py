"""pyro-gmvae: deep unsupervised clustering with mixture variational autoencoders in Pyro."""

from .gmvae import GMVAE
from .gmvae_w import GMVAEW
from .guides import GUIDES, make_guide
from .m2 import M2, ModifiedM2

__version__ = "0.1.0"

MODELS = {"m2": M2, "modified_m2": ModifiedM2, "gmvae": GMVAE, "gmvae_w": GMVAEW}


def make_model(name, **kwargs):
    """The model registered as ``name`` (``m2``, ``modified_m2``, ``gmvae``, ``gmvae_w``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


# After MODELS: the harness builds models through this package's registry.
from .harness.clustering import GMVAEClustering  # noqa: E402
from .harness.run import RunConfig, load_run  # noqa: E402

__all__ = [
    "GMVAE",
    "GMVAEClustering",
    "GMVAEW",
    "GUIDES",
    "M2",
    "MODELS",
    "ModifiedM2",
    "RunConfig",
    "load_run",
    "make_guide",
    "make_model",
]
