"""The model's code as files beside its weights, so that transformers loads an export with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and nothing of tttexp installed.

The files are generated from the package's own modules at export time, never kept by hand: starting from the
configuration and modeling modules, every ``tttexp`` module they import (also inside functions, such as the Triton
kernels that ``ops.dispatch`` imports when it picks them) becomes one flat file, ``tttexp/ops/ttt_linear/op.py`` ->
``ops_ttt_linear_op.py``, with its ``tttexp`` imports rewritten to relative ones. transformers copies the files that
an entry file reaches through ``from .x import ...`` lines, so every import is written in that form: a module
imported as a module (``from tttexp.ops import reference``) becomes ``from .ops_reference import _MODULE as
reference``, ``_MODULE`` being a name each generated file binds to itself. Two more rewrites:

- ``import triton`` lines at module level go inside ``try``: transformers' import check skips ``try`` blocks, so a
  machine without triton still loads the files (the kernel files are imported only where triton runs);
- ``torch.library`` op names get a namespace of the importing module's own name, so an export's Triton ops never
  collide with the package's (``tttexp::...``) or another export's in the same process.

Anything else that names ``tttexp`` in code is refused with an error, so a new import form cannot slip through.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

PACKAGE = "tttexp"
ENTRIES = {
    "tttexp.models.configuration": "configuration_tttexp",
    "tttexp.models.modeling": "modeling_tttexp",
}
AUTO_MAP = {
    "AutoConfig": "configuration_tttexp.TTTConfig",
    "AutoModelForCausalLM": "modeling_tttexp.TTTForCausalLM",
}
SELF = "_MODULE"
HEADER = "# Generated from {module} by tttexp.models.remote_code at export time; edits are lost on re-export.\n"
FOOTER = (f"\nimport sys as _sys  # noqa: E402\n\n"
          f"{SELF} = _sys.modules[__name__]  # this module, for `from .x import {SELF}`\n")
OP_NAMESPACE = (
    "import re as _re  # noqa: E402\n\n"
    "# torch.library op namespace of this copy (the package registers its ops under tttexp::)\n"
    '_OP_NAMESPACE = _re.sub(r"\\W", "_", __name__)\n'
)
TRITON_GUARD = ("try:  # imported only where triton runs; transformers' import check skips try blocks\n{body}"
                "except ImportError:  # pragma: no cover\n    raise\n")


class RemoteCodeError(RuntimeError):
    """The package's code uses a form the generator does not rewrite."""


ROOT = Path(__file__).resolve().parents[1]  # the tttexp package directory


def _source(module: str) -> Path | None:
    """The file of a tttexp module, found without importing anything (None: not a module)."""
    parts = module.split(".")[1:]
    candidates = [ROOT.joinpath(*parts, "__init__.py")]
    if parts:
        candidates.insert(0, ROOT.joinpath(*parts).with_suffix(".py"))
    return next((path for path in candidates if path.is_file()), None)


def module_file(module: str) -> Path:
    path = _source(module) if _is_ours(module) else None
    if path is None:
        raise RemoteCodeError(f"cannot find the source of {module}")
    return path


def is_package(module: str) -> bool:
    return module_file(module).name == "__init__.py"


def flat_name(module: str) -> str:
    """The generated file's module name: ``tttexp.ops.ttt_linear.op`` -> ``ops_ttt_linear_op``."""
    if module in ENTRIES:
        return ENTRIES[module]
    return module.removeprefix(PACKAGE + ".").replace(".", "_")


def _is_ours(name: str | None) -> bool:
    return name is not None and (name == PACKAGE or name.startswith(PACKAGE + "."))


def _is_module(name: str) -> bool:
    return _is_ours(name) and _source(name) is not None


def _imports(tree: ast.AST, module: str) -> list[str]:
    """The tttexp modules ``tree`` imports, anywhere in the file."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_ours(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module)
            if not _is_ours(base):
                continue
            subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            found += subs + ([base] if len(subs) < len(node.names) else [])
    return found


def _absolute(node: ast.ImportFrom, module: str) -> str | None:
    if not node.level:
        return node.module
    parts = module.split(".") if is_package(module) else module.split(".")[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def closure(roots: tuple[str, ...] = tuple(ENTRIES)) -> list[str]:
    """Every tttexp module that ``roots`` import, directly or not (the package ``__init__`` files that Python runs
    on the way are not followed: the generated files are flat)."""
    seen: list[str] = []
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.append(module)
        tree = ast.parse(module_file(module).read_text())
        todo += [m for m in _imports(tree, module) if m not in seen]
    return sorted(seen)


def _rewrite_import(node: ast.Import | ast.ImportFrom, module: str) -> list[str] | None:
    """The relative statements that replace one import of tttexp modules (None: not ours)."""
    if isinstance(node, ast.Import):
        if not any(_is_ours(a.name) for a in node.names):
            return None
        if not all(_is_ours(a.name) and a.asname is None for a in node.names):
            raise RemoteCodeError(f"{module}: `import {', '.join(a.name for a in node.names)}` mixes packages or "
                                  "binds a tttexp name; use `from tttexp.x import y`")
        # `import tttexp.a.b` only makes sure the module imports (its binding of `tttexp` must stay unused)
        return [f"from .{flat_name(a.name)} import {SELF}  # noqa: F401" for a in node.names]
    base = _absolute(node, module)
    if not _is_ours(base):
        return None
    lines, names = [], []
    for alias in node.names:
        if alias.name == "*":
            raise RemoteCodeError(f"{module}: `from {base} import *` is not rewritten")
        sub = f"{base}.{alias.name}"
        if _is_module(sub):
            lines.append(f"from .{flat_name(sub)} import {SELF} as {alias.asname or alias.name}")
        else:
            names.append(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}")
    if names:
        lines.insert(0, f"from .{flat_name(base)} import {', '.join(names)}")
    return lines


def generate_module(module: str) -> str:
    """The generated source of one module."""
    source = module_file(module).read_text()
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []  # (first line, last line, replacement), 0-based, inclusive
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        new = _rewrite_import(node, module)
        if new is None:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        indent, after = lines[first][: node.col_offset], lines[last][node.end_col_offset :].strip()
        if indent.strip() or (after and not after.startswith("#")):
            raise RemoteCodeError(f"{module}:{node.lineno}: an import that shares its line is not rewritten")
        edits.append((first, last, "".join(f"{indent}{line}\n" for line in new)))
    guarded = [n for n in tree.body if isinstance(n, ast.Import) and any(
        a.name == "triton" or a.name.startswith("triton.") for a in n.names)]
    if guarded:
        first, last = guarded[0].lineno - 1, guarded[-1].end_lineno - 1
        if any(not isinstance(n, ast.Import) for n in tree.body if first < n.lineno - 1 < last):
            raise RemoteCodeError(f"{module}: module-level triton imports must stand together")
        body = "".join("    " + line for line in lines[first : last + 1])
        edits.append((first, last, TRITON_GUARD.format(body=body)))
    for first, last, text in sorted(edits, reverse=True):
        lines[first : last + 1] = [text]
    text = "".join(lines)
    if '"tttexp::' in text:
        text = text.replace('"tttexp::', '_OP_NAMESPACE + "::')
        text = _after_imports(text, OP_NAMESPACE)
    text = HEADER.format(module=module) + text + FOOTER
    _check(text, module)
    return text


def _after_imports(text: str, block: str) -> str:
    """``block`` inserted after the module-level imports of ``text``."""
    tree = ast.parse(text)
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
               or isinstance(n, ast.Try) and isinstance(n.body[0], ast.Import | ast.ImportFrom)]
    last = max(n.end_lineno for n in imports)
    lines = text.splitlines(keepends=True)
    return "".join(lines[:last]) + "\n" + block + "".join(lines[last:])


def _check(text: str, module: str) -> None:
    """No import of tttexp and no ``tttexp`` name is left in the generated code."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import) and any(_is_ours(a.name) for a in node.names) or (
            isinstance(node, ast.ImportFrom) and not node.level and _is_ours(node.module)
        ) or (isinstance(node, ast.Name) and node.id == PACKAGE):
            raise RemoteCodeError(f"{module}:{node.lineno}: the generated code still names {PACKAGE}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
            re.fullmatch(r"tttexp(\.\w+)+", node.value) or node.value.startswith("tttexp::")
        ):
            raise RemoteCodeError(f"{module}:{node.lineno}: {node.value!r} names tttexp at run time")


def generate() -> dict[str, str]:
    """Every generated file: ``{file name: source}``."""
    return {f"{flat_name(m)}.py": generate_module(m) for m in closure()}


def write(out: Path) -> list[Path]:
    """Write the generated files into ``out`` and add ``auto_map`` to its ``config.json``; returns the files."""
    out = Path(out)
    written = []
    for name, text in generate().items():
        (out / name).write_text(text)
        written.append(out / name)
    config = out / "config.json"
    data = json.loads(config.read_text())
    data["auto_map"] = dict(AUTO_MAP)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return written
