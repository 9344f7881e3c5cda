import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_importing_the_package_does_not_import_wandb() -> None:
    result = _run("import tttexp.loggers, sys; assert 'wandb' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_constructing_every_logger_does_not_import_wandb() -> None:
    code = (
        "import sys\n"
        "from tttexp.loggers import JsonlLogger, LoggerGroup, NullLogger, WandbLogger, HealthMonitor\n"
        "LoggerGroup([NullLogger(), JsonlLogger('m.jsonl'), WandbLogger(mode='offline', tags=['a'])])\n"
        "HealthMonitor()\n"
        "assert 'wandb' not in sys.modules\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
