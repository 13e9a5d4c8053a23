"""ELBO estimators for the discrete cluster variable, one name each."""

import pyro.infer


class Estimator:
    """A Pyro ELBO behind one name. ``loss_and_grads`` returns the loss as a tensor, without
    reading it back to the host, so GPU training does not synchronise every step."""

    def __init__(self, name, elbo):
        self.name, self.elbo = name, elbo

    def loss(self, model, guide, *args):
        return self.elbo.differentiable_loss(model, guide, *args)

    def loss_and_grads(self, model, guide, *args):
        loss = self.elbo.differentiable_loss(model, guide, *args)
        loss.backward()
        return loss.detach()


def _enum(num_particles=1, **_):
    # max_plate_nesting=1: the data plate is dim -1, so enumeration uses dims -2 and left.
    return pyro.infer.TraceEnum_ELBO(
        max_plate_nesting=1, num_particles=num_particles, vectorize_particles=num_particles > 1
    )


ESTIMATORS = {"enum": _enum}


def make_estimator(name="enum", model=None, guide=None, num_particles=1, **kwargs) -> Estimator:
    """The estimator registered as ``name`` (one clear error for an unknown name or a misfit)."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {sorted(ESTIMATORS)}")
    if num_particles < 1:
        raise ValueError(f"num_particles (M) must be >= 1, got {num_particles}")
    return Estimator(name, ESTIMATORS[name](num_particles=num_particles, model=model, guide=guide, **kwargs))
