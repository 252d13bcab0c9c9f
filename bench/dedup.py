"""Near-dedup benchmark: nanoseek's vectorised MinHash LSH against datasketch's `MinHashLSH`.

Both run in one process on the same generated corpus with planted duplicates, with the same number of
permutations and the same threshold, and both cluster candidates the same way (every document against the
LSH index, union-find, keep the first of each cluster). datasketch runs twice: with the banding nanoseek uses
(`params=(bands, rows)`), and with the banding datasketch picks itself for the threshold.

Timing covers the whole near-dedup from raw text: shingling and hashing, LSH and clustering (nanoseek also
verifies candidates against their signatures, `DedupConfig.verify`; datasketch returns candidates unverified,
as it is normally used). Each method runs with several draws of hash functions and the figures are averaged:
which pairs near the threshold collide is decided by the draw, so one run alone compares luck as much as
method.

Ground truth comes from exact Jaccard similarity of word 5-gram sets, computed with Python sets: a planted copy
belongs to its original's cluster when their Jaccard similarity is at least the threshold; the true duplicates
are every cluster member but the first in corpus order. Precision and recall are over removed documents.

    python bench/dedup.py                              # 20,000 documents, 3 draws (~2.5 minutes)
    python bench/dedup.py --docs 2000 --hash-seeds 1   # quick check
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

from nanoseek.data.curate.dedup import DedupConfig, near_dedup, union_find

_WORD = re.compile(r"[a-z0-9]+")  # the word split nanoseek's hashing does on ASCII text


def make_corpus(n_docs: int, mean_words: int, seed: int) -> tuple[list[str], dict[int, tuple[int, str]]]:
    """Zipf-distributed random-word documents, then planted copies: 10% exact, 15% near (0.2-3% of words
    edited), 5% "hard negatives" (8-20% edited, mostly below the threshold). Order is shuffled.
    Returns (texts, {copy index: (original index, kind)})."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(30_000)]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    p /= p.sum()
    n_exact, n_near, n_neg = int(0.10 * n_docs), int(0.15 * n_docs), int(0.05 * n_docs)
    n_orig = n_docs - n_exact - n_near - n_neg
    originals = [list(rng.choice(len(vocab), size=max(20, int(rng.normal(mean_words, mean_words / 3))), p=p))
                 for _ in range(n_orig)]
    docs = list(originals)
    source: dict[int, tuple[int, str]] = {}

    def edited(words: list[int], frac: float) -> list[int]:
        out = list(words)
        for _ in range(max(1, round(frac * len(words)))):
            op, pos = rng.integers(3), int(rng.integers(len(out)))
            if op == 0:
                out[pos] = int(rng.choice(len(vocab), p=p))
            elif op == 1:
                out.insert(pos, int(rng.choice(len(vocab), p=p)))
            elif len(out) > 10:
                del out[pos]
        return out

    for kind, count, lo, hi in (("exact", n_exact, 0, 0), ("near", n_near, 0.002, 0.03), ("edit", n_neg, 0.08, 0.2)):
        for _ in range(count):
            o = int(rng.integers(n_orig))
            source[len(docs)] = (o, kind)
            docs.append(list(originals[o]) if kind == "exact" else edited(originals[o], rng.uniform(lo, hi)))
    order = rng.permutation(len(docs))  # position -> old index
    new_of = np.empty(len(docs), dtype=np.int64)
    new_of[order] = np.arange(len(docs))
    texts = [" ".join(vocab[w] for w in docs[i]) for i in order]
    planted = {int(new_of[c]): (int(new_of[o]), kind) for c, (o, kind) in source.items()}
    return texts, planted


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)} or {tuple(words)}


def ground_truth(texts: list[str], planted: dict[int, tuple[int, str]], threshold: float) -> tuple[np.ndarray, dict]:
    """[N] bool: is this document a duplicate that should be removed? Plus counts of planted pairs."""
    u, v, stats = [], [], {"exact": [0, 0], "near": [0, 0], "edit": [0, 0]}  # kind -> [above, below] threshold
    for copy, (orig, kind) in planted.items():
        a, b = shingles(texts[copy]), shingles(texts[orig])
        above = len(a & b) / len(a | b) >= threshold
        stats[kind][0 if above else 1] += 1
        if above:
            u.append(copy)
            v.append(orig)
    roots = union_find(len(texts), np.array(u, dtype=np.int64), np.array(v, dtype=np.int64))
    return roots != np.arange(len(texts)), stats


def run_nanoseek(texts: list[str], bands: int, rows: int, seed: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    start = time.perf_counter()
    roots = near_dedup(texts, DedupConfig(bands=bands, rows=rows, seed=seed))
    return roots != np.arange(len(texts)), time.perf_counter() - start, (bands, rows)


def run_datasketch(texts: list[str], num_perm: int, threshold: float, params: tuple[int, int] | None, seed: int
                   ) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Standard datasketch dedup: MinHash per document (bulk), insert all, query each, union-find clusters."""
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    sets = []
    for t in texts:
        words = _WORD.findall(t.lower())
        grams = [" ".join(words[i : i + 5]).encode() for i in range(len(words) - 4)] or [" ".join(words).encode()]
        sets.append(grams)
    minhashes = MinHash.bulk(sets, num_perm=num_perm, seed=seed)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)
    with lsh.insertion_session() as session:
        for i, m in enumerate(minhashes):
            session.insert(i, m)
    u, v = [], []
    for i, m in enumerate(minhashes):
        for j in lsh.query(m):
            if j < i:
                u.append(j)
                v.append(i)
    roots = union_find(len(texts), np.array(u, dtype=np.int64), np.array(v, dtype=np.int64))
    return roots != np.arange(len(texts)), time.perf_counter() - start, (lsh.b, lsh.r)


def precision_recall(removed: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    tp = int((removed & truth).sum())
    return tp / max(1, int(removed.sum())), tp / max(1, int(truth.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--words", type=int, default=250, help="mean words per document")
    parser.add_argument("--bands", type=int, default=14)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hash-seeds", type=int, default=3,
                        help="runs per method, each with other hash functions; results are averaged, because one "
                             "draw of hash functions decides pairs near the threshold by chance")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    num_perm = args.bands * args.rows
    threshold = DedupConfig(bands=args.bands, rows=args.rows).threshold
    texts, planted = make_corpus(args.docs, args.words, args.seed)
    truth, stats = ground_truth(texts, planted, threshold)
    n_words = sum(len(t.split()) for t in texts)
    print(f"corpus: {len(texts):,} docs, {n_words / len(texts):.0f} words/doc; planted pairs above/below Jaccard "
          f"{threshold:.3f}: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in stats.items())
          + f"; true duplicates to remove: {int(truth.sum()):,}")
    print(f"settings: {num_perm} permutations, threshold {threshold:.3f}, word 5-gram shingles, one process each")

    warm = texts[: min(len(texts), 2000)]  # warm-up both, so one-time setup (imports, buffers) is not timed
    run_nanoseek(warm, args.bands, args.rows, 0)
    run_datasketch(warm, num_perm, threshold, (args.bands, args.rows), 0)

    methods = {
        "nanoseek": lambda seed: run_nanoseek(texts, args.bands, args.rows, seed),
        "datasketch, same bands": lambda seed: run_datasketch(texts, num_perm, threshold, (args.bands, args.rows),
                                                              seed),
        "datasketch, its own bands": lambda seed: run_datasketch(texts, num_perm, threshold, None, seed),
    }
    results = {}
    for name, run in methods.items():
        runs = []
        for seed in range(1, args.hash_seeds + 1):
            removed, seconds, (b, r) = run(seed)
            runs.append((seconds, *precision_recall(removed, truth)))
        seconds, precision, recall = (float(np.mean(col)) for col in zip(*runs, strict=True))
        results[f"{name} ({b}x{r})"] = {"docs_per_s": len(texts) / seconds, "seconds": seconds,
                                        "precision": precision, "recall": recall, "runs": runs}

    n_true = int(truth.sum())
    recall = next(iter(results.values()))["recall"]
    print(f"\nmeans over {args.hash_seeds} draws of hash functions (standard error of one draw's recall: "
          f"{np.sqrt(recall * (1 - recall) / n_true):.4f})")
    print(f"{'method':<36} {'docs/s':>10} {'seconds':>8} {'precision':>10} {'recall':>8}")
    for name, r in results.items():
        print(f"{name:<36} {r['docs_per_s']:>10,.0f} {r['seconds']:>8.2f} {r['precision']:>10.4f} {r['recall']:>8.4f}")
    ours = next(iter(results.values()))
    print("\nratios, nanoseek / peer:")
    for name, r in list(results.items())[1:]:
        print(f"  vs {name:<34} speed {ours['docs_per_s'] / r['docs_per_s']:5.1f}x   "
              f"precision {ours['precision'] / max(r['precision'], 1e-9):.4f}   "
              f"recall {ours['recall'] / max(r['recall'], 1e-9):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"docs": len(texts), "threshold": threshold, "num_perm": num_perm, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
