"""Continuing a checkpoint at another world size: what each rank takes of the per-rank state.

The model and the optimizer reshard by themselves (sharded checkpoints are read slice by slice; a whole-model
``.pt`` is sharded on load). The per-rank state follows this rule:

- **Same world size and rows**: each rank takes back exactly what it saved (data position, RNG, carried state).
- **Data position** is global: every rank of a run stands at the same batch index. With shuffled windows
  (``data.stream=false``) it is converted through the windows consumed: ``position x global rows`` windows of the
  epoch's permutation have been read, where global rows = ``data.batch_size x world size``; the new position is
  that count divided by the new global rows (rounded down, with one warning when it does not divide: those
  windows are read again). With the same global batch the position is unchanged and the run continues on
  exactly the batches an uninterrupted run would have seen.
- **Per-row streams** (``data.stream=true``): a row is a document stream and its TTT state, so the number of
  global rows must stay the same (change ``data.batch_size`` with the world size); the carried state of each
  global row (rank r holds rows ``r*batch_size ...``) is concatenated over the saved ranks and split again over
  the new ones, so each row continues its own stream with its own state.
- **Context parallelism** (``distributed.context_parallel=cp``): the ``cp`` consecutive ranks of a context group
  read the same rows, so "global rows" counts data groups (``world / cp``), and each rank carries the state of the
  heads it computes (the TTT inner states and attention keys/values of heads ``c*H/cp ...``; conv tails and the
  offset are the group's, the same on each of its ranks). A resume at another ``cp`` (or world size) joins each
  saved group's heads in rank order, joins the groups' rows as above, takes this data group's rows and splits the
  heads again over the new group: the same rule along the head dimension as along the rows.
- **RNG**: each rank reseeds every generator from (seed, step, rank); deterministic, and independent of how
  the checkpoint was written.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from tttexp.distributed.layout import seed_everything
from tttexp.errors import CheckpointError


def rank_state(state: dict[str, Any], rank: int, world_size: int, *, rows_per_rank: int, stream: bool,
               batches_per_epoch: int | None = None, context_parallel: int = 1) -> dict[str, Any]:
    """This rank's ``data`` position, ``rng`` (None: reseed with :func:`reseed`) and ``carry`` from a checkpoint
    written by any world size and context-parallel degree."""
    saved_world = int(state.get("world_size", 1))
    saved_cp = int(state.get("context_parallel", 1))
    ranks = state["ranks"]
    groups = world_size // context_parallel  # data groups: the ranks that read different rows
    saved_rows = int(state.get("global_rows") or rows_per_rank * saved_world // saved_cp)
    rows = rows_per_rank * groups
    if saved_world == world_size and saved_cp == context_parallel and saved_rows == rows:
        return ranks[rank]
    if stream and saved_rows != rows:
        raise CheckpointError(
            f"the checkpoint carries {saved_rows} document streams ({saved_world} processes) and this run has "
            f"{rows} ({groups} x data.batch_size={rows_per_rank}); set data.batch_size={saved_rows // groups}"
            if saved_rows % groups == 0 else
            f"the checkpoint carries {saved_rows} document streams, which {groups} processes cannot share "
            "equally; use a world size that divides it"
        )
    data = dict(ranks[0]["data"])
    if not stream and saved_rows != rows:
        data = _windows_position(data, saved_rows, rows, batches_per_epoch)
    carries = [r.get("carry") for r in ranks]
    carry = None
    if any(c is not None for c in carries):
        saved_groups = [join_heads(carries[g * saved_cp:(g + 1) * saved_cp]) for g in range(saved_world // saved_cp)]
        mine = split_rows(concat_rows(saved_groups), groups, rank // context_parallel)
        carry = split_heads(mine, context_parallel, rank % context_parallel)
    return {"data": data, "rng": None, "carry": carry}


def _windows_position(data: dict[str, int], saved_rows: int, rows: int, per_epoch: int | None) -> dict[str, int]:
    consumed = int(data["position"]) * saved_rows
    position, left = divmod(consumed, rows)
    if left:
        print(f"warning: resuming with {rows} global rows instead of {saved_rows}: the data position rounds "
              f"down by {left} windows (read again)", file=sys.stderr, flush=True)
    epoch = int(data["epoch"])
    if per_epoch is not None and position >= per_epoch:
        epoch, position = epoch + 1, 0
    return {"epoch": epoch, "position": position}


def reseed(seed: int, step: int, rank: int) -> None:
    """Every generator of this rank from (seed, step, rank)."""
    seed_everything((seed * 1_000_003 + step) * 1_009 + rank)


def concat_rows(parts: list[Any]) -> Any:
    """Carried states (``TTTCache.state_dict()``) of consecutive ranks joined along the batch rows."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat([p.cpu() for p in parts], dim=0)
    if isinstance(first, dict):
        return {k: concat_rows([p[k] for p in parts]) for k in first}
    if isinstance(first, list | tuple):
        return [concat_rows(list(items)) for items in zip(*parts, strict=True)]
    return first  # seqlen_offset: the same on every rank


def split_rows(state: Any, world_size: int, rank: int) -> Any:
    """Rank ``rank``'s share of the rows of a joined carried state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        if state.shape[0] % world_size:
            raise CheckpointError(f"{state.shape[0]} carried rows cannot be split over {world_size} processes")
        per = state.shape[0] // world_size
        return state[rank * per:(rank + 1) * per].clone()
    if isinstance(state, dict):
        return {k: split_rows(v, world_size, rank) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [split_rows(v, world_size, rank) for v in state]
    return state


HEAD_SPLIT = ("ttt", "pending", "keys", "values")  # per-layer entries of a carried state with heads at dim 1


def join_heads(parts: list[Any]) -> Any:
    """The carried states (``TTTCache.state_dict()``) of one context group's ranks, in rank order, as one state
    with every head; the other entries are the group's, the same on each rank."""
    first = parts[0]
    if first is None or len(parts) == 1:
        return first
    layers = []
    for per_rank in zip(*[p["layers"] for p in parts], strict=True):
        layer = dict(per_rank[0])
        for key in HEAD_SPLIT:
            layer[key] = _map_heads([entry[key] for entry in per_rank], lambda ts: torch.cat(ts, dim=1))
        layers.append(layer)
    return {**first, "layers": layers}


def split_heads(state: Any, context_parallel: int, rank: int) -> Any:
    """Context rank ``rank``'s share of the heads of a carried state with every head."""
    if state is None or context_parallel == 1:
        return state

    def share(ts: list[torch.Tensor]) -> torch.Tensor:
        heads = ts[0].shape[1]
        if heads % context_parallel:
            raise CheckpointError(f"{heads} carried heads cannot be split over context_parallel={context_parallel}")
        per = heads // context_parallel
        return ts[0][:, rank * per:(rank + 1) * per].clone()

    layers = []
    for layer in state["layers"]:
        layer = dict(layer)
        for key in HEAD_SPLIT:
            layer[key] = _map_heads([layer[key]], share)
        layers.append(layer)
    return {**state, "layers": layers}


def _map_heads(values: list[Any], fn: Any) -> Any:
    """``fn`` over the tensors of equal entries (a tensor, a list of tensors, or None) of several ranks."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return fn(values)
    return [fn(list(items)) for items in zip(*values, strict=True)]
