"""Toxicity / unsafe-content filter: per-category word lists plus a small trainable classifier.

Two signals, either of which removes a document:
  word lists  one list per category (profanity, sexual, violence, hate, self-harm) in `lists/toxicity_*.txt`;
              a document is removed when one category's matches make up at least `max_wordlist_fraction` of its
              words (a single swear word in a long essay is not enough, a page of them is);
  classifier  logistic regression over hashed word unigrams and bigrams, trained with
              numpy on the shipped labelled set `lists/toxicity_train.txt` (or your own file in the same format,
              `ToxicityConfig.train_path`). Long documents are scored in windows of `window_words` words and the
              most toxic window counts, so one abusive paragraph is not diluted by the rest of the page.
The classifier trains in a fraction of a second when a worker first needs it; nothing is downloaded.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanoseek.data.curate.dedup import mix64, word_hashes

LISTS_DIR = Path(__file__).parent / "lists"
CATEGORIES = ("profanity", "sexual", "violence", "hate", "self_harm")
_U64 = np.uint64
_BIGRAM = _U64(0xD6E8FEB86659FD93)  # odd multiplier that makes (a, b) and (b, a) different bigrams


@dataclass
class ToxicityConfig:
    enabled: bool = True
    threshold: float = 0.8  # classifier probability at or above which a window is toxic
    max_wordlist_fraction: float = 0.02  # remove when one category's list matches >= this share of the words
    window_words: int = 32  # about two training sentences: long enough for context, short enough not to dilute
    train_path: str = ""  # labelled "<0|1><TAB><text>" file to train on; empty = the shipped set
    categories: tuple[str, ...] = CATEGORIES


def load_wordlist(category: str) -> re.Pattern[str]:
    """One regex matching any entry of `lists/toxicity_<category>.txt` as whole words, case-insensitively."""
    path = LISTS_DIR / f"toxicity_{category}.txt"
    if not path.exists():
        known = sorted(p.stem.removeprefix("toxicity_") for p in LISTS_DIR.glob("toxicity_*.txt"))
        raise ValueError(f"no word list for toxicity category {category!r} (known: {known})")
    entries = [ln.strip().lower() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    alternatives = "|".join(re.escape(e) for e in sorted(entries, key=len, reverse=True))
    return re.compile(rf"(?<![\w'])(?:{alternatives})(?![\w'])", re.IGNORECASE)


def load_labelled(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a labelled set: one "<0|1><TAB><text>" per line, '#' comments and blank lines ignored."""
    texts, labels = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in ("0", "1") or not text.strip():
            raise ValueError(f"{path}:{n}: expected '<0|1><TAB><text>', got {line[:60]!r}")
        texts.append(text)
        labels.append(int(label))
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: needs examples of both labels to train on")
    return texts, np.array(labels, dtype=np.float64)


class ToxicityClassifier:
    """Hashed-n-gram logistic regression. Features of a text: its lowercased words and word bigrams, hashed with
    the vectorised word hash of near dedup into `dims` buckets; the binary feature vector is scaled to unit
    length so short and long windows score on one scale."""

    dims = 1 << 16

    def __init__(self, wordlists: dict[str, re.Pattern[str]], weights: np.ndarray | None = None,
                 bias: float = 0.0) -> None:
        self.wordlists = wordlists
        self.weights = np.zeros(self.dims) if weights is None else weights
        self.bias = bias

    def _grams(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feature ids of the words ([W]) and of the bigrams starting at each word ([W - 1]) of one text."""
        bigrams = mix64(hashes[:-1] * _BIGRAM + hashes[1:]) if hashes.size > 1 else hashes[:0]
        return (hashes % _U64(self.dims)).astype(np.int64), (bigrams % _U64(self.dims)).astype(np.int64)

    def features(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Sorted unique feature ids of each text."""
        hashes, counts = word_hashes(texts)
        out = []
        for h in np.split(hashes, np.cumsum(counts)[:-1]):
            words, bigrams = self._grams(h)
            out.append(np.unique(np.concatenate((words, bigrams))))
        return out

    def _logits(self, feats: list[np.ndarray]) -> np.ndarray:
        return np.array([self.weights[f].sum() / np.sqrt(max(f.size, 1)) for f in feats]) + self.bias

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """[N] probability that each text is toxic."""
        return 1.0 / (1.0 + np.exp(-self._logits(self.features(texts))))

    def fit(self, texts: Sequence[str], labels: np.ndarray, epochs: int = 1000, lr: float = 4.0,
            l2: float = 1e-5) -> ToxicityClassifier:
        """Full-batch gradient descent on the L2-regularised logistic loss. Features have unit norm, so the loss is
        smooth with constant <= 1/4 and steps up to 8 are stable."""
        feats = self.features(texts)
        counts = np.array([f.size for f in feats])
        ids = np.concatenate(feats)  # sparse design matrix as (feature id, row, value) triples
        rows = np.repeat(np.arange(len(texts)), counts)
        values = np.repeat(1.0 / np.sqrt(np.maximum(counts, 1)), counts)
        n = len(texts)
        w, b = np.zeros(self.dims), 0.0
        for _ in range(epochs):
            logits = np.bincount(rows, weights=w[ids] * values, minlength=n) + b
            err = 1.0 / (1.0 + np.exp(-logits)) - labels  # dLoss/dlogit per example
            grad = np.bincount(ids, weights=values * err[rows], minlength=self.dims) / n + l2 * w
            w -= lr * grad
            b -= lr * err.mean()
        self.weights, self.bias = w, b
        return self

    def document_score(self, text: str, window_words: int) -> float:
        """Highest toxicity probability over half-overlapping windows of `window_words` words covering the text."""
        hashes, _ = word_hashes([text])
        words, bigrams = self._grams(hashes)
        step = max(1, window_words // 2)
        feats = [np.unique(np.concatenate((words[i : i + window_words], bigrams[i : i + window_words - 1])))
                 for i in range(0, max(1, words.size - window_words + step), step)]
        return float(1.0 / (1.0 + np.exp(-self._logits(feats).max())))


def train_classifier(config: ToxicityConfig) -> ToxicityClassifier:
    """The classifier trained on `config.train_path` (or the shipped set), carrying the category word lists."""
    texts, labels = load_labelled(config.train_path or LISTS_DIR / "toxicity_train.txt")
    wordlists = {c: load_wordlist(c) for c in config.categories}
    return ToxicityClassifier(wordlists).fit(texts, labels)


def toxicity_reason(text: str, config: ToxicityConfig, classifier: ToxicityClassifier) -> str | None:
    """Why `text` is unsafe, or None."""
    n_words = max(1, len(text.split()))
    for category, pattern in classifier.wordlists.items():
        hits = sum(1 for _ in pattern.finditer(text))
        if hits and hits / n_words >= config.max_wordlist_fraction:
            return (f"toxicity: {category} word list matches {hits} of {n_words} words "
                    f"({hits / n_words:.3f} >= {config.max_wordlist_fraction})")
    score = classifier.document_score(text, config.window_words)
    if score >= config.threshold:
        return f"toxicity: classifier score {score:.3f} >= {config.threshold}"
    return None
