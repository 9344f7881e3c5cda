"""FullyShardedDataParallel: FSDP2 (``fully_shard``) on each block and on the root, over a device mesh.

Parameters, gradients and optimizer state are split across the ``shard`` dimension of the mesh; with
``replicate=R`` the mesh is 2-D (R replicas x world/R shards: HSDP). The process group is set up exactly as for
DDP (self-launched, torchrun or SLURM). Every process holds the same model before sharding: rank 0's values are
broadcast first, so a freshly initialised or converted model is rank 0's on every rank.

Mixed precision (``trainer.precision=bf16`` on a GPU): the blocks and the root all-gather bf16 parameters and
reduce gradients in fp32; each TTT layer is its own FSDP unit that keeps fp32 parameters, so the inner state
(W, b), its LayerNorm and the learning-rate gate stay fp32 as on one device (autocast still runs the projections'
matmuls in bf16). Sharded parameters, gradients and the optimizer state are fp32 throughout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tttexp.configs import positive
from tttexp.distributed.ddp import DDPConfig, DistributedDataParallel
from tttexp.distributed.layout import warn
from tttexp.distributed.world import in_existing_world
from tttexp.errors import ConfigError, LayoutError


@dataclass
class FSDPConfig(DDPConfig):
    """``distributed=fsdp``: DDP's keys, and how the parameters are sharded."""

    _target_: str = "tttexp.distributed.FullyShardedDataParallel"
    replicate: int = 1  # HSDP: R replicas x (world / R) shards; must divide the world size; 1: plain FSDP
    reshard_after_forward: bool = True  # free gathered parameters after each block's forward (less memory)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("distributed.replicate", self.replicate)
        if isinstance(self.nproc_per_node, int) and not in_existing_world():  # else the world is known later
            try:
                check_mesh(self.replicate, self.nproc_per_node)
            except LayoutError as err:  # the same line as at run time, before any process starts
                raise ConfigError(str(err)) from None


class FullyShardedDataParallel(DistributedDataParallel):
    """FSDP2 over the processes of the current world; a world of one when started alone (it says so once)."""

    default_checkpoint_format = "dcp"
    shards_parameters = True

    def __init__(self, replicate: int = 1, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.replicate = int(replicate)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.mesh = None

    def setup(self, device: str, seed: int) -> torch.device:
        from tttexp.distributed.world import world_from_env

        _, world, _ = world_from_env()
        check_mesh(self.replicate, world)
        picked = super().setup(device, seed)
        from torch.distributed.device_mesh import init_device_mesh

        if self.context_parallel > 1:
            self.mesh = self._context_mesh(picked.type)
        elif self.replicate > 1:
            self.mesh = init_device_mesh(picked.type, (self.replicate, self.world_size // self.replicate),
                                         mesh_dim_names=("replicate", "shard"))
        else:
            self.mesh = init_device_mesh(picked.type, (self.world_size,), mesh_dim_names=("shard",))
        if self.world_size == 1:
            warn("distributed=fsdp with one process: nothing to shard; running FSDP at world size 1")
        return picked

    def _context_mesh(self, device_type: str):
        """With context parallelism: parameters sharded over the data dimension and replicated over the context
        one (HSDP's layout, replicate = context), the context group split from the same ``(data, context)`` mesh."""
        from torch.distributed.device_mesh import DeviceMesh

        from tttexp.distributed.context import ContextParallel, build_mesh

        if self.replicate > 1:
            raise LayoutError("distributed.context_parallel > 1 takes distributed.replicate=1 (parameters are "
                                "already replicated across the context group)")
        mesh = build_mesh(device_type, self.world_size, self.context_parallel)
        self.context = ContextParallel(mesh.get_group("context"))
        return DeviceMesh(device_type, mesh.mesh.transpose(0, 1), mesh_dim_names=("replicate", "shard"))

    # --- wrapping -------------------------------------------------------------------------------------------------

    def compile_label(self, model: nn.Module) -> str:
        return "blocks" if self.compile_mode(model) else "off"  # FSDP compiles per block whatever was asked

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Broadcast rank 0's values, compile blocks if asked, then shard each block and the root (in place)."""
        from torch.distributed.fsdp import fully_shard

        model.to(self.device)
        self._broadcast_from_rank0(model)
        if self.context is not None:
            from tttexp.distributed.context import enable

            enable(model, self.context)
        if self.compile_mode(model):  # under FSDP "true" compiles per block too: FSDP's hooks split the graph there
            self.compile = "blocks"
            from tttexp.distributed.layout import compile_blocks

            compile_blocks(model)
        block_policy, state_policy = self.precision_policies()
        blocks = list(model.blocks())
        for i, block in enumerate(blocks):
            ttt = getattr(block, "ttt", None)
            if ttt is not None and state_policy is not None:
                fully_shard(ttt, mesh=self.mesh, mp_policy=state_policy,
                            reshard_after_forward=self.reshard_after_forward)
            # the last block's parameters are needed again at once by the backward: keep them gathered
            last = i == len(blocks) - 1
            fully_shard(block, mesh=self.mesh, mp_policy=block_policy,
                        reshard_after_forward=self.reshard_after_forward and not last)
        fully_shard(model, mesh=self.mesh, mp_policy=block_policy, reshard_after_forward=self.reshard_after_forward)
        return model

    def precision_policies(self) -> tuple[Any, Any]:
        """(policy of blocks and root, policy of TTT layers): bf16 parameters with fp32 gradient reduction for
        the former and fp32 for the latter under ``trainer.precision=bf16``; fp32 defaults otherwise."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.precision != "bf16":
            return MixedPrecisionPolicy(), None
        return (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False))

    def _broadcast_from_rank0(self, model: nn.Module) -> None:
        if self.world_size == 1:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Reduce-scatter gradients on the last micro-batch only (the others accumulate unsharded)."""
        return _gradient_sync(model, last_micro_batch)

    def grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global norm of sharded gradients (summed over the shards), clipping when ``max_norm`` > 0."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        if max_norm and max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def local_tensors(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]

    # --- checkpoint state -------------------------------------------------------------------------------------

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Gather the whole model and optimizer state (on the CPU) in torch's single-process formats."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        from tttexp.distributed.optim_state import optimizer_state_by_index

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        if not optim_state:  # with cpu_offload only rank 0 receives the gathered state
            return model_state, {}
        return model_state, optimizer_state_by_index(model, optimizer, optim_state)

    def load_full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict) -> None:
        """Shard a single-process (``.pt``) state into this run's model and optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from tttexp.distributed.optim_state import optimizer_state_by_name

        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optimizer_state_by_name(model, optimizer, optimizer_state),
                       options=StateDictOptions(full_state_dict=True))


def check_mesh(replicate: int, world_size: int) -> None:
    """``distributed.replicate`` must divide the world size (HSDP: replicas x shards)."""
    if replicate < 1 or world_size % replicate:
        fits = ", ".join(str(r) for r in range(1, world_size + 1) if world_size % r == 0)
        raise LayoutError(
            f"distributed.replicate={replicate} does not divide the world size {world_size} (the mesh is replicate x "
            f"shard = {world_size} processes); use one of {fits}"
        )


def _gradient_sync(model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """FSDP reads the flag in the backward, after the trainer's ``with`` block: set it for this micro-batch and
    leave it (the last micro-batch of every step sets it back)."""
    setter = getattr(getattr(model, "_orig_mod", model), "set_requires_gradient_sync", None)
    if setter is not None:
        setter(last_micro_batch)
    return contextlib.nullcontext()
