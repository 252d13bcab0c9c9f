"""Heuristic quality filters for web-like text: Gopher quality and repetition rules, C4 rules, FineWeb rules.

Each rule set is a function `text -> reason or None` (C4 also cleans lines, so it returns the cleaned text too).
A reason names the rule, the measured value and the threshold, so a removal record explains itself.
Thresholds are the published ones; the sources:
  Gopher  Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
          appendix A.1.1 (quality filters) and table A1 (repetition thresholds).
  C4      Raffel et al. 2020 (T5), section 2.2, with the numbers of the reference implementation
          (tensorflow_datasets c4_utils: >= 5 sentences per page, >= 3 words per line, no word > 1000 chars).
  FineWeb Penedo et al. 2024, section 3.6 (the three custom filters) plus the newline-per-word rule of
          datatrove's FineWebQualityFilter.
These rules were tuned on English web pages. Worked math solutions, formulas, code and chat turns break them
(short lines, few stop words, `#### 42` answers, curly brackets), so the pipeline skips them for the domains in
`QualityConfig.skip_domains`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_TOKEN = re.compile(r"\w+|[^\w\s]+")  # words, and runs of punctuation as their own tokens (like nltk)
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'")
STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])  # Gopher's list
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@dataclass
class QualityConfig:
    """Thresholds of the heuristic filters; set a rule set's switch to False to skip it."""

    enabled: bool = True
    skip_domains: tuple[str, ...] = ("math", "logic", "math_logic", "code", "dialogue")
    # Gopher quality
    gopher_quality: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" and "..." each, per word
    max_bullet_lines: float = 0.9
    max_ellipsis_lines: float = 0.3
    min_alpha_words: float = 0.8  # fraction of words with at least one letter
    min_stop_words: int = 2
    # Gopher repetition (table A1)
    gopher_repetition: bool = True
    max_dup_line_fraction: float = 0.3
    max_dup_paragraph_fraction: float = 0.3
    max_dup_line_chars: float = 0.2
    max_dup_paragraph_chars: float = 0.2
    max_top_ngram_chars: tuple[float, ...] = (0.20, 0.18, 0.16)  # n = 2, 3, 4
    max_dup_ngram_chars: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # n = 5 .. 10
    # C4
    c4: bool = True
    c4_min_sentences: int = 5
    c4_min_words_per_line: int = 3
    c4_max_word_length: int = 1000
    c4_terminal_punctuation: bool = False  # drop lines without end punctuation; off as in FineWeb's use of C4
    c4_curly_bracket: bool = True
    # FineWeb
    fineweb: bool = True
    min_punctuated_lines: float = 0.12  # fraction of lines ending in terminal punctuation
    max_short_lines: float = 0.67  # fraction of lines of <= 30 characters
    short_line_chars: int = 30
    max_dup_line_char_ratio: float = 0.01  # characters in repeated lines / all non-newline characters
    max_newlines_per_word: float = 0.3


def _words(text: str) -> tuple[list[str], list[str]]:
    """(all tokens, words) where words are tokens that contain a letter or digit."""
    tokens = _TOKEN.findall(text)
    return tokens, [t for t in tokens if t[0].isalnum() or t[0] == "_"]


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items that repeat an earlier one, characters in those repeats)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def gopher_quality(text: str, cfg: QualityConfig) -> str | None:
    tokens, words = _words(text)
    n = len(words)
    if n < cfg.min_words:
        return f"gopher_quality: {n} words < {cfg.min_words}"
    if n > cfg.max_words:
        return f"gopher_quality: {n} words > {cfg.max_words}"
    mean_len = sum(map(len, words)) / n
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return (f"gopher_quality: mean word length {mean_len:.2f} outside "
                f"[{cfg.min_mean_word_length}, {cfg.max_mean_word_length}]")
    for symbol, count in (("#", text.count("#")), ("ellipsis", text.count("...") + text.count("\u2026"))):
        if count / n > cfg.max_symbol_word_ratio:
            return f"gopher_quality: {symbol}-to-word ratio {count / n:.3f} > {cfg.max_symbol_word_ratio}"
    lines = text.split("\n")
    bullets = sum(line.lstrip().startswith(("\u2022", "-", "*", "\u25cf", "\u25aa")) for line in lines) / len(lines)
    if bullets > cfg.max_bullet_lines:
        return f"gopher_quality: {bullets:.2f} of lines start with a bullet > {cfg.max_bullet_lines}"
    ellipsis = sum(line.rstrip().endswith(("...", "\u2026")) for line in lines) / len(lines)
    if ellipsis > cfg.max_ellipsis_lines:
        return f"gopher_quality: {ellipsis:.2f} of lines end with an ellipsis > {cfg.max_ellipsis_lines}"
    alpha = sum(any(c.isalpha() for c in w) for w in words) / n
    if alpha < cfg.min_alpha_words:
        return f"gopher_quality: {alpha:.2f} of words contain a letter < {cfg.min_alpha_words}"
    stops = sum(w.lower() in STOP_WORDS for w in words)
    if stops < cfg.min_stop_words:
        return f"gopher_quality: {stops} stop words < {cfg.min_stop_words}"
    return None


def _repeated_ngram_chars(words: list[str], n: int) -> int:
    """Characters of words covered by an n-gram occurrence that repeats an earlier one (each word counted once)."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered[i : i + n] = [True] * n
        else:
            seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c)


def gopher_repetition(text: str, cfg: QualityConfig) -> str | None:
    paragraphs = _PARAGRAPH_BREAK.split(text)
    lines = text.split("\n")
    for name, items, max_frac, max_chars in (
        ("paragraph", paragraphs, cfg.max_dup_paragraph_fraction, cfg.max_dup_paragraph_chars),
        ("line", lines, cfg.max_dup_line_fraction, cfg.max_dup_line_chars),
    ):
        count, chars = _duplicates(items)
        if count / len(items) > max_frac:
            return f"gopher_repetition: duplicate {name} fraction {count / len(items):.2f} > {max_frac}"
        if chars / len(text) > max_chars:
            return f"gopher_repetition: duplicate {name} character fraction {chars / len(text):.2f} > {max_chars}"
    _, words = _words(text.lower())
    total = sum(map(len, words)) or 1
    for n, limit in enumerate(cfg.max_top_ngram_chars, start=2):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if not counts:
            break
        gram, count = counts.most_common(1)[0]
        frac = sum(map(len, gram)) * count / total if count > 1 else 0.0
        if frac > limit:
            return f"gopher_repetition: top {n}-gram {' '.join(gram)!r} covers {frac:.2f} of characters > {limit}"
    for n, limit in enumerate(cfg.max_dup_ngram_chars, start=5):
        frac = _repeated_ngram_chars(words, n) / total
        if frac > limit:
            return f"gopher_repetition: repeated {n}-grams cover {frac:.2f} of characters > {limit}"
    return None


def c4(text: str, cfg: QualityConfig) -> tuple[str, str | None]:
    """C4 rules: drop lines with a word over 1000 characters, fewer than 3 words, "javascript", cookie/terms
    boilerplate (and, if enabled, no terminal punctuation); remove citation markers; reject the page for
    "lorem ipsum", a curly bracket, or fewer than 5 sentences left. Returns (cleaned text, reason or None)."""
    kept: list[str] = []
    sentences = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:  # paragraph breaks survive the line cleaning
            if kept and kept[-1]:
                kept.append("")
            continue
        words = line.split()
        if any(len(w) > cfg.c4_max_word_length for w in words):
            continue
        line = _CITATION.sub("", line)
        if cfg.c4_terminal_punctuation and (not line.endswith(TERMINAL_PUNCTUATION) or line.endswith("...")):
            continue
        if len(words) < cfg.c4_min_words_per_line:
            continue
        lower = line.lower()
        if "lorem ipsum" in lower:
            return text, "c4: contains 'lorem ipsum'"
        if "javascript" in lower or any(p in lower for p in POLICY_PHRASES):
            continue
        if cfg.c4_curly_bracket and "{" in line:
            return text, "c4: contains a curly bracket"
        sentences += max(1, len(_SENTENCE_END.findall(line)))
        kept.append(line)
    if sentences < cfg.c4_min_sentences:
        return text, f"c4: {sentences} sentences in kept lines < {cfg.c4_min_sentences}"
    return "\n".join(kept).strip(), None


def fineweb(text: str, cfg: QualityConfig) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    punctuated = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
    if punctuated < cfg.min_punctuated_lines:
        return f"fineweb: {punctuated:.2f} of lines end in punctuation < {cfg.min_punctuated_lines}"
    short = sum(len(line) <= cfg.short_line_chars for line in lines) / len(lines)
    if short > cfg.max_short_lines:
        return f"fineweb: {short:.2f} of lines have <= {cfg.short_line_chars} characters > {cfg.max_short_lines}"
    _, dup_chars = _duplicates(lines)
    ratio = dup_chars / max(1, len(text) - text.count("\n"))
    if ratio > cfg.max_dup_line_char_ratio:
        return f"fineweb: repeated lines hold {ratio:.3f} of characters > {cfg.max_dup_line_char_ratio}"
    _, words = _words(text)
    per_word = text.count("\n") / max(1, len(words))
    if per_word > cfg.max_newlines_per_word:
        return f"fineweb: {per_word:.2f} newlines per word > {cfg.max_newlines_per_word}"
    return None


def quality(text: str, cfg: QualityConfig) -> tuple[str, str | None]:
    """All enabled rule sets in FineWeb's order (repetition, quality, C4, FineWeb): (text, first reason or None).
    The text changes only through C4's line cleaning."""
    if cfg.gopher_repetition and (reason := gopher_repetition(text, cfg)):
        return text, reason
    if cfg.gopher_quality and (reason := gopher_quality(text, cfg)):
        return text, reason
    if cfg.c4:
        text, reason = c4(text, cfg)
        if reason:
            return text, reason
    if cfg.fineweb and (reason := fineweb(text, cfg)):
        return text, reason
    return text, None
