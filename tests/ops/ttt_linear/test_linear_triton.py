"""TTT-Linear Triton kernels against the float64 reference: interpreter on the CPU (fp32), full shapes with ``-m gpu``.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py before anything imports them).
The interpreter computes bf16 dots wrongly, so there the bf16 path runs with emulated dots (operands rounded to
bf16, products in fp32) and the fp32 path carries the 1e-5 checks.
"""

from __future__ import annotations

import pytest
import torch

from tttexp.ops.dispatch import ttt_triton
from tttexp.ops.testing import check, make, rel, run_both
from tttexp.ops.ttt_linear.op import linear_bwd_op, linear_fwd_op
from tttexp.ops.ttt_linear.triton import LinearConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"

LINEAR_CASES = [
    # b, h, t, f, k, state, reset, every, forward split into state chain + segment outputs, backward reuse
    (1, 2, 37, 64, 16, False, False, 8, True, False),
    (2, 2, 37, 64, 16, True, True, 2, True, False),
    (2, 2, 37, 96, 16, True, True, 8, False, True),
    (1, 2, 37, 96, 16, False, True, 1, True, False),
    (2, 1, 21, 32, 8, False, False, 2, False, True),
    (1, 1, 5, 64, 16, True, False, 8, True, False),
]


def _with(config):
    def fn(layer, *args, **kw):
        return ttt_triton(layer, *args, **kw, config=config)

    return fn


@pytest.mark.parametrize(("b", "h", "t", "f", "k", "with_state", "with_reset", "every", "split", "reuse"),
                         LINEAR_CASES)
def test_linear_fp32_forward_backward(b, h, t, f, k, with_state, with_reset, every, split, reuse):
    inputs = make("linear", b, h, t, f, k, with_state, with_reset, dev=DEV)
    config = LinearConfig(every=every, split_fwd=split, reuse=reuse)
    check(run_both(_with(config), "linear", *inputs, torch.float32), 1e-5)


@pytest.mark.parametrize(("scratch", "reuse"), [("fp32", False), ("input", False), ("input", True)])
def test_linear_bf16_emulated_dots(scratch, reuse):
    """The bf16 code path (operands in bf16, fp32 accumulation, bf16 outputs) against float64; with the
    backward's dot-feeding scratch tiles in fp32 or in bf16, and with the finishing pass reading them."""
    inputs = make("linear", 2, 2, 40, 64, 16, True, True, dev=DEV)
    check(run_both(_with(LinearConfig(scratch=scratch, reuse=reuse)), "linear", *inputs, torch.bfloat16), 2e-2)


def test_linear_chunked_calls_equal_one_pass():
    xs, lr, tok, ln, init, _, _ = make("linear", 2, 2, 48, 32, 16, False, False, dev=DEV)
    args = [x.float() for x in xs] + [lr.float(), tok.float()] + [x.float() for x in ln]
    init = tuple(x.float() for x in init)
    with torch.no_grad():
        out, fin = ttt_triton("linear", *args, init)
        cut = 32
        first = [a[:, :, :cut] for a in args[:4]]
        second = [a[:, :, cut:] for a in args[:4]]
        out1, st = ttt_triton("linear", *first, *args[4:], init)
        out2, fin2 = ttt_triton("linear", *second, *args[4:], init, state=st)
    assert rel(torch.cat([out1, out2], 2), out) < 1e-6
    for a, b in zip(fin2, fin, strict=True):
        assert rel(a, b) < 1e-6


def test_no_grad_forward_saves_no_checkpoints():
    xs, lr, tok, ln, init, _, _ = make("linear", 1, 2, 20, 32, 16, False, False, dev=DEV)
    args = [x.float().contiguous() for x in [*xs, lr, tok, *ln, *init]]
    _, _, _, ckw, _ = linear_fwd_op(*args, None, None, None, False, "")
    assert ckw.shape[1] == 0
    _, _, _, ckw, _ = linear_fwd_op(*args, None, None, None, True, '{"every": 1}')
    assert ckw.shape[1] == 2


def test_linear_compile_traces_the_custom_op_without_breaks():
    """``torch.compile(fullgraph=True)`` of forward + backward through the op (aot_eager: no codegen)."""
    xs, lr, tok, ln, init, state, _ = make("linear", 1, 2, 24, 16, 16, True, False, dev=DEV)
    leaves = [x.float().requires_grad_(True) for x in [*xs, lr, tok, *ln, *init, *state]]

    def loss(*ls):
        out, fin = ttt_triton("linear", *ls[:7], tuple(ls[7:9]), state=tuple(ls[9:]))
        return (out * out).sum() + fin[0].sum() + fin[-1].pow(2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-6


def test_linear_opcheck():
    """Schema, fake (meta) implementation and autograd registration of the custom ops, forward and backward.

    Batch and heads above 1, so the fake outputs' strides are checked against the real ones (torch.compile
    trusts them)."""
    xs, lr, tok, ln, init, state, _ = make("linear", 2, 2, 20, 16, 16, True, False, dev=DEV)
    args = [x.float().contiguous().requires_grad_(True) for x in [*xs, lr, tok, *ln, *init]]
    st = [x.float().contiguous().requires_grad_(True) for x in state]
    reset = torch.zeros(2, 2, dtype=torch.uint8, device=DEV)
    call = (*args, *st, reset, True, '{"every": 1}')
    torch.library.opcheck(linear_fwd_op, call,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    plain = [a.detach() for a in args]
    out = linear_fwd_op(*call)
    bwd_call = (*plain, reset, out[3], out[4], torch.randn_like(out[0]), torch.randn_like(out[1]),
                torch.randn_like(out[2]), '{"every": 1}')
    torch.library.opcheck(linear_bwd_op, bwd_call, test_utils=("test_schema", "test_faketensor"))


GPU_CASES = [
    # b, h, t, f, state, reset, dtype, tol, kernel settings (None: the defaults)
    (8, 12, 2048, 64, False, False, torch.float32, 1e-5, None),
    (8, 12, 2048, 64, True, True, torch.bfloat16, 1e-2, None),
    # the backward's dot-feeding scratch in fp32 (the default keeps it in bf16): within the same bf16 bounds
    (8, 12, 2048, 64, True, True, torch.bfloat16, 1e-2, LinearConfig(scratch="fp32")),
    # the finishing pass reading the first pass's tiles instead of recomputing them
    (8, 12, 2048, 64, True, True, torch.bfloat16, 1e-2, LinearConfig(reuse=True)),
    (2, 16, 1000, 96, True, True, torch.float32, 1e-5, None),
    (2, 16, 1000, 96, False, False, torch.bfloat16, 1e-2, None),
    (1, 12, 4099, 64, False, False, torch.bfloat16, 1e-2, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "h", "t", "f", "with_state", "with_reset", "dtype", "tol", "config"), GPU_CASES)
def test_linear_gpu_full_shapes(b, h, t, f, with_state, with_reset, dtype, tol, config):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    inputs = make("linear", b, h, t, f, 16, with_state, with_reset, dev="cuda")
    op = ttt_triton if config is None else _with(config)
    errs = check(run_both(op, "linear", *inputs, dtype, tok_scale=dtype == torch.bfloat16), tol)
    print("linear", b, h, t, f, dtype, config, {k: f"{v:.1e}" for k, v in errs.items()})
