"""The reference TTT op: dual form == primal oracle, gradients, resets and continuation."""

import pytest
import torch

from tttexp.ops import reference
from tttexp.ops.reference import state_shapes, ttt_dual, ttt_primal


def make_inputs(layer, batch, heads, seq, f, k=16, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    xq, xk, xv = r(batch, heads, seq, f), r(batch, heads, seq, f), r(batch, heads, seq, f)
    lr = torch.rand(batch, heads, seq, generator=g, dtype=dtype) * (1.0 / f) + 0.1 / f
    tok = 1.0 / torch.arange(1, k + 1, dtype=dtype) + 0.05 * torch.rand(k, generator=g, dtype=dtype)
    ln_w, ln_b = 1.0 + 0.1 * r(heads, f), 0.1 * r(heads, f)
    init = tuple(0.2 * r(*shape[1:]) for shape in state_shapes(layer, batch, heads, f))
    return (xq, xk, xv, lr, tok, ln_w, ln_b), init


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("layer", ["linear", "mlp"])
@pytest.mark.parametrize(("batch", "seq", "f"), [(1, 37, 64), (3, 21, 96), (3, 16, 8), (1, 5, 64)])
def test_dual_equals_primal(layer, batch, seq, f):
    args, init = make_inputs(layer, batch, 1, seq, f)
    reset = torch.rand(batch, (seq + 15) // 16) < 0.5
    out_d, st_d = ttt_dual(layer, *args, init, reset=reset)
    out_p, st_p = ttt_primal(layer, *args, init, reset=reset)
    assert (out_d - out_p).abs().max() < 1e-10
    for a, b in zip(st_d, st_p, strict=True):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_dual_gradcheck(layer):
    args, init = make_inputs(layer, 1, 2, 19, 4, k=8)
    leaves = [t.clone().requires_grad_() for t in (*args, *init)]
    reset = torch.tensor([[False, True, False]])

    def fn(*ts):
        out, state = ttt_dual(layer, *ts[:7], tuple(ts[7:]), reset=reset)
        return (out, *state)

    # fast mode: the analytic and numerical Jacobians projected on random vectors (a full Jacobian costs ~40 s)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_carried_state_equals_one_pass(layer):
    args, init = make_inputs(layer, 2, 2, 48, 8)
    out, final = ttt_dual(layer, *args, init)
    first = [a[:, :, :32] if a.dim() >= 3 else a for a in args]
    second = [a[:, :, 32:] if a.dim() >= 3 else a for a in args]
    out1, mid = ttt_dual(layer, *first, init)
    out2, end = ttt_dual(layer, *second, init, state=mid)
    assert (torch.cat([out1, out2], 2) - out).abs().max() < 1e-12
    for a, b in zip(end, final, strict=True):
        assert (a - b).abs().max() < 1e-12


def test_reset_restarts_from_learned_state():
    layer = "linear"
    args, init = make_inputs(layer, 2, 1, 32, 8)
    reset = torch.tensor([[False, True], [False, False]])
    out, _ = ttt_dual(layer, *args, init, reset=reset)
    second = [a[:, :, 16:] if a.dim() >= 3 else a for a in args]
    alone, _ = ttt_dual(layer, *second, init)
    assert (out[0, :, 16:] - alone[0]).abs().max() < 1e-12
    assert (out[1, :, 16:] - alone[1]).abs().max() > 1e-6


def test_state_and_statistics_stay_fp32_under_bf16_autocast():
    args, init = make_inputs("linear", 1, 2, 20, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = ttt_dual("linear", *[a.bfloat16() if a.dim() == 4 else a for a in args], init)
    assert out.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in state)
    ref, _ = ttt_dual("linear", *[a.bfloat16().double() if a.dim() == 4 else a.double() for a in args],
                      tuple(s.double() for s in init))
    assert rel(out.double(), ref) < 1e-2


def test_unknown_layer_is_a_clear_error():
    args, init = make_inputs("linear", 1, 1, 4, 4)
    with pytest.raises(ValueError, match="model.ttt_layer must be one of"):
        ttt_dual("conv", *args, init)


def test_layer_norm_l2_grad_matches_autograd():
    z = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    w, b = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    loss = 0.5 * (reference.layer_norm(z, w, b) - target).pow(2).sum()
    (auto,) = torch.autograd.grad(loss, z)
    assert (reference.layer_norm_l2_grad(z, target, w, b) - auto).abs().max() < 1e-12
