"""Command-line options from a stage's config dataclass (the one place that maps configs to options).

Every field of a config in :mod:`cmma_cli.config` becomes an option of its command: ``epochs`` ->
``--epochs``, ``learn_temperature`` -> ``--learn-temperature/--no-learn-temperature``, a list -> a
comma-separated value (``--modalities structure,text``, also repeatable: ``-e Li -e O``). The help text is
the field's trailing comment in ``config.py``, so the docs live next to the defaults. Field metadata may
add a short flag (``metadata={"short": "-e"}``), rename the long one (``{"long": "--from"}``) and set a
lower bound for numbers (``{"min": 1}``); ``choices`` and ``check`` are applied by
:func:`cmma_cli.config.validate` when the command starts, before it reads anything. Values come, lowest to
highest priority, from the dataclass default, the ``[section]`` table of ``--config file.toml``, and the
command line. Options that are not settings (secrets such as an API key, inputs) stay the command's own.
"""

from __future__ import annotations

import functools
import inspect
import io
import tokenize
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from cmma_cli.config import base_type, coerce, flat_fields, load_toml_section, option_flag, section_types, validate

CONFIG_PARAM = "config"


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """``{field: trailing comment}`` for the fields of dataclass ``cls``, read from its source."""
    out: dict[str, str] = {}
    found = _class_lines(inspect.getsourcefile(cls) or "", cls.__qualname__)
    if found is None:  # not a top-level class of a readable file: let inspect find it
        source = inspect.getsource(cls)
    else:
        lines, start, end = found
        source = "".join(lines[start:end])
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        code = lines[tok.start[0] - 1][: tok.start[1]].strip()
        name = code.split(":", 1)[0].strip() if ":" in code else ""
        if name.isidentifier():
            out[name] = tok.string.lstrip("#").strip()
    return out


def _class_lines(path: str, qualname: str) -> tuple[list[str], int, int] | None:
    """``(the file's lines, first, end)`` of the top-level class ``qualname`` of the file at ``path``: the lines
    :func:`inspect.getsource` gives (decorators first), the file parsed once for all its classes (getsource
    parses the whole module again for every class, ~20 ms each at every start of the command line)."""
    found = _module_classes(path)
    return None if found is None or qualname not in found[1] else (found[0], *found[1][qualname])


@functools.lru_cache(maxsize=None)
def _module_classes(path: str) -> tuple[list[str], dict[str, tuple[int, int]]] | None:
    import ast
    import linecache

    lines = linecache.getlines(path)
    if not lines:
        return None
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        return None
    return lines, {node.name: (min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1, node.end_lineno)
                   for node in tree.body if isinstance(node, ast.ClassDef)}


def _default_text(f) -> str:
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)


def _parameters(cls: type, skip: set[str]) -> list[inspect.Parameter]:
    """One keyword parameter per setting of ``cls`` (its own fields, then each modality's section, flat)."""
    params = []
    hints: dict[type, dict[str, Any]] = {}  # each class's resolved annotations, once (not once per field)
    for name, (modality, f) in flat_fields(cls).items():
        if name in skip:
            continue
        owner = cls if modality is None else section_types(cls._sections)[modality]
        if owner not in hints:
            hints[owner] = typing.get_type_hints(owner)
        base, is_list, _ = base_type(hints[owner][f.name])
        flag = option_flag(cls, name)
        short = [f.metadata["short"]] if f.metadata.get("short") else []
        help_text = f"{field_help(owner).get(f.name, '')} (default: {_default_text(f)})".strip()
        extra: dict[str, Any] = {}
        if base is bool:
            decls = [f"{flag}/--no-{flag[2:]}", *short]
            kind = Optional[bool]
        else:
            decls = [flag, *short]
            kind = Optional[list[str]] if is_list else Optional[base]
            if is_list:
                help_text = "Comma-separated or repeated. " + help_text
            elif "min" in f.metadata:
                extra["min"] = f.metadata["min"]
        panel = "Settings" if modality is None else f"{modality} settings"
        option = typer.Option(*decls, help=help_text, show_default=False, rich_help_panel=panel, **extra)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind, option]))
    return params


def _given(value: Any) -> Any:
    """A command-line value as :func:`~cmma_cli.config.coerce` takes it: a repeated list option joined by commas,
    an absent one None."""
    if isinstance(value, (list, tuple)):
        return ",".join(value) if value else None
    return value


def with_config(cls: type, section: str, skip: tuple[str, ...] = ()) -> Callable:
    """Decorate a command so it takes every field of ``cls`` as an option plus ``--config FILE``.

    The command receives the built config as its keyword argument ``cfg`` (not an option); fields named
    in ``skip`` are left to the command's own options.
    """

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolves string annotations in fn's module
        own = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in sig.parameters.items() if name != "cfg"]
        extra = _parameters(cls, set(skip))
        config_opt = inspect.Parameter(
            CONFIG_PARAM, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[Path], typer.Option(
                "--config", help=f"TOML file whose '{section}' table sets any of the settings below.",
                show_default=False, rich_help_panel="Settings")],
        )
        names = {p.name for p in extra}

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            config_file = kwargs.pop(CONFIG_PARAM, None)
            given = {k: _given(kwargs.pop(k)) for k in list(kwargs) if k in names}
            values: dict[str, Any] = {}
            if config_file is not None:
                values.update(load_toml_section(config_file, section, cls))
            given = {k: v for k, v in given.items() if v is not None}
            values.update({k: coerce(cls, k, v, option_flag(cls, k)) for k, v in given.items()})
            return fn(*args, cfg=validate(cls(**values)), **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + [config_opt] + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        wrapper.__annotations__["return"] = hints.get("return", sig.return_annotation)
        return wrapper

    return decorate
