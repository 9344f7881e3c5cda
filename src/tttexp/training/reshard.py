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
               batches_per_epoch: int | None = None) -> dict[str, Any]:
    """This rank's ``data`` position, ``rng`` (None: reseed with :func:`reseed`) and ``carry`` from a checkpoint
    written by any world size."""
    saved_world = int(state.get("world_size", 1))
    ranks = state["ranks"]
    saved_rows = int(state.get("global_rows") or rows_per_rank * saved_world)
    rows = rows_per_rank * world_size
    if saved_world == world_size and saved_rows == rows:
        return ranks[rank]
    if stream and saved_rows != rows:
        raise CheckpointError(
            f"the checkpoint carries {saved_rows} document streams ({saved_world} processes) and this run has "
            f"{rows} ({world_size} x data.batch_size={rows_per_rank}); set data.batch_size={saved_rows // world_size}"
            if saved_rows % world_size == 0 else
            f"the checkpoint carries {saved_rows} document streams, which {world_size} processes cannot share "
            "equally; use a world size that divides it"
        )
    data = dict(ranks[0]["data"])
    if not stream and saved_rows != rows:
        data = _windows_position(data, saved_rows, rows, batches_per_epoch)
    carries = [r.get("carry") for r in ranks]
    carry = None
    if any(c is not None for c in carries):
        carry = split_rows(concat_rows(carries), world_size, rank)
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
