"""Network pieces shared by the models and guides.

Every module here accepts inputs with arbitrary leading batch dims, because parallel enumeration
of the cluster (and vectorised particles) prepend dims such as (K, 1, ...) to the usual (B, ...).
"""

import contextlib
import math
import numbers

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian")

_VALIDATE = True


def set_validation(enabled: bool) -> None:
    """Turn the per-call input checks of models and guides on or off (on by default).

    The trainer checks a whole dataset once and then switches them off, because each check
    reads a value back from the device.
    """
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    return _VALIDATE


@contextlib.contextmanager
def data_checks(enabled: bool):
    """The per-call input checks on or off inside the block, as they were afterwards."""
    previous = _VALIDATE
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(previous)


def check_data(x: torch.Tensor, data_dim: int, likelihood: str) -> None:
    """One clear error for data a model cannot score: wrong shape, NaN/inf, non-binary values."""
    if not _VALIDATE:
        return
    if not torch.is_tensor(x):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        # Binarised images often arrive as bool/uint8; the networks would fail deep inside.
        raise TypeError(f"expected floating-point data, got {x.dtype}; convert it with x.float()")
    if x.dim() != 2 or x.shape[-1] != data_dim:
        raise ValueError(
            f"expected data of shape (batch, {data_dim}), got {tuple(x.shape)}; "
            "flatten images to vectors first"
        )
    if not torch.isfinite(x).all():
        raise ValueError("data contains NaN or infinite values")
    if likelihood == "bernoulli" and not ((x == 0) | (x == 1)).all():
        raise ValueError(
            "a Bernoulli likelihood needs binary data (0/1); binarise the grey levels "
            "(dynamic binarisation) or use likelihood='gaussian'"
        )


def prepare_data(x, data_dim: int, like: torch.Tensor) -> torch.Tensor:
    """Data as a model takes them: a float (N, data_dim) tensor with ``like``'s dtype and device.

    Accepts torch tensors, NumPy arrays and anything ``numpy.asarray`` reads (pandas frames);
    images (N, H, W), (N, C, H, W) or (N, H, W, C) are flattened; integer or bool data are
    converted, uint8 grey levels 0-255 scaled to [0, 1]. One clear ``ValueError``/``TypeError``
    for what cannot be used: an empty batch, the wrong number of features, NaN or infinite
    values (checked while validation is on, as it costs a read-back), a tensor without data.
    """
    if not torch.is_tensor(x):
        import numpy as np

        try:
            x = torch.from_numpy(np.array(x, copy=True))
        except (TypeError, ValueError) as err:
            raise TypeError(f"expected an array of data, got {type(x).__name__} ({err})") from None
    if x.is_meta:
        raise ValueError("the data are on the meta device, which holds shapes but no values")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"the batch is empty (shape {tuple(x.shape)}); pass at least one row")
    if x.dim() > 2:
        x = x.reshape(x.shape[0], -1)  # images, in whatever channel order: the pixels in a row
    if x.dim() != 2 or x.shape[1] != data_dim:
        raise ValueError(
            f"expected {data_dim} features per row, got data of shape {tuple(x.shape)}"
        )
    if not torch.is_floating_point(x):
        scale = 255.0 if x.dtype == torch.uint8 and bool(x.max() > 1) else 1.0
        x = x.to(like.dtype) / scale
    x = x.to(device=like.device, dtype=like.dtype)
    if _VALIDATE and not torch.isfinite(x).all():
        raise ValueError("the data contain NaN or infinite values")
    return x


def is_integer(n) -> bool:
    """True for Python and NumPy integers (``np.prod(shape)`` gives the latter), not for bools."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool)


def check_k(k: int) -> int:
    if not is_integer(k) or k < 2:
        raise ValueError(f"the number of clusters K must be an integer >= 2, got {k!r}")
    return int(k)


def check_likelihood(likelihood: str) -> str:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
    return likelihood


def xavier_init(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases (Shu: He init hurt these models badly)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def positive(raw: torch.Tensor, floor: float) -> torch.Tensor:
    """Softplus plus a floor: a variance that can neither vanish nor overflow into NaN."""
    return F.softplus(raw) + floor


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the last dim for inputs with any number of leading dims.

    Enumeration adds leading dims, so the input is reshaped to 2-D first (BatchNorm1d would
    otherwise read dim 1 as channels).
    """

    def forward(self, x):
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


def mlp(sizes, activation=nn.ReLU, batchnorm=False, final_activation=True) -> nn.Sequential:
    """Linear layers of the given sizes, each followed by [BatchNorm] and the activation."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        last = i == len(sizes) - 2
        if not last or final_activation:
            if batchnorm:
                layers.append(BatchNorm(b))
            layers.append(activation())
    return nn.Sequential(*layers)


class JointLinear(nn.Module):
    """Linear layer on the concatenation [a, b], computed as W_a a + W_b b.

    Under enumeration a is the data (B, Da) and b the enumerated cluster (K, 1, Db): W_a a is
    computed once instead of K times, and the two terms broadcast to (K, B, out). The result
    equals ``nn.Linear(Da + Db, out)`` applied to the broadcast concatenation.
    """

    def __init__(self, in_a: int, in_b: int, out: int):
        super().__init__()
        self.linear_a = nn.Linear(in_a, out)
        self.linear_b = nn.Linear(in_b, out, bias=False)
        # Initialise as one Xavier-uniform layer over the concatenated fan-in.
        bound = math.sqrt(6.0 / (in_a + in_b + out))
        nn.init.uniform_(self.linear_a.weight, -bound, bound)
        nn.init.uniform_(self.linear_b.weight, -bound, bound)
        nn.init.zeros_(self.linear_a.bias)

    def forward(self, a, b):
        return self.linear_a(a) + self.linear_b(b)

    def as_linear(self) -> nn.Linear:
        """The same map as one ``nn.Linear`` on [a, b] (for tests and the naive reference)."""
        lin = nn.Linear(
            self.linear_a.in_features + self.linear_b.in_features, self.linear_a.out_features
        )
        with torch.no_grad():
            lin.weight.copy_(torch.cat([self.linear_a.weight, self.linear_b.weight], dim=-1))
            lin.bias.copy_(self.linear_a.bias)
        return lin


class GaussianHead(nn.Module):
    """Mean (linear) and variance (softplus + floor) heads on a shared feature vector."""

    def __init__(self, in_features: int, out_features: int, min_var: float):
        super().__init__()
        self.loc = nn.Linear(in_features, out_features)
        self.var = nn.Linear(in_features, out_features)
        self.min_var = min_var

    def forward(self, h):
        return self.loc(h), positive(self.var(h), self.min_var).sqrt()


class BernoulliPixels(dist.Independent):
    """``Bernoulli(logits).to_event(1)`` whose log-density negates after summing over pixels.

    The generic one negates the per-pixel cross-entropy first: two extra passes (forward and
    backward) over the decoder's (K, B, D) enumerated output, 2.5 % of a GMVAE step at B = 1000.
    """

    def log_prob(self, value):
        logits, value = torch.broadcast_tensors(self.base_dist.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def observation_dist(params: torch.Tensor, likelihood: str, min_var: float = 1e-3):
    """p(x | .) from a decoder output: Bernoulli logits (D) or Gaussian mean and raw variance (2D)."""
    if likelihood == "bernoulli":
        return BernoulliPixels(dist.Bernoulli(logits=params, validate_args=False), 1)
    loc, raw_var = params.chunk(2, dim=-1)
    return dist.Normal(loc, positive(raw_var, min_var).sqrt()).to_event(1)


def mean_image(params: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The mean of :func:`observation_dist` (the decoded image), from the same decoder output."""
    if likelihood == "bernoulli":
        return torch.sigmoid(params)
    return params.chunk(2, dim=-1)[0]


def base_distribution(fn, stop):
    """The distribution under ``Independent`` / expanded / masked wrappers: the outermost one
    for which ``stop(d)`` holds, or the innermost."""
    while not stop(fn) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def decoder_out_features(data_dim: int, likelihood: str) -> int:
    return data_dim if likelihood == "bernoulli" else 2 * data_dim


# --- The convolutional networks of Dilokthanakul et al. 2016, Appendix A (Tables A.1-A.3) -------


class ConvEncoder(nn.Module):
    """Image -> feature vector, for 28x28x1 (Table A.1) or 32x32x3 (Table A.2) inputs.

    Takes flattened images with any leading dims and returns (..., out_features).
    """

    def __init__(self, image_shape, out_features: int = 500):
        super().__init__()
        self.image_shape = tuple(image_shape)
        c, h, w = self.image_shape
        if (h, w) == (28, 28):
            self.convs = nn.Sequential(
                nn.Conv2d(c, 16, 6, stride=1), nn.BatchNorm2d(16), nn.ReLU(),  # 28 -> 23
                nn.Conv2d(16, 32, 6, stride=1), nn.BatchNorm2d(32), nn.ReLU(),  # 23 -> 18
                nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),  # 18 -> 9
            )  # fmt: skip
            self.conv_shape = (64, 9, 9)
        elif (h, w) == (32, 32):
            self.convs = nn.Sequential(
                nn.Conv2d(c, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),  # 32 -> 16
                nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),  # -> 8
                nn.Conv2d(128, 256, 4, stride=2, padding=1), nn.BatchNorm2d(256), nn.ReLU(),  # -> 4
            )  # fmt: skip
            self.conv_shape = (256, 4, 4)
        else:
            raise ValueError(f"conv networks exist for 28x28 and 32x32 images, got {image_shape}")
        self.fc = nn.Sequential(
            nn.Linear(math.prod(self.conv_shape), out_features), BatchNorm(out_features), nn.ReLU()
        )
        self.out_features = out_features

    def forward(self, x):
        batch = x.shape[:-1]
        h = self.convs(x.reshape(-1, *self.image_shape))
        return self.fc(h.flatten(1)).reshape(*batch, self.out_features)


class ConvDecoder(nn.Module):
    """Latent -> decoder output, mirroring :class:`ConvEncoder` with transposed convolutions."""

    def __init__(self, in_features: int, image_shape, out_channels: int, hidden: int = 500):
        super().__init__()
        c, h, w = image_shape
        if (h, w) == (28, 28):
            self.conv_shape = (64, 9, 9)
            self.deconvs = nn.Sequential(
                nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),  # 9 -> 18
                nn.ConvTranspose2d(32, 16, 6, stride=1), nn.BatchNorm2d(16), nn.ReLU(),  # 18 -> 23
                nn.ConvTranspose2d(16, out_channels, 6, stride=1),  # 23 -> 28
            )  # fmt: skip
        elif (h, w) == (32, 32):
            self.conv_shape = (256, 4, 4)
            self.deconvs = nn.Sequential(
                nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),  # 4 -> 8
                nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),  # -> 16
                nn.ConvTranspose2d(64, out_channels, 4, stride=2, padding=1),  # -> 32
            )  # fmt: skip
        else:
            raise ValueError(f"conv networks exist for 28x28 and 32x32 images, got {image_shape}")
        self.fc = nn.Sequential(
            nn.Linear(in_features, hidden), BatchNorm(hidden), nn.ReLU(),
            nn.Linear(hidden, math.prod(self.conv_shape)), BatchNorm(math.prod(self.conv_shape)), nn.ReLU(),
        )  # fmt: skip
        self.out_features = out_channels * h * w

    def forward(self, z):
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.conv_shape)
        return self.deconvs(h).reshape(*batch, self.out_features)
