"""Each rank of a spawned gloo world: the model with its sequence split over the context group against the same
model on the whole sequence in this process (forward, loss and every gradient)."""

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
from tttexp.models import build_model

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
    grads, got_all, want_all = [], [], []
    for (pname, p), q in zip(model.named_parameters(), split.parameters(), strict=True):
        g = q.grad.clone()
        dist.all_reduce(g, group=cp.group)  # each rank holds its tokens' and its heads' share
        grads.append((rel(g, p.grad), pname))
        got_all.append(g.flatten())
        want_all.append(p.grad.flatten())
    worst["grad"], worst["grad_name"] = max(grads)
    worst["grads"] = rel(torch.cat(got_all), torch.cat(want_all))
    return worst


def _fitted(settings: dict, cp_size: int) -> dict:
    """Grouped K/V heads that ``cp_size`` divides (2 of 4 at cp=2, all 4 at cp=4)."""
    kv = settings.get("num_key_value_heads")
    return {**settings, "num_key_value_heads": cp_size} if kv is not None and kv % cp_size else settings


def run_rank(rank: int, world: int, cp_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world // cp_size, cp_size), mesh_dim_names=("data", "context"))
    cp = context.ContextParallel(mesh.get_group("context"))
    dp_rank = mesh.get_local_rank("data")
    variants = {name: _fitted(settings, cp_size) for name, settings in VARIANTS.items()}
    results = {name: {"fp32": compare(settings, cp, dp_rank, torch.float32),
                      "fp64": compare(settings, cp, dp_rank, torch.float64)} for name, settings in variants.items()}
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
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"results": results, "refusals": refusals}))
    dist.destroy_process_group()
