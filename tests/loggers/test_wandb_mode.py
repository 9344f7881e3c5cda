from pathlib import Path

import pytest

from tttexp.loggers import WandbLogger
from tttexp.loggers.wandb_mode import has_credentials, resolve_mode


def _netrc(home: Path, host: str) -> None:
    path = home / "home" / ".netrc"
    path.write_text(f"machine {host}\n  login user\n  password {'0' * 40}\n")
    path.chmod(0o600)


def test_invalid_mode_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError, match=r"auto, online, offline, disabled; got 'cloud'") as info:
        WandbLogger(mode="cloud")
    assert "\n" not in str(info.value)


def test_auto_is_offline_without_credentials(wandb_env: Path) -> None:
    assert not has_credentials()
    assert resolve_mode("auto") == "offline"


def test_auto_is_online_with_an_api_key(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert resolve_mode("auto") == "online"


def test_auto_reads_the_netrc_entry_of_the_configured_host(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _netrc(wandb_env, "api.wandb.ai")
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert resolve_mode("auto") == "offline"
    _netrc(wandb_env, "wandb.example.org")
    assert resolve_mode("auto") == "online"


def test_auto_follows_wandb_mode_and_explicit_modes_win(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online"
    assert resolve_mode("offline") == "offline"
