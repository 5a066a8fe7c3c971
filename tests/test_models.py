"""Networks as data: published parameter/MAC counts, the builder's structure, customise, the table."""
from __future__ import annotations

import dataclasses
from functools import lru_cache

import pytest
import torch
from torch import nn

from ablate.config import ArchConfig, NormConfig, ActConfig
from ablate.layers import GhostBatchNorm, Whitening, make_act, make_norm
from ablate.models import REGISTRY, Block, PreActBlock, build_model, build_published, count_macs, \
    count_params, count_weights, customise, init_dirac, init_dirac_unit_head, main

# B3 of docs/references.md: trainable parameters (BN gamma and beta included) and forward MACs in millions.
B3 = {
    "backbone": (1_557_056, 228),
    "extra_l1": (1_704_768, 266),
    "extra_l2": (2_147_392, 266),
    "extra_l3": (3_917_376, 266),
    "extra_l1l2": (2_295_104, 304),
    "extra_l1l3": (4_065_088, 304),
    "extra_l2l3": (4_507_712, 304),
    "extra_l1l2l3": (4_655_424, 342),
    "residual_l1": (1_852_480, 304),
    "residual_l2": (2_737_728, 304),
    "residual_l3": (6_277_696, 304),
    "residual_l1l2": (3_033_152, 379),
    "residual_l1l3": (6_573_120, 379),
    "residual_l2l3": (7_458_368, 379),
    "residual_l1l2l3": (7_753_792, 455),
    "resnet9": (6_573_120, 379),
    "backbone_2x": (6_210_688, 910),
}
# Other published counts (B1, B4) and approximate MACs (within 1%).
PARAMS = {"preact18": 5_205_834, "preact18_repeat": 5_205_962, "resnet9_final": 6_570_880,
          # B2 / EXP18 cell 21: the step-3 net without its branches, prep conv with no BN-ReLU.
          "shortest_path_repeat": 115_786}
# Post 7 "simple" net, worked by hand: convs 3*64*9 + 64*128*9 + 128*128*9 + 128*256*9 + 256*256*9
# + 256*512*9 + 512*512*9 = 1,728 + 73,728 + 147,456 + 294,912 + 589,824 + 1,179,648 + 2,359,296
# = 4,646,592, classifier 512*10 = 5,120 (no bias), BN 0 (affine frozen): 4,651,712. That is
# extra_l1l2l3's 4,655,424 minus its 2 * (64 + 2*128 + 2*256 + 2*512) = 3,712 BN parameters.
SIMPLE_PARAMS = 4_651_712
APPROX_MACS = {"preact18": 460e6, "preact18_repeat": 460e6, "resnet9_final": 380e6}

BATCH_NORM = make_norm(NormConfig())
RELU = make_act(ActConfig())


@lru_cache(maxsize=None)
def _published_counts(name: str) -> tuple[int, int]:
    model = build_published(name)
    return count_params(model), count_macs(model)


def test_registry_names() -> None:
    family = ["backbone"] + [f"{kind}_{s}" for kind in ("extra", "residual")
                             for s in ("l1", "l2", "l3", "l1l2", "l1l3", "l2l3", "l1l2l3")]
    assert len(family) == 15
    expected = {*family, "preact18_repeat", "preact18", "shortest_path_repeat", "shortest_path",
                "shortest_path_3x3", "shortest_path_pool", "shortest_path_wide", "resnet9", "backbone_2x",
                "resnet9_final", "simple", "airbench94_base", "airbench94", "airbench94_muon"}
    assert set(REGISTRY) == expected
    assert all(name == spec.name for name, spec in REGISTRY.items())


@pytest.mark.parametrize("name", list(B3))
def test_b3_params_and_macs(name: str) -> None:
    params, macs = _published_counts(name)
    assert params == B3[name][0]
    assert round(macs / 1e6) == B3[name][1]


@pytest.mark.parametrize("name", list(PARAMS))
def test_b1_b4_params_and_macs(name: str) -> None:
    params, macs = _published_counts(name)
    assert params == PARAMS[name]
    if name in APPROX_MACS:
        assert macs == pytest.approx(APPROX_MACS[name], rel=0.01)


def test_resnet9_final_counts_the_whitening_conv_but_not_its_weights() -> None:
    # 729 fixed whitening weights, 27*64 learnable 1x1 weights and BN betas only; MACs include the
    # whitening conv, 32*32*27*27, on top of ResNet9's (its 1x1 27->64 costs what a 3x3 3->64 does).
    params, macs = _published_counts("resnet9_final")
    assert macs == _published_counts("resnet9")[1] + 32 * 32 * 27 * 27 == 379_261_952 + 746_496
    model = build_published("resnet9_final")
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith("whiten.weight")) == 729


def test_simple_net_of_post_7() -> None:
    model = build_published("simple")
    assert count_params(model) == SIMPLE_PARAMS == _published_counts("extra_l1l2l3")[0] - 2 * 1_856
    assert count_macs(model) == _published_counts("extra_l1l2l3")[1]  # the Mul layers cost no MACs
    assert [name for name, _ in model.named_children()] == \
        ["input_scale", "prep", "layer1", "layer1_extra", "layer2", "layer2_extra", "layer3", "layer3_extra",
         "head"]
    assert model.input_scale.scale == pytest.approx(2 ** -0.5)
    assert model.head.scale.scale == pytest.approx(0.125 / 6 ** 0.5)
    assert model.head.linear.bias is None
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 7 and all(not b.weight.requires_grad and not b.bias.requires_grad for b in bns)
    assert all(b.weight.eq(1).all() and b.bias.eq(0).all() for b in bns)
    x = torch.randn(2, 3, 32, 32)  # the input scale is the first thing applied
    model.eval()
    scaled = dataclasses.replace(REGISTRY["simple"], input_scale=1.0)
    plain = build_model(scaled, make_norm(scaled.norm), RELU)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert torch.allclose(model(x), plain(x * 2 ** -0.5), atol=1e-6)
    # the simple net without BN (the stress test's other arm) trains only its convs and classifier too
    assert count_params(build_model(REGISTRY["simple"], make_norm(NormConfig(kind="none")), RELU)) == SIMPLE_PARAMS
    # input_scale 1 adds no layer (every other network)
    assert all("input_scale" not in dict(build_published(n, 1 / 8).named_children()) for n in ("resnet9", "backbone"))


def _forward_backward(model: nn.Module, batch: int) -> None:
    x = torch.randn(batch, 3, 32, 32)
    for m in model.modules():
        if isinstance(m, Whitening):
            m.fit(x)
    out = model(x)
    assert out.shape == (batch, 10)
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_network_trains_at_one_eighth_width(name: str) -> None:
    torch.manual_seed(0)
    _forward_backward(build_model(REGISTRY[name], BATCH_NORM, RELU, width_mult=1 / 8), batch=4)


def test_published_final_network_with_ghost_bn() -> None:
    torch.manual_seed(0)
    model = build_published("resnet9_final", width_mult=1 / 8)
    ghosts = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(ghosts) == 8 and all(g.splits == 16 and not g.weight.requires_grad for g in ghosts)
    acts = [m for m in model.modules() if isinstance(m, (nn.CELU, nn.ReLU))]
    assert len(acts) == 8 and all(isinstance(m, nn.CELU) and m.alpha == 0.3 for m in acts)
    _forward_backward(model, batch=16)
    with pytest.raises(ValueError):
        model(torch.randn(4, 3, 32, 32))


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_quarter_width_resnet9() -> None:
    convs = _convs(build_model(REGISTRY["resnet9"], BATCH_NORM, RELU, width_mult=1 / 4))
    widths = [convs[f"{layer}.conv"].out_channels for layer in ("prep", "layer1", "layer2", "layer3")]
    assert widths == [16, 32, 64, 128]
    final = build_published("resnet9_final", width_mult=1 / 4)
    assert isinstance(final.prep.whiten, Whitening) and final.prep.whiten.weight.shape == (27, 3, 3, 3)
    assert (final.prep.conv.in_channels, final.prep.conv.out_channels, final.prep.conv.kernel_size) == \
        (27, 16, (1, 1))
    assert final.head.linear.in_features == 128


def test_top_level_children_follow_the_spec() -> None:
    model = build_published("resnet9")
    assert [name for name, _ in model.named_children()] == \
        ["prep", "layer1", "layer1_res", "layer2", "layer3", "layer3_res", "head"]
    extra = build_published("extra_l1l2l3")
    assert [name for name, _ in extra.named_children()] == \
        ["prep", "layer1", "layer1_extra", "layer2", "layer2_extra", "layer3", "layer3_extra", "head"]


def _child_types(block: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in block.named_children()]


def test_pool_before_norm_orders_the_pooling_layers() -> None:
    final = build_published("resnet9_final", width_mult=1 / 8)
    for layer in ("layer1", "layer2", "layer3"):
        assert _child_types(getattr(final, layer)) == \
            [("conv", nn.Conv2d), ("pool", nn.MaxPool2d), ("norm", GhostBatchNorm), ("act", nn.CELU)]
    resnet9 = build_published("resnet9", width_mult=1 / 8)
    assert _child_types(resnet9.layer2) == \
        [("conv", nn.Conv2d), ("norm", nn.BatchNorm2d), ("act", nn.ReLU), ("pool", nn.MaxPool2d)]
    # The switch is a spec field: customise flips it both ways.
    flipped = build_model(customise(REGISTRY["resnet9"], ArchConfig(pool_before_norm=True)), BATCH_NORM, RELU, 1 / 8)
    assert [name for name, _ in flipped.layer2.named_children()] == ["conv", "pool", "norm", "act"]
    unflipped = build_model(customise(REGISTRY["resnet9_final"], ArchConfig(pool_before_norm=False)),
                            BATCH_NORM, RELU, 1 / 8)
    assert [name for name, _ in unflipped.layer2.named_children()] == ["conv", "norm", "act", "pool"]


def test_customise_conv_stem_on_the_final_network() -> None:
    spec = customise(REGISTRY["resnet9_final"], ArchConfig(stem="conv"))
    published = build_model(spec, make_norm(spec.norm), make_act(spec.act))
    assert not any(isinstance(m, Whitening) for m in published.modules())
    conv = published.prep.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 64, (3, 3))
    # A 3x3x3->64 conv has as many weights as the 27->64 1x1 it replaces, and the 2,240 BN scales stay
    # frozen with the published norm: ResNet9's 6,573,120 - 2,240.
    assert count_params(published) == 6_573_120 - 2_240 == 6_570_880
    # With ordinary (trainable-scale) BN injected it is ResNet9 exactly.
    assert count_params(build_model(spec, BATCH_NORM, RELU)) == 6_573_120
    # The rest of the Post 8 spec is untouched.
    assert spec.pool_before_norm and spec.logit_scale == 1 / 16 and spec.blocks[1:] == REGISTRY["resnet9_final"].blocks[1:]


def test_customise_whiten_stem_and_scalars() -> None:
    arch = ArchConfig(stem="whiten", logit_scale=0.25, whiten_eps=1e-3, preact_shortcut="input")
    spec = customise(REGISTRY["resnet9"], arch)
    assert spec.blocks[0] == ("prep", Block("whiten", 64, kernel=1))
    assert (spec.logit_scale, spec.whiten_eps, spec.preact_shortcut) == (0.25, 1e-3, "input")
    model = build_model(spec, BATCH_NORM, RELU)
    assert model.prep.whiten.eps == 1e-3 and count_params(model) == 6_573_120
    # None keeps the registered values.
    assert customise(REGISTRY["resnet9_final"], ArchConfig()) == REGISTRY["resnet9_final"]
    with pytest.raises(ValueError, match="arch.stem"):
        customise(REGISTRY["resnet9"], ArchConfig(stem="patchify"))


def test_logit_scale_multiplies_the_logits() -> None:
    x = torch.randn(2, 3, 32, 32)
    spec = REGISTRY["backbone"]
    outputs = []
    for scale in (spec.logit_scale, 1.0):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(spec, logit_scale=scale), BATCH_NORM, RELU, 1 / 8).eval()
        outputs.append(model(x))
    assert spec.logit_scale == 0.125
    torch.testing.assert_close(outputs[0], outputs[1] * 0.125)


def test_heads() -> None:
    preact = build_published("preact18", width_mult=1 / 8)
    assert preact.head.linear.in_features == 2 * 32 and preact.head.linear.bias is not None
    backbone = build_published("backbone", width_mult=1 / 8)
    assert backbone.head.linear.in_features == 64 and backbone.head.linear.bias is None
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(preact.head.pool(x), torch.cat([x.amax((2, 3)), x.mean((2, 3))], 1))


def test_published_layers_of_the_2018_networks() -> None:
    for name in ("preact18", "shortest_path_pool"):
        scales = [m.weight for m in build_published(name).modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(s.min() >= 0 and s.max() <= 1 for s in scales)
        assert not all(torch.equal(s, torch.ones_like(s)) for s in scales)  # U[0,1], not PyTorch's 1
    scales = [m.weight for m in build_published("backbone").modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(s, torch.ones_like(s)) for s in scales)


@pytest.mark.parametrize("shortcut_from_input", [False, True])
def test_preact_identity_shortcut(shortcut_from_input: bool) -> None:
    block = PreActBlock(8, 8, 1, BATCH_NORM, RELU, shortcut_from_input).eval()
    nn.init.zeros_(block.conv2.weight)  # no branch: the output is the shortcut alone
    x = torch.randn(2, 8, 6, 6)
    expected = x if shortcut_from_input else block.act1(block.norm1(x))
    torch.testing.assert_close(block(x), expected)
    down = PreActBlock(8, 16, 2, BATCH_NORM, RELU, shortcut_from_input).eval()
    nn.init.zeros_(down.conv2.weight)  # the projection always sees the activated input
    torch.testing.assert_close(down(x), down.projection(down.act1(down.norm1(x))))
    assert (down.projection.kernel_size, down.projection.stride) == ((1, 1), (2, 2))


def test_shortest_path_steps() -> None:
    def kinds(name: str) -> list[str]:
        return [block.kind for _, block in REGISTRY[name].blocks]

    # 4_1 keeps a pre-activation for each of B1's 8 blocks after a plain prep conv; 4_2 has none left.
    assert kinds("shortest_path_repeat")[0] == "conv"
    assert kinds("shortest_path_repeat").count("norm_act") == 8
    assert kinds("shortest_path") == ["conv_bn"] * 4
    convs = lambda name: [(c.kernel_size[0], c.stride[0], c.out_channels)  # noqa: E731
                          for c in _convs(build_published(name)).values()][1:]
    assert convs("shortest_path_repeat") == convs("shortest_path") == [(1, 2, 128), (1, 2, 256), (1, 2, 256)]
    assert convs("shortest_path_3x3") == [(3, 2, 128), (3, 2, 256), (3, 2, 256)]
    assert convs("shortest_path_pool") == [(3, 1, 128), (3, 1, 256), (3, 1, 256)]
    assert convs("shortest_path_wide") == [(3, 1, 128), (3, 1, 256), (3, 1, 512)]
    assert REGISTRY["shortest_path_pool"].head == "max_avg" and REGISTRY["shortest_path_wide"].head == "max"


def test_unknown_names_are_rejected() -> None:
    bad = dataclasses.replace(REGISTRY["backbone"], blocks=(("prep", Block("dense", 64)),))
    with pytest.raises(ValueError, match="block kind"):
        build_model(bad, BATCH_NORM, RELU)
    with pytest.raises(ValueError, match="network"):
        build_published("resnet18")


def test_main_lists_every_network(capsys: pytest.CaptureFixture[str]) -> None:
    main([])
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines[2:-1]]
    assert listed == list(REGISTRY)
    resnet9 = next(line for line in lines if line.startswith("resnet9 "))
    assert "6,573,120" in resnet9 and "379.3" in resnet9
    assert "115,786" in next(line for line in lines if line.startswith("shortest_path_repeat "))
    # airbench94: 1,971,640 weights (the cifar10-zoo README's count), 1,971,352 trained, ~118 M MACs (sota-facts 5)
    assert next(line for line in lines if line.startswith("airbench94 ")).split()[1:4] == \
        ["1,971,640", "1,971,352", "118.1"]
    assert next(line for line in lines if line.startswith("airbench94_base ")).split()[1:3] == \
        ["1,971,640", "1,971,640"]


def test_main_filters_by_name_and_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    main(["residual_l1*", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["network"] for r in rows] == ["residual_l1", "residual_l1l2", "residual_l1l3", "residual_l1l2l3"]
    assert next(r for r in rows if r["network"] == "residual_l1l3")["params"] == 6_573_120  # = resnet9
    main(["airbench"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:-1]]
    assert listed == ["airbench94_base", "airbench94", "airbench94_muon"]
    with pytest.raises(SystemExit) as exit_:
        main(["nosuch"])
    assert exit_.value.code == 2 and "no network matches 'nosuch'" in capsys.readouterr().err


# airbench94 by hand (sota-facts 3): whitening 24 x 3 x 2 x 2 = 288 fixed + 24 bias; ConvGroups
# 24->64: 13,824 + 36,864; 64->256: 147,456 + 589,824; 256->256: 2 x 589,824; BN biases 2 x (64 + 256
# + 256) = 1,152; head 256 x 10 = 2,560. 288 + 24 + 50,688 + 737,280 + 1,179,648 + 1,152 + 2,560.
AIRBENCH_WEIGHTS = 288 + 24 + 13_824 + 36_864 + 147_456 + 589_824 + 2 * 589_824 + 1_152 + 2_560


def test_airbench94_counts_every_weight_the_zoo_counts() -> None:
    """cifar10-zoo README: 1,971,640 parameters, the 288 fixed whitening weights included (not trained);
    the frozen BN scales (1,152 ones) are not counted. The base network (step 9_0) has the same count:
    its learned 2x2 conv has the whitening's 288 weights and its BN the 24 biases of the whitening's."""
    assert AIRBENCH_WEIGHTS == 1_971_640
    for name, trainable in (("airbench94", 1_971_352), ("airbench94_muon", 1_971_352), ("airbench94_base", 1_971_640)):
        model = build_published(name)
        assert (count_weights(model), count_params(model)) == (1_971_640, trainable), name
    assert count_macs(build_published("airbench94")) == pytest.approx(118e6, rel=0.01)  # sota-facts 5: 118 M MAC


def test_airbench94_layers_follow_the_published_network() -> None:
    model = build_published("airbench94")
    whiten = model.stem.whiten
    assert isinstance(whiten, Whitening) and whiten.weight.shape == (24, 3, 2, 2) and whiten.bias.shape == (24,)
    assert whiten.variant.padding == 0 and whiten.eps == 5e-4 and whiten.variant.images == 5_000
    assert [type(m) for m in model.stem.children()] == [Whitening, nn.GELU]  # no BN after the whitening
    for k, width in enumerate((64, 256, 256), 1):
        assert _child_types(getattr(model, f"layer{k}")) == \
            [("conv", nn.Conv2d), ("pool", nn.MaxPool2d), ("norm", nn.BatchNorm2d), ("act", nn.GELU)]
        assert _child_types(getattr(model, f"layer{k}_extra")) == \
            [("conv", nn.Conv2d), ("norm", nn.BatchNorm2d), ("act", nn.GELU)]
        assert getattr(model, f"layer{k}").conv.out_channels == width
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not b.weight.requires_grad and b.momentum == 0.4 and b.eps == 1e-12 for b in bns)
    assert model.head.linear.in_features == 256 and model.head.linear.bias is None
    assert model.head.scale.scale == pytest.approx(1 / 9)
    whiten.fit(torch.randn(8, 3, 32, 32))
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # 31 -> 15 -> 7 -> 3 -> global max


def test_airbench_base_stem_is_a_learned_conv_of_the_whitening_shape() -> None:
    base = build_published("airbench94_base", width_mult=1 / 4)
    conv = base.stem.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (3, 24, (2, 2), (0, 0))
    assert base.stem.norm.momentum == pytest.approx(0.1) and not base.stem.norm.weight.requires_grad
    # arch.stem switches between the two, both ways; the whitening keeps its 24 outputs at any width
    spec = customise(REGISTRY["airbench94_base"], ArchConfig(stem="whiten_act"))
    assert spec.blocks[0] == ("stem", Block("whiten_act"))
    assert customise(REGISTRY["airbench94"], ArchConfig(stem="conv")).blocks == REGISTRY["airbench94_base"].blocks
    assert build_published("airbench94", width_mult=1 / 4).layer1.conv.in_channels == 24


@pytest.mark.parametrize("spec_name, variant, shape", [("airbench94", "page3x3", (27, 3, 3, 3)),
                                                        ("resnet9_final", "airbench2x2", (24, 3, 2, 2))])
def test_the_whitening_variant_is_a_switch(spec_name: str, variant: str, shape: tuple) -> None:
    spec = customise(REGISTRY[spec_name], ArchConfig(whitening=variant))
    model = build_model(spec, BATCH_NORM, RELU, width_mult=1 / 8)
    whiten = next(m for m in model.modules() if isinstance(m, Whitening))
    assert whiten.weight.shape == shape
    _forward_backward(model, batch=4)


def test_dirac_init_makes_the_first_filters_the_identity() -> None:
    """airbench (sota-facts 3): PyTorch's init, then the first C_in output filters of each conv are
    the identity: on those channels a conv starts by passing its input through unchanged."""
    torch.manual_seed(0)
    model = init_dirac(build_published("airbench94", width_mult=1 / 8))
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        k = min(conv.in_channels, conv.out_channels)  # narrower outputs (1/8 width: 24 -> 8) keep k
        x = torch.randn(2, conv.in_channels, 7, 7)
        torch.testing.assert_close(conv(x)[:, :k], x[:, :k])  # 3x3 'same' convs: the identity exactly
        if conv.out_channels > k:
            assert conv.weight[k:].abs().sum() > 0  # the other filters keep PyTorch's random init
    head = init_dirac_unit_head(build_published("airbench94_muon", width_mult=1 / 8)).head.linear
    assert head.weight.std().item() == pytest.approx(1.0, rel=1e-5)
