"""Publishing cache entries so that concurrent builders (e.g. several ranks) never see half-written files.

Each builder writes a private temporary file or directory and then publishes it in one step. The first
published entry wins; later builders discard their copy and use the published one, so every process ends
up reading the same bytes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def temporary_sibling(final: Path) -> Path:
    """A unique path next to `final` (same filesystem, so publishing is a rename)."""
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def publish_file(tmp: Path, final: Path) -> None:
    """Move `tmp` to `final` unless `final` already exists; `tmp` is gone afterwards."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        pass
    except OSError:
        # Filesystems without hard links: a rename is still atomic, only "first wins" is lost.
        if not final.exists():
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename directory `tmp` to `final` unless a complete `final` exists; `tmp` is gone afterwards."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
