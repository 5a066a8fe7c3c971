"""Layers the journey swaps in and out: ghost batch norm, patch whitening, and the registries that turn
``NormConfig`` / ``ActConfig`` into layer factories (timm-style layer injection, design.md).

A network never names its normalisation or activation itself: ``ablate.models.build_model`` receives
``norm_layer(num_channels)`` and ``act_layer()`` factories, built here from the config, so a trick such as
ghost BN or CELU is a config switch, not an edit of every block.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.config import ActConfig, NormConfig
from ablate.device import memory_format_of

WHITEN_CHANNELS = 27  # 3 colour channels x 3 x 3 patch: Page's whitening conv's fixed output width


class GhostBatchNorm(nn.BatchNorm2d):
    """Batch norm that normalises ``splits`` parts of each training batch by their own statistics (A3 8.5).

    As in cifar10-fast, an N x C x H x W batch is viewed as (N/S) x (C*S) x H x W, so one call of
    ``F.batch_norm`` normalises every split at once: sample n falls in split ``n % S``. A channels_last
    batch, which cannot be viewed so, takes ``_GhostNormNHWC`` instead: same groups, no copy. Running statistics
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
        if memory_format_of(x) == torch.channels_last:
            # An NHWC tensor cannot be viewed with C and the split index merged (a reshape would copy
            # every activation twice): the splits are normalised in place of the view instead.
            return _GhostNormNHWC.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                        s, momentum, self.eps)
        y = F.batch_norm(x.view(n // s, c * s, h, w), self.running_mean, self.running_var,
                         self.weight.repeat(s), self.bias.repeat(s), True, momentum, self.eps)
        # Reshaped without autograd tracking it as a view of y: an in-place activation on a tracked view
        # makes autograd rebase it (CopySlices), which copies the whole activation gradient twice in
        # the backward pass. y itself is referenced by nothing else, so there is nothing to rebase.
        return torch.ops.aten._unsafe_view(y, (n, c, h, w))


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics in fp32 at least (fp64 for an fp64 input), whatever the activations' dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def _spatial_view(t: Tensor) -> Tensor:
    """An N x C x H x W tensor as N x (H*W) x C when it is channels_last (a view: each sample's
    positions are contiguous rows of C values), so that sums over the positions run along memory."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _spatial_sum(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Per sample and channel, the sum over the positions, N x C, along memory in either layout."""
    if t.is_contiguous(memory_format=torch.channels_last):
        return _spatial_view(t).sum(1, dtype=dtype)
    return t.sum((2, 3), dtype=dtype)


def _group_sum(per_sample: Tensor, splits: int) -> Tensor:
    """N x C per-sample values summed within each split (sample n in split n % S): S x C."""
    n, c = per_sample.shape
    return per_sample.view(n // splits, splits, c).sum(0)


class _GhostNormNHWC(torch.autograd.Function):
    """Ghost BN's training pass for a channels_last batch, without a copy into NCHW.

    Every (split, channel) group has its own statistics, the same groups as the NCHW path's (sample n
    in split n % S, running statistics at index split * C + channel). They are summed per sample over
    the positions first (along memory in an NHWC tensor: a reduction over the strided (N/S, S, C, H, W)
    view took 10x as long), then within each split; the variance is E[x^2] - mean^2 in fp32 at least.
    They are then laid out per sample, (N, C, 1, 1), so that the output and the input gradient are each
    one fused multiply-add in the input's own layout. Forward and backward are the textbook formulas.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                splits: int, momentum: float, eps: float) -> Tensor:
        n, c, h, w = x.shape
        stat = _stat_dtype(x)
        # Half-precision activations are widened once: reductions that convert as they go ran 2x slower.
        view = _spatial_view(x).to(stat)
        count = n // splits * h * w
        mean = _group_sum(view.sum(1), splits) / count  # S x C
        square = _group_sum(torch.linalg.vector_norm(view, 2, dim=1).square(), splits) / count
        var = (square - mean * mean).clamp_min(0)
        with torch.no_grad():
            running_mean.lerp_(mean.flatten().to(running_mean.dtype), momentum)
            running_var.lerp_(var.flatten().to(running_var.dtype) * (count / max(count - 1, 1)), momentum)
        invstd = torch.rsqrt(var + eps)
        scale = weight * invstd
        shift = bias - mean * scale
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.splits = splits
        return torch.addcmul(_per_sample(shift, n, x.dtype), x, _per_sample(scale, n, x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, mean, invstd, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        s = ctx.splits
        count = n // s * h * w
        stat = _stat_dtype(x)

        def group_sum(t: Tensor) -> Tensor:  # per (split, channel), S x C
            return _group_sum(_spatial_sum(t, stat), s)

        sum_g = group_sum(grad)
        sum_g_xhat = (group_sum(grad * x) - mean * sum_g) * invstd  # sum of grad * x_hat per group
        a = weight * invstd
        b = -a * invstd * sum_g_xhat / count
        offset = -b * mean - a * sum_g / count
        # dx = a * (g - mean(g) - x_hat * mean(g * x_hat)) = a * g + b * x + offset, per group
        dx = torch.addcmul(_per_sample(offset, n, x.dtype), x, _per_sample(b, n, x.dtype))
        dx.addcmul_(grad, _per_sample(a, n, x.dtype))
        return dx, sum_g_xhat.sum(0).to(weight.dtype), sum_g.sum(0).to(weight.dtype), None, None, None, None, None


def _per_sample(stat: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """An S x C per-group statistic as N x C x 1 x 1, sample n taking its split's (n % S) row."""
    return stat.to(dtype).repeat(n // stat.shape[0], 1)[:, :, None, None]


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

# PyTorch 0.4 drew BN scales from U[0,1]; later versions start at 1 (docs/references.md E11), so the early
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


def _relu(cfg: ActConfig, inplace: bool = False) -> nn.Module:
    return nn.ReLU(inplace)


def _celu(cfg: ActConfig, inplace: bool = False) -> nn.Module:
    return nn.CELU(cfg.alpha, inplace)


def _softplus(cfg: ActConfig, inplace: bool = False) -> nn.Module:
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


def _shifted_relu(cfg: ActConfig, inplace: bool = False) -> nn.Module:
    return ShiftedReLU()


def _gelu(cfg: ActConfig, inplace: bool = False) -> nn.Module:
    # The exact (erf) GELU, nn.GELU's default, as airbench94 uses it; it has no in-place form.
    return nn.GELU()


# Each builder takes ``inplace``: ReLU and CELU may then overwrite their input, as the reference code's
# nn.ReLU(True) does, which saves one activation-sized block per layer (forward and backward).
ACT_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "relu": _relu,
    "celu": _celu,
    "softplus": _softplus,
    "shifted_relu": _shifted_relu,
    "gelu": _gelu,
}


def make_act(cfg: ActConfig) -> Callable[..., nn.Module]:
    """Factory ``act_layer(inplace=False)`` for the activation described by ``cfg``. A block asks for
    ``inplace=True`` only where the input is a fresh tensor nothing else reads (a norm's or a conv's
    output), never on a block's own input."""
    return partial(_lookup(ACT_LAYERS, cfg.kind, "act.kind"), cfg)


@dataclass(frozen=True)
class WhiteningVariant:
    """How a fixed patch-whitening layer is made (``arch.whitening`` picks one of ``WHITENINGS``).

    kernel   patch side: the filters are the eigenvectors of the kernel x kernel x 3 patches' second moment
    negated  the filters are followed by their negations (airbench: 2 x 12 = 24 outputs, so that the
             activation after it sees both signs of every whitened direction)
    padding  of the conv (Page: 1, a 32x32 output; airbench: 0, 31x31)
    images   how many training images the filters are fitted on (Page: 10,000; airbench: 5,000)
    """

    kernel: int
    negated: bool
    padding: int
    images: int

    @property
    def patch_size(self) -> int:
        return 3 * self.kernel * self.kernel

    @property
    def out_channels(self) -> int:
        return self.patch_size * (2 if self.negated else 1)


# Page's 3x3 (A3 8.7, new_dawn.py) and airbench's 2x2 with negations (sota-facts section 3, airbench94.py).
WHITENINGS: dict[str, WhiteningVariant] = {
    "page3x3": WhiteningVariant(kernel=3, negated=False, padding=1, images=10_000),
    "airbench2x2": WhiteningVariant(kernel=2, negated=True, padding=0, images=5_000),
}


def whitening_variant(name: str) -> WhiteningVariant:
    return _lookup(WHITENINGS, name, "arch.whitening")


def _patch_second_moment(images: Tensor, kernel: int = 3, chunk: int = 64) -> Tensor:
    """Uncentred second-moment matrix X^T X / (n-1) of all stride-1 kernel x kernel patches, in float64.

    Each chunk of images is multiplied in float32 (fp64 convolutions and matmuls run 32-64x slower on
    consumer GPUs) and the chunks are summed in float64, so the error stays that of one chunk's sum.
    ``F.unfold`` orders a patch channel-major (c, dy, dx), the same order as a conv weight's. airbench
    divides by n instead of n - 1: over millions of patches the two differ by less than 1e-6.
    """
    size = 3 * kernel * kernel
    total = torch.zeros(size, size, dtype=torch.float64, device=images.device)
    count = 0
    for part in images.split(chunk):
        x = F.unfold(part.float(), kernel_size=kernel)  # n x size x positions
        x = x.transpose(1, 2).reshape(-1, x.shape[1])
        total += (x.T @ x).double()
        count += x.shape[0]
    return total / (count - 1)


def patch_whitening_filter(images: Tensor, eps: float, kernel: int = 3) -> Tensor:
    """Fixed conv weight (3k^2, 3, k, k) that whitens the k x k patches of ``images`` (B4, new_dawn.py;
    airbench's with k = 2).

    ``images`` are normalised N x 3 x H x W. Filter j is eigenvector j of the patches' uncentred second
    moment divided by sqrt(lambda_j + eps), so the filtered patches have second moment
    diag(lambda / (lambda + eps)): about the identity, with eps damping the noisy small-eigenvalue directions.
    Filters are ordered by decreasing eigenvalue, as in cifar10-fast and airbench. The small
    eigendecomposition runs on the CPU, where it takes microseconds; on CUDA it would load cuSOLVER
    inside the timed region.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"patch whitening expects N x 3 x H x W images, got shape {tuple(images.shape)}")
    eigenvalues, eigenvectors = torch.linalg.eigh(_patch_second_moment(images, kernel).cpu())
    filters = eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0) + eps)[:, None]
    return filters.reshape(3 * kernel * kernel, 3, kernel, kernel).to(torch.float32)


class Whitening(nn.Module):
    """Fixed patch-whitening conv 3 -> C (A3 8.7; airbench's first layer), the filters fitted from data.

    The weight is a buffer, not a parameter: it is never trained, not counted as trainable, and moves
    with ``.to()`` and ``state_dict`` like any buffer. With ``bias`` a learnable bias (zero at the start)
    follows, as airbench's first conv has; ``freeze_bias`` stops training it. Call ``fit`` with (a
    sample of) the normalised training images before training, inside the timed region as both
    new_dawn.py and airbench do. Until then the layer refuses to run: an unfitted whitening would
    silently train a different network.
    """

    def __init__(self, eps: float = 1e-2, variant: WhiteningVariant = WHITENINGS["page3x3"],
                 bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.variant = variant
        self.fitted = False
        k = variant.kernel
        self.register_buffer("weight", torch.zeros(variant.out_channels, 3, k, k))
        self.register_parameter("bias", nn.Parameter(torch.zeros(variant.out_channels)) if bias else None)

    def extra_repr(self) -> str:
        v = self.variant
        return (f"3, {v.out_channels}, kernel_size=({v.kernel}, {v.kernel}), padding={v.padding}, eps={self.eps}, "
                f"negated={v.negated}, bias={self.bias is not None}, fitted={self.fitted}")

    @torch.no_grad()
    def fit(self, images: Tensor) -> None:
        filters = patch_whitening_filter(images.to(self.weight.device), self.eps, self.variant.kernel)
        if self.variant.negated:
            filters = torch.cat([filters, -filters])
        self.weight.copy_(filters.to(self.weight.device, self.weight.dtype), non_blocking=True)
        self.fitted = True

    def freeze_bias(self, frozen: bool = True) -> None:
        """Stop (or resume) training the bias: the optimisers skip a parameter without a gradient."""
        if self.bias is not None:
            self.bias.requires_grad_(not frozen)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fitted:
            raise RuntimeError("Whitening layer used before fit(): fit it on the normalised training images "
                               "first (ablate.train.fit_whitening)")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), bias, padding=self.variant.padding)


@contextmanager
def unfitted_allowed(model: nn.Module) -> Iterator[None]:
    """Let ``model``'s unfitted whitening layers run (with zero filters) inside the block, for passes
    whose numbers do not matter: counting MACs, warming up kernels before the timer."""
    unfitted = [m for m in model.modules() if isinstance(m, Whitening) and not m.fitted]
    for m in unfitted:
        m.fitted = True
    try:
        yield
    finally:
        for m in unfitted:
            m.fitted = False


__all__ = [
    "ACT_LAYERS", "GhostBatchNorm", "NORM_LAYERS", "SCALE_INITS", "ShiftedReLU", "WHITENINGS", "WHITEN_CHANNELS",
    "Whitening", "WhiteningVariant", "make_act", "make_norm", "patch_whitening_filter", "unfitted_allowed",
    "whitening_variant",
]
