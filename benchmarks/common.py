"""Helpers shared by the benchmark scripts: the commit, the two model families, inputs of the op, timers.

Scripts in this folder import it as ``common`` (the folder is on ``sys.path`` when a script runs); it puts ``src``
on the path too, so the scripts also run from a checkout without an install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tttexp.models import SIZE_PRESETS, build_model  # noqa: E402
from tttexp.ops import reference  # noqa: E402

VOCAB = 32000
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """``GIT_COMMIT`` if set (the device copy has no .git), else ``git rev-parse HEAD``."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def llama(size: str):
    """A same-width Llama (SDPA attention, tied embeddings) from transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = SIZE_PRESETS[size]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
                      num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
                      tie_word_embeddings=True, max_position_embeddings=65536, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def ttt(size: str, layer: str, checkpointing: bool, kernel: str, settings: dict | None = None):
    """A TTT model of one of the paper's sizes; ``settings``: its Triton kernels' launch settings (None: defaults)."""
    return build_model(vocab_size=VOCAB, **SIZE_PRESETS[size], ttt_layer=layer, kernel=kernel,
                       kernel_settings=settings, gradient_checkpointing=checkpointing)


def settings_label(settings: dict | None) -> str:
    """Kernel launch settings as a row's name shows them: `` [split_bwd=true]``; empty for the defaults."""
    if not settings:
        return ""
    return " [" + ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items()) + "]"


def op_inputs(layer: str, b: int, t: int, h: int, f: int, dtype: torch.dtype, k: int = 16) -> list:
    """Random inputs of the inner-loop op on the GPU: ``[xq, xk, xv, lr, tok, ln_w, ln_b, init_state list]``."""
    dev = "cuda"
    xs = [(torch.randn(b, h, t, f, device=dev) * 0.7).to(dtype).requires_grad_(True) for _ in range(3)]
    lr = (torch.rand(b, h, t, device=dev) * 2.0 / f).requires_grad_(True)
    tok = (1.0 / torch.arange(1, k + 1, device=dev) + 0.05 * torch.rand(k, device=dev)).requires_grad_(True)
    ln = [(1.0 + 0.2 * torch.randn(h, f, device=dev)).requires_grad_(True),
          (0.1 * torch.randn(h, f, device=dev)).requires_grad_(True)]
    init = [(0.02 * torch.randn(*s[1:], device=dev)).requires_grad_(True)
            for s in reference.state_shapes(layer, b, h, f)]
    return [*xs, lr, tok, *ln, init]


def op_fns(op, layer: str, inputs: list, **kw):
    """``(fwd, fwd_bwd, leaves)`` closures of one op call (``op`` has the signature of ``reference.ttt_dual``)."""
    leaves = inputs[:7] + inputs[7]
    dout = torch.randn_like(inputs[0])

    def fwd():
        with torch.no_grad():
            return op(layer, *inputs[:7], tuple(inputs[7]), **kw)

    def fwd_bwd():
        out, fin = op(layer, *inputs[:7], tuple(inputs[7]), **kw)
        torch.autograd.backward([out, fin[0]], [dout, torch.ones_like(fin[0])])

    return fwd, fwd_bwd, leaves


def arm(size: str, checkpointing: bool = False):
    """The project's own Transformer++ (``model.mixer=attention``): the Llama block, built as the app builds it."""
    return build_model(vocab_size=VOCAB, **SIZE_PRESETS[size], mixer="attention",
                       gradient_checkpointing=checkpointing)


def sync(cuda: bool) -> None:
    """Wait for the GPU (timers read after it); nothing on the CPU."""
    if cuda:
        torch.cuda.synchronize()


def result_path(result: dict, out: str | None, stem: str) -> Path:
    """Where ``result`` goes: ``out`` when it is a ``.json`` path, else ``<stem>-<date>-<card>.json`` in the folder
    ``out`` (``benchmarks/results`` when ``out`` is None)."""
    path = Path(out or RESULTS_DIR)
    if path.suffix != ".json":
        card = result["device"].replace("NVIDIA ", "").split()[0]
        path = path / f"{stem}-{result['date']}-{card}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def add_row(result: dict, path: Path, row: dict) -> None:
    """Append ``row`` to ``result["rows"]`` and rewrite ``path``, so a run cut short keeps what it measured."""
    result["rows"].append(row)
    path.write_text(json.dumps(result, indent=2) + "\n")


def write_result(result: dict, out: str | None, stem: str) -> Path:
    """Write ``result`` as JSON to ``out``: a ``.json`` path, or a folder that gets ``<stem>-<date>-<card>.json``."""
    path = result_path(result, out, stem)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {path}")
    return path


def times_ms(fn, n: int, cuda: bool) -> list[float]:
    """Milliseconds of each of ``n`` calls of ``fn``: CUDA events around each call on the GPU (the GPU's time,
    synchronised after each), the wall clock on the CPU."""
    times = []
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times
