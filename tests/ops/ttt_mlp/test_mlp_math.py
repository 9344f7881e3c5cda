"""The hand-derived TTT-MLP backward (plain PyTorch, float64) against autograd of ``reference.ttt_dual``."""

from __future__ import annotations

import math

import pytest
import torch

from tttexp.ops import reference
from tttexp.ops.common import gelu_parts
from tttexp.ops.ttt_mlp.math import mlp_step, ttt_mlp_manual

D = torch.float64


@pytest.mark.parametrize(
    ("b", "h", "t", "f", "k", "with_state", "with_reset"),
    [(2, 2, 37, 8, 16, False, False), (2, 2, 37, 8, 16, True, True), (1, 2, 20, 6, 4, True, False),
     (3, 1, 10, 5, 4, False, True)],
)
def test_manual_mlp_backward_matches_autograd(b, h, t, f, k, with_state, with_reset):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)

    def rn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, dtype=D, generator=gen) * scale

    xq, xk, xv = (rn(b, h, t, f, scale=0.7) for _ in range(3))
    lr = torch.rand(b, h, t, dtype=D, generator=gen) * 2.0 / f
    tok = 1.0 / torch.arange(1, k + 1, dtype=D) + 0.1 * torch.rand(k, dtype=D, generator=gen)
    ln_w, ln_b = 1.0 + rn(h, f, scale=0.2), rn(h, f, scale=0.1)
    shapes = reference.state_shapes("mlp", b, h, f)
    init = tuple(rn(*s[1:], scale=0.3) for s in shapes)
    state = tuple(rn(*s, scale=0.3) for s in shapes) if with_state else None
    reset = None
    if with_reset:
        reset = torch.rand(b, math.ceil(t / k), generator=gen) < 0.4
        reset[0, 0] = True
    leaves = [xq, xk, xv, lr, tok, ln_w, ln_b, *init, *(state or ())]
    for leaf in leaves:
        leaf.requires_grad_(True)
    out, fin = reference.ttt_dual("mlp", xq, xk, xv, lr, tok, ln_w, ln_b, init, state=state, reset=reset)
    dout = torch.randn_like(out)
    dfin = tuple(torch.randn_like(s) for s in fin)
    ref = torch.autograd.grad((out, *fin), leaves, (dout, *dfin), allow_unused=True)
    ref = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, ref, strict=True)]
    with torch.no_grad():
        out2, fin2, g = ttt_mlp_manual(xq, xk, xv, lr, tok, ln_w, ln_b, init, state, reset, dout, dfin)
    got = [g["xq"], g["xk"], g["xv"], g["lr"], g["tok"], g["gw"], g["gb"], *g["init"], *g.get("state", ())]
    for a, want in [(out2, out), *zip(fin2, fin, strict=True), *zip(got, ref, strict=True)]:
        assert torch.allclose(a, want, rtol=1e-10, atol=1e-12)


def test_gelu_parts_derivatives():
    x = torch.linspace(-6, 6, 301, dtype=D, requires_grad=True)
    s, ds, dds = gelu_parts(x)
    assert torch.allclose(s, reference.gelu_tanh(x), atol=1e-14)
    assert torch.allclose(ds, reference.gelu_tanh_grad(x), atol=1e-14)
    (autograd_dds,) = torch.autograd.grad(reference.gelu_tanh_grad(x).sum(), x)
    assert torch.allclose(dds, autograd_dds, atol=1e-12)


def test_step_matches_reference_minibatch():
    b, h, m, f = 2, 2, 16, 8
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    xq, xk, xv = (torch.randn(b, h, m, f, dtype=D, generator=gen) for _ in range(3))
    lr = torch.rand(b, h, m, dtype=D, generator=gen) / f
    tok = torch.rand(m, dtype=D, generator=gen) + 0.1
    ln_w, ln_b = torch.randn(h, f, dtype=D, generator=gen), torch.randn(h, f, dtype=D, generator=gen)
    st = tuple(0.3 * torch.randn(*s, dtype=D, generator=gen) for s in reference.state_shapes("mlp", b, h, f))
    out, new = mlp_step(xq, xk, xv, lr, tok, ln_w, ln_b, *st)
    out_r, acc = reference.minibatch_mlp(xq, xk, xv, lr, tok, ln_w, ln_b, st, reference.zero_accumulators(st))
    new_r = reference.apply_accumulators(st, acc, tok[-1])
    for a, want in [(out, out_r), *zip(new, new_r, strict=True)]:
        assert torch.allclose(a, want, rtol=1e-12, atol=1e-12)
