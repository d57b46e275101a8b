"""Generic recipe machinery: TOML + `--section.key value` overrides onto nested dataclasses.

Kept separate from the component configs so that each component owns only its fields and its
range checks; this module owns type conversion and the one-line error format.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user-caused configuration error, rendered as one line: key, value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str, where: str | None = None):
        self.key, self.value, self.allowed, self.where = key, value, allowed, where
        loc = f" (in {where})" if where else ""
        super().__init__(f"config error{loc}: {key} = {value!r}: {allowed}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is typing.Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) in (list, tuple):
        name = f"a list of {_type_name(typing.get_args(inner)[0])}"
    else:
        name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
            inner, getattr(inner, "__name__", str(inner))
        )
    return name + (" or none" if optional else "")


def _finite(key: str, value: float, where: str | None) -> float:
    """Every float option is a finite number: NaN or inf (also `1e400`, which parses as inf) would
    train NaN or dead models that still checkpoint; no option has a meaning for them."""
    if not math.isfinite(value):
        raise ConfigError(key, value, "must be a finite number (not NaN or infinity)", where)
    return value


def nonfinite_fields(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float field of nested dataclass `obj` that is NaN or inf, for
    configs built in code rather than through `coerce`."""
    out: list[tuple[str, float]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += nonfinite_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            out.append((prefix + f.name, value))
        elif isinstance(value, list | tuple):
            out += [(f"{prefix}{f.name}[{i}]", v) for i, v in enumerate(value)
                    if isinstance(v, float) and not math.isfinite(v)]
    return out


def coerce(key: str, value: Any, tp: Any, *, from_cli: bool = False, where: str | None = None) -> Any:
    """Convert `value` to type `tp` or raise ConfigError naming `key`.

    Values from TOML are already typed and are checked strictly (no "3" for an int); values from
    the command line are strings and are parsed.
    """
    inner, optional = _unwrap_optional(tp)
    if optional and (value is None or (from_cli and str(value).lower() in ("none", "null"))):
        return None
    bad = ConfigError(key, value, f"must be {_type_name(tp)}", where)
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if value in choices:
            return value
        raise ConfigError(key, value, "must be one of " + ", ".join(repr(c) for c in choices), where)
    if origin in (list, tuple):
        (elem,) = typing.get_args(inner)[:1]
        if _is_dataclass_type(elem):  # a list of tables; on the command line a TOML inline array
            return _table_list(key, value, elem, from_cli, where)
        if from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list | tuple):
            raise bad
        return [coerce(f"{key}[{i}]", v, elem, from_cli=from_cli, where=where) for i, v in enumerate(value)]
    if inner is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if from_cli:
            try:
                return int(str(value).replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if inner is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return _finite(key, float(value), where)
        if from_cli:
            try:
                number = float(str(value).replace("_", ""))
            except ValueError:
                raise bad from None
            return _finite(key, number, where)
        raise bad
    if inner is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(key, value, f"unsupported field type {inner}", where)


def _table_list(key: str, value: Any, elem: type, from_cli: bool, where: str | None) -> list[Any]:
    """[{...}, ...] -> [elem(...), ...]; from the command line the value is TOML text, e.g.
    '[{step = 0, layers = "top:1"}]'."""
    if from_cli and isinstance(value, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(key, value, f"must be a TOML array of tables, e.g. [{{a = 1}}, {{a = 2}}] ({e})",
                              where) from None
    if not isinstance(value, list | tuple):
        raise ConfigError(key, value, "must be an array of tables", where)
    return [v if isinstance(v, elem) else build_dataclass(elem, v, f"{key}[{i}].", where) for i, v in enumerate(value)]


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "", where: str | None = None) -> Any:
    """Instantiate nested dataclass `cls` from a dict, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", data, "must be a table of keys", where)
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = prefix + key
        if key not in known:
            raise ConfigError(full, value, "unknown key; allowed: " + ", ".join(sorted(known)), where)
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = build_dataclass(tp, value, full + ".", where)
        else:
            kwargs[key] = coerce(full, value, tp, where=where)
    return cls(**kwargs)


def apply_override(obj: Any, dotted: str, raw: str) -> None:
    """Set `a.b.c = raw` on a nested dataclass, parsing `raw` by the field's declared type."""
    parts = dotted.split(".")
    target = obj
    for i, part in enumerate(parts):
        hints = _field_types(type(target))
        names = {f.name for f in dataclasses.fields(target)}
        key = ".".join(parts[: i + 1])
        if part not in names:
            raise ConfigError(key, raw, "unknown key; allowed: " + ", ".join(sorted(names)), "command line")
        if i == len(parts) - 1:
            tp = hints[part]
            if _is_dataclass_type(tp):
                raise ConfigError(key, raw, "is a section; set one of its keys", "command line")
            setattr(target, part, coerce(key, raw, tp, from_cli=True, where="command line"))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(key, raw, "is not a section", "command line")


def parse_override_args(args: list[str]) -> list[tuple[str, str]]:
    """`['--a.b', '1', '--c.d=x']` -> `[('a.b', '1'), ('c.d', 'x')]`."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(arg, arg, "expected an override of the form --section.key value", "command line")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(body, None, "missing value after the key", "command line")
            key, value = body, args[i + 1]
            i += 2
        out.append((key, value))
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("recipe", str(p), "file not found")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("recipe", str(p), f"is not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError("recipe", str(p), f"is not UTF-8 text (byte {e.start}); a recipe is a TOML file") from None
    except OSError as e:
        raise ConfigError("recipe", str(p), f"cannot be read ({e.strerror or e})") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
