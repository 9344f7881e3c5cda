"""Throughput, FLOPs, MFU and memory: small pure functions, unit-tested."""

from __future__ import annotations

import time

import torch

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


def train_flops_per_token(num_params: int, ttt_fwd_flops: float) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus three times the inner loop's forward."""
    return 6.0 * num_params + 3.0 * ttt_fwd_flops


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
    """Allocated and reserved GPU memory in GiB (empty off CUDA)."""
    if device.type != "cuda":
        return {}
    gib = 1024**3
    return {
        "system/gpu_memory_allocated": torch.cuda.memory_allocated(device) / gib,
        "system/gpu_memory_reserved": torch.cuda.memory_reserved(device) / gib,
        "system/gpu_memory_peak": torch.cuda.max_memory_allocated(device) / gib,
    }


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
