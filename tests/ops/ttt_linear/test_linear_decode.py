"""The TTT-Linear decode kernel, token by token through ``ops.decode_step``, against the float64 dual form."""

from __future__ import annotations

import pytest
import torch

from tttexp.ops import decode_step, reference
from tttexp.ops.testing import make, rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def decode_sequence(layer, xs, lr, tok, ln, init, state, reset, dtype, kernel):
    """Token-by-token decode, applying the accumulators at each mini-batch boundary."""
    xq, xk, xv = (x.to(dtype) for x in xs)
    lr, tok, ln_w, ln_b = lr.float(), tok.float(), ln[0].float(), ln[1].float()
    bsz, seq, k = xq.shape[0], xq.shape[2], tok.shape[0]
    init = tuple(s.float() for s in init)
    cur = reference.expand_state(init, bsz, torch.float32) if state is None else tuple(s.float() for s in state)
    outs = []
    acc = None
    for i in range(seq):
        n, j = divmod(i, k)
        if j == 0:
            if reset is not None:
                cur = reference.reset_rows(cur, init, reset[:, n])
            acc = None
        sl = slice(i, i + 1)
        out, acc = decode_step(layer, xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], lr[:, :, sl], tok[j:j + 1],
                               ln_w, ln_b, cur, acc, kernel=kernel)
        outs.append(out)
        if j == k - 1 or i == seq - 1:
            cur = reference.apply_accumulators(cur, acc, tok[j])
    return torch.cat(outs, 2), cur


@pytest.mark.parametrize(("layer", "kernel"), [("linear", "triton"), ("linear", "torch"), ("mlp", "auto")])
@pytest.mark.parametrize(("b", "h", "t", "f", "with_state", "with_reset"),
                         [(2, 2, 21, 64, True, True), (1, 2, 19, 96, False, False)])
def test_decode_matches_dual_form(layer, kernel, b, h, t, f, with_state, with_reset):
    xs, lr, tok, ln, init, state, reset = make(layer, b, h, t, f, 8, with_state, with_reset, dev=DEV)
    out64, fin64 = reference.ttt_dual(layer, *xs, lr, tok, *ln, tuple(init), state=state, reset=reset)
    with torch.no_grad():
        out, fin = decode_sequence(layer, xs, lr, tok, ln, init, state, reset, torch.float32, kernel)
    assert rel(out, out64) < 1e-5
    for a, b_ in zip(fin, fin64, strict=True):
        assert rel(a, b_) < 1e-5
