"""Inference timing on a fixed prompt: prefill latency and cached decode throughput, plus a greedy sample."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from tttexp.loggers import catalogue as C
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

    Returns the ``inference/`` record (prefill_ms, decode_tokens_per_sec, decode_ms_per_token) and the generated
    ids ``[B, new_tokens]``.
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
        C.INFERENCE_PREFILL_MS: 1000.0 * prefill,
        C.INFERENCE_DECODE_TOKENS_PER_SEC: prompt.shape[0] * steps / decode if decode > 0 else 0.0,
        C.INFERENCE_DECODE_MS_PER_TOKEN: 1000.0 * decode / steps,
    }
    return metrics, torch.cat(generated, dim=1)


def inference_report(model: TTTForCausalLM, data: Any, device: torch.device,
                     autocast: contextlib.AbstractContextManager | None = None) -> tuple[dict[str, float], str | None]:
    """Time inference on the first 64 tokens of the validation set: the timings as a record, and the prompt with
    its greedy continuation as text (None without a tokenizer)."""
    prompt = next(data.val_set.batches(1))["input_ids"][:, :64].to(device)
    record, generated = time_inference(model, prompt, new_tokens=32, autocast=autocast)
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        return record, None
    return record, tokenizer.decode(prompt[0].tolist()) + " ▶ " + tokenizer.decode(generated[0].tolist())
