"""Choosing the wandb mode: ``auto`` goes online only when credentials exist, so no job ever waits at a
login prompt or fails for want of an account."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_HOST = "api.wandb.ai"
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def check_mode(mode: str) -> str:
    """``mode`` itself if valid, else ValueError."""
    if mode not in MODES:
        raise ValueError(f"wandb mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def has_credentials() -> bool:
    """True when ``WANDB_API_KEY`` is set or the netrc file has an entry for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "")).hostname or DEFAULT_HOST
    netrc_path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not netrc_path.is_file():
        return False
    try:
        return netrc.netrc(str(netrc_path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """The concrete mode (online, offline or disabled) for a configured ``mode``.

    ``auto`` follows ``WANDB_MODE`` when it is set, else goes online exactly when credentials exist.
    """
    if check_mode(mode) != "auto":
        return mode
    env_mode = _ENV_MODES.get(os.environ.get("WANDB_MODE", "").strip().lower())
    if env_mode is not None:
        return env_mode
    return "online" if has_credentials() else "offline"
