"""`make bench`: run every benchmark on this GPU, then rewrite the README's results table from the JSON files.

    python benchmarks/run_all.py                       # all benchmarks, then the table
    python benchmarks/run_all.py --only train-125m,fsdp  # some of them (names: --list), then the table
    python benchmarks/run_all.py --table               # only rebuild the table from benchmarks/results/*.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_train import fastest_baseline
from common import settings_label
from figures import commit_time, profile_bars, profile_figure, speed_figure, speed_points

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = RESULTS / "figures"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

RUNS = {
    "ops": ["benchmarks/bench_ops.py"],
    "profile-linear": ["benchmarks/profile_train.py", "--size", "125m", "--context", "2048", "--layer", "linear"],
    "profile-mlp": ["benchmarks/profile_train.py", "--size", "125m", "--context", "2048", "--layer", "mlp",
                    "--models", "ttt"],
    # 125m in one run per TTT layer, so the table can be filled in shorter calls
    **{f"train-125m-{layer}": ["benchmarks/bench_train.py", "--sizes", "125m", "--contexts", "2048,8192,32768",
                               "--tokens", "16384", "--layers", layer, "--ttt-modes", "compiled", "--compile-llama",
                               "--compile-llama-max-context", "8192", "--out", "benchmarks/results"]
       for layer in ("linear", "mlp")},
    **{f"train-{size}": ["benchmarks/bench_train.py", "--sizes", size, "--contexts", "2048,8192,32768", "--tokens",
                         "16384", "--layers", "linear", "--ttt-modes", "blocks", "--compile-llama",
                         "--compile-llama-max-context", "8192", "--out", "benchmarks/results"]
       for size in ("350m", "760m")},
    "train-1.3b": ["benchmarks/bench_train.py", "--sizes", "1.3b", "--contexts", "2048,8192,32768", "--tokens",
                   "16384", "--layers", "linear", "--ttt-modes", "blocks", "--checkpointing", "--compile-llama",
                   "--compile-llama-max-context", "8192", "--out", "benchmarks/results"],
    # the unsharded 1.3b row above, through FSDP at world size 1 (same batch, context, compile and checkpointing)
    "fsdp": ["benchmarks/bench_fsdp.py", "--size", "1.3b", "--batch", "8", "--context", "2048", "--compile",
             "blocks", "--checkpointing", "--out", "benchmarks/results"],
    "decode": ["benchmarks/bench_decode.py", "--size", "125m", "--batch", "64", "--prompt", "2048",
               "--compile-prefill"],
    "default": ["benchmarks/bench_default.py"],
}


def newest(prefix: str) -> dict | None:
    """The result file of ``prefix`` with the latest date inside it (file times are checkout times in a clone)."""
    found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{prefix}*.json"))]
    return max(found, key=lambda d: d.get("date", "")) if found else None


def train_runs() -> dict[tuple[str, str, str], list[dict]]:
    """The training rows of each run, by (device, date, commit): rows of different runs are never compared."""
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for p in sorted(RESULTS.glob("train-*.json")):
        data = json.loads(p.read_text())
        runs.setdefault((data["device"], data["date"], data["commit"][:8]), []).extend(data["rows"])
    return runs


def draw_figures() -> list[Path]:
    """Draw the figures of ``figures.py`` for the GPU of the newest training run (the README shows them under its
    targets table); returns the files written."""
    runs = {key: rows for key, rows in train_runs().items() if key[0] != "cpu"}
    if not runs:
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # a GPU image without it: the results and tables still stand
        print("warning: matplotlib is not installed, so the figures were not redrawn (`run_all.py --table` elsewhere)")
        return []
    device = max(runs, key=lambda key: key[1])[0]
    points = speed_points([(date, commit, rows, fastest_baseline(rows))
                           for (dev, date, commit), rows in runs.items() if dev == device], ROOT)
    profiles = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("profile-125m-2048-*.json"))]
    bars = profile_bars([d for d in profiles if d["device"] == device], ROOT)
    drawn = [speed_figure(points, device, FIGURES / "speed-vs-baseline.png"),
             profile_figure(bars, f"Where a compiled training step goes: 125m, 8×2048, bf16, {device}",
                            FIGURES / "step-profile-125m-2048.png")]
    return [path for path in drawn if path is not None]


def table() -> str:
    lines = []
    order = {"125m": 0, "350m": 1, "760m": 2, "1.3b": 3}
    runs = train_runs()  # one table per run
    newest_first = sorted(runs.items(), key=lambda kv: (kv[0][1], commit_time(kv[0][2], ROOT)), reverse=True)
    for (device, date, commit), train in newest_first:
        train.sort(key=lambda r: (order.get(r["size"], 9), r["context"], r["model"] != "ttt"))
        lines += ["" if lines else None, f"Training, {device}, {date}, commit {commit} (bf16, fused AdamW; ratio "
                  "against the fastest baseline of the same width measured on the same GPU in the same run: "
                  "transformers' Llama eager or compiled, or the project's Transformer++ arm; runs before "
                  "2026-12 had no arm row):", "",
                  "| model | size | context | batch | tokens/s | × fastest baseline | MFU | peak GiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines = [x for x in lines if x is not None]
        best = fastest_baseline(train)
        for r in train:
            mode = {"blocks": " compiled per block", True: " compiled"}.get(r["compiled"], "")
            if r["ttt_layer"]:
                kernel = f" ({r['kernel']})" if r.get("kernel") not in (None, "triton") else ""
                name = f"TTT-{r['ttt_layer']}{kernel}{mode}{settings_label(r.get('kernel_settings'))}"
            else:
                name = ("Transformer++ arm" if r["model"] == "attention" else "Llama") + mode
            name += " + activation checkpointing" if r.get("checkpointing") else ""
            if "error" in r:
                lines.append(f"| {name} | {r['size']} | {r['context']} | {r['batch']} | {r['error']} | | | |")
                continue
            key = (r["size"], r["context"])
            ratio = f"{r['tokens_per_sec'] / best[key]:.2f}" if key in best else "- (no baseline in this run)"
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
            lines.append(f"| {name} | {r['size']} | {r['context']} | {r['batch']} | {r['tokens_per_sec']:,.0f} | "
                         f"{ratio} | {mfu} | {r['peak_memory_gib']:.1f} |")
    decode = newest("decode-")
    if decode and decode["rows"] and "what" in decode["rows"][0]:
        rows, r0 = decode["rows"], decode["rows"][0]
        pre = [r for r in rows if r["what"] == "prefill" and "prefill_s" in r]
        llama_pre = min((r["prefill_s"] for r in pre if r["model"] == "llama"), default=0)
        dec = [r for r in rows if r["what"] == "decode"]
        llama_dec = next((r["decode_tokens_per_sec"] for r in dec if r["model"] == "llama"), 0)
        lines += ["", f"Prefill and decoding, {decode['device']}, {decode['date']}, commit {decode['commit'][:8]} "
                      f"({r0['size']}, batch {r0['batch']}, {r0['prompt']}-token prompt, bf16, greedy; "
                      "`benchmarks/bench_decode.py`):", "",
                  "| model | prefill ms | × Llama prefill (faster) | decode tokens/s | × Llama generate() |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in pre:
            name = (f"TTT-{r['ttt_layer']}" if r["ttt_layer"] else "Llama") + (" compiled" if r["compiled"] else "")
            ratio = r["prefill_s"] / llama_pre if llama_pre else 0
            lines.append(f"| {name} | {r['prefill_s'] * 1000:.0f} | {ratio:.2f} | | |")
        for r in dec:
            name = (f"TTT-{r['ttt_layer']}" if r["ttt_layer"] else "Llama generate() (dynamic KV cache)") + (
                " (CUDA graphs)" if r.get("graphs") else "")
            ratio = r["decode_tokens_per_sec"] / llama_dec if llama_dec else 0
            lines.append(f"| {name} | | | {r['decode_tokens_per_sec']:,.0f} | {ratio:.2f} |")
    elif decode:
        base = next((r["decode_tokens_per_sec"] for r in decode["rows"] if r["model"] == "llama"), None)
        lines += ["", f"Decoding, {decode['device']}, {decode['date']} (batch {decode['rows'][0]['batch']}, "
                      f"{decode['rows'][0]['prompt']}-token prompt, greedy):", "",
                  "| model | decode tokens/s | × Llama generate() | prefill ms |", "| --- | ---: | ---: | ---: |"]
        for r in decode["rows"]:
            name = f"TTT-{r['ttt_layer']}" if r["ttt_layer"] else "Llama (KV cache)"
            ratio = r["decode_tokens_per_sec"] / base if base else 0
            lines.append(f"| {name} | {r['decode_tokens_per_sec']:,.0f} | {ratio:.2f} | {r['prefill_s'] * 1000:.0f} |")
    lines += fsdp_lines()
    default = newest("default-")
    if default:
        lines += ["", f"The embedded default run (`python -m tttexp.train`, no overrides), {default['device']} with "
                      f"{default['cpu_count']} cores, {default['date']}: {default['wall_s']:.0f} s wall from start to "
                      f"exit, final validation loss {default['final_val_loss']:.2f}."]
    ops = newest("ops-")
    if ops and ops.get("cases"):
        lines += ["", f"Inner-loop op (`benchmarks/bench_ops.py`), {ops['device']}, {ops['date']}, commit "
                      f"{ops['commit'][:8]} (bf16, forward and backward of one layer's op; \"graph\": the same call "
                      "replayed from a CUDA graph, the GPU time without the host's launches):", "",
                  "| layer | B | T | H | F | fwd ms | fwd+bwd ms | fwd+bwd from a graph, ms | × PyTorch reference |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in ops["cases"]:
            graph = f"{r['triton_fwd_bwd_graph_ms']:.3f}" if "triton_fwd_bwd_graph_ms" in r else "-"
            speed = f"{r['speedup_fwd_bwd']:.0f}" if "speedup_fwd_bwd" in r else "-"
            lines.append(f"| {r['layer']} | {r['B']} | {r['T']} | {r['H']} | {r['F']} | {r['triton_fwd_ms']:.3f} | "
                         f"{r['triton_fwd_bwd_ms']:.3f} | {graph} | {speed} |")
    return "\n".join(lines) if lines else "No results yet: run `make bench` on a GPU."


def fsdp_lines() -> list[str]:
    """The FSDP rows (world size 1 on one GPU), each beside the unsharded TTT row of the same size, context,
    compile and checkpointing measured on the same GPU the same day, if there is one."""
    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("fsdp-*.json"))]
    runs = [r for r in runs if r.get("device", "cpu") != "cpu"]
    if not runs:
        return []
    unsharded = {}
    for (device, date, _), rows in train_runs().items():
        for r in rows:
            if r["model"] == "ttt" and "tokens_per_sec" in r:
                key = (device, date, r["size"], r["ttt_layer"], r["context"], str(r["compiled"]),
                       bool(r.get("checkpointing")))
                unsharded[key] = r
    lines = ["", "FSDP at world size 1 (`benchmarks/bench_fsdp.py`: the project's FullyShardedDataParallel, bf16 mixed "
                 "precision, fused AdamW), beside the unsharded row of the same settings from the same GPU and day:",
             "", "| model | size | context | batch | compile | world size | tokens/s | × unsharded | peak GiB | "
                 "unsharded peak GiB | device, date, commit |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(runs, key=lambda r: (r["date"], r["size"]), reverse=True):
        key = (r["device"], r["date"], r["size"], r["ttt_layer"], r["context"], r["compile"],
               bool(r.get("activation_checkpointing")))
        base = unsharded.get(key)
        ratio = f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}" if base else "- (no unsharded row that day)"
        base_mem = f"{base['peak_memory_gib']:.1f}" if base else "-"
        name = f"TTT-{r['ttt_layer']}" + (" + activation checkpointing" if r.get("activation_checkpointing") else "")
        lines.append(f"| {name} | {r['size']} | {r['context']} | {r['batch_per_rank']} | {r['compile']} | "
                     f"{r['world_size']} | {r['tokens_per_sec']:,.0f} | {ratio} | {r['peak_memory_gib']:.1f} | "
                     f"{base_mem} | {r['device']}, {r['date']}, {r['commit'][:8]} |")
    return lines


def write_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for path in draw_figures():
        print(f"drawn: {path.relative_to(ROOT)}")
    block = f"{START}\n{table()}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text += f"\n## Benchmarks\n\n{block}\n"
    readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", action="store_true", help="only rebuild the README table")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the benchmark names and their commands")
    args = parser.parse_args()
    if args.list:
        for name, cmd in RUNS.items():
            print(f"{name:16s} {' '.join(cmd)}")
        return
    names = list(RUNS) if args.only is None else [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if not args.table:
        for name in names:
            print("$", " ".join(RUNS[name]), flush=True)
            subprocess.run([sys.executable, *RUNS[name]], cwd=ROOT, check=False)
    write_readme()
    print(table())


if __name__ == "__main__":
    main()
