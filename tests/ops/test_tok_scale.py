"""The token weights' gradient is checked against the size of what it sums: that bound must still catch a lost term."""

import torch

from tttexp.ops import reference
from tttexp.ops.testing import make, rel, run_both


def _drops_row_one(layer, xq, xk, xv, lr, tok, ln_w, ln_b, init, state=None, reset=None):
    """The reference with batch row 1's share of the token weights' gradient lost (a detached ``tok`` there)."""
    rows = []
    for b, t in ((0, tok), (1, tok.detach())):
        st = tuple(s[b:b + 1] for s in state) if state is not None else None
        rows.append(reference.ttt_dual(layer, xq[b:b + 1], xk[b:b + 1], xv[b:b + 1], lr[b:b + 1], t, ln_w, ln_b,
                                       init, state=st, reset=None if reset is None else reset[b:b + 1]))
    return torch.cat([r[0] for r in rows]), tuple(torch.cat(s) for s in zip(rows[0][1], rows[1][1], strict=True))


def test_tok_scale_bounds_the_gradient_and_still_fails_a_lost_term():
    inputs = make("linear", 2, 3, 40, 16, 16, True, True)
    exact = {name: (got, want, scale) for name, got, want, scale in
             run_both(reference.ttt_dual, "linear", *inputs, torch.float32, tok_scale=True)}
    got, want, scale = exact["dtok"]
    assert scale >= want.norm().item() * (1 - 1e-12)  # |sum of terms| <= sum of |terms|
    assert rel(got, want, scale) < 1e-5
    lost = {name: (got, want, scale) for name, got, want, scale in
            run_both(_drops_row_one, "linear", *inputs, torch.float32, tok_scale=True)}
    got, want, scale = lost["dtok"]
    assert rel(got, want, scale) > 0.05
    assert rel(lost["dxq"][0], lost["dxq"][1]) < 1e-5  # only the token weights' gradient is wrong
