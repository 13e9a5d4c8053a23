"""A proposed speed fix for GMVAE-w, timed by the benchmark as ``pyro_proposed`` (not library code).

Under ``TraceEnum_ELBO`` with the default guide (``GMVAEWGuide``, cluster c enumerated in the guide
from the exact posterior), one step of ``GMVAEW`` does two avoidable things:

1. the prior network μ_c(w), σ_c(w) (``components``, w → H → 2·K·x_dim: the largest layers of the
   model) runs twice on the same w: once in the guide for p(c | x, w), once in the model;
2. the model selects the component of each enumerated c by a one-hot contraction,
   ``(c.unsqueeze(-1) * loc).sum(-2)``, which builds a (K, B, K, x_dim) tensor: K times the work
   and memory of indexing.

``ProposedGMVAEW`` memoises ``components`` on the identity of w (the model replays the guide's w
tensor object, so the second call is a lookup within the same step) and selects the component
with ``pyro.ops.indexing.Vindex``. Loss and gradients are unchanged (checked in
``tests/test_speed_equivalence.py``).
"""

import copy

import pyro
import pyro.distributions as dist
from pyro.ops.indexing import Vindex

from pyro_gmvae.gmvae_w import GMVAEW
from pyro_gmvae.nets import observation_dist


class ProposedGMVAEW(GMVAEW):
    def components(self, w):
        memo = self.__dict__.get("_components_memo")
        if memo is not None and memo[0] is w:
            return memo[1]
        out = super().components(w)
        # A plain attribute (not a module buffer): the last w and its components, one step's worth.
        self.__dict__["_components_memo"] = (w, out)
        return out

    def model(self, obs):
        self.check(obs)
        pyro.module(self.name, self)
        with pyro.plate("data", obs.shape[0]):
            w = pyro.sample("w", dist.Normal(obs.new_zeros(self.w_dim), 1.0).to_event(1))
            c = pyro.sample(
                "c",
                dist.OneHotCategorical(logits=self.cluster_logits),
                infer={"enumerate": "parallel"},
            )
            loc, scale = self.components(w)  # (..., B, K, x_dim)
            # c is (K, 1, K) under enumeration: its index (K, 1) broadcasts against the batch.
            idx = c.argmax(-1)
            x = pyro.sample(
                "x", dist.Normal(Vindex(loc)[..., idx, :], Vindex(scale)[..., idx, :]).to_event(1)
            )
            pyro.sample("obs", observation_dist(self.decoder(x), self.likelihood), obs=obs)


def proposed(model, guide):
    """Views of a GMVAEW and its guide, sharing every parameter, that run the proposed code."""
    if not isinstance(model, GMVAEW):
        raise TypeError(f"the proposal is for GMVAEW, got {type(model).__name__}")
    new_model = copy.copy(model)  # shares the parameter and module dicts
    new_model.__class__ = ProposedGMVAEW
    new_model.__dict__.pop("_components_memo", None)
    new_guide = copy.copy(guide)
    new_guide.__dict__["model"] = new_model  # the guide's plain reference to its model
    return new_model, new_guide
