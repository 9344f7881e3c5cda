"""Suite-wide settings: a shared tokenizer/token cache, offline wandb, and a helper to run the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Without a GPU the Triton kernels run under Triton's interpreter. The variable must be set before any module
# defines a kernel (triton reads it when a function is decorated), so it is set here, before tests are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def app_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer and token cache shared by every app run of the session (the first run fills it)."""
    configured = os.environ.get("TTTEXP_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("tttexp-cache")


@pytest.fixture
def run_app(app_cache: Path, tmp_path: Path):
    """Run ``python -m tttexp.train`` in a subprocess; returns the CompletedProcess."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            python_path: str | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "TTTEXP_CACHE_DIR": str(app_cache), "WANDB_MODE": "offline",
                    "WANDB_SILENT": "true", "WANDB_API_KEY": "", "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("WANDB_API_KEY")
        if python_path:
            full_env["PYTHONPATH"] = python_path + os.pathsep + full_env.get("PYTHONPATH", "")
        return subprocess.run([sys.executable, "-m", "tttexp.train", *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
