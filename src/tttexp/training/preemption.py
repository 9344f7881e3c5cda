"""Preemption: SIGTERM, SIGUSR1 or SIGUSR2 asks the loop to finish its step, checkpoint and exit for a requeue.

SIGUSR2 is what submitit sends before a SLURM time limit (it requeues from its own handler, which runs after our
checkpoint); anywhere else it is one more way to ask for a checkpoint, never a way to die without one.

In a self-launched DDP job the launcher process receives the signal and forwards it to its workers
(``distributed.launch.SignalForwarder``); the workers checkpoint and return, and the launcher exits with
:data:`EXIT_PREEMPTED` and requeues the job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

from tttexp.distributed.launch import LAUNCHED_WORKER

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# submitit asks for USR2 before a SLURM time limit and requeues from its own USR2 handler.
SUBMITIT_SIGNALS = (signal.SIGUSR2,)
EXIT_PREEMPTED = 3  # the app's exit status after a preemption checkpoint


class Preempted(RuntimeError):
    """Raised after the preemption checkpoint is written; the message says how to continue."""


class PreemptionFlag:
    """Installs handlers (main thread only) that record the signal; the loop polls :meth:`requested`."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def hand_over(self) -> bool:
        """After our checkpoint: let the handler we replaced (submitit's requeue) act on the signal."""
        previous = self._previous.get(self.signal) if self.signal is not None else None
        if callable(previous) and self.signal in SUBMITIT_SIGNALS:
            previous(self.signal, None)
            return True
        return False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def requested(self) -> bool:
        return self.signal is not None

    def requested_anywhere(self, layout: Any) -> bool:
        """Has any process been signalled? One process needs no device tensor (and so no host sync)."""
        if layout.world_size == 1:
            return self.requested()
        import torch

        flag = torch.tensor(1.0 if self.requested() else 0.0, device=layout.device)
        return bool(layout.all_reduce_max(flag) > 0)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def requeue_slurm_job() -> bool:
    """Under SLURM, put this job back in the queue (its next start resumes with ``resume=auto``)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get(LAUNCHED_WORKER) or not job or shutil.which("scontrol") is None:  # the launcher requeues
        return False
    return subprocess.run(["scontrol", "requeue", job], capture_output=True).returncode == 0
