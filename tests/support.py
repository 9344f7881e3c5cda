"""Shared test helpers (importable from every test folder): build the app's pieces in-process from a composed
config, read a run's metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from tttexp.app.build import build, build_layout, build_model_and_data
from tttexp.app.preflight import compose_config
from tttexp.training.trainer import Trainer


def build_trainer(overrides: list[str], run_dir: Path, cache_dir: Path, logger=None) -> Trainer:
    """A Trainer exactly as ``train.run`` builds it (without the logger backend unless given)."""
    from omegaconf import OmegaConf

    from tttexp.loggers import NullLogger

    os.environ["TTTEXP_CACHE_DIR"] = str(cache_dir)
    cfg = compose_config(["experiment=smoke", "logging=none", *overrides])
    layout = build_layout(cfg)
    layout.setup(cfg.device, cfg.seed)
    data = build(cfg.data)
    model, _ = build_model_and_data(cfg, layout, data)
    return Trainer(
        model=model, data=data, layout=layout, logger=logger or NullLogger(),
        optim=OmegaConf.to_object(cfg.optim), loop=OmegaConf.to_object(cfg.trainer),
        run_dir=run_dir,
    )


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_by_step(run_dir: Path, key: str) -> dict[int, float]:
    """The last logged value of ``key`` at each step (a resumed run re-logs steps after its checkpoint)."""
    out: dict[int, float] = {}
    for row in records(run_dir):
        if key in row:
            out[row["step"]] = row[key]
    return out


def exit_code_of_the_app(argv: list[str], app: str = "train") -> int | str | None:
    """Run ``python -m tttexp.<app> ARGV`` in this process (the entry: rerun, preflight, the run directory's
    owner; then Hydra and the job) and return its exit code. The logging handlers Hydra installs and the console
    copy into a run's log are removed afterwards."""
    import importlib

    module = importlib.import_module(f"tttexp.app.{app}")
    root = logging.getLogger()
    handlers, level, saved_argv = list(root.handlers), root.level, sys.argv
    stdout, stderr = sys.stdout, sys.stderr
    sys.argv = [f"tttexp.{app}", *argv]
    try:
        module.main()
    except SystemExit as stopped:
        return stopped.code
    finally:
        sys.argv = saved_argv
        sys.stdout, sys.stderr = stdout, stderr
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
    return 0


def checksums(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) and the SHA-256 of its bytes."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def small_tokenizer(lines: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer as transformers has it (EOS ``<|endoftext|>``), trained on ``lines`` in well
    under a second: a model directory's own tokenizer for tests that need one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def rolling_nll(model, tokenizer, texts: list[str]) -> float:
    """Summed loss of every token of ``texts`` (each one's first token after the end-of-text token), computed by
    tttexp's own validation loss: what the harness's ``loglikelihood_rolling`` measures on texts within one window."""
    import torch

    from tttexp.training.validation import mean_loss

    total = 0.0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        batch = {"input_ids": torch.tensor([[tokenizer.eos_token_id, *ids[:-1]]]), "labels": torch.tensor([ids])}
        total += mean_loss(model, [batch])[0]
    return total


@contextlib.contextmanager
def one_thread():
    """Torch on one thread: tiny models gain nothing from threads and lose much to contention on a busy machine
    (subprocesses get the same with ``OMP_NUM_THREADS=1``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
