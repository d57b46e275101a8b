"""Writes tests/data/safety_filter_set.jsonl: the labelled set of the harmful-content filter's test
(tests/unit/test_safety_filter.py), from recipes/safety/filter.toml's terms and hand-written benign
sentences, each also in obfuscated variants. Seeded: rerunning writes the same file.

The obfuscations are written here independently of lmforge/safety/normalize.py (their own
leetspeak table, the Cyrillic and Latin look-alikes Unicode lists in confusables.txt, zero-width
and format characters, spacing, stretching, fullwidth forms, combining marks), so the test
measures the filter against disguises, not against its own fold.

    python tests/data/make_safety_filter_set.py
"""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7", "l": "1", "b": "8", "g": "9"}
LOOKALIKE = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "x": "\u0445",
             "y": "\u0443", "i": "\u0456", "s": "\u0455", "j": "\u0458", "d": "\u0501", "K": "\u041a",
             "M": "\u041c", "H": "\u041d", "T": "\u0422", "B": "\u0412"}
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e"]
COMBINING = ["\u0301", "\u0308", "\u0336", "\u0337", "\u0323", "\u0300"]

HARMFUL_TEMPLATES = ["{t}", "{T}.", "honestly, {t}.", "I mean it: {t}!", "they wrote \"{t}\" in the chat",
                     "{t}, that is what I told him", "listen to me. {t}"]

BENIGN = [
    "The committee will meet on Tuesday to review the budget.",
    "She has real skill at the piano and plays every evening.",
    "The bombastic speech went on for an hour.",
    "A killer whale surfaced near the boat at dawn.",
    "Our pipeline kills stale jobs after ten minutes.",
    "The bomb squad safely removed the old shell from the field.",
    "Please cut the onions into thin slices.",
    "He will hurtle down the slope on his new sled.",
    "The gun salute opened the ceremony at noon.",
    "Go back to the main menu and choose settings.",
    "I know where you left the keys: on the table.",
    "Nobody will ever guess the answer to that riddle.",
    "The race was won by a runner from Kenya.",
    "They shoot the film in the old harbour next week.",
    "The end of the book surprised everyone.",
    "Your house looks lovely in the snow.",
    "The agent sent the contract on Friday.",
    "Vermin were found in the old barn, so the farmer called for help.",
    "Exterminators treated the kitchen for ants.",
    "The museum's ghost tour runs every Halloween.",
    "Scunthorpe is a town in North Lincolnshire.",
    "The skillet was too hot for the pancakes.",
    "Her idiom choices made the translation hard.",
    "The beat of the drums grew louder toward the end.",
    "A throat lozenge helped with the cough.",
    "Build a birdhouse with your children this weekend.",
    "Make a list of what you need from the shop.",
    "The nerve of that referee, calling a foul there!",
    "Bombay duck is actually a fish.",
    "Let us kill time at the cafe until the train comes.",
    "The hurt knee healed after two weeks of rest.",
    "The kysely package is a SQL query builder.",
    "Keys, wallet, phone: check before leaving.",
    "He said he would die of laughter at the comedy show.",
    "Inferior vena cava returns blood to the heart.",
    "The live concert was streamed to thousands.",
    "A burning smell came from the toaster.",
    "The untraceable call turned out to be a wrong number.",
    "Her country of birth is Portugal.",
    "Thou shalt not kill, saith the commandment.",
    "And the LORD said unto Moses, go down and speak to the people.",
    "To be, or not to be, that is the question.",
    "The year 2024 had 366 days, and 1337 was a year too.",
    "Version 3.5 fixed the crash on start.",
    "Email me at h4ck3r-free@example.org about the 5k race.",
    "The price is $5 per item, or 4 for $18.",
    "Cut your losses and sell the old car.",
    "You should dine at the new place on the corner.",
    "Life is short; enjoy the small things.",
    "The pipe burst during the cold night.",
    "The bomb cyclone brought heavy snow.",
    "Self-care is important for students.",
    "Throat singing is a tradition in Tuva.",
    "The kill switch stops the machine in an emergency.",
    "We will hunt for fossils near the cliff.",
    "The guns of the old fort are now a museum exhibit.",
    "Go back and check your answers before handing in the test.",
    "He beat the record by two seconds.",
    "A worthless coin turned out to be rare after all.",
    "I will help you move on Saturday.",
]


def leet(s: str, rng: random.Random) -> str:
    return "".join(LEET[c] if c in LEET and rng.random() < 0.6 else c for c in s)


def lookalike(s: str, rng: random.Random) -> str:
    return "".join(LOOKALIKE[c] if c in LOOKALIKE and rng.random() < 0.7 else c for c in s)


def invisible(s: str, rng: random.Random) -> str:
    return "".join(c + (rng.choice(INVISIBLE) if c.isalpha() and rng.random() < 0.5 else "") for c in s)


def spacing(s: str, rng: random.Random) -> str:
    sep = rng.choice([" ", ".", "-", "_", " . ", "/"])
    words = s.split(" ")
    k = rng.randrange(len(words))
    words[k] = sep.join(words[k])
    return " ".join(words)


def alternate_case(s: str, rng: random.Random) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in s)


def stretch(s: str, rng: random.Random) -> str:
    return "".join(c * rng.randint(2, 5) if c in "aeiou" and rng.random() < 0.5 else c for c in s)


def fullwidth(s: str, rng: random.Random) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s)


def zalgo(s: str, rng: random.Random) -> str:
    return "".join(c + "".join(rng.choice(COMBINING) for _ in range(rng.randint(1, 3))) if c.isalpha() else c
                   for c in s)


def punctuate(s: str, rng: random.Random) -> str:
    return "".join(c + (rng.choice(".-_'") if c.isalpha() and rng.random() < 0.3 else "") for c in s)


VARIANTS = {"plain": lambda s, r: s, "leet": leet, "homoglyph": lookalike, "invisible": invisible,
            "spacing": spacing, "case": alternate_case, "stretch": stretch, "fullwidth": fullwidth,
            "zalgo": zalgo, "punctuation": punctuate,
            "mixed": lambda s, r: invisible(lookalike(leet(alternate_case(s, r), r), r), r)}


def main() -> None:
    rng = random.Random(18)
    policy = tomllib.loads((REPO / "recipes" / "safety" / "filter.toml").read_text())
    rows = []
    for cat in policy["categories"]:
        for term in cat["terms"]:
            for name, variant in VARIANTS.items():
                template = rng.choice(HARMFUL_TEMPLATES)
                # the disguise is applied to the term's words only: the template stays readable
                text = template.replace("{T}", variant(term.capitalize(), rng)).replace("{t}", variant(term, rng))
                rows.append({"text": text, "label": "harmful", "category": cat["name"], "variant": name})
    for sentence in BENIGN:
        for name in ("plain", "leet", "homoglyph", "invisible", "case", "stretch", "fullwidth"):
            rows.append({"text": VARIANTS[name](sentence, rng), "label": "benign", "category": "", "variant": name})
    with open(HERE / "safety_filter_set.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows ({sum(r['label'] == 'harmful' for r in rows)} harmful)")


if __name__ == "__main__":
    main()
