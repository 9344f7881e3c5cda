"""DistributedDataParallel: one process per device, gradients all-reduced; joins the world it is started in."""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tttexp.configs import choice, positive
from tttexp.distributed.context import ContextParallel, build_mesh, enable
from tttexp.distributed.layout import LayoutConfig, ProcessLayout, compile_blocks
from tttexp.distributed.world import slurm_rendezvous, world_from_env
from tttexp.errors import LayoutError


@dataclass
class DDPConfig(LayoutConfig):
    """``distributed=ddp``: a process group over the world (self-launched, torchrun or SLURM)."""

    _target_: str = "tttexp.distributed.DistributedDataParallel"
    nproc_per_node: Any = "auto"  # auto: one per visible GPU (on the CPU give a number)
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: int = 600  # collective timeout in seconds
    context_parallel: int = 1  # ranks that split each sequence (a data x context mesh); must divide heads and world

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("distributed.backend", self.backend, ("auto", "nccl", "gloo"))
        positive("distributed.context_parallel", self.context_parallel)


class DistributedDataParallel(ProcessLayout):
    """DDP over the processes of the current world (a world of one when started alone)."""

    def __init__(self, backend: str = "auto", timeout_s: int = 600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backend = backend
        self.timeout_s = timeout_s
        self._owns_group = False

    def setup(self, device: str, seed: int) -> torch.device:
        self.rank, self.world_size, self.local_rank = world_from_env()
        picked = super().setup(device, seed)
        if not dist.is_initialized():
            slurm_rendezvous()
            backend = self.backend if self.backend != "auto" else ("nccl" if picked.type == "cuda" else "gloo")
            store = None
            if "MASTER_PORT" not in os.environ:
                if self.world_size > 1:
                    raise LayoutError("a multi-process world needs MASTER_ADDR and MASTER_PORT (torchrun sets them)")
                store = dist.HashStore()  # a world of one rendezvous in memory: no port to pick, none to lose
            else:
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(
                backend=backend, rank=self.rank, world_size=self.world_size, store=store,
                timeout=datetime.timedelta(seconds=self.timeout_s),
                device_id=picked if picked.type == "cuda" else None,
            )
            self._owns_group = True
        if self.context_parallel > 1 and type(self) is DistributedDataParallel:
            self.mesh = build_mesh(picked.type, self.world_size, self.context_parallel)
            self.context = ContextParallel(self.mesh.get_group("context"))
        return picked

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.context is not None:  # gradients are averaged over every rank: the loss is scaled for it
            enable(model, self.context)
        mode = self.compile_mode(model)
        if mode == "blocks":
            compile_blocks(model)
        wrapped: nn.Module = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if mode == "model":
            wrapped = torch.compile(wrapped)
        return wrapped

    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        inner = getattr(model, "_orig_mod", model)
        if not last_micro_batch and isinstance(inner, DDP):
            return inner.no_sync()
        return contextlib.nullcontext()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def teardown(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
