"""The hand-derived TTT-Linear backward (plain PyTorch, float64) against autograd of ``reference.ttt_dual``."""

from __future__ import annotations

import math

import pytest
import torch

from tttexp.ops import reference
from tttexp.ops.ttt_linear.math import linear_step, ttt_linear_manual

D = torch.float64


def _inputs(b: int, h: int, t: int, f: int, k: int, with_state: bool, with_reset: bool, gen: torch.Generator):
    def rn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, dtype=D, generator=gen) * scale

    x = [rn(b, h, t, f, scale=0.7) for _ in range(3)]
    lr = torch.rand(b, h, t, dtype=D, generator=gen) * 3.0 / f
    tok = 1.0 / torch.arange(1, k + 1, dtype=D) + 0.1 * torch.rand(k, dtype=D, generator=gen)
    ln_w, ln_b = 1.0 + rn(h, f, scale=0.2), rn(h, f, scale=0.1)
    init = (rn(h, f, f, scale=0.1), rn(h, f, scale=0.1))
    state = (rn(b, h, f, f, scale=0.1), rn(b, h, f, scale=0.1)) if with_state else None
    reset = None
    if with_reset:
        reset = torch.rand(b, math.ceil(t / k), generator=gen) < 0.4
        reset[0, 0] = True
        reset[-1, -1] = True
    return x, lr, tok, ln_w, ln_b, init, state, reset


@pytest.mark.parametrize(
    ("b", "h", "t", "f", "k", "with_state", "with_reset", "every"),
    [
        (2, 2, 37, 8, 16, False, False, 2),
        (2, 2, 37, 8, 16, True, True, 2),
        (1, 3, 50, 6, 4, True, False, 3),
        (3, 2, 20, 5, 4, False, True, 1),
        (2, 1, 9, 7, 16, True, True, 4),
    ],
)
def test_manual_backward_matches_autograd(b, h, t, f, k, with_state, with_reset, every):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    (xq, xk, xv), lr, tok, ln_w, ln_b, (W0, b0), state, reset = _inputs(b, h, t, f, k, with_state, with_reset, gen)
    leaves = [xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, *(state or ())]
    for leaf in leaves:
        leaf.requires_grad_(True)
    out, (Wf, bf) = reference.ttt_dual("linear", xq, xk, xv, lr, tok, ln_w, ln_b, (W0, b0), state=state, reset=reset)
    dout, dWf, dbf = torch.randn_like(out), torch.randn_like(Wf), torch.randn_like(bf)
    ref = torch.autograd.grad((out, Wf, bf), leaves, (dout, dWf, dbf), allow_unused=True)
    ref = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, ref, strict=True)]
    with torch.no_grad():
        out2, (Wf2, bf2), g = ttt_linear_manual(
            xq, xk, xv, lr, tok, ln_w, ln_b, W0, b0, state, reset, dout, dWf, dbf, every=every
        )
    names = ["xq", "xk", "xv", "lr", "tok", "gw", "gb", "W0", "b0"] + (["state_W", "state_b"] if state else [])
    for got, want in [(out2, out), (Wf2, Wf), (bf2, bf)] + [(g[n], r) for n, r in zip(names, ref, strict=True)]:
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_step_update_matches_reference_accumulators():
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    (xq, xk, xv), lr, tok, ln_w, ln_b, (W0, b0), _, _ = _inputs(2, 2, 16, 8, 16, False, False, gen)
    W, b = W0.expand(2, *W0.shape), b0.expand(2, *b0.shape)
    out, W1, b1 = linear_step(xq, xk, xv, lr, tok, ln_w, ln_b, W, b)
    out_r, acc = reference.minibatch_linear(xq, xk, xv, lr, tok, ln_w, ln_b, (W, b), (W * 0, b * 0))
    W1_r, b1_r = reference.apply_accumulators((W, b), acc, tok[-1])
    for got, want in [(out, out_r), (W1, W1_r), (b1, b1_r)]:
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
