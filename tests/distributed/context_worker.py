"""Each rank of a spawned gloo world: the model with its sequence split over the context group against the same
model on the whole sequence in this process (forward, loss and every gradient); chunks with carried state (state
passing: each rank carries its heads' states); the split evaluations (loss by position, a split prefill and greedy
decoding); and the activation bytes each rank saves for the backward."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tttexp.distributed import context
from tttexp.errors import LayoutError
from tttexp.models import TTTCache, build_model
from tttexp.training.passkey import greedy, split_prefill
from tttexp.training.saved_memory import saved_activation_bytes
from tttexp.training.validation import loss_by_position, mean_loss

VOCAB, BATCH, SEQ = 97, 2, 64
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
        "mini_batch_size": 16, "kernel": "torch"}
VARIANTS = {
    "linear_transformer": {"ttt_layer": "linear", "backbone": "transformer"},
    "mlp_transformer": {"ttt_layer": "mlp", "backbone": "transformer"},
    "mlp_mamba": {"ttt_layer": "mlp", "backbone": "mamba"},
    "linear_mamba_docs": {"ttt_layer": "linear", "backbone": "mamba", "docs": True},
    "attention": {"mixer": "attention", "num_key_value_heads": 2},
    "hybrid_checkpointed": {"mixer_types": ["attention", "ttt"], "gradient_checkpointing": True, "docs": True},
}


def batch(docs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    starts = None
    if docs:  # documents starting inside either rank's slice, and at the start of the second slice
        starts = torch.zeros(BATCH, SEQ // TINY["mini_batch_size"], dtype=torch.bool)
        starts[0, 1] = starts[1, 2] = starts[1, 3] = True
    return ids[:, :-1], ids[:, 1:], starts


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def compare(settings: dict, cp: context.ContextParallel, dp_rank: int, dtype: torch.dtype) -> dict[str, float]:
    """Relative differences (in norm) of the split model's logits, loss and gradients: each tensor's worst, and
    all gradients as one vector."""
    settings = dict(settings)
    docs = settings.pop("docs", False)
    torch.manual_seed(0)
    model = build_model(vocab_size=VOCAB, **TINY, **settings).to(dtype).train()  # the split runs in training
    split = copy.deepcopy(model)
    context.enable(split, cp)
    ids, labels, starts = batch(docs)
    ids, labels = (ids + dp_rank) % VOCAB, (labels + dp_rank) % VOCAB  # each data-parallel rank its own rows

    out = model(ids, labels=labels, use_cache=False, doc_starts=starts)
    out.loss.backward()

    local = SEQ // cp.size
    sl, msl = slice(cp.rank * local, (cp.rank + 1) * local), slice(cp.rank * local // 16, (cp.rank + 1) * local // 16)
    got = split(ids[:, sl], use_cache=False, doc_starts=None if starts is None else starts[:, msl])
    # the mean over the whole sequence: each rank's token sum over all tokens, summed over the group
    loss = F.cross_entropy(got.logits.float().flatten(0, 1), labels[:, sl].flatten(), reduction="sum") / labels.numel()
    loss.backward()
    worst = {"logits": rel(got.logits, out.logits[:, sl])}
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp.group)
    worst["loss"] = rel(total, out.loss.detach())
    return worst | compare_grads(model, split, cp.sum_over_group)  # each rank holds its tokens' and heads' share


def compare_grads(model: torch.nn.Module, split: torch.nn.Module, reduce) -> dict:
    """The split model's gradients (``reduce``: summed over the context group) against one process's: the worst
    tensor's relative error and name, and the error of all gradients as one vector."""
    grads, got_all, want_all = [], [], []
    for (pname, p), q in zip(model.named_parameters(), split.parameters(), strict=True):
        g = reduce(q.grad)
        grads.append((rel(g, p.grad), pname))
        got_all.append(g.flatten())
        want_all.append(p.grad.flatten())
    grad, grad_name = max(grads)
    return {"grad": grad, "grad_name": grad_name, "grads": rel(torch.cat(got_all), torch.cat(want_all))}


CHUNKS = 3


def carried(settings: dict, cp: context.ContextParallel, dp_rank: int, dtype: torch.dtype) -> dict[str, float]:
    """State passing: ``CHUNKS`` consecutive chunks of each row, the cache carried (and cut from the graph) between
    them, documents starting inside them. Worst relative differences of each chunk's logits and loss, of the
    gradients summed over the chunks, and of the carried TTT states (each rank holds its heads') and conv tails."""
    settings = dict(settings)
    docs = settings.pop("docs", False)
    torch.manual_seed(0)
    model = build_model(vocab_size=VOCAB, **TINY, **settings).to(dtype).train()
    split = copy.deepcopy(model)
    context.enable(split, cp)
    g = torch.Generator().manual_seed(2)
    ids = (torch.randint(0, VOCAB, (BATCH, CHUNKS * SEQ + 1), generator=g) + dp_rank) % VOCAB
    k = TINY["mini_batch_size"]
    starts = (torch.rand(BATCH, CHUNKS * SEQ // k, generator=g) < 0.3) if docs else None
    local = SEQ // cp.size
    worst = {"logits": 0.0, "loss": 0.0, "state": 0.0}
    whole_cache, split_cache = TTTCache(len(model.blocks())), TTTCache(len(model.blocks()))
    for c in range(CHUNKS):
        chunk = slice(c * SEQ, (c + 1) * SEQ)
        mine = slice(c * SEQ + cp.rank * local, c * SEQ + (cp.rank + 1) * local)
        inputs, labels = ids[:, chunk], ids[:, 1:][:, chunk]
        chunk_starts = None if starts is None else starts[:, chunk.start // k : chunk.stop // k]
        out = model(inputs, labels=labels, cache=whole_cache, use_cache=True, doc_starts=chunk_starts)
        out.loss.backward()
        whole_cache = out.cache.detach()
        whole_cache.keep_last_keys(SEQ)
        got = split(ids[:, mine], cache=split_cache, use_cache=True,
                    doc_starts=None if starts is None else starts[:, mine.start // k : mine.stop // k])
        loss = F.cross_entropy(got.logits.float().flatten(0, 1), ids[:, 1:][:, mine].flatten(),
                               reduction="sum") / labels.numel()
        loss.backward()
        split_cache = got.cache.detach()
        split_cache.keep_last_keys(SEQ)
        worst["logits"] = max(worst["logits"], rel(got.logits, out.logits[:, cp.rank * local:(cp.rank + 1) * local]))
        worst["loss"] = max(worst["loss"], rel(cp.sum_over_group(loss), out.loss.detach()))
        assert split_cache.seqlen_offset == whole_cache.seqlen_offset == (c + 1) * SEQ
        for want, have in zip(whole_cache.layers, split_cache.layers, strict=True):
            heads = cp.head_slice(want.ttt[0].shape[1] if want.ttt else want.keys.shape[1])
            pairs = [(h, w[:, heads]) for h, w in zip(have.ttt or (), want.ttt or (), strict=True)]
            if want.keys is not None:
                pairs += [(have.keys, want.keys[:, heads]), (have.values, want.values[:, heads])]
            pairs += [(have.convs[name], want.convs[name]) for name in want.convs]
            if want.doc_start is not None:
                pairs.append((have.doc_start, want.doc_start))
            worst["state"] = max([worst["state"], *(rel(h, w) for h, w in pairs)])
    return worst | compare_grads(model, split, cp.sum_over_group)


def evaluations(settings: dict, cp: context.ContextParallel) -> dict[str, float]:
    """The split evaluations against whole sequences on one process (float64): loss by position over 2 x the
    training length, the validation loss, a prefill split over the group then continued whole (the logits of the
    rest), and greedy decoding; ``tokens_equal`` is 1.0 when the greedy tokens are the same."""
    settings = dict(settings)
    settings.pop("docs", None)
    torch.manual_seed(0)
    model = build_model(vocab_size=VOCAB, **TINY, **settings).double().eval()
    split = copy.deepcopy(model)
    context.enable(split, cp)
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, VOCAB, (3, 2 * SEQ + 1), generator=g)
    want = loss_by_position(model, seqs, buckets=8, batch_size=2)
    got = loss_by_position(split, seqs, buckets=8, batch_size=2, context=cp)
    worst = {"by_position": max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(got, want, strict=True))}
    batches = [{"input_ids": seqs[:, :-1], "labels": seqs[:, 1:]}]
    total, count = mean_loss(split, batches, context=cp)
    whole_total, whole_count = mean_loss(model, batches)
    sums = cp.sum_over_group(torch.tensor([total, float(count)], dtype=torch.float64))
    worst["mean_loss"] = abs(float(sums[0]) - whole_total) / whole_total + abs(float(sums[1]) - whole_count)
    prompt = seqs[:2, :SEQ + 37]  # at cp=2 a prefix of 96 tokens splits into whole mini-batches, 5 run whole
    step = cp.size * TINY["mini_batch_size"]
    with torch.no_grad():
        cache, rest = split_prefill(split, prompt, cp)
        assert rest.shape[1] == prompt.shape[1] - (prompt.shape[1] - 1) // step * step
        logits = split(rest, cache=cache, use_cache=True).logits
        whole = model(prompt, use_cache=True).logits[:, -rest.shape[1]:]
    worst["prefill"] = rel(logits, whole)
    tokens = greedy(split, prompt, 6, context=cp)
    worst["tokens_equal"] = float(torch.equal(tokens, greedy(model, prompt, 6)))
    return worst


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """The activations one training step holds at its peak (training/saved_memory.py), with the backward run."""
    losses = []

    def forward() -> None:
        out = model(ids, use_cache=False)
        losses.append(F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()))

    found = saved_activation_bytes(model, forward)
    losses[0].backward()
    return found


def activation_ratio(settings: dict, cp: context.ContextParallel) -> float:
    """The activation bytes one rank saves at this ``cp`` over those of one process on the whole sequence (4 x the
    usual length, so that per-token activations outweigh what does not grow with it)."""
    settings = dict(settings)
    settings.pop("docs", None)
    torch.manual_seed(0)
    model = build_model(vocab_size=VOCAB, **TINY, **settings).train()
    split = copy.deepcopy(model)
    context.enable(split, cp)
    ids = torch.randint(0, VOCAB, (BATCH, 4 * SEQ + 1), generator=torch.Generator().manual_seed(4))
    local = slice(cp.rank * 4 * SEQ // cp.size, (cp.rank + 1) * 4 * SEQ // cp.size)
    whole = saved_bytes(model, ids[:, :-1], ids[:, 1:])
    return saved_bytes(split, ids[:, :-1][:, local], ids[:, 1:][:, local]) / whole


def _fitted(settings: dict, cp_size: int) -> dict:
    """Grouped K/V heads that ``cp_size`` divides (2 of 4 at cp=2, all 4 at cp=4)."""
    kv = settings.get("num_key_value_heads")
    return {**settings, "num_key_value_heads": cp_size} if kv is not None and kv % cp_size else settings


def run_rank(rank: int, world: int, cp_size: int, port: int, out_dir: str, cache: str | None = None,
             cases: tuple = ()) -> None:
    """The model-level comparisons at ``cp_size``, then the trainer runs ``cases`` (context_run_worker.run_cases)
    in the same world: one launch for all of them."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world // cp_size, cp_size), mesh_dim_names=("data", "context"))
    cp = context.ContextParallel(mesh.get_group("context"))
    dp_rank = mesh.get_local_rank("data")
    variants = {name: _fitted(settings, cp_size) for name, settings in VARIANTS.items()}
    results = {name: {"fp32": compare(settings, cp, dp_rank, torch.float32),
                      "fp64": compare(settings, cp, dp_rank, torch.float64)} for name, settings in variants.items()}
    # state passing in fp32 for every variant; float64 (per tensor) where documents start inside the chunks
    stream = {name: {"fp32": carried(settings, cp, dp_rank, torch.float32),
                     **({"fp64": carried(settings, cp, dp_rank, torch.float64)} if settings.get("docs") else {})}
              for name, settings in variants.items()}
    evals = {name: evaluations(settings, cp) for name, settings in variants.items()}
    memory = {name: activation_ratio(settings, cp) for name, settings in variants.items()}
    refusals = []
    for settings in ({"num_attention_heads": 3 * cp_size + 1, "hidden_size": 8 * (3 * cp_size + 1)},):
        try:
            context.enable(build_model(vocab_size=VOCAB, **{**TINY, **settings}), cp)
        except LayoutError as exc:
            refusals.append(str(exc))
    model = build_model(vocab_size=VOCAB, **TINY)
    context.enable(model, cp)
    try:  # a slice of 8 tokens is half a mini-batch
        model(torch.zeros(1, 8, dtype=torch.long), use_cache=False)
    except LayoutError as exc:
        refusals.append(str(exc))
    stopped = TTTCache(len(model.blocks()))
    stopped.seqlen_offset = 8
    try:  # a cached sequence that stopped inside a mini-batch
        model(torch.zeros(1, 16, dtype=torch.long), cache=stopped, use_cache=True)
    except LayoutError as exc:
        refusals.append(str(exc))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"results": results, "stream": stream, "evals": evals,
                                                               "memory": memory, "refusals": refusals}))
    if cases:
        from . import context_run_worker

        context_run_worker.run_cases(rank, Path(out_dir), Path(cache), cases)
    dist.destroy_process_group()
