"""Layers the journey swaps in and out: ghost batch norm, patch whitening, and the registries that turn
``NormConfig`` / ``ActConfig`` into layer factories (timm-style layer injection, design.md).

A network never names its normalisation or activation itself: ``ablate.models.build_model`` receives
``norm_layer(num_channels)`` and ``act_layer()`` factories, built here from the config, so a trick such as
ghost BN or CELU is a config switch, not an edit of every block.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.config import ActConfig, NormConfig

WHITEN_CHANNELS = 27  # 3 colour channels x 3 x 3 patch: the whitening conv's fixed output width


class GhostBatchNorm(nn.BatchNorm2d):
    """Batch norm that normalises ``splits`` parts of each training batch by their own statistics (A3 8.5).

    As in cifar10-fast, an N x C x H x W batch is reshaped to (N/S) x (C*S) x H x W, so one call of
    ``F.batch_norm`` normalises every split at once: sample n falls in split ``n % S``. Running statistics
    are therefore kept per split (C*S entries) and averaged over the splits for evaluation. Averaging at
    evaluation time, instead of overwriting the buffers when switching to eval as cifar10-fast does, keeps
    ``eval()`` free of side effects (an EMA copy of the state stays consistent). With ``splits=1`` this is
    exactly ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, splits: int = 1, eps: float = 1e-5, momentum: float = 0.1) -> None:
        if splits < 1:
            raise ValueError(f"GhostBatchNorm needs splits >= 1, got {splits}")
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.splits = splits
        self.running_mean = torch.zeros(num_features * splits)
        self.running_var = torch.ones(num_features * splits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, splits={self.splits}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        n, c, h, w = x.shape
        s = self.splits
        if not self.training:
            mean = self.running_mean.view(s, c).mean(0)
            var = self.running_var.view(s, c).mean(0)
            return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        if n % s:
            raise ValueError(f"GhostBatchNorm: a batch of {n} cannot be cut into {s} equal splits; "
                             "use a batch size divisible by norm.splits (and drop the last partial batch)")
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # reshape, not view: a channels_last input cannot be viewed with C and the split index merged.
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), self.running_mean, self.running_var,
                         self.weight.repeat(s), self.bias.repeat(s), True, momentum, self.eps)
        # A channels_last activation stays channels_last after the reshape: the next conv does not pay for it.
        return y.reshape(n, c, h, w).contiguous(memory_format=memory_format_of(x))


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a channels_last tensor (not also contiguous), else contiguous_format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _batch_norm(cfg: NormConfig, num_features: int) -> nn.Module:
    return nn.BatchNorm2d(num_features, eps=cfg.eps, momentum=cfg.momentum)


def _ghost_norm(cfg: NormConfig, num_features: int) -> nn.Module:
    return GhostBatchNorm(num_features, splits=cfg.splits, eps=cfg.eps, momentum=cfg.momentum)


def _no_norm(cfg: NormConfig, num_features: int) -> nn.Module:
    return nn.Identity()


NORM_LAYERS: dict[str, Callable[[NormConfig, int], nn.Module]] = {
    "batch": _batch_norm,
    "ghost": _ghost_norm,
    "none": _no_norm,
}

# PyTorch 0.4 drew BN scales from U[0,1]; later versions start at 1 (journey-facts E11), so the early
# networks need the old default spelled out to be replayed faithfully.
SCALE_INITS: dict[str, Callable[[Tensor], Tensor]] = {
    "one": nn.init.ones_,
    "uniform": nn.init.uniform_,
}


def _lookup(registry: dict, key: str, what: str):
    try:
        return registry[key]
    except KeyError:
        raise ValueError(f"unknown {what} {key!r}; choose one of {', '.join(registry)}") from None


def _build_norm(cfg: NormConfig, num_features: int) -> nn.Module:
    layer = _lookup(NORM_LAYERS, cfg.kind, "norm.kind")(cfg, num_features)
    weight = getattr(layer, "weight", None)
    if weight is None:  # nn.Identity: nothing to initialise
        return layer
    with torch.no_grad():
        if cfg.frozen_scale:
            # Step 8_6: gamma is the constant 1; without requires_grad the optimiser and the
            # trainable-parameter count never see it, while beta stays learnable.
            weight.fill_(1.0)
            weight.requires_grad_(False)
        else:
            _lookup(SCALE_INITS, cfg.scale_init, "norm.scale_init")(weight)
        layer.bias.zero_()
        if cfg.frozen_bias:
            # Post 7's BN with a frozen affine map: beta is the constant 0, likewise left out of training.
            layer.bias.requires_grad_(False)
    return layer


def make_norm(cfg: NormConfig) -> Callable[[int], nn.Module]:
    """Factory ``norm_layer(num_channels)`` for the normalisation described by ``cfg``."""
    _lookup(NORM_LAYERS, cfg.kind, "norm.kind")  # fail at configuration time, not at the first block
    _lookup(SCALE_INITS, cfg.scale_init, "norm.scale_init")
    return partial(_build_norm, cfg)


def _relu(cfg: ActConfig) -> nn.Module:
    return nn.ReLU()


def _celu(cfg: ActConfig) -> nn.Module:
    return nn.CELU(cfg.alpha)


def _softplus(cfg: ActConfig) -> nn.Module:
    return nn.Softplus(beta=cfg.beta, threshold=cfg.threshold)


class ShiftedReLU(nn.Module):
    """Post 7's "frozen batch norm": (ReLU(x) - sqrt(1/pi)) / sqrt(1 - 1/pi).

    For x ~ N(0, 2), the pre-activation of a He-initialised layer fed standardised inputs, ReLU(x) has
    mean sqrt(1/pi) and variance 1 - 1/pi, so this is what a batch norm after the ReLU would compute at
    initialisation, frozen: outputs keep zero mean and unit variance through any depth.
    """

    SHIFT = math.sqrt(1 / math.pi)
    SCALE = 1 / math.sqrt(1 - 1 / math.pi)

    def forward(self, x: Tensor) -> Tensor:
        return (F.relu(x) - self.SHIFT) * self.SCALE


def _shifted_relu(cfg: ActConfig) -> nn.Module:
    return ShiftedReLU()


ACT_LAYERS: dict[str, Callable[[ActConfig], nn.Module]] = {
    "relu": _relu,
    "celu": _celu,
    "softplus": _softplus,
    "shifted_relu": _shifted_relu,
}


def make_act(cfg: ActConfig) -> Callable[[], nn.Module]:
    """Factory ``act_layer()`` for the activation described by ``cfg``."""
    return partial(_lookup(ACT_LAYERS, cfg.kind, "act.kind"), cfg)


def _patch_second_moment(images: Tensor, chunk: int = 256) -> Tensor:
    """27 x 27 uncentred second-moment matrix X^T X / (n-1) of all stride-1 3x3 patches, in float64.

    Accumulated over chunks of images: the patches of 10k images are 243M numbers, 2 GB in float64.
    ``F.unfold`` orders a patch channel-major (c, dy, dx), the same order as a conv weight's (3, 3, 3).
    """
    total = torch.zeros(WHITEN_CHANNELS, WHITEN_CHANNELS, dtype=torch.float64, device=images.device)
    count = 0
    for part in images.split(chunk):
        x = F.unfold(part.to(torch.float64), kernel_size=3)  # n x 27 x positions
        x = x.transpose(1, 2).reshape(-1, x.shape[1])
        total += x.T @ x
        count += x.shape[0]
    return total / (count - 1)


def patch_whitening_filter(images: Tensor, eps: float) -> Tensor:
    """Fixed 3x3 conv weight (27, 3, 3, 3) that whitens the 3x3 patches of ``images`` (B4, new_dawn.py).

    ``images`` are normalised N x 3 x H x W. Filter k is eigenvector k of the patches' uncentred second
    moment divided by sqrt(lambda_k + eps), so the filtered patches have second moment
    diag(lambda / (lambda + eps)): about the identity, with eps damping the noisy small-eigenvalue directions.
    Filters are ordered by decreasing eigenvalue, as in cifar10-fast.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"patch whitening expects N x 3 x H x W images, got shape {tuple(images.shape)}")
    eigenvalues, eigenvectors = torch.linalg.eigh(_patch_second_moment(images))
    filters = eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0) + eps)[:, None]
    return filters.reshape(WHITEN_CHANNELS, 3, 3, 3).to(torch.float32)


def _patch_identity() -> Tensor:
    # Before ``fit`` the layer just lays out each 3x3x3 patch as 27 channels (an im2col), so an
    # unfitted network still runs sensibly.
    return torch.eye(WHITEN_CHANNELS).reshape(WHITEN_CHANNELS, 3, 3, 3)


class Whitening(nn.Module):
    """Fixed 3x3 conv 3 -> 27 (padding 1, no bias) whose filters whiten the input's patches (A3 8.7).

    The weight is a buffer, not a parameter: it is never trained, not counted as trainable, and moves
    with ``.to()`` and ``state_dict`` like any buffer. Call ``fit`` with (a subset of) the normalised
    training images before training; new_dawn.py uses the first 10,000 and times it with training.
    """

    def __init__(self, eps: float = 1e-2) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", _patch_identity())

    def extra_repr(self) -> str:
        return f"3, {WHITEN_CHANNELS}, kernel_size=(3, 3), padding=1, eps={self.eps}"

    @torch.no_grad()
    def fit(self, images: Tensor) -> None:
        filters = patch_whitening_filter(images.to(self.weight.device), self.eps)
        self.weight.copy_(filters.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=1)


__all__ = [
    "ACT_LAYERS", "GhostBatchNorm", "NORM_LAYERS", "SCALE_INITS", "ShiftedReLU", "WHITEN_CHANNELS", "Whitening",
    "make_act", "make_norm", "patch_whitening_filter",
]
