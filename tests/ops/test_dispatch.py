"""``tttexp.ops.dispatch``: the kernel names, their resolution, and the Triton path under the interpreter."""

from __future__ import annotations

import pytest
import torch

from tttexp import ops
from tttexp.models import configuration
from tttexp.ops import dispatch, reference
from tttexp.ops.testing import make, rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_names_are_defined_once():
    assert configuration.KERNELS is ops.KERNELS
    assert configuration.TTT_LAYERS is ops.TTT_LAYERS


def test_resolve_kernel():
    assert dispatch.resolve_kernel("torch", "cuda") == "torch"
    assert dispatch.resolve_kernel("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="model.kernel must be one of"):
        dispatch.resolve_kernel("cuda", "cpu")


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_dispatch_runs_triton_under_interpreter(layer):
    xs, lr, tok, ln, init, _, _ = make(layer, 1, 2, 20, 32, 16, False, False, dev=DEV)
    args = [x.float() for x in [*xs, lr, tok, *ln]]
    init = tuple(x.float() for x in init)
    assert dispatch.resolve_kernel("triton", DEV) == "triton"
    out, _ = ops.ttt(layer, *args, init, kernel="triton")
    ref, _ = reference.ttt_dual(layer, *args, init)
    assert rel(out, ref) < 1e-5


def test_ops_import_no_hydra():
    import subprocess
    import sys

    code = "import sys, tttexp.ops, tttexp.models; assert 'hydra' not in sys.modules and 'omegaconf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
