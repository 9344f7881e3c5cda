"""Where this process stands: its rank and world from the environment, a free port, SLURM's rendezvous.

The one place that reads torchrun's and SLURM's variables; everything else asks :func:`world_from_env` or
:func:`process_rank`.
"""

from __future__ import annotations

import os
import socket
import subprocess


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun/elastic variables, or SLURM's; (0, 1, 0) when alone."""
    env = os.environ
    try:
        if "WORLD_SIZE" in env and "RANK" in env:
            return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
            return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    except ValueError:
        pass
    return 0, 1, 0


def process_rank() -> int:
    """This process's global rank (0 when alone)."""
    return world_from_env()[0]


def in_existing_world() -> bool:
    """Started by torchrun/elastic (WORLD_SIZE set) or as one task of a multi-task SLURM step."""
    env = os.environ
    return "WORLD_SIZE" in env or (int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def slurm_rendezvous() -> None:
    """Under a multi-task SLURM step without torchrun: rendezvous at the first node, on a port from the job id."""
    env = os.environ
    if "SLURM_PROCID" not in env or "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            first = nodes.split(",")[0].split("[")[0]
        env["MASTER_ADDR"] = first
    env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
