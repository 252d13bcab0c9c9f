"""Language identification with py3langid (a maintained fork of langid.py, Lui & Baldwin 2012).

The model (97 languages, naive Bayes over byte n-grams) ships inside the wheel, so nothing is downloaded at run
time. Scores are normalised probabilities; FineWeb keeps English pages scoring >= 0.65 with fastText, and the same
threshold works here (English paragraphs score > 0.95, noise and other languages far below).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any


@dataclass
class LangIdConfig:
    enabled: bool = True
    languages: tuple[str, ...] = ("en",)  # ISO 639-1 codes to keep
    min_score: float = 0.65
    max_chars: int = 2000  # classify the beginning only: enough for a stable decision at a bounded cost
    skip_domains: tuple[str, ...] = ("math", "math_logic", "code")  # formulas and code have no language


@cache
def _identifier() -> Any:
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as e:
        raise ImportError("language identification needs `py3langid`: pip install 'nanoseek[data]'") from e
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639-1 language code, probability) of the first `max_chars` characters."""
    lang, score = _identifier().classify(text[:max_chars])
    return lang, float(score)


def language_reason(text: str, config: LangIdConfig) -> str | None:
    """Why `text` is not in an accepted language, or None."""
    lang, score = identify(text, config.max_chars)
    if lang not in config.languages:
        return f"language: {lang} ({score:.2f}) not in {list(config.languages)}"
    if score < config.min_score:
        return f"language: {lang} score {score:.2f} < {config.min_score}"
    return None
