"""Dedup internals against independent references: word hashes vs a Python polynomial hash, MinHash estimates vs
exact Jaccard of Python sets, union-find vs breadth-first search, and precision/recall on planted duplicates."""

from __future__ import annotations

import random
import re
from collections import deque

import numpy as np
import pytest

from nanoseek.data.curate.dedup import (
    DedupConfig,
    MinHasher,
    band_key,
    exact_duplicate_roots,
    lsh_edges,
    near_dedup,
    shingle_hashes,
    union_find,
    word_hashes,
)

M64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _reference_word_hashes(text: str) -> list[int]:
    """The documented word hash, with Python integers: sum(byte_i * P^i) mod 2^64, mixed."""
    out = []
    for word in re.findall(rb"[a-z0-9\x80-\xff]+", text.lower().encode()):
        h = sum(b * pow(0x100000001B3, i, 1 << 64) for i, b in enumerate(word)) & M64
        out.append(_splitmix(h))
    return out


def test_word_hashes_match_reference():
    texts = ["Hello, World! hello", "", "...", "a b  c\td\ne-f_g", "Ünïcode wörds, naïve café", "x" * 300]
    hashes, per_text = word_hashes(texts)
    expected = [_reference_word_hashes(t) for t in texts]
    assert per_text.tolist() == [len(e) for e in expected]
    assert hashes.tolist() == [h for e in expected for h in e]
    assert hashes[0] == hashes[2]  # case-insensitive: Hello == hello


def test_shingles_count_and_short_texts():
    texts = ["one two three four five six seven", "one two", "", "One, two!"]
    shingles, per_text = shingle_hashes(*word_hashes(texts), 5)
    assert per_text.tolist() == [3, 1, 0, 1]
    assert shingles[3] == shingles[4]  # a short text is one shingle of all its words, punctuation ignored


def _shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _corpus_pair(rng: random.Random, vocab: list[str], n_words: int, frac: float) -> tuple[str, str]:
    base = [rng.choice(vocab) for _ in range(n_words)]
    other = [w if rng.random() > frac else rng.choice(vocab) for w in base]
    return " ".join(base), " ".join(other)


def test_minhash_estimates_jaccard_without_bias():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    texts, exact = [], []
    for _ in range(150):
        a, b = _corpus_pair(rng, vocab, rng.choice([40, 200, 1500]), rng.uniform(0.0, 0.25))
        sa, sb = _shingle_set(a), _shingle_set(b)
        exact.append(len(sa & sb) / len(sa | sb))
        texts += [a, b]
    hasher = MinHasher(num_perm=112, ngram=5, seed=0)
    hasher.block = 300  # small work blocks: long texts are split across blocks and must still be exact
    sig = hasher.signatures(texts)
    estimate = (sig[0::2] == sig[1::2]).mean(axis=1)
    err = estimate - np.array(exact)
    expected_sd = np.sqrt(np.mean(np.array(exact) * (1 - np.array(exact))) / 112)
    assert abs(err.mean()) < 3 * expected_sd / np.sqrt(len(err)) + 0.005
    assert err.std() < 1.5 * expected_sd
    # a batch gives the same signatures as one text at a time, and the seed fixes them
    assert np.array_equal(sig[:6], np.stack([MinHasher(112, 5, 0).signatures([t])[0] for t in texts[:6]]))
    assert not np.array_equal(sig[:2], MinHasher(112, 5, 1).signatures(texts[:2]))


def test_empty_texts_have_no_signature_and_never_cluster():
    sig = MinHasher(16, 5, 0).signatures(["", "...", "some words here"])
    assert (sig[:2] == 0xFFFFFFFF).all() and not (sig[2] == 0xFFFFFFFF).all()
    roots = near_dedup(["", "!!", "?", "a real text with words"], DedupConfig(bands=4, rows=4))
    assert roots.tolist() == [0, 1, 2, 3]


def test_band_key_equality():
    block = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 4], [3, 2, 1]], dtype=np.uint32)
    key = band_key(block)
    assert key[0] == key[1] and len({int(k) for k in key}) == 3
    u, v = lsh_edges([key])
    assert (u.tolist(), v.tolist()) == ([0], [1])


def _bfs_components(n: int, edges: list[tuple[int, int]]) -> list[int]:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    root = [-1] * n
    for s in range(n):
        if root[s] >= 0:
            continue
        root[s] = s
        queue = deque([s])
        while queue:
            x = queue.popleft()
            for y in adj[x]:
                if root[y] < 0:
                    root[y] = s  # s is the smallest node of its component: nodes are visited in order
                    queue.append(y)
    return root


@pytest.mark.parametrize("seed", range(5))
def test_union_find_matches_bfs(seed):
    rng = random.Random(seed)
    n = 300
    edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.choice([0, 50, 250, 600]))]
    u = np.array([a for a, _ in edges], dtype=np.int64)
    v = np.array([b for _, b in edges], dtype=np.int64)
    assert union_find(n, u, v).tolist() == _bfs_components(n, edges)


def test_exact_duplicate_roots():
    digests = np.array([b"a", b"b", b"a", b"c", b"b", b"a"], dtype="S16")
    assert exact_duplicate_roots(digests).tolist() == [0, 1, 0, 3, 1, 0]


def test_near_dedup_precision_recall_on_planted_duplicates():
    """Truth from exact Jaccard: copies at >= 0.85 must go, edits at <= 0.5 must stay."""
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(20000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(80, 300))) for _ in range(400)]
    planted = []  # (copy index, original index, exact Jaccard)
    for _ in range(200):
        o = rng.randrange(400)
        words = texts[o].split()
        kind = rng.random()
        if kind < 0.3:
            copy = list(words)
        else:
            frac = rng.uniform(0.0, 0.02) if kind < 0.75 else rng.uniform(0.15, 0.3)
            copy = [w if rng.random() > frac else rng.choice(vocab) for w in words]
        texts.append(" ".join(copy))
        a, b = _shingle_set(texts[-1]), _shingle_set(texts[o])
        planted.append((len(texts) - 1, o, len(a & b) / len(a | b)))
    roots = near_dedup(texts)
    removed = roots != np.arange(len(texts))
    must_go = [c for c, _, j in planted if j >= 0.85]
    must_stay = [c for c, _, j in planted if j <= 0.5]
    assert len(must_go) > 100 and len(must_stay) > 30
    assert removed[must_go].all()  # recall 1.0 well above the threshold
    assert not removed[must_stay].any()
    assert not removed[:400].any()  # originals come first and are kept
    assert all(roots[c] == o for c, o, j in planted if j >= 0.85 and roots[o] == o)
