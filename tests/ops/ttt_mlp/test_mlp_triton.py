"""TTT-MLP Triton kernels against the float64 reference: interpreter on the CPU (fp32), full shapes with ``-m gpu``
(see ``test_linear_triton`` for the interpreter's bf16 caveat)."""

from __future__ import annotations

import pytest
import torch

from tttexp.ops.dispatch import ttt_triton
from tttexp.ops.testing import check, make, rel, run_both
from tttexp.ops.ttt_mlp.op import mlp_bwd_op, mlp_fwd_op
from tttexp.ops.ttt_mlp.triton import MLPConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _with(config):
    def fn(layer, *args, **kw):
        return ttt_triton(layer, *args, **kw, config=config)

    return fn


@pytest.mark.parametrize(
    ("b", "h", "t", "f", "k", "with_state", "with_reset", "every"),
    [(2, 2, 37, 64, 16, True, True, 2), (1, 2, 37, 96, 16, False, False, 4), (1, 1, 13, 32, 8, False, True, 1),
     (2, 1, 40, 16, 8, True, False, 2)],
)
def test_mlp_fp32_forward_backward(b, h, t, f, k, with_state, with_reset, every):
    inputs = make("mlp", b, h, t, f, k, with_state, with_reset, dev=DEV)
    check(run_both(_with(MLPConfig(every=every)), "mlp", *inputs, torch.float32), 1e-5)


BOTH = {"split_fwd": True, "split_bwd": True}


@pytest.mark.parametrize(
    ("b", "h", "t", "f", "k", "with_state", "with_reset", "every", "dtype", "tol", "split"),
    [(1, 1, 37, 96, 16, False, True, 4, torch.float32, 1e-5, {"split_bwd": True}),
     (2, 1, 40, 16, 8, True, False, 2, torch.float32, 1e-5, BOTH),
     (1, 2, 40, 32, 16, True, True, 2, torch.bfloat16, 2e-2, BOTH)],  # bf16: the stored states and X2bar in bf16
)
def test_mlp_split_kernels(b, h, t, f, k, with_state, with_reset, every, dtype, tol, split):
    """The backward as the parallel output path and the serial chain; the training forward as the state chain,
    then the segments' outputs in parallel: against the same reference."""
    inputs = make("mlp", b, h, t, f, k, with_state, with_reset, dev=DEV)
    check(run_both(_with(MLPConfig(every=every, **split)), "mlp", *inputs, dtype), tol)


def test_mlp_bf16_emulated_dots():
    inputs = make("mlp", 2, 2, 40, 64, 16, True, True, dev=DEV)
    check(run_both(ttt_triton, "mlp", *inputs, torch.bfloat16), 2e-2)


def test_mlp_chunked_calls_equal_one_pass():
    xs, lr, tok, ln, init, _, _ = make("mlp", 2, 2, 48, 32, 16, False, False, dev=DEV)
    args = [x.float() for x in xs] + [lr.float(), tok.float()] + [x.float() for x in ln]
    init = tuple(x.float() for x in init)
    with torch.no_grad():
        out, fin = ttt_triton("mlp", *args, init)
        first = [a[:, :, :32] for a in args[:4]]
        second = [a[:, :, 32:] for a in args[:4]]
        out1, st = ttt_triton("mlp", *first, *args[4:], init)
        out2, fin2 = ttt_triton("mlp", *second, *args[4:], init, state=st)
    assert rel(torch.cat([out1, out2], 2), out) < 1e-6
    for a, b in zip(fin2, fin, strict=True):
        assert rel(a, b) < 1e-6


def test_mlp_compile_traces_the_custom_op_without_breaks():
    xs, lr, tok, ln, init, state, _ = make("mlp", 1, 2, 24, 16, 16, True, False, dev=DEV)
    leaves = [x.float().requires_grad_(True) for x in [*xs, lr, tok, *ln, *init, *state]]

    def loss(*ls):
        out, fin = ttt_triton("mlp", *ls[:7], tuple(ls[7:11]), state=tuple(ls[11:]))
        return (out * out).sum() + fin[0].sum() + fin[-1].pow(2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 1e-6


def test_mlp_opcheck():
    xs, lr, tok, ln, init, state, _ = make("mlp", 2, 2, 20, 16, 16, True, False, dev=DEV)
    args = [x.float().contiguous().requires_grad_(True) for x in [*xs, lr, tok, *ln, *init]]
    st = [x.float().contiguous().requires_grad_(True) for x in state]
    reset = torch.zeros(2, 2, dtype=torch.uint8, device=DEV)
    call = (*args, st, reset, True, '{"every": 1}')
    torch.library.opcheck(mlp_fwd_op, call,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    plain = [a.detach() for a in args]
    out = mlp_fwd_op(*call)
    bwd_call = (*plain, reset, list(out[5:]), torch.randn_like(out[0]), [torch.randn_like(x) for x in out[1:5]],
                '{"every": 1}')
    torch.library.opcheck(mlp_bwd_op, bwd_call, test_utils=("test_schema", "test_faketensor"))


SPLIT = MLPConfig(split_bwd=True, split_fwd=True)
GPU_CASES = [
    # b, h, t, f, state, reset, dtype, tol, kernel settings (None: the defaults)
    (2, 12, 512, 64, True, True, torch.float32, 1e-5, None),
    (2, 12, 512, 64, False, False, torch.bfloat16, 1e-2, None),
    (1, 4, 300, 96, False, True, torch.float32, 1e-5, None),
    (2, 12, 512, 64, True, True, torch.float32, 1e-5, SPLIT),
    (2, 12, 512, 64, True, True, torch.bfloat16, 1e-2, SPLIT),
    (1, 4, 300, 96, False, True, torch.float32, 1e-5, MLPConfig(split_bwd=True, local_warps=4)),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "h", "t", "f", "with_state", "with_reset", "dtype", "tol", "config"), GPU_CASES)
def test_mlp_gpu_full_shapes(b, h, t, f, with_state, with_reset, dtype, tol, config):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    inputs = make("mlp", b, h, t, f, 16, with_state, with_reset, dev="cuda")
    op = ttt_triton if config is None else _with(config)
    errs = check(run_both(op, "mlp", *inputs, dtype, tok_scale=dtype == torch.bfloat16), tol)
    print("mlp", b, h, t, f, dtype, config, {k: f"{v:.1e}" for k, v in errs.items()})
