"""Check the command line before Hydra starts: bad groups, keys, types and values become one clear line.

Hydra's own messages for these mistakes span many lines (search paths, stack hints). Here the overrides are
composed once with Hydra's compose API — each value of a sweep separately — and the config validated, so that a
mistake exits with status 2 and one line before any run directory, data or model exists.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tttexp.app.schemas import register_configs, validate
from tttexp.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides of a command line, parsed by Hydra's own argument parser (so that every Hydra flag keeps
    its meaning), without ``hydra.*`` overrides; and whether preflight should stand aside: another config
    directory or name, a rerun, help, or shell completion, where Hydra itself decides what the words mean."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:  # argparse's own usage error: let Hydra print it
        return [], True
    stand_aside = bool(args.config_dir or args.config_path or args.config_name or args.experimental_rerun
                       or args.help or args.hydra_help or args.shell_completion)
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    return overrides, stand_aside


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


def compose_config(overrides: list[str]) -> DictConfig:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def check(argv: list[str]) -> str | None:
    """None when the command line composes and validates; otherwise the one-line reason."""
    overrides, custom = split_argv(argv)
    if custom:
        return None
    try:
        variants = expand_sweeps(overrides)
    except HydraException as err:
        return f"cannot parse the overrides: {_first_line(err)}"
    for variant in variants:
        try:
            cfg = compose_config(variant)
            validate(cfg)
        except ConfigError as err:
            return str(err)
        except MissingConfigException as err:
            return _missing_option(err, variant)
        except (HydraException, OmegaConfBaseException) as err:
            return _override_error(err)
    return None


def _missing_option(err: MissingConfigException, overrides: list[str]) -> str:
    text = str(err)
    match = re.search(r"Could not (?:find|load) '([^']+)/([^']+)'", text)
    if match:
        group, name = match.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
        return f"{group}={name} is not an option; choose one of: {', '.join(options)}"
    return _first_line(err)


def _override_error(err: Exception) -> str:
    text = f"{err}\n{err.__cause__ or ''}"
    key = re.search(r"Key '([^']+)' is not in struct", text) or re.search(r"Key '([^']+)' not in '", text)
    override = re.search(r"Could not override '([^']+)'", text) or re.search(r"Error merging override ([^=\s]+)", text)
    if key and override:
        full = override.group(1)
        parent = full.rsplit(".", 1)[0] if "." in full else ""
        return f"{full}: no such config key{_suggest(parent, key.group(1))}"
    conversion = re.search(r"Value '([^']*)' (?:of type '\w+' )?could not be converted to (\w+)", text)
    if conversion:
        where = override.group(1) if override else re.search(r"full_key: (\S+)", text)
        where = where if isinstance(where, str) else (where.group(1) if where else "a value")
        return f"{where}={conversion.group(1)}: expected {_article(conversion.group(2))}"
    boolean = re.search(r"Value '([^']*)' is not a valid bool", text)
    if boolean and override:
        return f"{override.group(1)}={boolean.group(1)}: expected a boolean (true or false)"
    return _first_line(err)


def _suggest(parent: str, key: str) -> str:
    try:
        node = compose_config([])
        if parent:
            node = OmegaConf.select(node, parent)
        keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
    except Exception:  # noqa: BLE001 - suggestions are best effort
        keys = []
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""


def _article(type_name: str) -> str:
    name = {"Float": "float", "Integer": "integer", "Boolean": "boolean"}.get(type_name, type_name.lower())
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
