"""Person names for the bias probes from the Faker package's per-locale lists (first names by gender,
last names; the romanized lists where a locale writes names in another script), read from the
installed package: no network, no Faker instance and none of its randomness (our own seeded
draws pick from these lists, eval/bias_pairs.py).

A name that could stand for either side of a pair tells the model nothing about the group, so
`group_names` drops every first name (and every last name) that also belongs to another group of
the same dimension ("Jordan" as a male and a female name; "John" in en_US and in en_NG), and every
name that is not a single run of letters."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from lmforge.eval.errors import EvalError

INSTALL_HINT = "pip install -e '.[eval]' (the Faker package: its name lists ship in the wheel)"


@dataclass(frozen=True)
class NameSource:
    """Which Faker lists a group's names come from: locales, "male" / "female" / "" (both), and
    `form` "first" (first names) or "full" (first + last names)."""

    locales: tuple[str, ...]
    gender: str = ""
    form: str = "first"


def faker_version() -> str:
    try:
        import faker
    except ImportError:
        raise EvalError("the bias probes need person names from Faker, which is not installed: "
                        f"{INSTALL_HINT}") from None
    return str(faker.VERSION)


def _provider(locale: str) -> type:
    faker_version()
    try:
        return importlib.import_module(f"faker.providers.person.{locale}").Provider
    except ImportError:
        raise EvalError(f"bias lexicon: Faker {faker_version()} has no person provider for locale {locale!r}") from None


def _names(provider: type, kind: str, gender: str) -> list[str]:
    """One locale's first or last names: the romanized list when the locale has one (zh_CN, ja_JP)."""
    for attr in (f"{kind}_romanized_names_{gender}" if gender else "", f"{kind}_romanized_names",
                 f"{kind}_names_{gender}" if gender else "", f"{kind}_names"):
        if attr and (names := getattr(provider, attr, None)):
            return list(names)  # tuples, lists and OrderedDicts (name -> weight): the names
    return []


def raw_names(src: NameSource, kind: str) -> set[str]:
    """Every first (kind "first") or last ("last") name the source's locales list, unfiltered."""
    gender = src.gender if kind == "first" else ""
    return {n.strip() for loc in src.locales for n in _names(_provider(loc), kind, gender)}


def group_names(sources: dict[str, NameSource]) -> dict[str, tuple[list[str], list[str]]]:
    """group -> (first names, last names), each sorted, letters only, none shared with another
    group of `sources` (the groups of one dimension). Last names are empty for form "first"."""
    firsts = {g: raw_names(s, "first") for g, s in sources.items()}
    lasts = {g: raw_names(s, "last") if s.form == "full" else set() for g, s in sources.items()}
    out = {}
    for g in sources:
        other_first = set().union(*(v for k, v in firsts.items() if k != g))
        other_last = set().union(*(v for k, v in lasts.items() if k != g))
        out[g] = (sorted(n for n in firsts[g] - other_first if n.isalpha()),
                  sorted(n for n in lasts[g] - other_last if n.isalpha()))
    return out
