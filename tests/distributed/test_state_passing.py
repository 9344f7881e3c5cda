"""multi_gpu_state_passing: carried state is exact, resets isolate documents, DDP is real, launching is real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tttexp.data import StreamLoader, build_tokenizer, load_documents, tokenize_documents
from tttexp.distributed.world import free_port
from tttexp.models import TTTConfig, TTTForCausalLM

from . import ddp_update

K = 16


@pytest.fixture(scope="module")
def stream_tokens(app_cache):
    docs = load_documents("shipped")[::25]
    tok = build_tokenizer("bpe", train_texts=[d.text[:20000] for d in docs], vocab_size=300, cache_dir=app_cache)
    tokens = [t[: 20 + 7 * i] for i, t in enumerate(tokenize_documents(docs, tok, app_cache))]
    return tokens, tok.eos_id


def float64_model(vocab: int) -> TTTForCausalLM:
    torch.manual_seed(0)
    cfg = TTTConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, ttt_layer="mlp", kernel="torch")
    return TTTForCausalLM(cfg).double().eval()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")


@pytest.mark.parametrize("resets", [True, False])
def test_chunks_with_carried_state_equal_one_pass_over_the_stream(stream_tokens, resets):
    tokens, eos = stream_tokens
    loader = StreamLoader(tokens, eos, eos, seq_len=2 * K, batch_size=2, mini_batch_size=K, seed=0)
    batches = [next(loader) for _ in range(5)]
    model = float64_model(300)
    with torch.no_grad():
        cache, chunked = None, []
        for b in batches:
            out = model(b["input_ids"], cache=cache, use_cache=True, doc_starts=b["doc_start"] if resets else None)
            cache = out.cache.detach()
            chunked.append(token_losses(out.logits, b["labels"]))
        whole_ids = torch.cat([b["input_ids"] for b in batches], 1)
        starts = torch.cat([b["doc_start"] for b in batches], 1) if resets else None
        whole = model(whole_ids, doc_starts=starts, use_cache=False).logits
    labels = torch.cat([b["labels"] for b in batches], 1)
    assert (torch.cat(chunked, 1) - token_losses(whole, labels)).abs().max() < 1e-9


def test_with_resets_each_document_scores_as_if_alone(stream_tokens):
    tokens, eos = stream_tokens
    loader = StreamLoader(tokens, eos, eos, seq_len=8 * K, batch_size=1, mini_batch_size=K, seed=0)
    b = next(loader)
    model = float64_model(300)
    starts = b["doc_start"][0].nonzero().flatten().tolist()
    assert len(starts) >= 2, "the test needs two documents in one chunk"
    with torch.no_grad():
        together = model(b["input_ids"], doc_starts=b["doc_start"], use_cache=False).logits
        for first, nxt in zip(starts, starts[1:], strict=False):
            block = b["input_ids"][:, first * K : nxt * K]
            alone = model(block, use_cache=False).logits
            assert (together[:, first * K : nxt * K] - alone).abs().max() < 1e-9


def test_two_gloo_processes_update_like_one_process_on_both_halves(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(ddp_update.run_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    model = ddp_update.small_model()
    ddp_update.step(model, *ddp_update.batch())
    single = model.state_dict()
    assert max((distributed[k] - single[k]).abs().max().item() for k in single) < 1e-12


# The self-launched two-process job is checked with wandb on, in one run:
# tests/app/test_wandb_app.py::test_a_self_launched_ddp_job_is_one_run_and_one_wandb_run.


def test_killing_one_worker_ends_the_job(app_cache, tmp_path):
    env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "PYTHONUNBUFFERED": "1"}
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tttexp.train", "experiment=smoke", "logging=none", "strategy=multi_gpu_state_passing",
         "distributed.nproc_per_node=2", "trainer.max_steps=100000", "trainer.log_every=1", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run / "metrics.jsonl").exists() and (run / "rank1.pid").exists()
                                              and "train/loss" in (run / "metrics.jsonl").read_text()):
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()
        os.kill(int((run / "rank1.pid").read_text()), signal.SIGKILL)
        killed = time.time()
        code = proc.wait(timeout=60)
        assert time.time() - killed < 60
        assert code != 0
    finally:
        if proc.poll() is None:
            proc.kill()
