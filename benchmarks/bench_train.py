"""Training throughput, MFU and peak memory: TTT models against same-width baselines, in one run.

    python benchmarks/bench_train.py --sizes 125m --contexts 2048,8192,32768 --tokens 16384
Each row times full optimizer steps (forward, backward, fused AdamW) in bf16 autocast, median over timed steps
after warm-up. Two baselines: transformers' Llama (SDPA), eager and, with --compile-llama, compiled; and the
project's own Transformer++ arm (``model.mixer=attention``: the Llama block in this code base), run in each of the
TTT rows' modes, so it gets the same compile. The ratio is against the fastest baseline of the same size and
context.
TTT models run eager, compiled whole ("compiled") or compiled one block at a time ("blocks": every block shares
one compiled graph, so large models compile in a fraction of the time; the head and loss stay eager).
``--kernel-settings '[{}, {"split_bwd": true}]'`` times each TTT row under each set of kernel launch settings
(``model.kernel_settings`` in the app); rows under other settings than the defaults are kept out of the figures.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
from pathlib import Path

import torch
from common import VOCAB, add_row, arm, commit, llama, result_path, settings_label, ttt

from tttexp.models import SIZE_PRESETS
from tttexp.ops.settings import kernel_settings
from tttexp.training.metrics import PEAK_BF16_FLOPS, train_flops_per_token, ttt_flops_per_token

MODES = {"eager": False, "compiled": True, "blocks": "blocks"}
MODE_NAMES = {False: "eager", True: "compiled", "blocks": "blocks"}


def time_steps(model, batch: int, ctx: int, steps: int, warmup: int, compiled: bool | str,
               profile_to: Path | None = None, vocab: int = VOCAB) -> dict:
    device = torch.device("cuda")
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    call = model
    if compiled == "blocks":
        for block in model.model.layers:
            block.compile()
    elif compiled:
        call = torch.compile(model)
    ids = torch.randint(0, vocab, (batch, ctx), device=device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = call(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1000)
    seconds = statistics.median(times)
    result = {"step_s": seconds, "tokens_per_sec": batch * ctx / seconds,
              "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3}
    if profile_to is not None:
        result["profile"] = str(profile_steps(call, opt, ids, profile_to))
    return result


def profile_steps(call, opt, ids, path: Path, steps: int = 2) -> Path:
    """The GPU kernels of ``steps`` optimizer steps, by total time, as a text table at ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = call(input_ids=ids, labels=ids, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    return path


def flops_per_token(kind: str, size: str, ctx: int, layer: str, n_params: int) -> float:
    p = SIZE_PRESETS[size]
    if kind in ("llama", "attention"):  # 6N + causal attention: 6 * layers * ctx * hidden (QK^T, AV; fwd+bwd; halved)
        return 6.0 * n_params + 6.0 * p["num_hidden_layers"] * ctx * p["hidden_size"]
    return train_flops_per_token(n_params, ttt_flops_per_token(p["hidden_size"], p["num_attention_heads"],
                                                               p["num_hidden_layers"], 16, layer))


def measure(kind: str, size: str, ctx: int, batch: int, layer: str, args, compiled: bool | str = False,
            kernel: str = "triton", settings: dict | None = None) -> dict:
    torch.manual_seed(0)
    row = {"model": kind, "size": size, "context": ctx, "batch": batch, "ttt_layer": layer if kind == "ttt" else None,
           "kernel": kernel if kind == "ttt" else None, "compiled": compiled,
           "checkpointing": bool(args.llama_checkpointing if kind == "llama" else args.checkpointing)}
    if settings:
        row["kernel_settings"] = settings
    model = None
    try:
        model = (ttt(size, layer, args.checkpointing, kernel, settings) if kind == "ttt" else
                 arm(size, args.checkpointing) if kind == "attention" else llama(size))
        if kind == "llama" and args.llama_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        n_params = sum(p.numel() for p in model.parameters())
        prof = None
        if args.profile:
            tag = f"{kind}-{layer if kind == 'ttt' else ''}-{size}-{ctx}-{MODE_NAMES[compiled]}"
            prof = Path(args.profile) / f"{tag}.txt"
        row.update(time_steps(model, batch, ctx, args.steps, args.warmup, compiled, prof))
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        row["mfu"] = row["tokens_per_sec"] * flops_per_token(kind, size, ctx, layer, n_params) / peak if peak else None
        row["parameters"] = n_params
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as err:  # noqa: BLE001 - a failed row is reported, the table goes on
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        model = None
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="125m")
    parser.add_argument("--contexts", default="2048,8192")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch = tokens / context)")
    parser.add_argument("--layers", default="linear,mlp")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kernels", default="triton", help="TTT inner-loop kernels to time: triton,torch")
    parser.add_argument("--compile-llama", action="store_true")
    parser.add_argument("--compile-llama-max-context", type=int, default=1 << 30,
                        help="compile the Llama only up to this context (compiled SDPA is slower at 32k)")
    parser.add_argument("--ttt-modes", default="eager", help="eager,compiled,blocks: how to run the TTT models")
    parser.add_argument("--skip-llama", action="store_true", help="no Llama rows (measured in another run)")
    parser.add_argument("--skip-arm", action="store_true", help="no Transformer++ arm rows")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing for TTT")
    parser.add_argument("--llama-checkpointing", action="store_true", help="activation checkpointing for the Llama")
    parser.add_argument("--profile", default=None, help="folder for a kernel-time table of each row")
    parser.add_argument("--out", default=None, help="a folder or a .json file for the result")
    parser.add_argument("--kernel-settings", default="{}",
                        help='the TTT kernels\' launch settings as JSON, or a list of them, each timed: '
                        '\'[{}, {"split_bwd": true}]\' (tttexp.ops.settings; {}: the defaults)')
    args = parser.parse_args()
    settings = json.loads(args.kernel_settings)
    settings = settings if isinstance(settings, list) else [settings]
    for layer in args.layers.split(","):
        for entry in settings:
            try:  # a misspelt setting fails here, before any GPU work
                kernel_settings(layer, entry)
            except ValueError as err:
                parser.error(f"--kernel-settings: {err}")

    result = {
        "benchmark": "train",
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "torch": torch.__version__,
        "rows": [],
    }
    out = result_path(result, args.out, "-".join(["train", *args.sizes.split(","), *args.layers.split(",")]))
    add = functools.partial(add_row, result, out)  # the file is rewritten after every row

    for size in args.sizes.split(","):
        for ctx in map(int, args.contexts.split(",")):
            batch = max(1, args.tokens // ctx)
            for layer in args.layers.split(","):
                for mode in args.ttt_modes.split(","):
                    for kernel in args.kernels.split(","):
                        for entry in settings:
                            add(measure("ttt", size, ctx, batch, layer, args, MODES[mode], kernel, entry))
            if not args.skip_arm:
                for mode in args.ttt_modes.split(","):
                    add(measure("attention", size, ctx, batch, "", args, MODES[mode]))
            if not args.skip_llama:
                add(measure("llama", size, ctx, batch, "", args))
            if args.compile_llama and not args.skip_llama and ctx <= args.compile_llama_max_context:
                add(measure("llama", size, ctx, batch, "", args, compiled=True))
    print_table(result["rows"])


def fastest_baseline(rows: list[dict]) -> dict[tuple, float]:
    """Per (size, context): the tokens/s of the fastest baseline row (any Llama or Transformer++ arm mode)."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["model"] in ("llama", "attention") and "tokens_per_sec" in r:
            key = (r["size"], r["context"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_sec"])
    return best


def row_name(r: dict) -> str:
    mode = {"blocks": "-blocks", True: "-compiled"}.get(r["compiled"], "")
    if r["model"] == "ttt":
        kernel = "" if r["kernel"] == "triton" else f"-{r['kernel']}"
        return f"ttt-{r['ttt_layer']}{kernel}{mode}{settings_label(r.get('kernel_settings'))}"
    return ("transformer++" if r["model"] == "attention" else "llama") + mode


def print_table(rows: list[dict]) -> None:
    best = fastest_baseline(rows)
    print(f"{'model':<22}{'size':<6}{'ctx':>7}{'batch':>6}{'tok/s':>12}{'vs best':>9}{'mfu':>7}{'mem GiB':>9}")
    for r in rows:
        name = row_name(r)
        if "error" in r:
            print(f"{name:<22}{r['size']:<6}{r['context']:>7}{r['batch']:>6}  {r['error'][:40]}")
            continue
        ratio = r["tokens_per_sec"] / best.get((r["size"], r["context"]), float("nan"))
        mfu = f"{r['mfu']:.2f}" if r.get("mfu") else "-"
        print(f"{name:<22}{r['size']:<6}{r['context']:>7}{r['batch']:>6}{r['tokens_per_sec']:>12,.0f}"
              f"{ratio:>9.2f}{mfu:>7}{r['peak_memory_gib']:>9.1f}")


if __name__ == "__main__":
    main()
