"""Evaluation metrics: pass@k, majority vote, format, consistency, hallucination, bits per byte.

The sampling protocol is DeepSeek-R1's: draw k completions per problem (temperature 0.6, top-p 0.95), then
    pass@1  = mean correctness over the k samples (averaged over problems): less noisy than one greedy answer;
    pass@k  = Chen et al. (2021)'s unbiased estimator of "at least one of k samples is right";
    maj@k   = the majority-vote answer is right (R1 calls it cons@k; DeepSeekMath calls it Maj@K).
Each is a mean over problems, so its 95% interval is a percentile bootstrap over problems (`bootstrap_ci`); two
models scored on the same problems compare by a paired bootstrap of the per-problem differences
(`paired_bootstrap_ci`), which cancels the spread of problem difficulty that the two share.
The functions here are pure: they take answers and correctness flags and know nothing about models, except
`bits_per_byte`, which scores text with a model's next-token distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nanoseek.infer.verify import vote
from nanoseek.rewards import answers_equal, format_reward


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one.

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; `correct[p]` holds the correctness of each sample of problem p."""
    if not correct:
        raise ValueError("no problems to average over")
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in correct) / len(correct)


def _bounds(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}")


def bootstrap_ci(scores: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                 weights: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `scores` (one per problem, e.g. its pass@1 = the share of
    its k samples that are right): resample the problems with replacement `n_boot` times, take the mean of
    each resample, and return the (1 - level) / 2 and (1 + level) / 2 quantiles of those means.

    With `weights`, the statistic is the weighted mean sum(w * s) / sum(w): a ratio over clusters, e.g. the
    share of optimal moves with one score per game (its optimal moves / its moves) weighted by its moves, so
    that games, not the correlated moves inside them, are resampled. When every score is equal the interval
    collapses to that value: the bootstrap cannot see variation the sample does not show."""
    _check_level(level, n_boot)
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty list of scores, got shape {x.shape}")
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != x.shape or (w <= 0).any():
        raise ValueError(f"need one positive weight per score, got {len(w)} weights for {len(x)} scores")
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))  # [n_boot, problems]
    return _bounds((x * w)[idx].sum(1) / w[idx].sum(1), level)


def paired_bootstrap_ci(start: Sequence[float], end: Sequence[float], level: float = 0.95, n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """Interval of mean(end - start) for two models scored on the same problems (in the same order): the
    problems are resampled together, i.e. the bootstrap of the per-problem differences."""
    if len(start) != len(end):
        raise ValueError(f"paired scores need the same problems, got {len(start)} and {len(end)} scores")
    return bootstrap_ci([e - s for s, e in zip(start, end, strict=True)], level, n_boot, seed)


def stratified_bootstrap_ci(groups: Sequence[Sequence[float]], level: float = 0.95, n_boot: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """Interval of the mean of group means (e.g. pass@1 averaged over tasks, each task its own problems):
    each group is resampled within itself, so every resample keeps every task and its size."""
    _check_level(level, n_boot)
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("need at least one group, each with at least one score")
    rng = np.random.default_rng(seed)
    means = [np.asarray(g, dtype=np.float64)[rng.integers(0, len(g), size=(n_boot, len(g)))].mean(1)
             for g in groups]
    return _bounds(np.mean(means, axis=0), level)


@dataclass
class Vote:
    """Outcome of a majority vote over k sampled answers."""

    answer: str | None  # the most common answer (None when no sample gave one)
    votes: int  # samples that gave it
    total: int  # all samples, answerless ones included

    @property
    def agreement(self) -> float:
        """Share of all samples behind the winning answer: the verification loop's confidence."""
        return self.votes / self.total if self.total else 0.0


def same_answer(a: str, b: str) -> bool:
    """Two extracted answers state the same value (symmetric; "7" == "7.0" == "$7")."""
    return answers_equal(a, b) and answers_equal(b, a)


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool] = same_answer) -> Vote:
    """The answer most samples agree on: the verification loop's vote (`nanoseek.infer.verify.vote`), with
    answers grouped by `same(group's first answer, answer)` (value equality, not string equality: "0.5" and
    "1/2" vote together); None (no answer) never wins. Ties go to the answer seen first, as
    `collections.Counter.most_common` does."""
    answer, votes, _ = vote(answers, same=lambda a, first: same(first, a))
    return Vote(answer, votes, len(answers))


def format_rate(completions: Sequence[str]) -> float:
    """Share of completions in the exact R1 format `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`
    (the same check as the RL format reward, so eval and training agree on what "formatted" means)."""
    if not completions:
        raise ValueError("no completions")
    return sum(format_reward(list(completions))) / len(completions)


def consistency(groups: Sequence[Sequence[str | None]], same: Callable[[str, str], bool] = same_answer) -> float:
    """Logical consistency: share of problems whose variants (the original question and its paraphrases, or
    its premises reordered) all receive the same answer. A missing answer counts as a disagreement: a model
    that answers only one wording is not consistent. Correctness does not matter here; a model can be
    consistently wrong."""
    if not groups:
        raise ValueError("no problems")
    agree = 0
    for answers in groups:
        if len(answers) < 2:
            raise ValueError(f"a consistency group needs at least two variants, got {len(answers)}")
        first = answers[0]
        agree += first is not None and all(a is not None and same(first, a) for a in answers[1:])
    return agree / len(groups)


def hallucination(answers: Sequence[str | None], correct: Sequence[bool],
                  abstained: Sequence[bool] | None = None) -> dict[str, float]:
    """Hallucination rate: the share of questions answered with a wrong answer stated as fact.

    `answers[i]` is what the model said (None: it gave no answer), `correct[i]` whether that is right, and
    `abstained[i]` whether the verification loop withheld the answer ("I'm not sure") — withheld answers are
    not hallucinations, whatever they were. Returns the rate, the abstention rate and the accuracy of the
    answers actually given (selective accuracy)."""
    n = len(answers)
    if n == 0 or len(correct) != n or (abstained is not None and len(abstained) != n):
        raise ValueError(f"need equally many answers, correctness flags and abstentions (>0), got {n}, "
                         f"{len(correct)}, {None if abstained is None else len(abstained)}")
    withheld = list(abstained) if abstained is not None else [False] * n
    given = [a is not None and not w for a, w in zip(answers, withheld, strict=True)]
    wrong = sum(g and not c for g, c in zip(given, correct, strict=True))
    n_given = sum(given)
    return {
        "hallucination_rate": wrong / n,
        "abstention_rate": sum(withheld) / n,
        "answered_accuracy": (n_given - wrong) / n_given if n_given else 0.0,
    }


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_len: int | None = None,
                  batch_size: int = 8) -> float:
    """Bits per UTF-8 byte of `texts` under the model: total next-token cross-entropy (nats) over the text's
    tokens / (ln 2 × the text's bytes). Unlike per-token loss it does not depend on the tokenizer, so models
    with different vocabularies compare. Each text is scored from a BOS token, so its first token is predicted
    too; texts longer than the context are scored in consecutive windows, each restarting from BOS."""
    if not texts:
        raise ValueError("no texts to score")
    ctx = max_len or model.config.max_position_embeddings
    windows: list[list[int]] = []
    n_bytes = 0
    for text in texts:
        ids = tokenizer.encode(text)
        n_bytes += len(text.encode("utf-8"))
        for start in range(0, len(ids), ctx - 1):
            windows.append([tokenizer.bos_id] + ids[start:start + ctx - 1])
    if n_bytes == 0:
        raise ValueError("texts hold no bytes")
    device = next(model.parameters()).device
    nats = 0.0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
        for row, w in enumerate(chunk):
            ids[row, :len(w)] = torch.tensor(w)
            labels[row, :len(w) - 1] = torch.tensor(w[1:])
        logits = model(ids[:, :-1].to(device)).float()  # [B, T-1, V]; right padding never leaks backwards
        nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten().to(device),
                                                        ignore_index=-100, reduction="sum"))
    return nats / (math.log(2) * n_bytes)
