"""What the bias probes are made of, read and checked: the groups of each dimension
(bias_lexicon.toml: word frames and words written in the repository, person names from the Faker
package's lists) and the templates (bias_templates.toml). Both files ship inside the package; a
malformed file is a one-line EvalError naming the entry.

Dimensions, in report order: gender, race_nationality, religion, age."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lmforge.eval.bias_names import NameSource
from lmforge.eval.errors import EvalError

DIMENSIONS = ("gender", "race_nationality", "religion", "age")
LEXICON = Path(__file__).with_name("bias_lexicon.toml")
TEMPLATES = Path(__file__).with_name("bias_templates.toml")
SLOT = "{X}"
MIN_WORDS_AFTER = 2
_PRONOUNS = re.compile(r"\b(he|she|him|her|his|hers|himself|herself|they|them|their)\b", re.IGNORECASE)
_FRAME_START = ("the ", "my ", "our ", "his ", "her ", "{}")


@dataclass(frozen=True)
class Group:
    """One side of a dimension: words put into the dimension's frames, and where names come from."""

    words: tuple[str, ...]
    names: NameSource | None


@dataclass(frozen=True)
class Dimension:
    name: str
    frames: tuple[str, ...]
    aligned: bool  # the groups' words are counterparts, index by index
    groups: dict[str, Group]


@dataclass(frozen=True)
class Template:
    """A sentence with one {X}, the group it stereotypes and the group it is contrasted with."""

    dimension: str
    id: str
    text: str
    stereotyped: str
    anti: str

    @property
    def prefix(self) -> str:
        return self.text.split(SLOT)[0]

    @property
    def suffix(self) -> str:
        return self.text.split(SLOT)[1]


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise EvalError(f"{path}: not valid TOML ({e})") from None


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise EvalError(f"{where}: must be a non-empty list of non-empty strings")
    return tuple(value)


def _names(value: object, where: str) -> NameSource | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"locales", "gender", "form"}:
        raise EvalError(f"{where}: must be a table with locales, and optionally gender and form")
    gender, form = value.get("gender", ""), value.get("form", "first")
    if gender not in ("", "male", "female") or form not in ("first", "full"):
        raise EvalError(f"{where}: gender must be male or female (or left out), form first or full")
    return NameSource(_strings(value.get("locales"), f"{where}.locales"), gender, form)


def load_lexicon(path: Path = LEXICON) -> dict[str, Dimension]:
    raw = _read(path)
    if sorted(raw) != sorted(DIMENSIONS):
        raise EvalError(f"{path}: must define exactly the dimensions {', '.join(DIMENSIONS)}; it has {', '.join(raw)}")
    out = {}
    for name in DIMENSIONS:
        d = raw[name]
        frames = _strings(d.get("frames"), f"{path}: {name}.frames")
        bad = [f for f in frames if f.count("{}") != 1 or not f.startswith(_FRAME_START)]
        if bad:
            raise EvalError(f"{path}: {name}.frames {bad[0]!r}: needs one {{}} and to start with the, my, our, his "
                            "or her (an article would change with the word)")
        groups_raw = d.get("groups")
        if not isinstance(groups_raw, dict) or len(groups_raw) < 2:
            raise EvalError(f"{path}: {name}.groups: needs at least two groups")
        groups = {g: Group(_strings(v.get("words"), f"{path}: {name}.groups.{g}.words"),
                           _names(v.get("names"), f"{path}: {name}.groups.{g}.names"))
                  for g, v in groups_raw.items()}
        aligned = bool(d.get("aligned", False))
        if aligned and len({len(g.words) for g in groups.values()}) != 1:
            raise EvalError(f"{path}: {name}: aligned = true needs word lists of one length in every group")
        out[name] = Dimension(name, frames, aligned, groups)
    return out


def load_templates(lexicon: dict[str, Dimension], path: Path = TEMPLATES) -> list[Template]:
    raw = _read(path)
    unknown = set(raw) - set(DIMENSIONS)
    if unknown:
        raise EvalError(f"{path}: unknown dimension {sorted(unknown)[0]!r}; allowed: {', '.join(DIMENSIONS)}")
    out, seen = [], set()
    for dim in DIMENSIONS:
        for i, t in enumerate(raw.get(dim, [])):
            where = f"{path}: {dim}[{i}]"
            if not isinstance(t, dict) or set(t) != {"id", "text", "stereotyped", "anti"}:
                raise EvalError(f"{where}: needs exactly id, text, stereotyped and anti")
            text = str(t["text"])
            if (dim, t["id"]) in seen:
                raise EvalError(f"{where}: id {t['id']!r} used twice")
            seen.add((dim, t["id"]))
            if text.count(SLOT) != 1:
                raise EvalError(f"{where}: text must hold {SLOT} exactly once")
            after = text.split(SLOT)[1]
            if len(after.split()) < MIN_WORDS_AFTER or not after.startswith((" ", ",")):
                raise EvalError(f"{where}: at least {MIN_WORDS_AFTER} words must follow {SLOT} (the score is their "
                                "likelihood), after a space or comma")
            if _PRONOUNS.search(text):
                raise EvalError(f"{where}: no pronouns (one could refer to {SLOT} and fit only one side)")
            for side in ("stereotyped", "anti"):
                if t[side] not in lexicon[dim].groups:
                    raise EvalError(f"{where}: {side} = {t[side]!r} is not a group of {dim} "
                                    f"({', '.join(lexicon[dim].groups)})")
            if t["stereotyped"] == t["anti"]:
                raise EvalError(f"{where}: stereotyped and anti must be different groups")
            out.append(Template(dim, str(t["id"]), text, t["stereotyped"], t["anti"]))
    missing = [d for d in DIMENSIONS if not any(t.dimension == d for t in out)]
    if missing:
        raise EvalError(f"{path}: no templates for {', '.join(missing)}")
    return out
