"""``python -m tttexp.eval checkpoint=... harness.tasks=[...]``: lm-evaluation-harness runs on the model in process.

Offline, on a local task (tests/app/harness: a YAML task of each type over one JSONL file): the harness's numbers
equal tttexp's own perplexity on the same text, and they reach the run directory, the Logger (metrics.jsonl,
summary.json, wandb offline) and the summary table.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import one_thread, rolling_nll, small_tokenizer
from tttexp.errors import ConfigError
from tttexp.loggers import find_run_files, read_run
from tttexp.models import TTTConfig, TTTForCausalLM
from tttexp.training.validation import mean_loss

REPO = Path(__file__).resolve().parents[2]
TASKS = Path(__file__).parent / "harness"
TEXTS = [json.loads(line)["text"] for line in (TASKS / "ttt_local.jsonl").read_text().splitlines() if line]


def _model(vocab: int) -> TTTForCausalLM:
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, ttt_layer="linear", backbone="mamba")
    model = TTTForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _nll(model: TTTForCausalLM, inputs: list[int], labels: list[int]) -> float:
    """Summed next-token loss of one sequence, with tttexp's own validation loss."""
    batch = {"input_ids": torch.tensor([inputs]), "labels": torch.tensor([labels])}
    total, _ = mean_loss(model, [batch])
    return total


def _own_numbers(model: TTTForCausalLM, tokenizer) -> dict[str, float]:
    """What the two local tasks measure, computed by tttexp on the same texts and the same tokens."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # loglikelihood: each text's last word after the rest (context and continuation split as the harness does)
    last_word, greedy = [], []
    for text in TEXTS:
        context, word = text.rsplit(" ", 1)
        whole, start = encode(f"{context} {word}"), len(encode(context))
        last_word.append(_nll(model, whole[:-1], [-100] * (start - 1) + whole[start:]))
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]]), use_cache=False).logits[0, start - 1 :]
        greedy.append(logits.argmax(-1).tolist() == whole[start:])
    rolling = rolling_nll(model, tokenizer, TEXTS)  # loglikelihood_rolling: every token of each text
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)
    nbytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    return {
        "ttt_local_lastword/perplexity": math.exp(sum(last_word) / len(TEXTS)),
        "ttt_local_lastword/acc": sum(greedy) / len(TEXTS),
        "ttt_local_rolling/word_perplexity": math.exp(rolling / words),
        "ttt_local_rolling/byte_perplexity": math.exp(rolling / nbytes),
        "ttt_local_rolling/bits_per_byte": rolling / nbytes / math.log(2),
    }


def test_harness_numbers_equal_own_perplexity_and_reach_every_record(tmp_path, app_cache):
    tokenizer = small_tokenizer(TEXTS * 3, vocab_size=400)
    model = _model(len(tokenizer))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run = tmp_path / "run"
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run(
        [sys.executable, "-m", "tttexp.eval", "experiment=smoke", "logging=wandb", f"checkpoint={folder}",
         f"data.tokenizer={folder}", "data.max_documents=20", "harness.tasks=[ttt_local_lastword,ttt_local_rolling]",
         f"harness.include_path={TASKS.relative_to(REPO)}", "harness.include_defaults=false",
         "harness.bootstrap_iters=0", f"hydra.run.dir={run}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,  # the task's data path is from the repo root
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((run / "harness.json").read_text())
    harness = {f"{task}/{key.split(',')[0]}": value for task, metrics in results["results"].items()
               for key, value in metrics.items() if key.endswith(",none") and "_stderr" not in key}
    with one_thread():
        own = _own_numbers(model, tokenizer)
    assert set(own) == set(harness)
    for name, value in own.items():
        assert harness[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert results["n-samples"]["ttt_local_rolling"]["effective"] == len(TEXTS)

    names = {f"harness/{name}" for name in own}
    recorded = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for row in recorded if "_type" not in row for k, v in row.items()}
    assert names <= set(logged) and logged["harness/ttt_local_rolling/word_perplexity"] == pytest.approx(
        own["ttt_local_rolling/word_perplexity"], rel=1e-4)
    assert any(row.get("key") == "harness/results" for row in recorded if row.get("_type") == "table")
    assert names <= set(json.loads((run / "summary.json").read_text()))
    assert names <= set(json.loads((run / "eval.json").read_text()))
    wandb_run = read_run(find_run_files(run)[0])
    assert names <= set(wandb_run.summary) and wandb_run.exit_code == 0
    table = [line.split() for line in done.stdout.splitlines()]
    assert ["harness/ttt_local_lastword/acc", f"{own['ttt_local_lastword/acc']:.4f}"] in table


def test_without_lm_eval_the_app_says_how_to_install_it(monkeypatch, tmp_path):
    from tttexp.app.eval import evaluate
    from tttexp.app.preflight import compose_config

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError, as when not installed
    cfg = compose_config(["experiment=smoke", "logging=none", f"checkpoint={tmp_path}", "harness.tasks=[piqa]"],
                         config_name="eval")
    with pytest.raises(ConfigError) as refused:
        evaluate(cfg, tmp_path)
    assert "\n" not in str(refused.value) and "pip install -e '.[eval]'" in str(refused.value)
