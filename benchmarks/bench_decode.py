"""Prefill and decoding throughput after a long prompt: TTT with its recurrent cache against a Llama's KV cache.

    python benchmarks/bench_decode.py --size 125m --batch 64 --prompt 2048 --new 128 [--compile-prefill]

Prefill: the median of 3 calls on the full prompt after one warm-up call of the same shape (the first call at a new
shape also grows the allocator), eager and, with --compile-prefill, ``torch.compile``d; the ratio uses the faster
Llama. Decoding, greedy: TTT steps its cache token by token, eager ("ttt") and with each step replayed from CUDA
graphs ("ttt-graphs": one graph per position inside a mini-batch, since the layer's work differs by position); the
graphed tokens are checked to equal the eager ones. The Llama runs ``generate()`` (its default dynamic KV cache);
its per-token time is ``(t(new) - t(1)) / (new - 1)``, so its own prefill is not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
from common import VOCAB, add_row, commit, llama, result_path, ttt

from tttexp.models import TTTCache

BF16 = dict(device_type="cuda", dtype=torch.bfloat16)


def _sync_time(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.no_grad()
def prefill_s(model, prompt: torch.Tensor, kind: str, compiled: bool, reps: int = 3) -> float:
    call = torch.compile(model) if compiled else model
    kw = {"use_cache": True} if kind == "ttt" else {"use_cache": False}
    with torch.autocast(**BF16):
        _sync_time(lambda: call(prompt, **kw))
        return statistics.median(_sync_time(lambda: call(prompt, **kw)) for _ in range(reps))


def _cache_tensors(cache: TTTCache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in layer.tensors()]


def _clone(cache: TTTCache) -> TTTCache:
    out = TTTCache(len(cache.layers))
    out.seqlen_offset = cache.seqlen_offset
    out.layers = [layer.map(torch.Tensor.clone) for layer in cache.layers]
    return out


class GraphedDecoder:
    """Greedy decoding with every step replayed from a CUDA graph.

    The K positions of a mini-batch run different code (position 0 starts the accumulators, K-1 applies them), so
    there is one graph per position, captured in order into one memory pool: graph i+1 reads the cache tensors
    graph i wrote. After the last position, its state is copied into the first graph's inputs.
    """

    def __init__(self, model, cache: TTTCache, token: torch.Tensor, k: int) -> None:
        self.k = k
        self.token = token.clone()
        saved, offset = _clone(cache), cache.seqlen_offset
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.autocast(**BF16, cache_enabled=False):
            for _ in range(k):  # compile the kernels, warm the allocator; one whole cycle leaves the same layout
                model(self.token, cache=cache, use_cache=True)
        torch.cuda.current_stream().wait_stream(stream)
        self.inputs = _cache_tensors(cache)
        torch._foreach_copy_(self.inputs, _cache_tensors(saved))
        pool = torch.cuda.graph_pool_handle()
        self.graphs, self.logits = [], []
        with torch.autocast(**BF16, cache_enabled=False):
            for _ in range(k):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = model(self.token, cache=cache, use_cache=True)
                self.graphs.append(graph)
                self.logits.append(out.logits)
        self.outputs = _cache_tensors(cache)
        cache.seqlen_offset = offset
        self.pos = offset % k

    def step(self) -> torch.Tensor:
        """Decode one token (the one in ``self.token``); returns the next token, also left in ``self.token``."""
        i = self.pos
        self.graphs[i].replay()
        if i == self.k - 1:
            torch._foreach_copy_(self.inputs, self.outputs)
        self.token.copy_(self.logits[i][:, -1].argmax(-1, keepdim=True))
        self.pos = (i + 1) % self.k
        return self.token


@torch.no_grad()
def ttt_decode(model, prompt: torch.Tensor, new: int, graphs: bool) -> tuple[float, float]:
    """Seconds for ``new`` tokens after the prompt; and the fraction of them equal to eager decoding's."""
    with torch.autocast(**BF16):
        out = model(prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    eager_cache = _clone(cache)
    if not graphs:
        def run():
            nonlocal token
            with torch.autocast(**BF16):
                for _ in range(new):
                    token = model(token, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        return _sync_time(run), 1.0
    dec = GraphedDecoder(model, cache, token, model.config.mini_batch_size)
    toks = []
    seconds = _sync_time(lambda: toks.extend(dec.step().clone() for _ in range(new)))
    ref, same = token, 0
    with torch.autocast(**BF16):
        for got in toks[: min(new, 48)]:
            ref = model(ref, cache=eager_cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            same += int(torch.equal(ref, got))
    return seconds, same / min(new, 48)


@torch.no_grad()
def llama_decode_s(model, prompt: torch.Tensor, new: int) -> float:
    def gen(n: int):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.autocast(**BF16):
        gen(2)()
        return _sync_time(gen(new)) - _sync_time(gen(1))


def prefill_row(model, prompt: torch.Tensor, kind: str, layer: str | None, compiled: bool, common: dict) -> dict:
    row = {"model": kind, "ttt_layer": layer, **common, "what": "prefill", "compiled": compiled}
    try:
        row["prefill_s"] = prefill_s(model, prompt, kind, compiled)
    except Exception as exc:  # noqa: BLE001 (a failed compile is a row, not the end of the run)
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="125m")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--layers", default="linear")
    parser.add_argument("--compile-prefill", action="store_true")
    parser.add_argument("--out", default=None, help="a folder or a .json file for the result")
    args = parser.parse_args()
    device = torch.device("cuda")
    prompt = torch.randint(0, VOCAB, (args.batch, args.prompt), device=device)
    result = {"benchmark": "decode", "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "commit": commit(), "torch": torch.__version__, "rows": []}
    rows = result["rows"]
    out = result_path(result, args.out, f"decode-{args.size}")

    def add(row: dict) -> None:
        add_row(result, out, row)
        print(json.dumps(row), flush=True)

    common = {"size": args.size, "batch": args.batch, "prompt": args.prompt}
    modes = [False, True] if args.compile_prefill else [False]
    for kind, layer in [("ttt", layer) for layer in args.layers.split(",")] + [("llama", None)]:
        torch.manual_seed(0)
        model = (ttt(args.size, layer, False, "auto") if kind == "ttt" else llama(args.size)).to(device).eval()
        for compiled in modes[:1]:
            add(prefill_row(model, prompt, kind, layer, compiled, common))
        torch.cuda.reset_peak_memory_stats()
        if kind == "ttt":
            for graphs in (False, True):
                seconds, same = ttt_decode(model, prompt, args.new, graphs)
                add({"model": kind, "ttt_layer": layer, **common, "what": "decode", "graphs": graphs,
                     "new_tokens": args.new, "decode_tokens_per_sec": args.batch * args.new / seconds,
                     "equal_to_eager": same, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        else:
            seconds = llama_decode_s(model, prompt, args.new)
            add({"model": kind, "ttt_layer": None, **common, "what": "decode", "graphs": False,
                 "new_tokens": args.new - 1, "decode_tokens_per_sec": args.batch * (args.new - 1) / seconds,
                 "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        for compiled in modes[1:]:  # last: eager decoding is timed before anything is compiled
            add(prefill_row(model, prompt, kind, layer, compiled, common))
        torch._dynamo.reset()
        del model
        torch.cuda.empty_cache()
    print(f"written: {out}")
    print(summary(rows))


def summary(rows: list[dict]) -> str:
    """Prefill time and decode tokens/s, each against the Llama (the faster of its prefills)."""
    pre = [r for r in rows if r["what"] == "prefill" and "prefill_s" in r]
    llama_pre = min((r["prefill_s"] for r in pre if r["model"] == "llama"), default=float("nan"))
    dec = [r for r in rows if r["what"] == "decode"]
    llama_dec = next((r["decode_tokens_per_sec"] for r in dec if r["model"] == "llama"), float("nan"))
    lines = []
    for r in pre:
        name = (f"ttt-{r['ttt_layer']}" if r["ttt_layer"] else "llama") + (" compiled" if r["compiled"] else "")
        lines.append(f"prefill {name:<22} {r['prefill_s'] * 1000:8.1f} ms  x{r['prefill_s'] / llama_pre:5.2f} llama")
    for r in dec:
        name = (f"ttt-{r['ttt_layer']}" if r["ttt_layer"] else "llama generate()") + (" graphs" if r["graphs"] else "")
        lines.append(f"decode  {name:<22} {r['decode_tokens_per_sec']:8,.0f} tok/s  "
                     f"x{r['decode_tokens_per_sec'] / llama_dec:5.2f} llama  mem {r['peak_memory_gib']:.1f} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
