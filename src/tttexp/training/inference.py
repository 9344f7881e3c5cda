"""Inference timing on a fixed prompt: prefill latency and cached decode throughput, plus a greedy sample."""

from __future__ import annotations

import contextlib
import time

import torch

from tttexp.models import TTTForCausalLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_inference(
    model: TTTForCausalLM,
    prompt: torch.Tensor,
    new_tokens: int = 32,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Prefill ``prompt [B, T]`` with a cache, then decode ``new_tokens`` greedily one token at a time.

    Returns ``{"inference/prefill_ms", "inference/decode_tokens_per_sec", "inference/decode_ms_per_token"}`` and
    the generated ids ``[B, new_tokens]``.
    """
    was_training = model.training
    model.eval()
    device = prompt.device
    ctx = autocast or contextlib.nullcontext()
    try:
        with ctx:
            _sync(device)
            start = time.perf_counter()
            out = model(prompt, use_cache=True)
            _sync(device)
            prefill = time.perf_counter() - start
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            generated = [token]
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(token, cache=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(token)
            _sync(device)
            decode = time.perf_counter() - start
    finally:
        model.train(was_training)
    steps = max(1, new_tokens - 1)
    metrics = {
        "inference/prefill_ms": 1000.0 * prefill,
        "inference/decode_tokens_per_sec": prompt.shape[0] * steps / decode if decode > 0 else 0.0,
        "inference/decode_ms_per_token": 1000.0 * decode / steps,
    }
    return metrics, torch.cat(generated, dim=1)
