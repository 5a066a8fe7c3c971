"""Networks as data: every architecture of the journey is a ``NetSpec`` of named ``Block``s built by one
function (design.md, "Networks as data"), so an ablation is an edit of the spec, not new model code.

``build_model`` takes the normalisation and activation as injected factories (``ablate.layers``); a spec's
own ``norm``/``act`` only record what the network was *published* with, for ``build_published`` and the
``python -m ablate.models`` table. Run ``python -m ablate.models`` to list every registered network with
its trainable parameters and forward MACs per image.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ablate.config import ActConfig, ArchConfig, NormConfig
from ablate.layers import Whitening, make_act, make_norm, unfitted_allowed, whitening_variant

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[..., nn.Module]  # act_layer(inplace=False)


# --------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Block:
    """One named block of a network.

    kind    what to build, a key of BLOCK_BUILDERS:
            conv      bare conv (B1 prep from step 1_1)
            conv_bn   conv -> norm -> act, then an optional max-pool (B3 conv_bn / layer Lk)
            norm_act  norm -> act on the input width (the shortest path's left-over pre-activations)
            preact    B1 PreActBlock(c_in -> out, stride)
            residual  x + [conv_bn -> conv_bn](x) at the input width (B3 Residual)
            extra     one more conv_bn at the input width (B3 Extra)
            whiten    fixed patch whitening (NetSpec.whitening; Page's: 3 -> 27), then conv_bn(-> out) (B4 prep)
            whiten_act  fixed patch whitening with a learnable bias, then the activation, no norm
                      (airbench's first layer; its width is the whitening's, 24 for 2x2 + negations)
    out     output channels at full width; 0 keeps the input width (norm_act, residual, extra)
    kernel  conv kernel size
    stride  conv stride
    pool    max-pool size after the conv (0: none); NetSpec.pool_before_norm places it before the norm
    padding conv padding; None: kernel // 2 (a 'same' conv for odd kernels)
    scaled  whether the width multiplier applies (False: a width fixed by the patch, as the whitening's)
    """

    kind: str
    out: int = 0
    kernel: int = 3
    stride: int = 1
    pool: int = 0
    padding: Optional[int] = None
    scaled: bool = True


@dataclass(frozen=True)
class NetSpec:
    """A whole network: named blocks in order, then global pooling, a linear classifier and a logit scale.

    ``norm``/``act`` are the layers the network was published with; they are used only to print, count
    and build the published network (``build_published``). A training run injects its own.
    """

    name: str
    blocks: tuple[tuple[str, Block], ...]
    head: str = "max"  # 'max' global max-pool | 'max_avg' concat of global max- and avg-pool (B1)
    fc_bias: bool = False
    logit_scale: float = 1.0
    pool_before_norm: bool = False  # conv -> pool -> norm -> act in pooling conv_bn blocks (A3 8.2b)
    whiten_eps: float = 1e-2
    whitening: str = "page3x3"  # the variant of every whitening layer: a key of ablate.layers.WHITENINGS
    preact_shortcut: str = "activated"  # identity shortcut adds act(norm(x)) ('activated') or x ('input'), E6
    input_scale: float = 1.0  # the input is multiplied by this first (Post 7 simple net: 1/sqrt(2)); 1: no layer
    norm: NormConfig = field(default_factory=NormConfig)
    act: ActConfig = field(default_factory=ActConfig)
    description: str = ""


# --------------------------------------------------------------------------------------------------
# Modules the blocks are made of


class PreActBlock(nn.Module):
    """B1 pre-activation block: a = act(norm(x)); out = [conv -> norm -> act -> conv](a) + shortcut.

    The shortcut is a 1x1 conv (stride s) on ``a`` when the shape changes; otherwise identity on ``a``
    (Page's DAWN_net, ``shortcut_from_input=False``) or on ``x`` (bkj's PreActBlock), docs/references.md E6.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm_layer: NormLayer, act_layer: ActLayer,
                 shortcut_from_input: bool = False) -> None:
        super().__init__()
        self.norm1, self.act1 = norm_layer(c_in), act_layer()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.norm2, self.act2 = norm_layer(c_out), act_layer(inplace=True)  # on norm2's fresh output
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        changes_shape = stride != 1 or c_in != c_out
        self.projection = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if changes_shape else None
        self.shortcut_from_input = shortcut_from_input

    def forward(self, x: Tensor) -> Tensor:
        a = self.act1(self.norm1(x))
        branch = self.conv2(self.act2(self.norm2(self.conv1(a))))
        if self.projection is not None:
            return branch + self.projection(a)
        return branch + (x if self.shortcut_from_input else a)


class Residual(nn.Module):
    """x + branch(x), with no activation after the add (B3)."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class GlobalMaxPool(nn.Module):
    expansion = 1

    def forward(self, x: Tensor) -> Tensor:
        return torch.amax(x, dim=(2, 3))


class GlobalMaxAvgPool(nn.Module):
    """Concatenation of global max- and average-pooling (B1's concat pool): doubles the features."""

    expansion = 2

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([torch.amax(x, dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


HEAD_POOLS: dict[str, type[nn.Module]] = {"max": GlobalMaxPool, "max_avg": GlobalMaxAvgPool}


class Mul(nn.Module):
    """Multiply by a constant: the logit scale (0.125 in Post 4, 1/16 in Post 8) or the input scale (Post 7)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def extra_repr(self) -> str:
        return f"{self.scale}"

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Network(nn.Sequential):
    """The built network: named blocks in spec order, then ``head`` (pool -> linear -> logit scale)."""

    def __init__(self, spec: NetSpec, layers: "OrderedDict[str, nn.Module]") -> None:
        super().__init__(layers)
        self.spec = spec


# --------------------------------------------------------------------------------------------------
# The builder


@dataclass(frozen=True)
class _Ctx:
    """What every block builder needs besides its own block: the injected layers and the spec's switches."""

    spec: NetSpec
    norm: NormLayer
    act: ActLayer


def _conv(c_in: int, c_out: int, block: Block) -> nn.Conv2d:
    padding = block.kernel // 2 if block.padding is None else block.padding
    return nn.Conv2d(c_in, c_out, block.kernel, block.stride, padding=padding, bias=False)


def _build_conv(block: Block, c_in: int, c_out: int, ctx: _Ctx) -> nn.Module:
    return _conv(c_in, c_out, block)


def _build_conv_bn(block: Block, c_in: int, c_out: int, ctx: _Ctx) -> nn.Module:
    # In place: the act's input is the norm's output (or the conv's, without a norm), read by nothing else.
    layers = [("conv", _conv(c_in, c_out, block)), ("norm", ctx.norm(c_out)), ("act", ctx.act(inplace=True))]
    if block.pool:
        # Pooling before the norm normalises a 4x smaller tensor (A3 8.2b): same op, cheaper.
        layers.insert(1 if ctx.spec.pool_before_norm else 3, ("pool", nn.MaxPool2d(block.pool)))
    return nn.Sequential(OrderedDict(layers))


def _build_norm_act(block: Block, c_in: int, c_out: int, ctx: _Ctx) -> nn.Module:
    return nn.Sequential(OrderedDict([("norm", ctx.norm(c_in)), ("act", ctx.act())]))


SHORTCUT_FROM_INPUT: dict[str, bool] = {"activated": False, "input": True}  # NetSpec.preact_shortcut


def _build_preact(block: Block, c_in: int, c_out: int, ctx: _Ctx) -> nn.Module:
    from_input = _lookup(SHORTCUT_FROM_INPUT, ctx.spec.preact_shortcut, "preact_shortcut")
    return PreActBlock(c_in, c_out, block.stride, ctx.norm, ctx.act, shortcut_from_input=from_input)


def _build_residual(block: Block, c_in: int, c_out: int, ctx: _Ctx) -> nn.Module:
    same = Block("conv_bn", kernel=block.kernel)
    return Residual(nn.Sequential(OrderedDict([
        ("res1", _build_conv_bn(same, c_in, c_in, ctx)),
        ("res2", _build_conv_bn(same, c_in, c_in, ctx)),
    ])))


def _build_whiten(block: Block, c_in: int, c_out: int, ctx: _Ctx) -> nn.Module:
    # The whitening conv's outputs are fixed by the input patch (27 for 3x3x3), never by the width multiplier.
    variant = whitening_variant(ctx.spec.whitening)
    stem = _build_conv_bn(block, variant.out_channels, c_out, ctx)
    whiten = Whitening(ctx.spec.whiten_eps, variant)
    return nn.Sequential(OrderedDict([("whiten", whiten), *stem.named_children()]))


def _build_whiten_act(block: Block, c_in: int, c_out: int, ctx: _Ctx) -> nn.Module:
    # airbench: no norm after the whitening (the zoo's step 1 drops it); its learnable bias is what the
    # norm's bias was, and the activation sees the whitened patches directly.
    whiten = Whitening(ctx.spec.whiten_eps, whitening_variant(ctx.spec.whitening), bias=True)
    return nn.Sequential(OrderedDict([("whiten", whiten), ("act", ctx.act())]))


BLOCK_BUILDERS: dict[str, Callable[[Block, int, int, _Ctx], nn.Module]] = {
    "conv": _build_conv,
    "conv_bn": _build_conv_bn,
    "norm_act": _build_norm_act,
    "preact": _build_preact,
    "residual": _build_residual,
    "extra": _build_conv_bn,
    "whiten": _build_whiten,
    "whiten_act": _build_whiten_act,
}


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, round(channels * width_mult))


def _lookup(registry: dict, key: str, what: str) -> Any:
    try:
        return registry[key]
    except KeyError:
        raise ValueError(f"unknown {what} {key!r}; choose one of {', '.join(registry)}") from None


def _out_channels(block: Block, channels: int, spec: NetSpec, width_mult: float) -> int:
    """A block's output width: the whitening's own for ``whiten_act``, else ``out`` (scaled unless the
    block says not), else the input width."""
    if block.kind == "whiten_act":
        return whitening_variant(spec.whitening).out_channels
    if not block.out:
        return channels
    return _scaled(block.out, width_mult) if block.scaled else block.out


def build_model(spec: NetSpec, norm_layer: NormLayer, act_layer: ActLayer, width_mult: float = 1.0) -> nn.Module:
    """Build ``spec`` with the injected layers; every channel width is multiplied by ``width_mult``."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    ctx = _Ctx(spec, norm_layer, act_layer)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if spec.input_scale != 1:
        layers["input_scale"] = Mul(spec.input_scale)
    channels = 3
    for name, block in spec.blocks:
        c_out = _out_channels(block, channels, spec, width_mult)
        layers[name] = _lookup(BLOCK_BUILDERS, block.kind, "block kind")(block, channels, c_out, ctx)
        channels = c_out
    pool = _lookup(HEAD_POOLS, spec.head, "head")()
    layers["head"] = nn.Sequential(OrderedDict([
        ("pool", pool),
        ("linear", nn.Linear(channels * pool.expansion, 10, bias=spec.fc_bias)),
        ("scale", Mul(spec.logit_scale)),
    ]))
    return Network(spec, layers)


def build_published(name: str, width_mult: float = 1.0) -> nn.Module:
    """A registered network with the norm and activation it was published with."""
    spec = _lookup(REGISTRY, name, "network")
    return build_model(spec, make_norm(spec.norm), make_act(spec.act), width_mult)


# --------------------------------------------------------------------------------------------------
# Spec edits from the config


def _stem_conv(block: Block, spec: NetSpec) -> Block:
    if block.kind == "whiten":
        return Block("conv_bn", block.out)
    if block.kind == "whiten_act":
        # airbench's base (cifar10-zoo main0): a learned conv of the whitening's shape (2x2, 3 -> 24, no
        # padding), whose BN supplies the bias; its width stays the whitening's at every scale.
        variant = whitening_variant(spec.whitening)
        return Block("conv_bn", variant.out_channels, kernel=variant.kernel, padding=variant.padding, scaled=False)
    return block


def _stem_whiten(block: Block, spec: NetSpec) -> Block:
    return Block("whiten", block.out, kernel=1) if block.kind in ("conv", "conv_bn") else block


def _stem_whiten_act(block: Block, spec: NetSpec) -> Block:
    return Block("whiten_act") if block.kind in ("conv", "conv_bn", "whiten") else block


STEMS: dict[str, Callable[[Block, NetSpec], Block]] = {"conv": _stem_conv, "whiten": _stem_whiten,
                                                       "whiten_act": _stem_whiten_act}
_SPEC_FIELDS = ("pool_before_norm", "logit_scale", "whiten_eps", "whitening", "preact_shortcut")


def with_stem(spec: NetSpec, stem: str) -> NetSpec:
    """``spec`` with its first block turned into the ``stem`` kind (a key of STEMS)."""
    (prep_name, prep), *rest = spec.blocks
    return dataclasses.replace(spec, blocks=((prep_name, _lookup(STEMS, stem, "arch.stem")(prep, spec)), *rest))


def customise(spec: NetSpec, arch: ArchConfig) -> NetSpec:
    """``spec`` with the ArchConfig fields that are not None applied (the width is build_model's job).

    ``stem='conv'`` turns a whitening prep into a learned conv_bn (3x3 for Page's, the whitening's shape
    for airbench's); ``stem='whiten'`` turns a prep conv into whitening -> conv_bn 1x1 (Page's);
    ``stem='whiten_act'`` into whitening + bias -> activation (airbench's). The stem is always the first
    block. ``whitening`` picks the variant of every whitening layer (ablate.layers.WHITENINGS).
    """
    changes = {key: getattr(arch, key) for key in _SPEC_FIELDS if getattr(arch, key, None) is not None}
    spec = dataclasses.replace(spec, **changes)
    return spec if arch.stem is None else with_stem(spec, arch.stem)


def init_he(model: nn.Module) -> nn.Module:
    """Every conv and linear weight drawn from N(0, 2 / fan_in) (He et al.), the variance that keeps a
    ReLU net's pre-activations at the same scale layer after layer (Post 7's frozen-BN net)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return model


def init_dirac(model: nn.Module) -> nn.Module:
    """airbench's partial identity (sota-facts section 3): after PyTorch's own init, the first C_in output
    filters of every conv are the identity (torch's dirac_), so each conv starts by passing its input
    through on those channels: a residual path without a skip connection. The fixed whitening is not an
    nn.Conv2d and keeps its fitted filters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.dirac_(m.weight[:m.weight.shape[1]])
    return model


def _head_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def init_dirac_unit_head(model: nn.Module) -> nn.Module:
    """``init_dirac``, and the classifier's weight rescaled to unit standard deviation
    (airbench94_muon's ``reset``, paired with its logits divided by 256 instead of x 1/9)."""
    init_dirac(model)
    head = _head_linear(model)
    with torch.no_grad():
        head.weight /= head.weight.std()
    return model


INITS: dict[str, Callable[[nn.Module], nn.Module]] = {"default": lambda model: model, "he": init_he,
                                                      "dirac": init_dirac, "dirac_unit_head": init_dirac_unit_head}


def initialise(model: nn.Module, init: str) -> nn.Module:
    """Apply the ``arch.init`` scheme to a built model ('default' leaves PyTorch's own)."""
    return _lookup(INITS, init, "arch.init")(model)


def scale_invariant_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The conv weights whose output goes straight into a batch norm, by name (Post 6).

    Batch norm undoes any rescaling of such a weight, so the loss does not depend on its norm: the
    gradient is orthogonal to w, and the norm only sets how far a step turns it (the effective step).
    A max-pool in between keeps this true (it commutes with a positive scale), so the pooling conv_bn
    blocks count in either order; a conv whose output is added to a shortcut before any norm does not.
    """
    found: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, PreActBlock):  # conv1 -> norm2 inside the block
            pairs = [("conv1", module.conv1, module.norm2)]
        elif isinstance(module, nn.Sequential):
            children = [(n, c) for n, c in module.named_children() if not isinstance(c, nn.MaxPool2d)]
            pairs = [(n, c, nxt) for (n, c), (_, nxt) in zip(children, children[1:])]
        else:
            continue
        for name, conv, norm in pairs:
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.modules.batchnorm._BatchNorm):
                found[f"{prefix}.{name}.weight" if prefix else f"{name}.weight"] = conv.weight
    return found


# --------------------------------------------------------------------------------------------------
# Counting


def count_params(model: nn.Module) -> int:
    """Trainable parameters (frozen BN scales and the fixed whitening filter excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_weights(model: nn.Module) -> int:
    """Trainable parameters plus the fixed whitening filters: what airbench counts (1,971,640 for
    airbench94, cifar10-zoo README): every conv and linear weight, the BN biases, the whitening bias and
    its filter, which is fitted from data. Frozen BN scales and biases are constants (1 and 0) and stay
    out, as in ``count_params``."""
    return count_params(model) + sum(m.weight.numel() for m in model.modules() if isinstance(m, Whitening))


# Layers whose multiply-accumulates are counted. For each, one output element costs weight[0].numel()
# MACs: c_in/groups * k * k for a conv (the whitening buffer included), in_features for a linear layer.
_MAC_LAYERS = (nn.Conv2d, nn.Linear, Whitening)


def count_macs(model: nn.Module, image_size: int = 32) -> int:
    """Forward multiply-accumulates per image of conv and linear layers (one 1 x 3 x size x size input)."""
    total = 0

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        nonlocal total
        total += output[0].numel() * module.weight[0].numel()

    reference = next(itertools.chain(model.parameters(), model.buffers()))
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _MAC_LAYERS)]
    was_training = model.training
    try:
        model.eval()  # one image: batch statistics (and ghost-BN splits) would not make sense
        with torch.no_grad(), unfitted_allowed(model):  # only shapes count
            model(torch.zeros(1, 3, image_size, image_size, device=reference.device, dtype=reference.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


# --------------------------------------------------------------------------------------------------
# The registry

B1_WIDTHS = (64, 128, 256, 256)  # B1: the last stage stays at 256
B3_WIDTHS = (64, 128, 256, 512)  # prep, L1, L2, L3
B3_LAYERS = (1, 2, 3)


def _norm_2018() -> NormConfig:
    """BN as published in Posts 1-4.5: PyTorch 0.4's U[0,1] scales (E11). A fresh copy per spec, since
    NormConfig is mutable and specs must not share it."""
    return NormConfig(scale_init="uniform")


def _preact18(name: str, prep_norm_act: bool, description: str) -> NetSpec:
    """B1: prep conv (+ BN-ReLU in the original), then 4 stages of 2 PreActBlocks, concat pool, FC+bias."""
    blocks = [("prep", Block("conv_bn" if prep_norm_act else "conv", B1_WIDTHS[0]))]
    for stage, width in enumerate(B1_WIDTHS, 1):
        for i in range(2):
            stride = 2 if stage > 1 and i == 0 else 1
            blocks.append((f"layer{stage}_block{i}", Block("preact", width, stride=stride)))
    return NetSpec(name, tuple(blocks), head="max_avg", fc_bias=True, norm=_norm_2018(),
                   description=description)


def _shortest_path_repeat() -> NetSpec:
    """4_1: the step-3 network (B1 without its prep BN-ReLU) with every residual branch removed:
    115,786 trainable parameters.

    With Page's activated identity (E6) a block without its branch is its pre-activation, and a
    downsampling block the 1x1 stride-2 projection after it. The prep is a plain conv, as in B2 and
    Page's EXP18 notebook (``DAWN_net(block=shortcut_block)``): the first BN-ReLU is block 1's own.
    """
    # One BN-ReLU per removed B1 block, back to back (B2: "at each block, BN-ReLU").
    blocks = [("prep", Block("conv", B1_WIDTHS[0]))]
    for stage, width in enumerate(B1_WIDTHS, 1):
        for i in range(2):
            blocks.append((f"layer{stage}_block{i}", Block("norm_act")))
            if stage > 1 and i == 0:
                blocks.append((f"layer{stage}_block{i}_conv", Block("conv", width, kernel=1, stride=2)))
    return NetSpec("shortest_path_repeat", tuple(blocks), head="max_avg", fc_bias=True,
                   norm=_norm_2018(), description="step 4_1 / B1 shortest path (branches removed)")


def _layers(widths: tuple[int, ...], kernel: int = 3, stride: int = 1, pool: int = 2,
            residual: tuple[int, ...] = (), extra: tuple[int, ...] = ()) -> tuple[tuple[str, Block], ...]:
    """prep conv_bn(3 -> widths[0]), then layer k = conv_bn(-> widths[k]) followed by its optional
    Residual and Extra blocks, in that order (B3). Shared by the Post 4 shortest paths and the B3 family."""
    blocks = [("prep", Block("conv_bn", widths[0]))]
    for k, width in enumerate(widths[1:], 1):
        blocks.append((f"layer{k}", Block("conv_bn", width, kernel, stride, pool)))
        if k in residual:
            blocks.append((f"layer{k}_res", Block("residual")))
        if k in extra:
            blocks.append((f"layer{k}_extra", Block("extra")))
    return tuple(blocks)


def _shortest_path(name: str, description: str, widths: tuple[int, ...] = B1_WIDTHS, kernel: int = 3,
                   stride: int = 1, pool: int = 2, head: str = "max_avg") -> NetSpec:
    # Open in the facts: what 4_2 keeps of 4_1's BN-ReLUs. Chosen: one after each conv (= conv_bn blocks).
    # Steps 4_2-4_5 still use the 2018 published layers (U[0,1] BN scales, FC bias, logit scale 1).
    return NetSpec(name, _layers(widths, kernel, stride, pool), head=head, fc_bias=True,
                   norm=_norm_2018(), description=description)


def _backbone(name: str, description: str, widths: tuple[int, ...] = B3_WIDTHS,
              residual: tuple[int, ...] = (), extra: tuple[int, ...] = ()) -> NetSpec:
    """B3 backbone (step 4_6: BN scales start at 1, no FC bias, logits x 0.125) plus optional blocks."""
    return NetSpec(name, _layers(widths, residual=residual, extra=extra), head="max", fc_bias=False,
                   logit_scale=0.125, description=description)


def _family() -> list[NetSpec]:
    """B3's 15 networks: the backbone plus Extra or Residual blocks on every non-empty subset of L1-L3."""
    nets = [_backbone("backbone", "step 4_6 / Post 4 backbone (B3)")]
    for kind, title in (("extra", "Extra"), ("residual", "Residual")):
        for r in range(1, len(B3_LAYERS) + 1):
            for subset in itertools.combinations(B3_LAYERS, r):
                name = f"{kind}_" + "".join(f"l{k}" for k in subset)
                where = "+".join(f"L{k}" for k in subset)
                nets.append(_backbone(name, f"step 4_7 / {title}:{where}", **{kind: subset}))
    return nets


def _simple() -> NetSpec:
    """Post 7's 8-layer "simple" net (docs/references.md C, batch_norm_post.ipynb): input x 1/sqrt(2); prep
    conv_bn 3 -> 64; L1 64 -> 128, L2 128 -> 256, L3 256 -> 512, each conv_bn + 2x2 max-pool + one extra
    conv_bn; global max-pool (MaxPool 4 on the 4x4 map); classifier 512 -> 10 without bias (the post's
    1x1 conv on a 1x1 map is this Linear); logits x 0.125/sqrt(6). Published with BN whose affine map is
    frozen (gamma = 1, beta = 0), so its trainable parameters are the convs and the classifier only."""
    return NetSpec("simple", _layers(B3_WIDTHS, extra=B3_LAYERS), head="max", fc_bias=False,
                   logit_scale=0.125 / math.sqrt(6), input_scale=1 / math.sqrt(2),
                   norm=NormConfig(frozen_scale=True, frozen_bias=True),
                   description="Post 7 / batch-norm study 'simple' net, BN affine frozen")


AIRBENCH_WIDTHS = (64, 256, 256)  # sota-facts section 3: hlb-CIFAR10's widths with the last block 512 -> 256


def _airbench(name: str, description: str, logit_scale: float = 1 / 9) -> NetSpec:
    """airbench94's network (sota-facts section 3, cifar10-airbench legacy/airbench94.py): a fixed 2x2
    whitening 3 -> 24 with a learnable bias, GELU; three ConvGroups (conv -> max-pool 2 -> BN -> GELU ->
    conv -> BN -> GELU, no residuals) at 64/256/256; max-pool over the final 3x3 map (nn.MaxPool2d(3)
    there, the global max here: the same on a 3x3 map); Linear 256 -> 10 without bias; logits x 1/9.
    BN as published: scales frozen at 1, eps 1e-12, PyTorch momentum 0.4 (airbench's 0.6)."""
    blocks = [("stem", Block("whiten_act"))]
    for k, width in enumerate(AIRBENCH_WIDTHS, 1):
        blocks += [(f"layer{k}", Block("conv_bn", width, pool=2)), (f"layer{k}_extra", Block("extra"))]
    return NetSpec(name, tuple(blocks), head="max", fc_bias=False, logit_scale=logit_scale, pool_before_norm=True,
                   whitening="airbench2x2", whiten_eps=5e-4,
                   norm=NormConfig(frozen_scale=True, momentum=0.4, eps=1e-12), act=ActConfig(kind="gelu"),
                   description=description)


def _airbench_nets() -> list[NetSpec]:
    final = _airbench("airbench94", "step 9_1 on / airbench94 (2x2 whitening + negations, GELU, 64/256/256)")
    # The zoo's main0_network.py of 2024-03-01, whose 34 epochs its README table gives: the whitening's
    # place taken by a learned conv of its shape followed by BN (momentum 0.1 in PyTorch's sense, the zoo's
    # 0.9), whose 24 biases stand in for the whitening bias, so the count is the same 1,971,640.
    base = dataclasses.replace(with_stem(final, "conv"), name="airbench94_base",
                               norm=NormConfig(frozen_scale=True, momentum=0.1, eps=1e-12),
                               description="step 9_0 / airbench base: learned 2x2 conv 3->24 + BN stem")
    # airbench94_muon.py: the same layers; logits / 256 (its head divides by the feature count) after a
    # unit-std head init (arch.init=dirac_unit_head).
    muon = _airbench("airbench94_muon", "step 10 / airbench94_muon (logits / 256)", logit_scale=1 / 256)
    return [base, final, muon]


def _registry() -> dict[str, NetSpec]:
    nets = [
        _preact18("preact18_repeat", True, "step 0 / B1 pre-act ResNet-18, repeated BN-ReLU"),
        _preact18("preact18", False, "steps 1_1-3 / B1 without the prep BN-ReLU"),
        _shortest_path_repeat(),
        _shortest_path("shortest_path", "step 4_2 / shortest path, no repeated BN-ReLU",
                       kernel=1, stride=2, pool=0),
        _shortest_path("shortest_path_3x3", "step 4_3 / 3x3 stride-2 downsampling", stride=2, pool=0),
        _shortest_path("shortest_path_pool", "step 4_4 / 3x3 conv + 2x2 max-pool"),
        _shortest_path("shortest_path_wide", "step 4_5 / widths to 512, global max-pool",
                       widths=B3_WIDTHS, head="max"),
        *_family(),
        _simple(),
    ]
    registry = {spec.name: spec for spec in nets}
    resnet9 = dataclasses.replace(registry["residual_l1l3"], name="resnet9",
                                  description="step 4_9 on / ResNet9 = Residual:L1+L3")
    registry["resnet9"] = resnet9
    registry["backbone_2x"] = _backbone("backbone_2x", "A2 4.8 / backbone at 2x width",
                                        widths=tuple(2 * w for w in B3_WIDTHS))
    registry["resnet9_final"] = dataclasses.replace(
        with_stem(resnet9, "whiten"), name="resnet9_final",
        pool_before_norm=True, logit_scale=1 / 16, whiten_eps=1e-2,
        norm=NormConfig(kind="ghost", splits=16, frozen_scale=True), act=ActConfig(kind="celu", alpha=0.3),
        description="step 8_7 on / Post 8 final (B4)")
    registry.update({spec.name: spec for spec in _airbench_nets()})
    return registry


REGISTRY: dict[str, NetSpec] = _registry()


# --------------------------------------------------------------------------------------------------
# python -m ablate.models (ablate models)


def model_rows(pattern: str = "") -> list[dict]:
    """Every registered network whose name matches ``pattern`` (a shell-style pattern such as
    ``residual_*``, or a part of the name), at full scale: its weights (``count_weights``: trainable
    parameters and fixed whitening filters), the trainable parameters alone, forward MACs, description."""
    def matches(name: str) -> bool:
        return fnmatch.fnmatch(name, pattern) if any(c in pattern for c in "*?[") else pattern in name

    rows = []
    for name in (n for n in REGISTRY if matches(n)):
        model = build_published(name)
        rows.append(dict(network=name, params=count_weights(model), trainable=count_params(model),
                         macs=count_macs(model), description=REGISTRY[name].description))
    return rows


def format_table(rows: list[dict]) -> str:
    header = ("network", "params", "trainable", "MACs (M)", "description")
    cells = [(r["network"], f"{r['params']:,}", f"{r['trainable']:,}", f"{r['macs'] / 1e6:.1f}", r["description"])
             for r in rows]
    widths = [max(len(row[i]) for row in (header, *cells)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        name, *numbers, description = row
        return "  ".join([f"{name:<{widths[0]}}", *(f"{n:>{w}}" for n, w in zip(numbers, widths[1:])), description])

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, cells),
                      "(params: every weight, the fixed whitening filters included; trainable: what the optimiser "
                      "updates)"])


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="ablate models", description="The registered networks (the options of arch=...) at full scale: "
        "every weight, the trainable parameters, forward MACs for one image, and what each network is.")
    parser.add_argument("pattern", nargs="?", default="",
                        help="only networks whose name contains this, or matches it as a shell pattern (residual_*)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    args = parser.parse_args(argv)
    rows = model_rows(args.pattern)
    if not rows:
        parser.error(f"no network matches {args.pattern!r}; the networks: {', '.join(REGISTRY)}")
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
