"""``--experimental-rerun``: run a finished job again, in a new directory of its own, from its saved YAML.

Hydra's own rerun unpickles ``.hydra/config.pickle``, and a pickle can run code. The same job is fully described
by the plain YAML Hydra saves beside it (the overrides, the primary config's name and directory), so the flag is
turned into that command line before anything starts; no pickle is ever read. The saved run directory is left
out: the first run owns it (its checkpoints, its log), and the rerun gets the app's default directory.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tttexp.errors import ConfigError

FLAG = "--experimental-rerun"


def expand(argv: list[str], app: str = "train") -> list[str]:
    """``argv`` with ``--experimental-rerun PATH`` replaced by the saved command line of that job (PATH: the job's
    ``.hydra/config.pickle``, its ``.hydra`` folder or its run directory); ``app`` is the app that reruns it."""
    if FLAG not in argv and not any(a.startswith(f"{FLAG}=") for a in argv):
        return argv
    rest, path = [], None
    it = iter(argv)
    for arg in it:
        if arg == FLAG:
            path = next(it, None)
        elif arg.startswith(f"{FLAG}="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not path:
        raise ConfigError(f"{FLAG} needs a path: a run's .hydra/config.pickle, its .hydra folder or its directory")
    if rest:
        raise ConfigError(f"{FLAG} reruns a job exactly as it ran; drop the other arguments ({' '.join(rest)})")
    return saved_command_line(Path(path), app)


def saved_command_line(path: Path, app: str = "train") -> list[str]:
    """The arguments that reproduce the job whose saved config is at ``path``, into a new run directory."""
    saved = path if path.name == ".hydra" else path.parent if path.name.endswith(".pickle") else path / ".hydra"
    hydra_yaml, overrides_yaml = saved / "hydra.yaml", saved / "overrides.yaml"
    if not hydra_yaml.is_file() or not overrides_yaml.is_file():
        raise ConfigError(f"{FLAG} {path}: no saved job there ({saved} needs hydra.yaml and overrides.yaml)")
    hydra = (yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra", {})
    runtime, job = hydra.get("runtime", {}), hydra.get("job", {})
    argv: list[str] = []
    for source in runtime.get("config_sources", []):
        if source.get("provider") == "command-line" and source.get("schema") == "file":
            argv += ["--config-dir", str(source["path"])]
    if job.get("config_name") and job["config_name"] != app:
        argv += ["--config-name", str(job["config_name"])]
    argv += [str(o) for o in yaml.safe_load(overrides_yaml.read_text()) or []]
    argv += [str(o) for o in hydra.get("overrides", {}).get("hydra", []) if not str(o).startswith("hydra.run.dir=")]
    return argv
