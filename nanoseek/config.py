"""Recipes: one TOML file describes a whole run; dataclasses hold the defaults.

A recipe is a TOML file with one table per stage (`[model]`, `[data]`, `[pretrain]`, ...). Built-in recipes
live in `recipes/` and are found by name (`debug`, `tiny`, ...); any other value is read as a path.
`--set pretrain.lr=1e-3` overrides one field. Each stage turns its table into its own dataclass with
`from_dict`, which rejects unknown fields by name so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPE_DIR = Path(__file__).parent / "recipes"
T = TypeVar("T")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe by built-in name or path, follow its `base = "..."` chain, then apply `key=value` overrides."""
    path = Path(name_or_path)
    if not path.suffix and (RECIPE_DIR / f"{name_or_path}.toml").exists():
        path = RECIPE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise FileNotFoundError(f"recipe {name_or_path!r} not found (built-in recipes: {', '.join(recipe_names())})")
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from e
    base = recipe.pop("base", None)
    if base is not None:
        recipe = merge(load_recipe(base), recipe)
    recipe.setdefault("name", path.stem)
    for item in overrides or []:
        set_path(recipe, item)
    return recipe


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge two recipes table by table: a table of `top` updates the same table of `base` field by field, and a
    field's value replaces the base's whole, even a dict such as `tasks` or `rewards` (a child recipe that trains
    on one task must not inherit its parent's others)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def set_path(recipe: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as TOML (numbers, bools, strings, lists)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings need no quotes on the command line
    *parents, leaf = key.strip().split(".")
    node = recipe
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a dict, naming any unknown field and checking simple types."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"[{where or cls.__name__}] unknown field(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        data[name] = _coerce(value, hints[name], f"{where or cls.__name__}.{name}")
    return cls(**data)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
