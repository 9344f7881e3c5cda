"""EleutherAI's lm-evaluation-harness on a tttexp model: ``python -m tttexp.eval checkpoint=... harness.tasks=[...]``.

The harness runs in this process through its Python API (``lm_eval.simple_evaluate``), with the loaded model wrapped
as its ``HFLM``, so a run checkpoint of any format is evaluated as it is, without an export. Results go to the eval
run's directory (``harness.json``; ``metrics.jsonl`` and ``summary.json`` through the project's Logger, which also
sends them to wandb under ``logging=wandb``) and to the summary table printed at the end, as ``harness/<task>/<metric>``
(the harness's filter name is appended when it is not ``none``).

``lm-eval`` is an optional dependency (``pip install -e '.[eval]'``); it is imported only when tasks are given.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tttexp.errors import ConfigError
from tttexp.loggers import catalogue as C

INSTALL_HINT = "the harness needs lm-eval: pip install -e '.[eval]' (or pip install 'lm-eval>=0.4,<0.5')"
RESULTS_FILE = "harness.json"
PREFIX = C.HARNESS
NOT_METRICS = ("alias", "name", "sample_len")  # entries of a task's results that are not metrics


@dataclass
class HarnessConfig:
    """``harness`` in ``python -m tttexp.eval``: which lm-evaluation-harness tasks to run, and how."""

    tasks: list[str] = field(default_factory=list)  # lm_eval task, group or tag names; empty: no harness run
    num_fewshot: int | None = None  # examples per prompt; None: each task's own default
    limit: float | None = None  # documents per task: a count (>= 1) or a fraction (< 1); None: all (a smoke test)
    batch_size: int = 8  # requests per forward pass
    max_length: int | None = None  # tokens per window of the model; None: the harness's default (2048)
    include_path: str | None = None  # a folder of extra task YAML files (their data paths are relative to the cwd)
    include_defaults: bool = True  # index the harness's bundled tasks too (false: only include_path; faster)
    bootstrap_iters: int = 100000  # resamples for the standard errors; 0: none
    log_samples: bool = False  # write every request with its inputs and results to harness_samples.json
    seed: int = 0  # the harness's random, numpy, torch and few-shot seeds


def import_lm_eval() -> Any:
    """``lm_eval``, or a one-line :class:`ConfigError` that says how to install it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return lm_eval


def check(settings: HarnessConfig) -> None:
    """Value checks, before any model is loaded."""
    if not settings.tasks:
        raise ConfigError("harness.tasks is empty; give tasks, e.g. harness.tasks=[lambada_openai,hellaswag]")
    if settings.batch_size < 1:
        raise ConfigError(f"harness.batch_size={settings.batch_size} must be >= 1")
    if settings.limit is not None and settings.limit <= 0:
        raise ConfigError(f"harness.limit={settings.limit} must be > 0 (a count, or a fraction below 1)")
    if settings.max_length is not None and settings.max_length < 2:
        raise ConfigError(f"harness.max_length={settings.max_length} must be >= 2")
    if settings.include_path is not None and not Path(settings.include_path).is_dir():
        raise ConfigError(f"harness.include_path={settings.include_path}: no such directory")


def check_config(node: Any) -> HarnessConfig:
    """The ``harness`` node of the eval config as settings: lm-eval importable and values sane (before the
    model is loaded)."""
    from omegaconf import OmegaConf

    settings = HarnessConfig(**OmegaConf.to_container(node, resolve=True))
    import_lm_eval()
    check(settings)
    return settings


@contextlib.contextmanager
def _no_cache(model: Any) -> Iterator[None]:
    """Whole-window forward passes without building a TTT cache (the harness never continues a sequence)."""
    saved = model.config.use_cache
    model.config.use_cache = False
    try:
        yield
    finally:
        model.config.use_cache = saved


def run_tasks(model: Any, tokenizer: Any, settings: HarnessConfig,
              autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
    """Run ``settings.tasks`` on ``model`` (a ``TTTForCausalLM`` on its device) with a transformers ``tokenizer``;
    returns the harness's results dict (``results``, ``configs``, ``n-samples``, ...)."""
    check(settings)
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=settings.include_path, include_defaults=settings.include_defaults)
    unknown = [name for name in settings.tasks if name not in tasks.all_tasks
               and not any(c in name for c in "*?[") and not name.endswith((".yaml", ".yml"))]
    if unknown:
        where = f" under {settings.include_path}" if settings.include_path else ""
        raise ConfigError(f"harness.tasks: unknown task(s) {', '.join(unknown)}{where} (lm_eval --tasks list "
                          "names them all)")
    model.eval()
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=settings.batch_size,
              max_length=settings.max_length)
    with _no_cache(model), autocast or contextlib.nullcontext():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot, limit=settings.limit,
            bootstrap_iters=settings.bootstrap_iters, log_samples=settings.log_samples, task_manager=tasks,
            random_seed=settings.seed, numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
    if results is None:  # a process other than the harness's rank 0
        return {}
    return dict(results)


def flat_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """``harness/<task>/<metric>`` -> value, for every numeric metric of every task and group."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                metric, _, filt = key.partition(",")
                name = metric if filt in ("", "none") else f"{metric}_{filt}"
                out[f"{PREFIX}{task}/{name}"] = float(value)
    return out


def hf_tokenizer(checkpoint: Path, data: Any) -> Any:
    """The transformers tokenizer of the evaluated model: a ``save_pretrained`` directory's own, else the data's
    (the tokenizer the model was trained on, as the eval app sets it up)."""
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and (checkpoint / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    tokenizer = data.tokenizer
    backend = getattr(tokenizer, "_backend", None)
    if hasattr(backend, "tok"):  # a transformers tokenizer already (data.tokenizer=<name or directory>)
        return backend.tok
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        if not tokenizer.save_pretrained(folder):
            raise ConfigError(f"the harness needs a transformers tokenizer; {tokenizer.name} has none (a "
                              "SentencePiece file): use data.tokenizer=bpe or a transformers tokenizer directory")
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def table(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the results: one row per task and metric, with its standard error."""
    columns = ["task", "metric", "value", "stderr", "n_shot", "samples"]
    rows = []
    shots = results.get("n-shot") or {}
    counts = results.get("n-samples") or {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if key in NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, int | float):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                stderr = float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr) else None
                name = metric if filt in ("", "none") else f"{metric}_{filt}"
                rows.append([task, name, float(value), stderr, shots.get(task),
                             (counts.get(task) or {}).get("effective")])
    return columns, rows


def write_results(results: Mapping[str, Any], out_dir: Path) -> Path:
    """``harness.json`` in ``out_dir`` (per-request samples, when kept, in ``harness_samples.json``)."""
    out_dir = Path(out_dir)
    kept = {k: v for k, v in results.items() if k != "samples"}
    path = out_dir / RESULTS_FILE
    path.write_text(json.dumps(kept, indent=2, default=str, sort_keys=True))
    if results.get("samples"):
        (out_dir / "harness_samples.json").write_text(json.dumps(results["samples"], indent=1, default=str))
    return path


def evaluate(cfg: Any, model: Any, data: Any, out_dir: Path, autocast: Any, own: Mapping[str, Any]) -> dict:
    """The harness part of ``python -m tttexp.eval``: run ``cfg.harness``, write ``harness.json``, report the
    results with the eval's own ones (``own``) through the Logger, print the table; returns the flat metrics."""
    from omegaconf import OmegaConf

    from tttexp.app.build import build_logger
    from tttexp.app.table import print_summary
    from tttexp.training.checkpoint import step_of

    settings = check_config(cfg.harness)
    tokenizer = hf_tokenizer(Path(cfg.checkpoint), data)
    results = run_tasks(model, tokenizer, settings, autocast=autocast)
    flat = flat_metrics(results)
    write_results(results, out_dir)
    step = max(step_of(Path(cfg.checkpoint)), 0)
    logger = build_logger(cfg, out_dir, True)
    logger.start(out_dir, OmegaConf.to_container(cfg, resolve=True),
                 {"checkpoint": str(cfg.checkpoint), C.HARNESS_TASKS: ",".join(settings.tasks)})
    scalars = {k: v for k, v in own.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    summary = {**scalars, **flat}
    failed = True
    try:
        logger.log(summary, step)
        logger.log_table(C.HARNESS_RESULTS, *table(results), step)
        failed = False
    finally:
        logger.finish(summary, failed=failed)
    print_summary(summary, out_dir)
    return {**flat, C.HARNESS_RESULTS_FILE: RESULTS_FILE, C.HARNESS_SETTINGS: asdict(settings)}
