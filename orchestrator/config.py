"""Typed configuration: the strict base model, YAML loading and dotted overrides.

Every stage owns a frozen config class (in its own module) built on :class:`StrictModel`;
:mod:`recoup.orchestrator.runconfig` composes them into the run config. Loading turns
pydantic's errors into one sentence per problem that names the key and where it came
from (the YAML file or the command-line override), because a typo in a 13B run should
cost seconds, not a GPU-hour.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)
N = TypeVar("N", int, float)


class _Loader(yaml.SafeLoader):
    """YAML without the 1.1 base-60 integers: ``pattern: 2:4`` must stay the string "2:4",
    not become 124."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers
         if not (tag == "tag:yaml.org,2002:int" and ":" in rx.pattern)]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode,
                                deep: bool = False) -> dict[Any, Any]:
    """A YAML mapping; a key given twice is an error naming the key and both lines (YAML's
    own rule, which PyYAML does not enforce: it silently keeps the last value, so a repeated
    section would drop the first one whole)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping says so itself
            break
        if first is not None:
            where = f" in {key_node.start_mark.name}" if key_node.start_mark.name else ""
            raise ConfigError(f"duplicate key {key!r} at line {line}{where} "
                              f"(first given at line {first}); give each key once")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        _mapping_without_duplicates)


def yaml_load(text: str, name: str | None = None) -> Any:
    """Parse YAML text (``name``: the file, for messages); duplicate keys are refused."""
    loader = _Loader(text)
    if name is not None:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _numeric_not_bool(annotation: Any) -> bool:
    """True if a field of this type takes numbers but not booleans (``int``, ``float``,
    ``int | None``...): YAML's ``true`` must not pass there as 1."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _numeric_not_bool(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return bool not in args and any(_numeric_not_bool(a) for a in args)
    return annotation in (int, float)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable, every
    float is finite (``.inf`` or ``nan`` for a learning rate is a typo, not a setting) and
    a boolean is not a number (``steps: true`` is refused, not read as 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if (isinstance(value, bool) and field is not None
                        and _numeric_not_bool(field.annotation)):
                    raise ValueError(f"{key}: {str(value).lower()} is a boolean, not a "
                                     "number; give a number")
        return data


#: ``json_schema_extra`` of a field added to a stage's config after runs existed, whose
#: default keeps what those runs did: at its default it is left out of the stage's
#: fingerprint (:func:`fingerprint_dump`), so upgrading recoup does not make finished stages
#: stale; set to anything else, it counts like any field.
ADDED_FIELD = {"omit_at_default": True}


def fingerprint_dump(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` without the :data:`ADDED_FIELD` fields that hold
    their default (in nested sections too): what a stage's fingerprint and its "what
    changed" message are computed from."""
    out = model.model_dump(mode="json")
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        extra = info.json_schema_extra
        if isinstance(extra, Mapping) and extra.get("omit_at_default") \
                and value == info.get_default(call_default_factory=True):
            del out[name]
        elif isinstance(value, BaseModel):
            out[name] = fingerprint_dump(value)
    return out


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the config."""


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"degrade.sparsity=0.6"`` -> ``(("degrade", "sparsity"), 0.6)``; values parse as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {text!r} is not of the form key.sub=value (e.g. degrade.sparsity=0.6)"
        )
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from e
    return tuple(key.split(".")), value


def apply_override(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(path[: i + 1])
            raise ConfigError(f"override of {'.'.join(path)}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_text(), name=str(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a text file ({e.reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def _is_subsequence(short: Sequence[str], long: Sequence[str]) -> bool:
    it = iter(long)
    return all(part in it for part in short)


def _origin(loc: Sequence[str], source: str, overrides: Mapping[str, str]) -> str:
    """Who set the value at fault: the override that set it (or a section above it, or the
    same key seen through a tagged union: ``data.source.alpaca.path`` for
    ``data.source.path``), else the file. A check of a whole section that an override
    changed names both."""
    key = ".".join(loc)
    if key in overrides:
        return f"override {overrides[key]!r}"
    for okey, text in overrides.items():
        parts = okey.split(".")
        same_ends = bool(loc) and parts[0] == loc[0] and parts[-1] == loc[-1]
        if key.startswith(okey + ".") or (same_ends and _is_subsequence(parts, loc)):
            return f"override {text!r}"
    touched = [text for okey, text in overrides.items() if okey.startswith(key + ".") or not key]
    if touched:
        return f"{source} with override {', '.join(repr(t) for t in touched)}"
    return source


def _describe_error(err: Mapping[str, Any], source: str, overrides: Mapping[str, str]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    origin = _origin(loc, source, overrides)
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'"
    if err["type"] == "missing":
        return f"{origin}: required key '{key}' is missing"
    got = err.get("input")
    got_text = "" if isinstance(got, dict | BaseModel) else f" (got {got!r})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{origin}: {key + ': ' if key else ''}{msg}{got_text}"


def validate(model: type[M], data: Mapping[str, Any], *, source: str,
             overrides: Mapping[str, str] | None = None) -> M:
    """Validate ``data`` into ``model``; on failure a ConfigError listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [_describe_error(err, source, overrides or {}) for err in e.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(model: type[M], path: Path, overrides: Sequence[str] = ()) -> M:
    """Read a YAML file, apply ``key.sub=value`` overrides, validate into ``model``."""
    data = read_yaml_mapping(path)
    applied: dict[str, str] = {}
    for text in overrides:
        key_path, value = parse_override(text)
        apply_override(data, key_path, value)
        applied[".".join(key_path)] = text
    return validate(model, data, source=str(path), overrides=applied)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; used to say which values changed on resume."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def diff_configs(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences, e.g. ``["degrade.sparsity: 0.5 -> 0.6"]``."""
    a, b = flatten(old), flatten(new)
    missing = object()
    return [
        f"{prefix}{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    ]


def cli_number(parse: Callable[[str], N], ok: Callable[[N], bool], must: str,
               ) -> Callable[[str], N]:
    """An argparse ``type=`` that parses with ``parse`` (``int`` or ``float``) and refuses a
    value for which ``ok`` is false, saying what it ``must`` be."""
    kind = "whole number" if parse is int else "number"

    def convert(text: str) -> N:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} {must}")
        return value

    return convert
