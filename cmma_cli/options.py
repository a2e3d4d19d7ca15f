"""Command-line options from a stage's config dataclass (the one place that maps configs to options).

Every field of a config in :mod:`cmma_cli.config` becomes an option of its command: ``epochs`` ->
``--epochs``, ``learn_temperature`` -> ``--learn-temperature/--no-learn-temperature``, a list -> a
comma-separated value (``--modalities structure,text``). The help text is the field's trailing comment in
``config.py``, so the docs live next to the defaults. Values come, lowest to highest priority, from the
dataclass default, the ``[section]`` table of ``--config file.toml``, and the command line.
"""

from __future__ import annotations

import functools
import inspect
import io
import tokenize
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Union

import typer

from cmma_cli.config import load_toml_section
from cmma_cli.errors import CMMAError

CONFIG_PARAM = "config"


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """``{field: trailing comment}`` for the fields of dataclass ``cls``, read from its source."""
    out: dict[str, str] = {}
    source = inspect.getsource(cls)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        code = lines[tok.start[0] - 1][: tok.start[1]].strip()
        name = code.split(":", 1)[0].strip() if ":" in code else ""
        if name.isidentifier():
            out[name] = tok.string.lstrip("#").strip()
    return out


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether it is a list) of a field annotation such as ``int | None`` or ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default_text(f) -> str:
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)


def _parameters(cls: type, skip: set[str]) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    params = []
    for f in fields(cls):
        if f.name in skip:
            continue
        base, is_list = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{helps.get(f.name, '')} (default: {_default_text(f)})".strip()
        if base is bool:
            decls = [f"{flag}/--no-{flag[2:]}"]
            kind = Optional[bool]
        else:
            decls = [flag]
            kind = Optional[str] if is_list else Optional[base]
            if is_list:
                help_text = "Comma-separated. " + help_text
        option = typer.Option(*decls, help=help_text, show_default=False, rich_help_panel="Settings")
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind, option])
        )
    return params


def _convert(cls: type, name: str, value: Any) -> Any:
    base, is_list = _base_type(typing.get_type_hints(cls)[name])
    if is_list and isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            return [base(v) for v in items]
        except ValueError:
            raise CMMAError(f"--{name.replace('_', '-')} takes comma-separated {base.__name__} values, not {value!r}.") from None
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
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            values: dict[str, Any] = {}
            if config_file is not None:
                values.update(load_toml_section(config_file, section, cls))
            values.update({k: v for k, v in given.items() if v is not None})
            values = {k: _convert(cls, k, v) for k, v in values.items()}
            return fn(*args, cfg=cls(**values), **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + [config_opt] + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
        wrapper.__annotations__["return"] = hints.get("return", sig.return_annotation)
        return wrapper

    return decorate
