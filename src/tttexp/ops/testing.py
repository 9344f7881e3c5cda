"""Helpers for checking an implementation of the inner loop against the float64 reference (tests, GPU checks)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tttexp.ops import reference

D = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> float:
    """Relative L2 error of ``a`` against ``b``: over ``scale`` where given, else over the norm of ``b`` (the norm
    of ``a`` where that is zero); ``a`` must be finite."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    nb = b.norm().item() if scale is None else scale
    if nb == 0.0:
        return a.norm().item()
    return ((a - b).norm() / nb).item()


def make(layer: str, b: int, h: int, t: int, f: int, k: int, with_state: bool, with_reset: bool, dev: str = "cpu"):
    """Fresh random float64 inputs shaped like the model's (lr already scaled by 1/F, tok ~ 1/(i+1)):
    ``(xs, lr, tok, ln, init, state, reset)``."""
    gen = torch.Generator(device=dev).manual_seed(torch.seed() % 2**31)

    def rn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, dtype=D, device=dev, generator=gen) * scale

    xs = [rn(b, h, t, f, scale=0.7) for _ in range(3)]
    lr = torch.rand(b, h, t, dtype=D, device=dev, generator=gen) * 2.0 / f
    tok = 1.0 / torch.arange(1, k + 1, dtype=D, device=dev) + 0.1 * torch.rand(k, dtype=D, device=dev, generator=gen)
    ln = [1.0 + rn(h, f, scale=0.2), rn(h, f, scale=0.1)]
    shapes = reference.state_shapes(layer, b, h, f)
    init = [rn(*s[1:], scale=0.1) for s in shapes]
    state = [rn(*s, scale=0.1) for s in shapes] if with_state else None
    reset = None
    if with_reset:
        reset = torch.rand(b, math.ceil(t / k), device=dev, generator=gen) < 0.4
        reset[0, 0] = True
        reset[-1, -1] = True
    return xs, lr, tok, ln, init, state, reset


def run_both(fn: Callable, layer: str, xs, lr, tok, ln, init, state, reset, dtype: torch.dtype, grads: bool = True,
             tok_scale: bool = False):
    """The float64 reference (on ``dtype``-rounded inputs) and ``fn`` (signature of ``reference.ttt_dual``);
    returns ``(name, got, want, scale)`` for the outputs, final state and, with ``grads``, every input gradient.
    ``scale`` is None (errors are relative to ``want``) except for the token weights' gradient with ``tok_scale``,
    which is measured against the size of what it sums (``tok_grad_scale``)."""
    xs = [x.to(dtype).to(D) for x in xs]
    leaves64 = [*xs, lr, tok, *ln, *init, *(state or [])]
    leaves64 = [x.detach().clone().requires_grad_(grads) for x in leaves64]
    leaves = [x.detach().to(dtype if i < 3 else torch.float32).requires_grad_(grads) for i, x in enumerate(leaves64)]
    n_init = len(init)

    def call(f, ls):
        st = tuple(ls[7 + n_init:]) if state is not None else None
        return f(layer, *ls[:7], tuple(ls[7:7 + n_init]), state=st, reset=reset)

    out64, fin64 = call(reference.ttt_dual, leaves64)
    out, fin = call(fn, leaves)
    assert out.dtype == dtype and all(s.dtype == torch.float32 for s in fin)
    pairs = [("out", out, out64, None)]
    pairs += [(f"final{i}", a, b, None) for i, (a, b) in enumerate(zip(fin, fin64, strict=True))]
    if grads:
        cot = [torch.randn_like(out64)] + [torch.randn_like(s) for s in fin64]
        g64 = torch.autograd.grad((out64, *fin64), leaves64, cot, allow_unused=True)
        g = torch.autograd.grad((out, *fin), leaves, [cot[0].to(dtype)] + [c.float() for c in cot[1:]],
                                allow_unused=True)
        names = ["xq", "xk", "xv", "lr", "tok", "ln_w", "ln_b"] + [f"init{i}" for i in range(n_init)]
        names += [f"state{i}" for i in range(len(state or []))]
        for name, x, a, b in zip(names, leaves, g, g64, strict=True):
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x, dtype=D) if b is None else b
            assert a.dtype == x.dtype, name
            scale = None
            if name == "tok" and tok_scale:
                scale = tok_grad_scale(layer, leaves64[:7], leaves64[7:7 + n_init], leaves64[7 + n_init:] or None,
                                       reset, cot)
            pairs.append((f"d{name}", a, b, scale))
    return pairs


def tok_grad_scale(layer: str, inputs, init, state, reset, cot) -> float:
    """The norm over the K positions of sum over (batch, head) of |the token weights' gradient from that row|.

    That gradient sums terms of every head, token and feature of the batch, and they mostly cancel: in bf16 its
    error relative to itself ran 0.3-4 % on fresh inputs at the GPU shapes, where every other output stays under
    0.5 %. Like any rounded sum, its error is bounded by the size of its terms, not of its result; the rows' own
    gradients (each from the float64 reference on that batch row and head alone) give that size."""
    xq, xk, xv, lr, tok, ln_w, ln_b = inputs
    total = torch.zeros_like(tok, dtype=D)
    for b in range(xq.shape[0]):
        for h in range(xq.shape[1]):
            row = [x[b:b + 1, h:h + 1].detach() for x in (xq, xk, xv, lr)]
            tk = tok.detach().clone().requires_grad_(True)
            st = tuple(s[b:b + 1, h:h + 1].detach() for s in state) if state is not None else None
            out, fin = reference.ttt_dual(layer, *row, tk, ln_w[h:h + 1].detach(), ln_b[h:h + 1].detach(),
                                          tuple(s[h:h + 1].detach() for s in init), state=st,
                                          reset=None if reset is None else reset[b:b + 1])
            (g,) = torch.autograd.grad((out, *fin), tk, [c[b:b + 1, h:h + 1] for c in cot])
            total += g.abs()
    return total.norm().item()


def check(pairs, tol: float) -> dict[str, float]:
    """Assert every pair's relative error is at most ``tol``; returns the errors."""
    errs = {name: rel(a, b, scale) for name, a, b, scale in pairs}
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return errs
