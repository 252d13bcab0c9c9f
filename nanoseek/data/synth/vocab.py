"""Word pools shared by the text and task generators.

Everything here is plain ASCII so a byte-level tokenizer sees one byte per character and a tiny model can learn
names and objects as whole units. Made-up words (logic terms, place names) keep reasoning tasks free of world
knowledge: "all wugs are daxes" can only be answered from the premises, never from memory.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

NAMES = [
    "Ada", "Ali", "Amy", "Ana", "Ben", "Bo", "Cal", "Cara", "Dan", "Dee", "Eli", "Ema", "Finn", "Gus", "Hana",
    "Ian", "Ida", "Ivy", "Jack", "Jin", "Joe", "Kai", "Kim", "Lea", "Leo", "Liam", "Lin", "Lou", "Max", "Mia",
    "Nia", "Noa", "Omar", "Pia", "Raj", "Rosa", "Sam", "Sara", "Tara", "Ted", "Tom", "Uma", "Vic", "Wes",
    "Yara", "Yuki", "Zoe", "Zak", "Abe", "Alma", "Arlo", "Bea", "Cruz", "Dara", "Edda", "Enzo", "Eva", "Fay",
    "Gia", "Hugo", "Ines", "Ira", "Jade", "Juno", "Kofi", "Lars", "Lena", "Luca", "Mara", "Milo", "Nell", "Nico",
    "Olga", "Otto", "Paz", "Quin", "Remy", "Rita", "Ruth", "Saul", "Suki", "Taj", "Tess", "Theo", "Ugo", "Vera",
    "Wren", "Xia", "Yusuf", "Zara", "Ezra", "Maya", "Nadia", "Oren", "Priya", "Rafa",
]

# (singular, plural) of countable things, for word problems ("1 apple", "5 apples"); one word each, which keeps
# every sentence short enough for the word-problem split argument in tasks.py.
OBJECTS = [
    ("apple", "apples"), ("pen", "pens"), ("book", "books"), ("marble", "marbles"), ("sticker", "stickers"),
    ("coin", "coins"), ("card", "cards"), ("shell", "shells"), ("stamp", "stamps"), ("cookie", "cookies"),
    ("pencil", "pencils"), ("ball", "balls"), ("flower", "flowers"), ("bead", "beads"), ("egg", "eggs"),
    ("cup", "cups"), ("rock", "rocks"), ("button", "buttons"), ("ribbon", "ribbons"), ("plum", "plums"),
    ("candle", "candles"), ("kite", "kites"), ("leaf", "leaves"), ("box", "boxes"), ("peach", "peaches"),
]

CONTAINERS = ["bag", "tin", "jar", "basket", "crate", "pack"]  # plural by adding "s"

PRONOUNS = {"she": ("She", "her"), "he": ("He", "him"), "they": ("They", "them")}

# A fixed pronoun per name keeps stories consistent; "they" is used for a few names on purpose.
_PRONOUN_OF = {name: ("she", "he", "they")[i % 3] for i, name in enumerate(NAMES)}


def pronoun(name: str) -> tuple[str, str]:
    """(subject, object) pronoun for a name: ("She", "her")."""
    return PRONOUNS[_PRONOUN_OF[name]]


def count_noun(n: int, obj: tuple[str, str]) -> str:
    """'1 apple', '3 apples'."""
    return f"{n} {obj[0] if n == 1 else obj[1]}"


_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "th"]
_STOPS = ["b", "d", "g", "k", "m", "n", "p", "t", "x", "z"]


@functools.cache
def _unsafe_words() -> re.Pattern[str]:
    """The curation stage's unsafe-word lists: a made-up word that happens to spell one ('Nudes') is redrawn."""
    from nanoseek.data.curate.toxicity import CATEGORIES, load_wordlist

    return re.compile("|".join(load_wordlist(c).pattern for c in CATEGORIES), re.IGNORECASE)


def _safe(draw: Callable[[], str]) -> str:
    while True:
        word = draw()
        if not _unsafe_words().search(word):
            return word


def nonsense_noun(rng: random.Random) -> str:
    """A made-up plural noun for syllogisms ('daks', 'bilots'): ~180k of them, so two unrelated problems almost
    never share a premise, and eval premises never turn up in training text by chance."""
    def draw() -> str:
        stem = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_STOPS)
        if rng.random() < 0.7:
            stem = rng.choice(_ONSETS) + rng.choice(_VOWELS) + stem
        return stem + ("es" if stem[-1] in "sxz" else "s")

    return _safe(draw)


def place_name(rng: random.Random, syllables: int = 2) -> str:
    """A pronounceable made-up proper name ('Varo', 'Kestil'): a large space, so passages rarely repeat."""
    def draw() -> str:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
        return ("".join(parts) + rng.choice(_CODAS)).capitalize()

    return _safe(draw)
