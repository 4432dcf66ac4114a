"""Typed configuration: the strict base model, YAML loading and dotted overrides.

Every stage owns a frozen config class (in its own module) built on :class:`StrictModel`;
:mod:`recoup.orchestrator.runconfig` composes them into the run config. Loading turns
pydantic's errors into one sentence per problem that names the key and where it came
from (the YAML file or the command-line override), because a typo in a 13B run should
cost seconds, not a GPU-hour.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


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


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
        data = yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not a {type(data).__name__}")
    return data


def _describe_error(err: Mapping[str, Any], source: str, overrides: Mapping[str, str]) -> str:
    key = ".".join(str(p) for p in err["loc"])
    origin = f"override {overrides[key]!r}" if key in overrides else source
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'"
    if err["type"] == "missing":
        return f"{origin}: required key '{key}' is missing"
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{origin}: {key}: {err['msg']}{got_text}"


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
