"""One frozen configuration, built once from a YAML file plus `KEY=VALUE` overrides.

Keys are dotted paths into the YAML (`solver.base_lr=0.04`). An override must name a key that
the file defines; an unknown key is an error naming the closest valid one. A file may start
from another with `base: other.yaml` (relative to itself) and hold only the keys it changes,
under the same rules, so every default is written once. Once merged, every value goes through
one validation pass (train/config_schema.py: choices, ranges, element types), and a bad one is
a `ConfigError` of one sentence naming the key, what it may hold and where the value came from
(the file or the override), raised before a tool writes anything.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from train import config_schema

REFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "reference.yaml"


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


def walk(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key, value) of nested `data`, each section before its keys: the one walker of configs."""
    for k, v in data.items():
        yield prefix + k, v
        if isinstance(v, Mapping):
            yield from walk(v, prefix + k + ".")


def leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The (dotted key, value) of every value that is not a section."""
    return ((key, value) for key, value in walk(data, prefix) if not isinstance(value, Mapping))


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """The value at `a.b.c`; KeyError when a part is missing."""
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_type(key: str, old: Any, new: Any, origin: str) -> None:
    """A section stays a section; a key the schema does not know keeps the type of its default."""
    if isinstance(old, Mapping):
        example = next(iter(old), "KEY")
        raise ConfigError(f"{key} is a section, not a value (from {origin}); set one of its keys, e.g. {key}.{example}=...")
    if isinstance(new, Mapping):
        raise ConfigError(f"{key} takes a value, not a section of keys (from {origin})")
    if key in config_schema.SCHEMA:
        return  # the validation pass checks it, with its allowed values
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) and isinstance(new, bool)
    elif isinstance(old, float):
        ok = isinstance(new, (int, float))
    else:
        ok = isinstance(new, type(old))
    if not ok:
        raise ConfigError(f"{key} must be a {type(old).__name__} like {old!r}, got {new!r} (from {origin})")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in a few words: what went wrong and where (PyYAML's own text spans lines)."""
    problem = getattr(error, "problem", None) or type(error).__name__
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_override(override: str) -> tuple[str, Any]:
    """`a.b.c=VALUE` -> (key, VALUE parsed as YAML; an empty VALUE is the empty string)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like KEY=VALUE, e.g. solver.base_lr=0.04")
    key, raw = override.split("=", 1)
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {override!r} is not valid YAML ({_yaml_problem(e)}); write lists as [a, b] and quote "
            "strings that hold ':', '#', '[' or '{'"
        ) from None


def apply_override(data: dict[str, Any], override: str, origins: dict[str, str] | None = None) -> None:
    """Apply one `a.b.c=VALUE` to nested `data` in place; VALUE is parsed as YAML."""
    key, value = parse_override(override)
    shown = override if override.isprintable() else override.encode("unicode_escape").decode()  # one line, always
    _set(data, key, value, f"override {shown}", origins)


def _set(data: dict[str, Any], key: str, value: Any, origin: str, origins: dict[str, str] | None = None) -> None:
    *parents, leaf = key.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        _refuse_retired(key, origin)
        close = difflib.get_close_matches(key, [k for k, _ in walk(data)], n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown config key {key!r} (from {origin}){hint}")
    _check_type(key, node[leaf], value, origin)
    node[leaf] = value
    if origins is not None:
        origins[key] = origin


def _refuse_retired(key: str, origin: str) -> None:
    """A key that no longer exists stops the load in one sentence saying what replaced it."""
    if key in config_schema.RETIRED:
        raise ConfigError(f"{key} (from {origin}) is retired: {config_schema.RETIRED[key]}")


def _read_yaml(path: Path, origins: dict[str, str], chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's keys, with its `base:` chain resolved; `origins` gets the file of each leaf.

    `chain` holds the files that named this one as their base, so a chain that comes back to one
    of them stops with a sentence instead of recursing without end.
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass one from configs/")
    if path.resolve() in chain:
        loop = " -> ".join(str(p) for p in (*chain[chain.index(path.resolve()):], path.resolve()))
        raise ConfigError(f"the base: chain of {chain[0]} comes back to a file it started from ({loop}); remove the loop")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({_yaml_problem(e)}); fix the file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (it does not decode as UTF-8); pass a YAML config file") from None
    except RecursionError:
        raise ConfigError(f"{path} nests its values too deeply to be a config; pass a YAML config file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    base = data.pop("base", None)
    if base is None:  # a complete config (the reference, or an old copy of it)
        for key, _ in leaves(data):
            _refuse_retired(key, str(path))
            origins[key] = str(path)
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: {base!r} must name a YAML file (relative to {path.parent})")
    merged = _read_yaml(path.parent / base, origins, (*chain, path.resolve()))
    for key, value in leaves(data):
        _set(merged, key, value, str(path), origins)
    return merged


def validate(data: dict[str, Any], origins: Mapping[str, str]) -> None:
    """The validation pass: every leaf the schema knows is checked (and normalized, e.g. 1 -> 1.0) in place."""
    values = {}
    for key, value in list(leaves(data)):
        if key not in config_schema.SCHEMA:
            continue
        kept, allowed = config_schema.check_value(key, value)
        if allowed is not None:
            raise ConfigError(f"{key}={value!r} ({_origin(origins, key)}) is not allowed: {key} must be {allowed}")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = kept
        values[key] = kept
    for relation, value, other in config_schema.check_relations(values):
        raise ConfigError(
            f"{relation.key}={value!r} ({_origin(origins, relation.key)}) must {relation.says}, "
            f"which is {other!r} ({_origin(origins, relation.other)})"
        )
    buckets = config_schema.check_buckets(values)
    if buckets:
        raise ConfigError(
            f"data.buckets ({_origin(origins, 'data.buckets')}) {buckets}; list each [height, width] once, "
            "each at least as large as one of those, or set data.static_shapes=false"
        )


def _origin(origins: Mapping[str, str], key: str) -> str:
    return f"from {origins[key]}" if key in origins else "default"


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (and its `base:` chain), apply the overrides in order, validate, and freeze it."""
    origins: dict[str, str] = {}
    data = _read_yaml(Path(path), origins)
    for override in overrides:
        apply_override(data, override, origins)
    validate(data, origins)
    return Config(data)


def read_saved_config(path: str | Path) -> dict[str, Any]:
    """A resolved config a run saved (`output_dir/config.yaml`) as a mapping, for `load_saved_config`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror}); pass --config with the run's config") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problem = _yaml_problem(e) if isinstance(e, yaml.YAMLError) else "not text"
        raise ConfigError(f"{path} is not a readable config ({problem}); pass --config with the run's config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections; pass --config with the run's config")
    return data


def load_saved_config(saved: Mapping[str, Any], source: str, overrides: Iterable[str] = ()) -> Config:
    """A resolved config saved with a run (e.g. in a checkpoint), over configs/reference.yaml, then `overrides`.

    Keys the current reference no longer has (say, from an older version) are left out, so an old
    checkpoint still yields the config it was trained with; the values it has are validated as usual.
    """
    origins: dict[str, str] = {}
    data = _read_yaml(REFERENCE_CONFIG, origins)
    known = {key for key, _ in walk(data)}
    for key, value in leaves(saved):
        if key in known:
            _set(data, key, value, source, origins)
    for override in overrides:
        apply_override(data, override, origins)
    validate(data, origins)
    return Config(data)
