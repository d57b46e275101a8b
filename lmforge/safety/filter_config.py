"""The harmful-content filter's TOML: categories with their terms and lexicon files, the output
gate's action and the prompt gate's policy message. Checked whole before any text is read.

    action = "mask"                 # output gate: "mask" each blocked span, or "stop" the stream there
    mask = "[filtered]"             # what replaces a blocked span under "mask"
    policy_message = "I can't help with that: the request was refused by the content policy ({categories})."

    [[categories]]
    name = "violence"
    terms = ["kill yourself", "shoot them all"]   # inline terms and/or
    lexicons = ["violence.txt"]                   # files: one term a line, `#` comments; relative to the TOML

Terms are matched as whole words through the obfuscation fold of normalize.py (case, leetspeak,
invisible characters, homoglyphs, accents, stretched letters, spacing or punctuation inside
words). No list ships with lmforge's code: the policy is the operator's (recipes/safety/filter.toml
is an example).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config.loader import ConfigError, load_toml

__all__ = ["ACTIONS", "CategoryConfig", "FilterConfig", "load_filter_config", "read_lexicon_file"]

ACTIONS = ("mask", "stop")
DEFAULT_POLICY = "I can't help with that: the request was refused by the content policy ({categories})."
_TOP_KEYS = {"action", "mask", "policy_message", "categories"}
_CATEGORY_KEYS = {"name", "terms", "lexicons"}


@dataclass(frozen=True)
class CategoryConfig:
    name: str
    terms: tuple[str, ...]  # inline terms and those of the lexicon files, in file order


@dataclass(frozen=True)
class FilterConfig:
    categories: tuple[CategoryConfig, ...]
    action: str = "mask"
    mask: str = "[filtered]"
    policy_message: str = DEFAULT_POLICY


def read_lexicon_file(path: Path, key: str, where: str) -> list[str]:
    """One term a line; blank lines and `#` comments skipped."""
    if not path.is_file():
        raise ConfigError(key, str(path), "is not a file (lexicon paths are relative to the filter TOML)", where)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, str(path), f"cannot be read as UTF-8 text ({e.__class__.__name__})", where) from None
    return [t for t in (ln.split("#", 1)[0].strip() for ln in lines) if t]


def _str_list(value: Any, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, value, "must be a list of strings", where)
    return value


def parse_filter_config(data: dict[str, Any], base: Path, where: str) -> FilterConfig:
    for k in data:
        if k not in _TOP_KEYS:
            raise ConfigError(k, data[k], f"unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}", where)
    action = data.get("action", "mask")
    if action not in ACTIONS:
        raise ConfigError("action", action, f"must be one of {', '.join(ACTIONS)}", where)
    for key in ("mask", "policy_message"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(key, data[key], "must be a string", where)
    raw = data.get("categories")
    if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
        raise ConfigError("categories", raw, "need at least one [[categories]] table with a name and terms", where)
    cats: list[CategoryConfig] = []
    for i, c in enumerate(raw):
        prefix = f"categories[{i}]."
        for k in c:
            if k not in _CATEGORY_KEYS:
                raise ConfigError(prefix + k, c[k], f"unknown key; allowed: {', '.join(sorted(_CATEGORY_KEYS))}", where)
        name = c.get("name")
        if not isinstance(name, str) or not name.strip() or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(prefix + "name", name, "must be a word (letters, digits, _ or -)", where)
        if name in {x.name for x in cats}:
            raise ConfigError(prefix + "name", name, "is used by an earlier category", where)
        terms = list(_str_list(c.get("terms", []), prefix + "terms", where))
        for f in _str_list(c.get("lexicons", []), prefix + "lexicons", where):
            terms += read_lexicon_file(base / f, prefix + "lexicons", where)
        terms = [" ".join(t.split()) for t in terms if t.strip()]
        if not terms:
            raise ConfigError(prefix + "terms", [], "no terms: give terms and/or lexicons files with terms", where)
        cats.append(CategoryConfig(name, tuple(terms)))
    mask = data.get("mask", "[filtered]")
    return FilterConfig(tuple(cats), action, mask, data.get("policy_message", DEFAULT_POLICY))


def load_filter_config(path: Path | str, flag: str = "--safety-filter") -> FilterConfig:
    """The filter TOML at `path`; `flag`: the option that named it, for the error line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(flag, str(path), "file not found; a filter TOML (see recipes/safety/filter.toml)")
    return parse_filter_config(load_toml(path), path.parent, str(path))
