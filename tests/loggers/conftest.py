"""Keeps wandb local: offline, silent, no credentials, every wandb directory under the test's tmp dir."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_WANDB_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID")


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment where wandb finds no credentials and writes only below ``tmp_path``."""
    home = tmp_path / "home"
    home.mkdir()
    for name in (*_WANDB_ENV, "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    for name, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("WANDB_ARTIFACT_DIR", str(home / "artifacts"))
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def _wandb_teardown() -> Iterator[None]:
    """Stop wandb's background service once, after the last test, so the session ends promptly."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()
