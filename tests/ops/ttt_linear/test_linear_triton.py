"""Triton TTT kernels against the float64 reference: interpreter on the CPU (fp32), full shapes with ``-m gpu``.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set here before the kernels are imported). The
interpreter computes bf16 dots wrongly, so there the bf16 path runs with emulated dots (operands rounded to bf16,
products in fp32) and the fp32 path carries the 1e-5 checks.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    if "tttexp.ops.triton_common" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tttexp Triton kernels were imported before TRITON_INTERPRET=1 was set")
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402

from tttexp.ops import dispatch, reference  # noqa: E402
from tttexp.ops import triton_linear as tlin  # noqa: E402
from tttexp.ops import triton_mlp as tmlp  # noqa: E402
from tttexp.ops.triton_decode import linear_decode_step  # noqa: E402
from tttexp.ops.triton_ttt import linear_bwd_op, linear_fwd_op, mlp_bwd_op, mlp_fwd_op, ttt_triton  # noqa: E402

D = torch.float64
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    nb = b.norm().item()
    if nb == 0.0:
        return a.norm().item()
    return ((a - b).norm() / nb).item()


def make(layer: str, b: int, h: int, t: int, f: int, k: int, with_state: bool, with_reset: bool, dev: str = DEV):
    """Fresh random float64 inputs shaped like the model's (lr already scaled by 1/F, tok ~ 1/(i+1))."""
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


def run_both(layer, xs, lr, tok, ln, init, state, reset, dtype, grads: bool = True):
    """The float64 reference (on ``dtype``-rounded inputs) and the Triton op; returns pairs (name, got, want)."""
    xs = [x.to(dtype).to(D) for x in xs]
    leaves64 = [*xs, lr, tok, *ln, *init, *(state or [])]
    leaves64 = [x.detach().clone().requires_grad_(grads) for x in leaves64]
    leaves = [x.detach().to(dtype if i < 3 else torch.float32).requires_grad_(grads) for i, x in enumerate(leaves64)]
    n_init = len(init)

    def call(fn, ls):
        st = tuple(ls[7 + n_init:]) if state is not None else None
        return fn(layer, *ls[:7], tuple(ls[7:7 + n_init]), state=st, reset=reset)

    out64, fin64 = call(reference.ttt_dual, leaves64)
    out, fin = call(ttt_triton, leaves)
    assert out.dtype == dtype and all(s.dtype == torch.float32 for s in fin)
    pairs = [("out", out, out64)] + [(f"final{i}", a, b) for i, (a, b) in enumerate(zip(fin, fin64, strict=True))]
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
            pairs.append((f"d{name}", a, b))
    return pairs


def check(pairs, tol: float) -> dict[str, float]:
    errs = {name: rel(a, b) for name, a, b in pairs}
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    return errs


LINEAR_CASES = [
    # b, h, t, f, k, state, reset, every, forward split into state chain + segment outputs
    (1, 2, 37, 64, 16, False, False, 8, True),
    (2, 2, 37, 64, 16, True, True, 2, True),
    (2, 2, 37, 96, 16, True, True, 8, False),
    (1, 2, 37, 96, 16, False, True, 1, True),
    (2, 1, 21, 32, 8, False, False, 2, False),
    (1, 1, 5, 64, 16, True, False, 8, True),
]


@pytest.mark.parametrize(("b", "h", "t", "f", "k", "with_state", "with_reset", "every", "split"), LINEAR_CASES)
def test_linear_fp32_forward_backward(monkeypatch, b, h, t, f, k, with_state, with_reset, every, split):
    monkeypatch.setitem(tlin.CONFIG, "every", every)
    monkeypatch.setitem(tlin.CONFIG, "split_fwd", split)
    inputs = make("linear", b, h, t, f, k, with_state, with_reset)
    check(run_both("linear", *inputs, torch.float32), 1e-5)


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_bf16_emulated_dots(layer):
    """The bf16 code path (operands in bf16, fp32 accumulation, bf16 outputs) against float64."""
    inputs = make(layer, 2, 2, 40, 64, 16, True, True)
    check(run_both(layer, *inputs, torch.bfloat16), 2e-2)


@pytest.mark.parametrize(
    ("b", "h", "t", "f", "k", "with_state", "with_reset", "every"),
    [(2, 2, 37, 64, 16, True, True, 2), (1, 2, 37, 96, 16, False, False, 4), (1, 1, 13, 32, 8, False, True, 1),
     (2, 1, 40, 16, 8, True, False, 2)],
)
def test_mlp_fp32_forward_backward(monkeypatch, b, h, t, f, k, with_state, with_reset, every):
    monkeypatch.setitem(tmlp.CONFIG, "every", every)
    inputs = make("mlp", b, h, t, f, k, with_state, with_reset)
    check(run_both("mlp", *inputs, torch.float32), 1e-5)


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_chunked_calls_equal_one_pass(layer):
    xs, lr, tok, ln, init, _, _ = make(layer, 2, 2, 48, 32, 16, False, False)
    args = [x.float() for x in xs] + [lr.float(), tok.float()] + [x.float() for x in ln]
    init = tuple(x.float() for x in init)
    with torch.no_grad():
        out, fin = ttt_triton(layer, *args, init)
        cut = 32
        first = [a[:, :, :cut] for a in args[:4]]
        second = [a[:, :, cut:] for a in args[:4]]
        out1, st = ttt_triton(layer, *first, *args[4:], init)
        out2, fin2 = ttt_triton(layer, *second, *args[4:], init, state=st)
    assert rel(torch.cat([out1, out2], 2), out) < 1e-6
    for a, b in zip(fin2, fin, strict=True):
        assert rel(a, b) < 1e-6


def test_no_grad_forward_saves_no_checkpoints():
    xs, lr, tok, ln, init, _, _ = make("linear", 1, 2, 20, 32, 16, False, False)
    args = [x.float().contiguous() for x in [*xs, lr, tok, *ln, *init]]
    _, _, _, ckw, _ = linear_fwd_op(*args, None, None, None, 4, False)
    assert ckw.shape[1] == 0
    _, _, _, ckw, _ = linear_fwd_op(*args, None, None, None, 1, True)
    assert ckw.shape[1] == 2


def test_dispatch_runs_triton_under_interpreter():
    xs, lr, tok, ln, init, _, _ = make("linear", 1, 2, 20, 32, 16, False, False)
    args = [x.float() for x in [*xs, lr, tok, *ln]]
    init = tuple(x.float() for x in init)
    assert dispatch.resolve_kernel("triton", DEV) == "triton"
    out, _ = dispatch.ttt("linear", *args, init, kernel="triton")
    ref, _ = reference.ttt_dual("linear", *args, init)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_compile_traces_the_custom_op_without_breaks(layer):
    """``torch.compile(fullgraph=True)`` of forward + backward through the op (aot_eager: no codegen)."""
    xs, lr, tok, ln, init, state, _ = make(layer, 1, 2, 24, 16, 16, True, False)
    leaves = [x.float().requires_grad_(True) for x in [*xs, lr, tok, *ln, *init, *state]]
    n = len(init)

    def loss(*ls):
        out, fin = ttt_triton(layer, *ls[:7], tuple(ls[7:7 + n]), state=tuple(ls[7 + n:]))
        return (out * out).sum() + fin[0].sum() + fin[-1].pow(2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_opcheck(layer):
    """Schema, fake (meta) implementation and autograd registration of the custom ops, forward and backward.

    Batch and heads above 1, so the fake outputs' strides are checked against the real ones (torch.compile
    trusts them)."""
    xs, lr, tok, ln, init, state, _ = make(layer, 2, 2, 20, 16, 16, True, False)
    args = [x.float().contiguous().requires_grad_(True) for x in [*xs, lr, tok, *ln, *init]]
    st = [x.float().contiguous().requires_grad_(True) for x in state]
    reset = torch.zeros(2, 2, dtype=torch.uint8, device=DEV)
    if layer == "linear":
        op, call = linear_fwd_op, (*args, *st, reset, 1, True)
    else:
        op, call = mlp_fwd_op, (*args, st, reset, 1, True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, call, test_utils=checks)

    plain = [a.detach() for a in args]
    out = op(*call)
    dout = torch.randn_like(out[0])
    if layer == "linear":
        bwd_call = (*plain, reset, out[3], out[4], dout, torch.randn_like(out[1]), torch.randn_like(out[2]), 1)
        torch.library.opcheck(linear_bwd_op, bwd_call, test_utils=("test_schema", "test_faketensor"))
    else:
        bwd_call = (*plain, reset, list(out[5:]), dout, [torch.randn_like(x) for x in out[1:5]], 1)
        torch.library.opcheck(mlp_bwd_op, bwd_call, test_utils=("test_schema", "test_faketensor"))


def decode_sequence(xs, lr, tok, ln, init, state, reset, dtype):
    """Token-by-token decode with the kernel, applying the accumulators at each mini-batch boundary."""
    xq, xk, xv = (x.to(dtype) for x in xs)
    lr, tok, ln_w, ln_b = lr.float(), tok.float(), ln[0].float(), ln[1].float()
    bsz, seq, k = xq.shape[0], xq.shape[2], tok.shape[0]
    init = tuple(s.float() for s in init)
    cur = reference.expand_state(init, bsz, torch.float32) if state is None else tuple(s.float() for s in state)
    outs = []
    for i in range(seq):
        n, j = divmod(i, k)
        if j == 0:
            if reset is not None:
                cur = reference._reset_rows(cur, init, reset[:, n])
            acc = reference.zero_accumulators(cur)
        sl = slice(i, i + 1)
        out, acc = linear_decode_step(xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], lr[:, :, sl], tok[j:j + 1],
                                      ln_w, ln_b, cur, acc)
        outs.append(out)
        if j == k - 1 or i == seq - 1:
            cur = reference.apply_accumulators(cur, acc, tok[j])
    return torch.cat(outs, 2), cur


@pytest.mark.parametrize(("b", "h", "t", "f", "with_state", "with_reset"),
                         [(2, 2, 21, 64, True, True), (1, 2, 19, 96, False, False)])
def test_decode_matches_dual_form(b, h, t, f, with_state, with_reset):
    xs, lr, tok, ln, init, state, reset = make("linear", b, h, t, f, 8, with_state, with_reset)
    out64, fin64 = reference.ttt_dual("linear", *xs, lr, tok, *ln, tuple(init), state=state, reset=reset)
    with torch.no_grad():
        out, fin = decode_sequence(xs, lr, tok, ln, init, state, reset, torch.float32)
    assert rel(out, out64) < 1e-5
    for a, b_ in zip(fin, fin64, strict=True):
        assert rel(a, b_) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# GPU: full shapes (run with -m gpu)
# --------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    # layer, b, h, t, f, state, reset, dtype, tol
    ("linear", 8, 12, 2048, 64, False, False, torch.float32, 1e-5),
    ("linear", 8, 12, 2048, 64, True, True, torch.bfloat16, 1e-2),
    ("linear", 2, 16, 1000, 96, True, True, torch.float32, 1e-5),
    ("linear", 2, 16, 1000, 96, False, False, torch.bfloat16, 1e-2),
    ("mlp", 2, 12, 512, 64, True, True, torch.float32, 1e-5),
    ("mlp", 2, 12, 512, 64, False, False, torch.bfloat16, 1e-2),
    ("mlp", 1, 4, 300, 96, False, True, torch.float32, 1e-5),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("layer", "b", "h", "t", "f", "with_state", "with_reset", "dtype", "tol"), GPU_CASES)
def test_gpu_full_shapes(layer, b, h, t, f, with_state, with_reset, dtype, tol):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    inputs = make(layer, b, h, t, f, 16, with_state, with_reset, dev="cuda")
    errs = check(run_both(layer, *inputs, dtype), tol)
    print(layer, b, h, t, f, dtype, {k: f"{v:.1e}" for k, v in errs.items()})
