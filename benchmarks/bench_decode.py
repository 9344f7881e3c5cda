"""Decoding throughput after a long prompt: TTT with its recurrent cache against a Llama's KV-cache generate().

    python benchmarks/bench_decode.py --size 125m --batch 64 --prompt 2048 --new 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from common import VOCAB, commit, llama, ttt


@torch.no_grad()
def ttt_decode(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    return prefill, time.perf_counter() - t0


@torch.no_grad()
def llama_decode(model, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(prompt, use_cache=False)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    return prefill, total - prefill


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="125m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--layers", default="linear")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    prompt = torch.randint(0, VOCAB, (args.batch, args.prompt), device=device)
    rows = []
    candidates = [("ttt", layer) for layer in args.layers.split(",")] + [("llama", None)]
    for kind, layer in candidates:
        torch.manual_seed(0)
        model = (ttt(args.size, layer, False, "auto") if kind == "ttt" else llama(args.size)).to(device).eval()
        run = ttt_decode if kind == "ttt" else llama_decode
        run(model, prompt[:, :256], 8)  # warm-up: kernels, cuBLAS handles
        torch.cuda.reset_peak_memory_stats()
        prefill, decode = run(model, prompt, args.new)
        rows.append({"model": kind, "ttt_layer": layer, "size": args.size, "batch": args.batch,
                     "prompt": args.prompt, "new_tokens": args.new, "prefill_s": prefill,
                     "decode_tokens_per_sec": args.batch * args.new / decode,
                     "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3})
        print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    result = {"benchmark": "decode", "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "commit": commit(), "rows": rows}
    out = Path(args.out or f"benchmarks/results/decode-{result['date']}-{result['device'].replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    base = next(r["decode_tokens_per_sec"] for r in rows if r["model"] == "llama")
    for r in rows:
        name = f"ttt-{r['ttt_layer']}" if r["ttt_layer"] else "llama"
        print(f"{name:<12} decode {r['decode_tokens_per_sec']:>10,.0f} tok/s  x{r['decode_tokens_per_sec'] / base:5.2f}"
              f"  prefill {r['prefill_s'] * 1000:8.1f} ms  mem {r['peak_memory_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
