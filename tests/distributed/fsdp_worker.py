"""Runs of the real trainer for the FSDP tests: one process (in the test) or each rank of a spawned gloo world."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from support import build_trainer
from tttexp.training.checkpoint import load_checkpoint

STEPS = 20
HALF = 10


def overrides(layer: str, world: int, layout: str, *extra: str) -> list[str]:
    """Tiny, quick settings with one loss per step; the global batch is 4 sequences at any world size."""
    return [f"model.ttt_layer={layer}", f"distributed={layout}", f"data.batch_size={4 // world}",
            f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=none",
            "trainer.position_eval_sequences=0", "trainer.plots=false", "device=cpu", *extra]


def train(args: list[str], run_dir: Path, cache: Path, resume: Path | None = None):
    """Train to the end (resuming from ``resume`` if given); returns the trainer and its loss per step."""
    trainer = build_trainer(args, run_dir, cache)
    if resume is not None:
        trainer.restore(load_checkpoint(resume))
    trainer.fit()
    return trainer, {int(h["step"]): h["train/loss"] for h in trainer.records.history}


def local_bytes(trainer) -> dict[str, int]:
    """Bytes of parameters and of optimizer state this process holds."""
    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(size(p) for p in trainer.raw_model.parameters())
    optim = sum(size(v) for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return {"params": params, "optim": optim}


def tiny_mlp_model():
    from tttexp.models import build_model

    torch.manual_seed(0)
    return build_model(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, kernel="torch", ttt_layer="mlp")


def bf16_batch() -> torch.Tensor:
    return torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))


def bf16_step(rank: int, world: int) -> dict:
    """One bf16 step under FSDP's mixed precision (forced on: the CPU fallback would switch bf16 off): the dtypes
    each part computes with, the gradients' dtype, and the loss on this rank's row."""
    from tttexp.distributed import FullyShardedDataParallel

    layout = FullyShardedDataParallel(backend="gloo")
    layout.setup("cpu", seed=0)
    layout.precision = "bf16"
    model = tiny_mlp_model()
    block = model.blocks()[0]
    seen: dict[str, str] = {}
    inner = block.ttt._inner

    def spy(*args, **kwargs):
        seen.update(ttt_state=str(block.ttt.W1.dtype), ttt_proj=str(block.ttt.q_proj.weight.dtype),
                    mlp=str(block.mlp.up_proj.weight.dtype))
        return inner(*args, **kwargs)

    block.ttt._inner = spy
    wrapped = layout.prepare_model(model)
    ids = bf16_batch()[rank:rank + 1]
    with layout.autocast():
        loss = wrapped(ids[:, :-1], labels=ids[:, 1:], use_cache=False).loss
    loss.backward()
    grads = sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None})
    return {**seen, "grads": grads, "loss": float(layout.all_reduce_mean(loss.detach()))}


def run_rank(rank: int, world: int, port: int, root: str, cache: str) -> None:
    """Each rank of a 2-process gloo world: FSDP from scratch (TTT-Linear, with and without activation checkpointing,
    and TTT-MLP), FSDP resuming a one-process
    checkpoint, and DDP whose checkpoint FSDP resumes. Rank 0 writes the losses, every rank its bytes."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one core each: tiny ops gain nothing from threads and lose much to contention
    root_path, cache_path = Path(root), Path(cache)
    out: dict[str, object] = {}
    fsdp_linear, out["fsdp_linear"] = train(overrides("linear", world, "fsdp", f"trainer.ckpt_every={HALF}"),
                                            root_path / "fsdp_linear", cache_path)
    out["bytes"] = local_bytes(fsdp_linear)
    _, out["fsdp_mlp"] = train(overrides("mlp", world, "fsdp"), root_path / "fsdp_mlp", cache_path)
    _, out["fsdp_checkpointed"] = train(overrides("linear", world, "fsdp", "model.gradient_checkpointing=true"),
                                        root_path / "fsdp_checkpointed", cache_path)
    _, out["fsdp_from_single"] = train(overrides("linear", world, "fsdp"), root_path / "fsdp_from_single",
                                       cache_path, resume=root_path / "single_linear/checkpoints/step-00000010.dcp")
    _, out["ddp"] = train(overrides("linear", world, "ddp", f"trainer.ckpt_every={HALF}"), root_path / "ddp",
                          cache_path)
    _, out["fsdp_from_ddp"] = train(overrides("linear", world, "fsdp"), root_path / "fsdp_from_ddp", cache_path,
                                    resume=root_path / "ddp/checkpoints/step-00000010.pt")
    out["bf16"] = bf16_step(rank, world)
    (root_path / f"rank{rank}.json").write_text(json.dumps(out))
    fsdp_linear.layout.teardown()
