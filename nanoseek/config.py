"""Recipes: one TOML file describes a whole run; dataclasses hold the defaults.

A recipe is a TOML file with one table per stage (`[model]`, `[data]`, `[pretrain]`, ...). Built-in recipes
live in `recipes/` and are found by name (`debug`, `tiny`, ...); any other value is read as a path.
`--set pretrain.lr=1e-3` overrides one field. Each stage turns its table into its own dataclass with
`from_dict`, which rejects unknown fields by name so a typo never silently falls back to a default; the
command line rejects unknown tables the same way (`check_tables`). Integers in recipes count things (steps,
tokens, samples, seeds): a negative one is refused.
"""

from __future__ import annotations

import dataclasses
import re
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

# Every table a recipe may hold: any other name is a typo (`[pretrian]`) that would otherwise be silently ignored.
# `nanoseek sft` and `nanoseek grpo` also read the table their --section names.
RECIPE_TABLES = frozenset({
    "model", "data", "pretrain", "curate",  # pretrain (and every stage: [data]); data curate --config
    "sft", "dpo", "reward_model", "grpo", "rejection", "distill", "distill_sft",  # the post-training commands
    "sft_cold", "grpo_reasoning", "grpo_final",  # nanoseek r1's stages, with [rejection] and [sft]
    "run", "grpo_zero", "grpo_r1", "student_pretrain", "grpo_student", "eval",  # nanoseek run's own tables
    "refine",  # nanoseek refine, with [dpo] and [sft]
    "vl", "vl_align", "vl_sft", "vl_grpo",  # nanoseek run --recipe vl (nanoseek.vl_pipeline)
})
_KEY_PART = re.compile(r"[A-Za-z0-9_-]+")  # a TOML bare key


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe by built-in name or path, follow its `base = "..."` chain, then apply `key=value` overrides."""
    recipe = _read_recipe(name_or_path, chain=())
    for item in overrides or []:
        set_path(recipe, item)
    return recipe


def _read_recipe(name_or_path: str | Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One recipe file merged over its base; `chain` holds the files that inherit from it, to detect a cycle."""
    path = Path(name_or_path)
    if not path.suffix and (RECIPE_DIR / f"{name_or_path}.toml").exists():
        path = RECIPE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise FileNotFoundError(f"recipe {name_or_path!r} not found (built-in recipes: {', '.join(recipe_names())})")
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ValueError(f"recipe inheritance cycle: {cycle}")
    try:
        recipe = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from e
    recipe.setdefault("name", path.stem)  # its own, not its base's: errors and reports name the file
    base = recipe.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ValueError(f"{path}: base={base!r} must name a recipe (a built-in name or a TOML path)")
        recipe = merge(_read_recipe(base, (*chain, path.resolve())), recipe)
    return recipe


def check_tables(recipe: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """Refuse a recipe key that is not a known table (`RECIPE_TABLES`, plus `extra`: a --section), or a known
    table that is not a table, as `from_dict` refuses an unknown field."""
    name = recipe.get("name", "?")
    for key, value in recipe.items():
        if key == "name":
            continue
        if key not in RECIPE_TABLES and key not in extra:
            what = f"unknown table [{key}]" if isinstance(value, dict) else f"{key} = {value!r} is outside any table"
            raise ValueError(f"recipe {name!r}: {what}; known tables: {', '.join(sorted({*RECIPE_TABLES, *extra}))}")
        if not isinstance(value, dict):
            raise ValueError(f"recipe {name!r}: {key} = {value!r} must be a table ([{key}] with fields)")


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A child recipe over its base: every table the child writes replaces the base's table whole, and the tables it
    does not write are inherited as they are. Tables cannot leak: merged field by field, a field only the base sets
    (say max_steps beside a child's epochs) would silently change the child's run."""
    return {**base, **top}


def set_path(recipe: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as TOML (numbers, bools, strings, lists), and a bare
    word needs no quotes. A key with an empty or non-TOML part, one that walks into a value (`pretrain.lr.x`), a
    value that replaces a table, or a list or quoted string that is not valid TOML is refused with one line."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(_KEY_PART.fullmatch(p) for p in parts):
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key of letters, digits, _ and -, "
                         f"e.g. pretrain.lr=1e-3")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        if raw.strip()[:1] in ("[", "{", '"', "'"):
            raise ValueError(f"--set {item!r}: not a valid TOML value ({e})") from e
        value = raw  # bare strings need no quotes on the command line
    *parents, leaf = parts
    node = recipe
    for depth, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a table")
    if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
        raise ValueError(f"--set {item!r}: {key.strip()} is a table; set one of its fields ({key.strip()}.FIELD=...)")
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
    if hint is int and value < 0:
        raise ValueError(f"{where}: expected a count >= 0, got {value}")
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
