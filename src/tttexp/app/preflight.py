"""Check the command line before Hydra starts: bad groups, keys, types and values become one clear line.

Hydra's own messages for these mistakes span many lines (search paths, stack hints). Here the overrides are
composed once with Hydra's compose API — each value of a sweep separately — and the config validated, so that a
mistake exits with status 2 and one line before any run directory, data or model exists.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from tttexp.app import schemas
from tttexp.app.schemas import register_configs, validate
from tttexp.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class CommandLine:
    """What preflight needs from a command line, read by Hydra's own argument parser (so that every Hydra flag
    keeps its meaning): the overrides (``hydra.*`` included: callbacks, launcher and sweeper are checked too),
    the primary config (``--config-path``/``--config-name``) and an extra config directory (``--config-dir``)."""

    def __init__(self, argv: list[str], default_config: str = "train") -> None:
        from hydra._internal.utils import get_args_parser

        try:
            args = get_args_parser().parse_args(argv)
        except SystemExit:  # argparse's own usage error: let Hydra print it
            args = None
        self.parsed = args is not None
        self.overrides: list[str] = list(args.overrides) if args else []
        self.config_name: str = (args.config_name if args else None) or default_config
        self.config_path: str | None = args.config_path if args else None
        self.config_dir: str | None = args.config_dir if args else None
        self.rerun: bool = bool(args and args.experimental_rerun)
        # one job runs here, in hydra.run.dir (not a sweep, not a printout of the config or of Hydra's facts)
        self.single_job = bool(args and not args.multirun and not args.cfg and not args.info)
        # help and shell completion compose nothing that runs: Hydra decides what the words mean
        self.stand_aside = not self.parsed or bool(args.help or args.hydra_help or args.shell_completion)


def split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """The job's overrides (without ``hydra.*``) and whether preflight stands aside (kept for callers)."""
    line = CommandLine(argv)
    return [o for o in line.overrides if not o.lstrip("+~").startswith("hydra")], line.stand_aside


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value, the other sweeps at their first value (N lists, not the product)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    firsts, choices = [], []
    for text, ov in zip(overrides, parsed, strict=True):
        if ov.is_sweep_override():
            key = ov.get_key_element()
            if ov.value_type == ValueType.INTERVAL_SWEEP:  # Optuna's continuous ranges: check both ends
                values = [f"{key}={ov.value().start}", f"{key}={ov.value().end}"]
            else:
                values = [f"{key}={v}" for v in ov.sweep_string_iterator()]
            firsts.append(values[0])
            choices.append(values)
        else:
            firsts.append(text)
            choices.append([text])
    lists = [firsts]
    for i, values in enumerate(choices):
        for value in values[1:]:
            lists.append(firsts[:i] + [value] + firsts[i + 1 :])
    return lists


def compose_config(overrides: list[str], *, config_name: str = "train", config_path: str | None = None,
                   config_dir: str | None = None, with_hydra: bool = False, task_name: str = "train") -> DictConfig:
    """Compose as the app does: the primary config directory (``--config-path``, default conf/), an extra
    directory after it (``--config-dir``), the primary config (``--config-name``); ``with_hydra`` keeps the
    ``hydra`` node (callbacks, launcher, sweeper, logging); ``task_name`` is the app (Hydra's job name)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.types import RunMode

    register_configs()
    GlobalHydra.instance().clear()
    search_path = create_config_search_path(_primary_dir(config_path))
    if config_dir is not None:
        extra = Path(config_dir).expanduser().resolve()
        if not extra.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: no such directory")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    try:
        hydra = Hydra.create_main_hydra2(task_name=task_name, config_search_path=search_path)
        cfg = hydra.compose_config(config_name=config_name, overrides=list(overrides), run_mode=RunMode.RUN,
                                   from_shell=False, with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()
    if not with_hydra and "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def _primary_dir(config_path: str | None) -> str:
    if config_path is None:
        return f"file://{CONF_DIR}"
    if "://" in config_path:
        return config_path
    where = Path(config_path).expanduser()
    return f"file://{where if where.is_absolute() else (Path(__file__).resolve().parent / where).resolve()}"


_CHECKED: dict[str, Any] = {}  # the built config of the one job a command line runs here, by its composed text


def check(argv: list[str], *, app: str = "train", validate: Callable[[DictConfig], Any] = validate) -> str | None:
    """None when the command line composes and validates; otherwise the one-line reason.

    Every run is composed here, a custom ``--config-dir``/``--config-path``/``--config-name`` included, with
    its ``hydra`` node: Hydra builds ``hydra.callbacks``, the launcher and the sweeper before the job starts,
    so what a config may run (app/security.py) is checked now or never. ``app`` names the app (its primary
    config and job name); ``validate`` is its check of a composed config, which returns the built config: for a
    command line that runs one job here, the job takes it (:func:`checked`) instead of checking again."""
    _CHECKED.clear()
    line = CommandLine(argv, default_config=app)
    if line.stand_aside:
        return None
    if line.rerun:
        # the entry has already turned the flag into the saved YAML's command line; Hydra's own rerun would unpickle
        return f"--experimental-rerun unpickles a saved config (code could run); tttexp.{app} reruns from the YAML"
    try:
        variants = expand_sweeps(line.overrides)
    except HydraException as err:
        return f"cannot parse the overrides: {_first_line(err)}"
    for variant in variants:
        try:
            cfg = compose_line(line, variant, app)
            built = validate(cfg)
            if line.single_job and len(variants) == 1:
                _CHECKED[_job_text(cfg)] = built
        except ConfigError as err:
            return str(err)
        except MissingConfigException as err:
            return _missing_option(err, variant)
        except (HydraException, OmegaConfBaseException) as err:
            return _override_error(err, variant)
    return None


def checked(cfg: DictConfig, validate: Callable[[DictConfig], Any] = validate) -> Any:
    """The config ``validate`` builds from the job's ``cfg``: the one preflight built, when it checked this very job
    in this process (each check then runs once per job), otherwise built now."""
    built = _CHECKED.pop(_job_text(cfg), None)
    return built if built is not None else validate(cfg)


def _job_text(cfg: DictConfig) -> str:
    """The job's config as written (interpolations unresolved), without the ``hydra`` node."""
    return OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"]))


def compose_line(line: CommandLine, overrides: list[str], app: str = "train") -> DictConfig:
    """The config (``hydra`` node included) that ``line`` gives the app with ``overrides``."""
    return compose_config(overrides, config_name=line.config_name, config_path=line.config_path,
                          config_dir=line.config_dir, with_hydra=True, task_name=app)


def _missing_option(err: MissingConfigException, overrides: list[str]) -> str:
    text = str(err)
    match = re.search(r"Could not (?:find|load) '([^']+)/([^']+)'", text)
    if match:
        group, name = match.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
        return f"{group}={name} is not an option; choose one of: {', '.join(options)}"
    return _first_line(err)


def _override_error(err: Exception, overrides: list[str]) -> str:
    text = f"{err}\n{err.__cause__ or ''}"
    key = re.search(r"Key '([^']+)' is not in struct", text) or re.search(r"Key '([^']+)' not in '", text)
    override = re.search(r"Could not override '([^']+)'", text) or re.search(r"Error merging override ([^=\s]+)", text)
    if key and override:
        full = override.group(1)
        if full.startswith("model.kernel_settings."):  # a mapping with no keys until given: a new key takes a +
            return (f"{full}: a kernel setting is added with a +, as +{full}=..., or given with the others, as "
                    f"'model.kernel_settings={{{full.rsplit('.', 1)[1]}:...}}'")
        parent = full.rsplit(".", 1)[0] if "." in full else ""
        typed = re.search(r"object_type=(\w+)", text)
        current = [s for s in schemas.schemas_of(parent) if typed and s.__name__ == typed.group(1)] if parent else []
        target = {f.name: f.default for f in fields(current[0])}.get("_target_") if current else None
        if target:  # a key another option of the group takes: say which
            line = schemas.refusal(parent, key.group(1), _written_value(full, overrides), target)
            if line:
                return line
        return f"{full}: no such config key{_suggest(parent, key.group(1))}"
    conversion = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    if conversion:
        where = override.group(1) if override else re.search(r"full_key: (\S+)", text)
        where = where if isinstance(where, str) else (where.group(1) if where else "a value")
        return f"{where}={conversion.group(1)}: expected {_article(conversion.group(2))}"
    boolean = re.search(r"Value '([^']*)' is not a valid bool", text)
    if boolean and override:
        return f"{override.group(1)}={boolean.group(1)}: expected a boolean (true or false)"
    if override and "." in override.group(1) and not _is_section(override.group(1).rsplit(".", 1)[0]):
        return f"{override.group(1)}: no such config key"  # under a plain value (strategy.compile: strategy is a name)
    return _first_line(err)


def _is_section(key: str) -> bool:
    """Whether ``key`` is a section (not a plain value) of the config as composed by default."""
    try:
        return isinstance(OmegaConf.select(compose_config([]), key), DictConfig)
    except Exception:  # noqa: BLE001 - only decides how a message reads
        return True


def _written_value(key: str, overrides: list[str]) -> str:
    """The value ``key`` is given on the command line, as written."""
    for text in overrides:
        name, _, value = text.partition("=")
        if name.lstrip("+~") == key:
            return value
    return "?"


def _suggest(parent: str, key: str) -> str:
    """A close key: of the section as composed by default, or of any option's schema for it."""
    try:
        node = compose_config([])
        if parent:
            node = OmegaConf.select(node, parent)
        keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001 - suggestions are best effort
        keys = []
    keys += [f.name for schema in schemas.schemas_of(parent) for f in fields(schema) if f.name not in keys]
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""


def _article(type_name: str) -> str:
    name = {"Float": "float", "Integer": "integer", "Boolean": "boolean"}.get(type_name, type_name.lower())
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
