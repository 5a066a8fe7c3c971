"""Muon (ablate/muon.py) against a reference orthogonalisation, and against its definition in
airbench94_muon.py (sota-facts section 3, last paragraph)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ablate.config import OptimConfig
from ablate.muon import NS_COEFFICIENTS, Muon, Optimizers, newton_schulz
from ablate.optim import make_optimizer, set_lr

SHAPES = [(64, 24 * 9), (256, 256 * 9), (24, 12), (100, 30)]  # airbench's filters, flattened; a tall one


@pytest.mark.parametrize("shape", SHAPES)
def test_three_newton_schulz_steps_orthogonalise_like_the_svd(shape):
    """The reference: G = U S V^T gives the orthogonalisation U V^T. Three quintic steps keep U and V
    (U^T O V is diagonal to 2%) and bring every singular value into ~[0.65, 1.2] (Keller Jordan:
    "something like U S' V^T with S' ~ Uniform(0.5, 1.5)"), so O points along U V^T."""
    torch.manual_seed(0)
    g = torch.randn(shape)
    o = newton_schulz(g, steps=3).float()
    assert o.shape == g.shape
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    singular = torch.linalg.svdvals(o)
    assert singular.min() > 0.6 and singular.max() < 1.25
    rotated = u.T @ o @ vh.T
    assert (rotated - torch.diag(torch.diag(rotated))).norm() < 0.03 * rotated.norm()
    polar = u @ vh
    assert (o * polar).sum() / (o.norm() * polar.norm()) > 0.98


def test_each_iteration_is_the_quintic_on_the_singular_values():
    """The definition, exactly (in fp64): with X0 = G / |G|_F each step maps every singular value s to
    a s + b s^3 + c s^5, the singular vectors untouched."""
    torch.manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(9, 6, dtype=torch.float64))
    s = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.05, 0.01], dtype=torch.float64)
    g = q1 @ torch.diag(s) @ q2.T
    a, b, c = NS_COEFFICIENTS
    x = s / s.norm()
    for _ in range(3):
        x = a * x + b * x ** 3 + c * x ** 5
    expected = q1 @ torch.diag(x) @ q2.T
    torch.testing.assert_close(newton_schulz(g, steps=3, eps=0.0, dtype=torch.float64), expected)


def test_newton_schulz_matches_torchs_own():
    """torch.optim.Muon (2-D parameters only) carries the same iteration; ablate's agrees with it."""
    reference = pytest.importorskip("torch.optim._muon")._zeropower_via_newtonschulz
    torch.manual_seed(2)
    g = torch.randn(64, 216)
    ours, theirs = newton_schulz(g, 3).float(), reference(g, NS_COEFFICIENTS, 3, 1e-7).float()
    torch.testing.assert_close(ours, theirs, atol=0.03, rtol=0.05)  # bf16 arithmetic, two orders of ops


def test_muon_step_renormalises_the_filter_then_steps_along_the_orthogonalised_nesterov_momentum():
    """airbench94_muon: v = mu v + g; u = g + mu v; w = w sqrt(out)/|w|; w = w - lr NS(u), two steps."""
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = Muon([w], lr=0.24, momentum=0.6, ns_steps=3)
    ref, buf = w.detach().clone(), torch.zeros_like(w)
    for _ in range(2):
        g = torch.randn_like(w)
        w.grad = g.clone()
        opt.step()
        buf = 0.6 * buf + g
        update = g + 0.6 * buf
        ref = ref * 8 ** 0.5 / ref.norm()
        ref = ref - 0.24 * newton_schulz(update.reshape(8, -1), 3).view(ref.shape).float()
        torch.testing.assert_close(w.detach(), ref)
    # the norm before the step is sqrt(out): the step itself has norm lr x |NS(u)|_F
    assert w.norm().item() == pytest.approx(8 ** 0.5, rel=0.2)


def test_optim_update_muon_puts_the_filters_in_muon_and_the_rest_in_sgd():
    """optim.update=muon: every trainable 4-D tensor (conv filter) in Muon at optim.muon_lr x the
    schedule's shape; the BN biases, the head and everything else in Nesterov SGD; no decay on Muon's."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2, bias=False))
    model[1].weight.requires_grad_(False)
    cfg = OptimConfig(update="muon", units="torch", momentum=0.85, weight_decay=2e-6, muon_lr=0.24,
                      head_lr_mult=0.67 / 0.053, head_wd_mult=0.053 / 0.67)
    opt = make_optimizer(model, cfg, batch_size=2000, lr_base=0.053)
    assert isinstance(opt, Optimizers)
    sgd, muon = opt.optimizers
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.85
    assert isinstance(muon, Muon) and muon.param_groups[0]["params"] == [model[0].weight]
    set_lr(opt, 0.053 * 0.5, 2000)  # half-way down the linear decay
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model[0].weight)] == pytest.approx(0.12)
    assert lrs[id(model[1].bias)] == pytest.approx(0.0265) and lrs[id(model[3].weight)] == pytest.approx(0.335)
    decays = {id(p): g["weight_decay"] for g in sgd.param_groups for p in g["params"]}
    # torch's coefficient is wd x N / the group's own start LR: every group decays 2e-6 x 2000 per step
    assert decays[id(model[1].bias)] * 0.053 == pytest.approx(2e-6 * 2000)
    assert decays[id(model[3].weight)] * 0.67 == pytest.approx(2e-6 * 2000)
