"""Decontamination: remove training documents that share a word n-gram (13 by default) with an evaluation set.

The method of GPT-3 (Brown et al. 2020, appendix C) and most reports since: lower-cased word tokens, any shared
13-gram marks the document as contaminated. Two details keep it from removing innocent text:
  * an eval text shorter than n words is indexed whole (as one k-gram, k = its length) only if it has at least
    `min_words` words -- "What is 3 + 4?" is not evidence of a leak, a 10-word question copied verbatim is;
  * n-grams found in more than `max_item_frequency` different eval items are boilerplate (instructions,
    templates, licences) and are dropped from the index, as GPT-3 dropped its most frequent 13-grams.
Words and n-grams are hashed with the same vectorised code as near dedup (`dedup.word_hashes`,
`dedup.shingle_hashes`); documents are checked in batches, one binary search in the sorted index per n-gram
length.

The built-in evaluation splits of `nanoseek.data.synth` are always registered (for every task and level);
more eval sets are added by path (JSONL, Parquet, text, saved datasets), reading the fields in `fields`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanoseek.data.curate.dedup import shingle_hashes, word_hashes
from nanoseek.data.sources import InputConfig, Reject, columns, discover, read


@dataclass
class DecontamConfig:
    enabled: bool = True
    ngram: int = 13
    min_words: int = 8  # shorter eval texts are not indexed
    max_item_frequency: int = 10  # n-grams in more eval items than this are boilerplate
    paths: tuple[str, ...] = ()  # extra eval sets
    fields: tuple[str, ...] = ("question", "prompt", "problem", "text", "solution", "passage")
    builtin: bool = True  # the held-out splits of the built-in tasks (nanoseek.data.synth)
    builtin_per_level: int = 100  # eval problems per task and level (as `nanoseek data synth` writes them)
    builtin_seeds: tuple[int, ...] = (0,)
    builtin_difficulties: tuple[str, ...] = ("1-3", "1-5")  # level sets the eval splits are drawn with


@dataclass
class EvalIndex:
    """Sorted n-gram hashes per n-gram length, with the eval set each came from."""

    ngram: int
    grams: dict[int, np.ndarray]  # k -> sorted unique [G_k] uint64
    owners: dict[int, np.ndarray]  # k -> [G_k] index into `names`
    names: list[str]
    items: int  # eval texts indexed

    def match(self, texts: Sequence[str]) -> list[tuple[str, int] | None]:
        """For each text, (eval set of its first shared n-gram, number of shared n-grams), or None if it shares
        none. One batch of texts is hashed together; each n-gram length is one binary search in the index."""
        hashes, counts = word_hashes(texts)
        n = len(texts)
        hits = np.zeros(n, dtype=np.int64)
        owner = np.full(n, -1, dtype=np.int64)
        for k, index in self.grams.items():
            grams, per_text = shingle_hashes(hashes, counts, k)
            if not index.size or not grams.size:
                continue
            pos = np.minimum(np.searchsorted(index, grams), index.size - 1)
            hit = index[pos] == grams
            text_of = np.repeat(np.arange(n), per_text)[hit]
            hits += np.bincount(text_of, minlength=n)
            texts_hit, first = np.unique(text_of, return_index=True)  # first hit of each text at this length
            new = owner[texts_hit] < 0
            owner[texts_hit[new]] = self.owners[k][pos[hit][first[new]]]
        return [(self.names[owner[i]], int(hits[i])) if hits[i] else None for i in range(n)]


def build_index(eval_sets: dict[str, list[str]], config: DecontamConfig) -> EvalIndex:
    """Index eval texts by name. Each text contributes its n-grams, or itself whole when it is shorter than n
    words but has at least `min_words`; n-grams shared by more than `max_item_frequency` texts are dropped."""
    names = list(eval_sets)
    texts = [t for name in names for t in eval_sets[name]]
    owner_of_text = np.repeat(np.arange(len(names)), [len(eval_sets[n]) for n in names])
    hashes, counts = word_hashes(texts)
    keep = counts >= config.min_words
    lengths = np.where(counts >= config.ngram, config.ngram, counts)
    grams: dict[int, np.ndarray] = {}
    owners: dict[int, np.ndarray] = {}
    first_word = np.concatenate(([0], np.cumsum(counts)[:-1]))
    for k in sorted(set(lengths[keep].tolist()), reverse=True):
        sel = np.flatnonzero(keep & (lengths == k))
        # the words of the selected texts, in order, so shingle_hashes sees them as consecutive texts
        word_idx = np.concatenate([np.arange(first_word[i], first_word[i] + counts[i]) for i in sel])
        g, per_text = shingle_hashes(hashes[word_idx], counts[sel], k)
        item = np.repeat(sel, per_text)
        pairs = np.unique(np.stack([g, item.astype(np.uint64)], axis=1), axis=0)  # one (gram, item) each
        uniq, first, freq = np.unique(pairs[:, 0], return_index=True, return_counts=True)
        ok = freq <= config.max_item_frequency
        grams[k] = uniq[ok]
        owners[k] = owner_of_text[pairs[first[ok], 1].astype(np.int64)]
    return EvalIndex(config.ngram, grams, owners, names, int(keep.sum()))


def _levels(spec: str, max_level: int) -> list[int]:
    """'1-3' -> [1, 2, 3]; '1,4' -> [1, 4]; levels above the task's maximum are dropped."""
    levels: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"decontam.builtin_difficulties: expected levels like '1-3' or '1,4', got {spec!r}")
        levels.update(range(int(lo), int(hi or lo) + 1))
    return sorted(d for d in levels if 1 <= d <= max_level)


def builtin_eval_sets(config: DecontamConfig) -> dict[str, list[str]]:
    """The held-out split of every built-in task, drawn exactly as `nanoseek data synth` draws it
    (`make_problems(task, per_level * len(levels), seed, levels, split="eval")`) for each seed and level set:
    questions, paraphrases, passages and solutions."""
    from nanoseek.data import synth  # imported here: synth is only needed when the built-in sets are registered

    sets: dict[str, list[str]] = {}
    for task, spec in synth.TASKS.items():
        texts: list[str] = []
        for seed in config.builtin_seeds:
            for difficulty in config.builtin_difficulties:
                levels = _levels(difficulty, spec.levels)
                if not levels:
                    continue
                problems = synth.make_problems(task, config.builtin_per_level * len(levels), seed=seed,
                                               difficulty=levels, split="eval")
                for problem in problems:
                    texts.extend(_problem_texts(problem))
        sets[f"builtin:{task}"] = texts
    return sets


def _problem_texts(problem: object) -> list[str]:
    """The texts of one `synth.Problem` (a dataclass) that a leak could copy."""
    fields = dataclasses.asdict(problem)  # type: ignore[call-overload]
    out = [v for k, v in fields.items() if k in ("question", "solution", "passage") and isinstance(v, str)]
    return out + [p for p in fields.get("paraphrases") or [] if isinstance(p, str)]


def read_eval_set(path: str, config: DecontamConfig) -> list[str]:
    """Texts of one eval set file or directory: the string values of the configured fields of every record."""
    files, _ = discover([path], InputConfig(), require_text=False)
    texts: list[str] = []
    for f in files:
        available = columns(f)
        for field_name in config.fields:
            if available is not None and field_name not in available:
                continue
            for item in read(f, InputConfig(text_field=field_name, max_chars=1 << 40)):
                if isinstance(item, Reject):
                    if "missing or null" in item.reason or "is empty" in item.reason:
                        continue  # records need not carry every field
                    raise ValueError(f"eval set {item.file}:{item.line}: {item.reason}")
                texts.append(item.text)
    if not texts:
        raise ValueError(f"eval set {path}: no record has any of the fields {list(config.fields)}")
    return texts


def load_index(config: DecontamConfig) -> EvalIndex:
    """The index of the built-in splits (if enabled) and of the eval sets in `config.paths`."""
    sets = builtin_eval_sets(config) if config.builtin else {}
    for path in config.paths:
        sets[f"path:{Path(path).name}"] = read_eval_set(path, config)
    return build_index(sets, config)
