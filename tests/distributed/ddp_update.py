"""Worker for the 2-process gloo test: one DDP step on this rank's half of a batch, parameters saved by rank 0."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def small_model():
    from tttexp.models import build_model

    torch.manual_seed(0)
    return build_model(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, kernel="torch").double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 33), generator=g)
    return ids[:, :-1], ids[:, 1:]


def step(model, ids, labels) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    model(ids, labels=labels, use_cache=False).loss.backward()
    opt.step()


def run_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from tttexp.distributed import DistributedDataParallel

    layout = DistributedDataParallel(backend="gloo", timeout_s=60)
    layout.setup("cpu", seed=0)
    model = small_model()
    wrapped = layout.prepare_model(model)
    ids, labels = batch()
    half = ids.shape[0] // world
    step(wrapped, ids[rank * half : (rank + 1) * half], labels[rank * half : (rank + 1) * half])
    if rank == 0:
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, Path(out))
    layout.teardown()
