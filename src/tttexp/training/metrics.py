"""Throughput, FLOPs, MFU and memory: small pure functions, unit-tested."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

from tttexp.loggers import catalogue as C

# Dense bf16 peak FLOP/s by device-name fragment (datasheet figures, without sparsity).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
}


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def ttt_flops_per_token(hidden_size: int, num_heads: int, num_layers: int, mini_batch: int, ttt_layer: str) -> float:
    """Forward FLOPs per token of the inner loop (dual form), all layers.

    Per head and token: the inner forward on the key, the output on the query, and the update each cost a
    matmul against the state (2*f*h each for a state f x h); the causal query-key scores and their product with
    the gradients cost 2*K*f each, on average half of that under the causal mask.
    """
    f = hidden_size // num_heads
    if ttt_layer == "linear":
        state_macs = 3 * f * f
        causal = 2 * mini_batch * f
    else:
        h = 4 * f
        state_macs = 3 * (f * h + h * f) + f * h  # both layers, plus the backprop of G2 into layer 1
        causal = 2 * mini_batch * (f + h)
    return num_layers * num_heads * 2.0 * (state_macs + causal / 2)


def mixer_flops_per_token(mixers: list[str], hidden_size: int, num_heads: int, mini_batch: int, ttt_layer: str,
                          seq_len: int) -> float:
    """Forward FLOPs per token of the sequence mixers beyond their weights, one entry of ``mixers`` per layer: a TTT
    layer's inner loop, or causal softmax attention (scores and their product with the values, 2 * 2 * d per
    earlier position, T / 2 of them on average)."""
    per_ttt = ttt_flops_per_token(hidden_size, num_heads, 1, mini_batch, ttt_layer)
    per_attention = 2.0 * seq_len * hidden_size
    return sum(per_ttt if mixer == "ttt" else per_attention for mixer in mixers)


def train_flops_per_token(num_params: int, mixer_fwd_flops: float) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus three times the mixers' forward
    (the inner loop's, or attention's scores)."""
    return 6.0 * num_params + 3.0 * mixer_fwd_flops


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of a TTT-family model at ``seq_len`` (its config names its mixers)."""
    config = model.config
    mixers = [config.mixer(i) for i in range(config.num_hidden_layers)]
    return train_flops_per_token(
        sum(p.numel() for p in model.parameters()),
        mixer_flops_per_token(mixers, config.hidden_size, config.num_attention_heads, config.mini_batch_size,
                              config.ttt_layer, seq_len),
    )


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when known (``None`` on the CPU or an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak."""
    if not peak:
        return None
    return tokens_per_sec * flops_per_token / peak


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Allocated, reserved and peak GPU memory in GiB; allocated is 0 where there is no GPU, so the series
    exists in every run."""
    if device.type != "cuda":
        return {C.SYSTEM_GPU_MEMORY_ALLOCATED: 0.0}
    gib = 1024**3
    return {
        C.SYSTEM_GPU_MEMORY_ALLOCATED: torch.cuda.memory_allocated(device) / gib,
        C.SYSTEM_GPU_MEMORY_RESERVED: torch.cuda.memory_reserved(device) / gib,
        C.SYSTEM_GPU_MEMORY_PEAK: torch.cuda.max_memory_allocated(device) / gib,
    }


def host_memory() -> dict[str, float]:
    """This process's resident host memory in GiB (now, from /proc; the peak from getrusage)."""
    gib = 1024**3
    out: dict[str, float] = {}
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        out[C.SYSTEM_HOST_MEMORY_RSS] = pages * os.sysconf("SC_PAGE_SIZE") / gib
    except (OSError, ValueError, IndexError):
        pass
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out[C.SYSTEM_HOST_MEMORY_PEAK] = peak_kib * 1024 / gib
    out.setdefault(C.SYSTEM_HOST_MEMORY_RSS, out[C.SYSTEM_HOST_MEMORY_PEAK])
    return out


def memory(device: torch.device) -> dict[str, float]:
    """GPU and host memory of this process, logged on every device."""
    return {**gpu_memory(device), **host_memory()}


class Stopwatch:
    """Wall time of a window of steps, synchronising the device only when read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = time.perf_counter()

    def restart(self) -> None:
        """Leave out the time since the last lap (evaluation, checkpoints) from the next one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.start = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


class Window:
    """Sums over the steps between two log records, kept on the device so that steps never sync the host.

    A step whose loss or gradient norm is not finite is counted (``nonfinite``) and left out of the means, by
    device-side selection: no host sync per step, on every recipe."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.grad_norm = torch.zeros((), device=device, dtype=torch.float64)
        self.good = torch.zeros((), device=device, dtype=torch.float64)
        self.bad = torch.zeros((), device=device, dtype=torch.float64)
        self.steps = 0
        self.tokens = 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, ok: bool, tokens: int) -> None:
        """``ok=False``: a step already skipped (and counted) by the host-side check."""
        self.steps += 1
        self.tokens += tokens
        if ok:
            loss, grad_norm = loss.detach().double(), grad_norm.detach().double()
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            self.loss += torch.where(finite, loss, 0.0)
            self.grad_norm += torch.where(finite, grad_norm, 0.0)
            self.good += finite
            self.bad += ~finite

    def nonfinite(self) -> int:
        return int(self.bad)

    def means(self) -> tuple[float, float]:
        good = float(self.good)
        if not good:
            return float("nan"), float("nan")
        return float(self.loss) / good, float(self.grad_norm) / good


class RunClock:
    """Where a run's wall time went, by phase, and its steady-state training throughput.

    ``compile``: the first step of the process (compilation, autotuning, allocator warm-up); ``train``: every
    later step; ``eval``: validation, inference timing and the end-of-run reports; ``other``: the rest (setup
    inside the loop, checkpoints, logging). The steady-state rate counts the windows after the first logged one;
    a run with only one window falls back to that window without its first step.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = {"compile": 0.0, "train": 0.0, "eval": 0.0}
        self.tokens = 0  # trained by this process's run (a resumed run counts from its resume)
        self._windows = 0
        self._steady = [0, 0.0]  # tokens, seconds
        self._first = [0, 0.0]

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def window(self, tokens: int, seconds: float) -> None:
        """A logged window of training steps (``tokens`` and ``seconds`` without the process's first step)."""
        self.add("train", seconds)
        target = self._first if self._windows == 0 else self._steady
        target[0] += tokens
        target[1] += seconds
        self._windows += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def steady_tokens_per_second(self) -> float:
        tokens, seconds = self._steady if self._steady[1] > 0 else self._first
        return tokens_per_second(tokens, seconds)

    def summary(self) -> dict[str, float]:
        total = self.elapsed()
        other = max(0.0, total - sum(self.seconds.values()))
        return {
            C.SUMMARY_TOTAL_TIME: total,
            C.SUMMARY_COMPILE_TIME: self.seconds["compile"],
            C.SUMMARY_TRAIN_TIME: self.seconds["train"],
            C.SUMMARY_EVAL_TIME: self.seconds["eval"],
            C.SUMMARY_OTHER_TIME: other,
            C.SUMMARY_AVG_TOKENS_PER_SEC: self.steady_tokens_per_second(),
            C.SUMMARY_WALL_TOKENS_PER_SEC: tokens_per_second(self.tokens, total),
        }


def compiled_frames() -> int:
    """Frames torch.compile has compiled in this process so far (0 when it was never used)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["frames"]["ok"]) if utils is not None else 0
