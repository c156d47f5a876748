"""One frozen configuration, built once from a YAML file plus `KEY=VALUE` overrides.

Keys are dotted paths into the YAML (`solver.base_lr=0.04`). An override must name a key that
the file defines and keep its type; an unknown key is an error naming the closest valid one.
A file may start from another with `base: other.yaml` (relative to itself) and hold only the
keys it changes, under the same rules, so every default is written once.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml


class ConfigError(ValueError):
    """A config file or override the user can fix; the message says how."""


class Config(Mapping[str, Any]):
    """Read-only nested mapping with attribute access (`cfg.solver.base_lr`)."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", {k: _freeze(v) for k, v in data.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is frozen; pass KEY=VALUE overrides when it is built")

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self._data.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _dotted_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        keys.append(prefix + k)
        if isinstance(v, Mapping):
            keys.extend(_dotted_keys(v, prefix + k + "."))
    return keys


def _check_type(key: str, old: Any, new: Any) -> Any:
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float))
        new = float(new) if ok else new
    elif isinstance(old, Mapping):
        ok = False
    else:
        ok = isinstance(new, type(old))
    if not ok:
        raise ConfigError(f"{key} must be a {type(old).__name__} like {old!r}, got {new!r}")
    return new


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=VALUE` to nested `data` in place; VALUE is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like KEY=VALUE, e.g. solver.base_lr=0.04")
    key, raw = override.split("=", 1)
    _set(data, key, yaml.safe_load(raw) if raw else "")


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        close = difflib.get_close_matches(key, _dotted_keys(data), n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    node[leaf] = _check_type(key, node[leaf], value)


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in data.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's keys, with its `base:` chain resolved."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass one from configs/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / base)
    for key, value in _leaves(data):
        try:
            _set(merged, key, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return merged


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (and its `base:` chain), apply the overrides in order, and freeze it."""
    data = _read_yaml(Path(path))
    for override in overrides:
        apply_override(data, override)
    return Config(data)
