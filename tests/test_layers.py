"""Ghost BN against BN and a manual per-split reference; norm/act registries; patch whitening."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
import torch
import torch.nn.functional as F
from torch import nn

from ablate.config import ActConfig, NormConfig
from ablate.layers import ACT_LAYERS, NORM_LAYERS, WHITENINGS, GhostBatchNorm, Whitening, unfitted_allowed, make_act, \
    make_norm, patch_whitening_filter

C = 6


def _randomise_affine(*layers: nn.BatchNorm2d) -> None:
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)


def _batch(n: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # A different mean/scale per sample, so a wrong split assignment changes the statistics.
    return torch.randn(n, C, 5, 5, generator=gen) * torch.linspace(0.5, 3, n)[:, None, None, None] + \
        torch.arange(n, dtype=torch.float32)[:, None, None, None] / 4


def test_ghost_bn_with_one_split_is_batch_norm() -> None:
    bn, ghost = nn.BatchNorm2d(C), GhostBatchNorm(C, splits=1)
    _randomise_affine(bn, ghost)
    for seed in range(3):  # several steps, so the running-statistic updates are compared too
        x = _batch(seed=seed)
        assert torch.equal(ghost(x), bn(x))
    assert torch.equal(ghost.running_mean, bn.running_mean)
    assert torch.equal(ghost.running_var, bn.running_var)
    assert ghost.num_batches_tracked == bn.num_batches_tracked == 3
    bn.eval(), ghost.eval()
    x = _batch(seed=7)
    assert torch.equal(ghost(x), bn(x))


def test_ghost_bn_normalises_each_split_by_its_own_statistics() -> None:
    splits, eps, momentum = 16, 1e-5, 0.1
    ghost = GhostBatchNorm(C, splits=splits, eps=eps, momentum=momentum)
    _randomise_affine(ghost)
    x = _batch(n=64)
    y = ghost(x)
    w, b = ghost.weight[:, None, None], ghost.bias[:, None, None]
    means, variances = [], []
    for j in range(splits):
        part = x[j::splits]  # cifar10-fast's reshape puts sample n in split n % splits
        mean, var = part.mean(dim=(0, 2, 3)), part.var(dim=(0, 2, 3), unbiased=False)
        expected = (part - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps) * w + b
        torch.testing.assert_close(y[j::splits], expected, rtol=1e-5, atol=1e-5)
        means.append(mean)
        variances.append(part.var(dim=(0, 2, 3), unbiased=True))
    # Running statistics per split, C*S of them, updated with the PyTorch momentum convention.
    assert ghost.running_mean.shape == (C * splits,)
    torch.testing.assert_close(ghost.running_mean.view(splits, C), momentum * torch.stack(means))
    torch.testing.assert_close(ghost.running_var.view(splits, C),
                               (1 - momentum) + momentum * torch.stack(variances))
    # Evaluation normalises with the statistics averaged over the splits, and leaves the buffers alone.
    ghost.eval()
    before = ghost.running_mean.clone()
    mean = ghost.running_mean.view(splits, C).mean(0)[:, None, None]
    var = ghost.running_var.view(splits, C).mean(0)[:, None, None]
    x_test = _batch(n=3, seed=5)
    torch.testing.assert_close(ghost(x_test), (x_test - mean) / torch.sqrt(var + eps) * w + b)
    assert torch.equal(ghost.running_mean, before)


def test_ghost_bn_gives_the_same_output_for_channels_last_input() -> None:
    ghost = GhostBatchNorm(C, splits=4)
    _randomise_affine(ghost)
    x = _batch()
    expected = ghost(x)
    y = ghost(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_ghost_bn_channels_last_path_matches_nchw_in_gradients_and_running_statistics() -> None:
    """The NHWC path (no copy into NCHW) is the same layer: the same gradients for the input, the
    scales and the biases, and the same running statistics, to fp64 round-off."""
    nchw = GhostBatchNorm(C, splits=4).double()
    _randomise_affine(nchw)
    nhwc = copy.deepcopy(nchw)
    x = (_batch().double() * 3 + 1)
    grad = torch.randn_like(x)
    inputs = [x.clone().requires_grad_(), x.contiguous(memory_format=torch.channels_last).requires_grad_()]
    for layer, inp in zip((nchw, nhwc), inputs):
        (layer(inp) * grad).sum().backward()
    assert inputs[1].grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(nhwc, name).grad, getattr(nchw, name).grad)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(nhwc, name), getattr(nchw, name))
    layer = copy.deepcopy(nchw)
    assert torch.autograd.gradcheck(lambda t, w, b: layer(t.contiguous(memory_format=torch.channels_last)),
                                    (x[:8, :, :3, :3].clone().requires_grad_(), layer.weight, layer.bias))


def test_ghost_bn_output_takes_an_in_place_activation_without_a_rebase() -> None:
    """Blocks run their activation in place on the norm's output. The NCHW path's output must not be an
    autograd view of the batch norm's (N/S, C*S, H, W) result, or every in-place activation costs a
    CopySlices rebase (two activation-sized copies per layer in the backward pass); the gradients must
    be those of an out-of-place activation."""
    ghost = GhostBatchNorm(C, splits=4).double()
    _randomise_affine(ghost)
    x = _batch().double() * 3 + 1
    grad = torch.randn_like(x)
    grads = []
    for act in (nn.CELU(0.3, inplace=True), nn.CELU(0.3)):
        layer, inp = copy.deepcopy(ghost), x.clone().requires_grad_()
        y = layer(inp)
        assert not y._is_view()
        (act(y) * grad).sum().backward()
        grads.append((inp.grad, layer.weight.grad, layer.bias.grad))
    for in_place, out_of_place in zip(*grads):
        torch.testing.assert_close(in_place, out_of_place)


def test_ghost_bn_accepts_half_input_when_the_layer_is_fp32() -> None:
    ghost = GhostBatchNorm(C, splits=4)  # fp32 BN inside an fp16 model (fp16_bn32)
    x = _batch()
    y = ghost(x.half())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), GhostBatchNorm(C, splits=4)(x), rtol=1e-2, atol=1e-2)


def test_ghost_bn_rejects_a_batch_it_cannot_split_evenly() -> None:
    with pytest.raises(ValueError, match="equal splits"):
        GhostBatchNorm(C, splits=16)(_batch(n=24))


def test_registries_cover_the_config_choices() -> None:
    """Every norm and act option of conf/ names a registered layer (validation allows exactly those)."""
    conf = Path(__file__).resolve().parents[1] / "conf"
    norms = {yaml.safe_load(p.read_text()).get("kind", "batch") for p in (conf / "norm").glob("*.yaml")}
    acts = {yaml.safe_load(p.read_text()).get("kind", "relu") for p in (conf / "act").glob("*.yaml")}
    assert norms == set(NORM_LAYERS) and acts <= set(ACT_LAYERS) and len(acts) >= 4
    with pytest.raises(ValueError, match="norm.kind"):
        make_norm(NormConfig(kind="layer"))
    with pytest.raises(ValueError, match="act.kind"):
        make_act(ActConfig(kind="swish"))


def test_make_norm_builds_the_configured_layer() -> None:
    bn = make_norm(NormConfig(kind="batch", eps=1e-3, momentum=0.2))(C)
    assert type(bn) is nn.BatchNorm2d and bn.eps == 1e-3 and bn.momentum == 0.2
    assert torch.equal(bn.weight, torch.ones(C)) and torch.equal(bn.bias, torch.zeros(C))
    ghost = make_norm(NormConfig(kind="ghost", splits=16))(C)
    assert isinstance(ghost, GhostBatchNorm) and ghost.splits == 16
    assert isinstance(make_norm(NormConfig(kind="none"))(C), nn.Identity)


def test_uniform_scale_init_is_pytorch_0_4s_default() -> None:
    torch.manual_seed(0)
    bn = make_norm(NormConfig(scale_init="uniform"))(256)
    assert bn.weight.min() >= 0 and bn.weight.max() <= 1
    assert not torch.equal(bn.weight, torch.ones(256))
    assert torch.equal(bn.bias, torch.zeros(256))


def test_frozen_scale_is_one_and_not_trainable() -> None:
    bn = make_norm(NormConfig(kind="ghost", splits=2, frozen_scale=True, scale_init="uniform"))(C)
    assert torch.equal(bn.weight, torch.ones(C)) and not bn.weight.requires_grad
    assert bn.bias.requires_grad
    trainable = [p for p in bn.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == C  # beta only
    bn(_batch()).sum().backward()
    assert bn.weight.grad is None and bn.bias.grad is not None


def test_frozen_affine_is_identity_map_and_not_trainable() -> None:
    """Post 7: frozen_scale + frozen_bias = gamma 1, beta 0, nothing trainable; still normalises."""
    bn = make_norm(NormConfig(frozen_scale=True, frozen_bias=True))(C)
    assert torch.equal(bn.weight, torch.ones(C)) and torch.equal(bn.bias, torch.zeros(C))
    assert not any(p.requires_grad for p in bn.parameters())
    x = _batch().requires_grad_(True)
    y = bn(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-5)
    y.sum().backward()
    assert bn.weight.grad is None and bn.bias.grad is None


def test_make_act() -> None:
    assert isinstance(make_act(ActConfig(kind="relu"))(), nn.ReLU)
    gelu = make_act(ActConfig(kind="gelu"))(inplace=True)  # no in-place form: the flag is ignored
    x = torch.linspace(-4, 4, 41)
    torch.testing.assert_close(gelu(x), x * 0.5 * (1 + torch.erf(x / 2 ** 0.5)))  # x * Phi(x), the erf form
    celu = make_act(ActConfig(kind="celu", alpha=0.3))()
    assert isinstance(celu, nn.CELU) and celu.alpha == 0.3


def _correlated_images(n: int = 64) -> torch.Tensor:
    """Random images with correlated colours and neighbouring pixels (a 3x3 patch is far from white)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 34, 34, generator=gen, dtype=torch.float64)
    x = F.avg_pool2d(x, 3, stride=1) * 3 + 0.1 * x[:, :, 1:-1, 1:-1]  # spatial correlation
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.0, 1.0, 0.5], [0.2, 0.0, 0.8]], dtype=torch.float64)
    return (torch.einsum("dc,nchw->ndhw", mix, x) + 0.3).float()  # colour mixing and a non-zero mean


def _patch_moment(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = F.conv2d(images.double(), weight.double())  # no padding: exactly the stride-1 3x3 patches
    flat = out.transpose(0, 1).reshape(27, -1)
    return flat @ flat.T / (flat.shape[1] - 1)


def test_whitened_patches_have_identity_second_moment() -> None:
    images = _correlated_images()
    weight = patch_whitening_filter(images, eps=1e-8)
    assert weight.shape == (27, 3, 3, 3) and weight.dtype == torch.float32
    moment = _patch_moment(images, weight)
    torch.testing.assert_close(moment, torch.eye(27, dtype=torch.float64), rtol=0, atol=1e-3)


def test_whitening_eps_shrinks_the_small_eigenvalues() -> None:
    images, eps = _correlated_images(), 1e-2
    patches = F.unfold(images.double(), 3).transpose(1, 2).reshape(-1, 27)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / (patches.shape[0] - 1))
    assert eigenvalues.min() < 10 * eps  # the data must have directions eps actually damps
    moment = _patch_moment(images, patch_whitening_filter(images, eps))
    expected = (eigenvalues / (eigenvalues + eps)).flip(0)  # filters are ordered by decreasing eigenvalue
    torch.testing.assert_close(moment, torch.diag(expected), rtol=0, atol=1e-3)


def test_whitening_layer_is_a_fixed_conv_with_a_buffer() -> None:
    layer = Whitening(eps=1e-2)
    assert list(layer.parameters()) == [] and "weight" in dict(layer.named_buffers())
    images = _correlated_images(8)
    # Unfitted it refuses to run: it would silently train another network.
    with pytest.raises(RuntimeError, match="before fit"):
        layer(images)
    with unfitted_allowed(layer):  # for shape-only passes (MAC counting, warm-up)
        assert layer(images).shape == (8, 27, 32, 32)
    assert not layer.fitted
    layer.fit(images)
    torch.testing.assert_close(layer.weight, patch_whitening_filter(images, 1e-2))
    out = layer(images)
    assert out.shape == (8, 27, 32, 32)
    assert layer(images.double()).dtype == torch.float64  # the buffer follows the input's dtype


def test_airbench_whitening_is_2x2_eigenfilters_and_their_negations() -> None:
    """sota-facts 3: the 12 eigenvectors of the 2x2x3 patches' covariance scaled by 1/sqrt(lambda + 5e-4),
    then their negations: 24 filters, padding 0, whose first 12 outputs have second moment
    diag(lambda / (lambda + eps)) and whose last 12 are the first 12 negated."""
    images, eps = _correlated_images(), 5e-4
    layer = Whitening(eps, WHITENINGS["airbench2x2"], bias=True)
    assert layer.weight.shape == (24, 3, 2, 2) and [n for n, _ in layer.named_parameters()] == ["bias"]
    layer.fit(images)
    out = layer(images)
    assert out.shape == (64, 24, 31, 31)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])
    patches = F.unfold(images.double(), 2).transpose(1, 2).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / (patches.shape[0] - 1))
    flat = out[:, :12].double().transpose(0, 1).reshape(12, -1)
    moment = flat @ flat.T / (flat.shape[1] - 1)
    torch.testing.assert_close(moment, torch.diag((eigenvalues / (eigenvalues + eps)).flip(0)), rtol=0, atol=2e-3)


def test_whitening_bias_adds_to_every_output_and_freezes() -> None:
    images = _correlated_images(4)
    layer = Whitening(5e-4, WHITENINGS["airbench2x2"], bias=True)
    layer.fit(images)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(24.0))
    plain = F.conv2d(images, layer.weight)
    torch.testing.assert_close(layer(images), plain + torch.arange(24.0)[:, None, None])
    layer(images).sum().backward()
    assert layer.bias.grad is not None
    layer.bias.grad = None
    layer.freeze_bias()
    assert not layer.bias.requires_grad and layer(images).grad_fn is None  # nothing left to train here
    layer.freeze_bias(False)
    assert layer.bias.requires_grad


def test_page_whitening_keeps_its_published_shape() -> None:
    v = WHITENINGS["page3x3"]
    assert (v.kernel, v.negated, v.padding, v.images, v.out_channels) == (3, False, 1, 10_000, 27)
    a = WHITENINGS["airbench2x2"]
    assert (a.kernel, a.negated, a.padding, a.images, a.out_channels) == (2, True, 0, 5_000, 24)
