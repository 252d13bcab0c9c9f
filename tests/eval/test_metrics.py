"""Metrics: pass@k against brute-force enumeration, majority vote, format, consistency, hallucination, bpb."""

import itertools
import math
import random

import pytest
import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.metrics import (
    bits_per_byte,
    bootstrap_ci,
    consistency,
    format_rate,
    hallucination,
    majority_vote,
    mean_pass_at_k,
    paired_bootstrap_ci,
    pass_at_k,
    same_answer,
    stratified_bootstrap_ci,
)
from nanoseek.infer.verify import vote as verify_vote
from nanoseek.model.hf import load


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(n, c, k) for n in (1, 2, 5, 8) for c in range(n + 1)
                                          for k in (1, 2, 3, n) if k <= n])
def test_pass_at_k_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_matches_binomial_formula():
    # the product form must equal 1 - C(n-c, k) / C(n, k) where the binomials are astronomically large
    n, c, k = 200, 7, 64
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share of correct samples


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems():
    rows = [[True, False, False, False], [False] * 4, [True] * 4]
    assert mean_pass_at_k(rows, 1) == pytest.approx((0.25 + 0 + 1) / 3)
    assert mean_pass_at_k(rows, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


def test_majority_vote_groups_equal_values():
    vote = majority_vote(["7", "7.0", "$7", "8", None, "8"])
    assert same_answer(vote.answer, "7") and vote.votes == 3 and vote.total == 6
    assert vote.agreement == pytest.approx(0.5)
    assert majority_vote(["1/2", "0.5", "3"]).votes == 2


def test_majority_vote_ties_go_to_the_first_answer_and_none_never_wins():
    assert majority_vote(["8", "7", "7", "8"]).answer == "8"
    assert majority_vote([None, None, "5"]).answer == "5"
    empty = majority_vote([None, None])
    assert empty.answer is None and empty.votes == 0 and empty.agreement == 0.0


def test_majority_vote_with_custom_equality():
    vote = majority_vote(["Paris", "paris ", "Rome"], same=lambda a, b: a.strip().lower() == b.strip().lower())
    assert vote.answer == "Paris" and vote.votes == 2


def test_majority_vote_is_the_verification_loop_vote():
    answers = ["1/2", None, "0.5", "3", "0.50", "3", "three"]
    assert (majority_vote(answers).answer, majority_vote(answers).votes) == verify_vote(answers)[:2] == ("1/2", 3)
    # `same` is called as (group's first answer, answer): "70" joins "7"'s group only when "7" came second
    assert majority_vote(["7", "70", "8"], same=str.startswith).votes == 1
    assert majority_vote(["70", "7", "8"], same=str.startswith).votes == 2


def test_format_rate():
    good = "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>"
    assert format_rate([good, good, "7", "<think>\nx\n</think>\n<answer>\n\n</answer>"]) == pytest.approx(0.5)


def test_consistency_counts_groups_in_full_agreement():
    groups = [["7", "7.0", "7"], ["7", "8", "7"], ["yes", "Yes"], ["3", None]]
    assert consistency(groups) == pytest.approx(2 / 4)
    assert consistency([["no", "no"]]) == 1.0  # consistently wrong is still consistent
    with pytest.raises(ValueError, match="two variants"):
        consistency([["7"]])


def test_hallucination_with_and_without_abstention():
    answers = ["7", "8", None, "5", "2"]
    correct = [True, False, False, False, True]
    plain = hallucination(answers, correct)
    assert plain["hallucination_rate"] == pytest.approx(2 / 5)  # "8" and "5": wrong answers stated as fact
    assert plain["abstention_rate"] == 0.0
    assert plain["answered_accuracy"] == pytest.approx(2 / 4)
    verified = hallucination(answers, correct, abstained=[False, True, False, False, False])
    assert verified["hallucination_rate"] == pytest.approx(1 / 5)  # the withheld "8" is not a hallucination
    assert verified["abstention_rate"] == pytest.approx(1 / 5)
    assert verified["answered_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        hallucination(["7"], [True, False])


def test_bits_per_byte_matches_per_text_scoring(checkpoint):
    model, tok = load(checkpoint), Tokenizer.load(checkpoint)
    texts = ["What is 3 + 4?\n3 + 4 = 7\n#### 7", "Ana lives in Velor.", "x" * 3]
    nats = 0.0
    for t in texts:  # one text at a time, no padding: the reference for the batched, padded version
        ids = torch.tensor([[tok.bos_id] + tok.encode(t)])
        with torch.no_grad():
            logits = model(ids[:, :-1])
        nats += float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
    expected = nats / (math.log(2) * sum(len(t.encode()) for t in texts))
    assert bits_per_byte(model, tok, texts, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_bits_per_byte_of_a_uniform_model(checkpoint):
    model, tok = load(checkpoint), Tokenizer.load(checkpoint)
    with torch.no_grad():
        model.head.weight.zero_()  # every next token equally likely: log2(V) bits per token
    texts = ["Ana lives in Velor. Velor is in Pandia.", "12 + 30 = 42"]
    tokens = sum(len(tok.encode(t)) for t in texts)
    expected = tokens * math.log2(model.config.vocab_size) / sum(len(t.encode()) for t in texts)
    assert bits_per_byte(model, tok, texts) == pytest.approx(expected, rel=1e-5)
    # windows shorter than a text restart from BOS but still score every token exactly once
    assert bits_per_byte(model, tok, texts, max_len=5) == pytest.approx(expected, rel=1e-5)


# --- bootstrap intervals ------------------------------------------------------------------------------------

def test_bootstrap_matches_the_exact_bootstrap_distribution():
    """For 5 problems, all 5^5 equally likely resamples give the exact bootstrap distribution of the mean: the
    sampled interval's ends must sit at its quantiles."""
    scores = [0.0, 0.25, 0.5, 1.0, 1.0]
    means = sorted(sum(scores[i] for i in r) / 5 for r in itertools.product(range(5), repeat=5))
    exact = (means[int(0.025 * len(means))], means[int(0.975 * len(means))])
    lo, hi = bootstrap_ci(scores, n_boot=200_000, seed=1)
    assert lo == pytest.approx(exact[0], abs=0.03) and hi == pytest.approx(exact[1], abs=0.03)
    assert lo < sum(scores) / 5 < hi


def test_bootstrap_agrees_with_the_normal_approximation_on_a_large_sample():
    rng = random.Random(0)
    scores = [rng.randint(0, 4) / 4 for _ in range(3000)]  # pass@1 of k=4 samples per problem
    mean = sum(scores) / len(scores)
    half = 1.96 * math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1) / len(scores))
    lo, hi = bootstrap_ci(scores, n_boot=4000)
    assert lo == pytest.approx(mean - half, abs=0.1 * half) and hi == pytest.approx(mean + half, abs=0.1 * half)
    assert bootstrap_ci(scores, level=0.5, n_boot=4000)[1] - bootstrap_ci(scores, level=0.5, n_boot=4000)[0] \
        == pytest.approx(2 * 0.674 * half / 1.96, rel=0.1)


def test_bootstrap_is_seeded_and_degenerate_samples_collapse():
    scores = [0.0, 1.0, 0.5, 0.75]
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    assert bootstrap_ci([0.3]) == pytest.approx((0.3, 0.3))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(scores, level=95)


def test_weighted_bootstrap_is_a_ratio_over_clusters():
    # equal weights: the plain mean's interval; moves per game as weights: the pooled share of optimal moves
    scores = [0.0, 1.0, 0.5, 0.25, 1.0]
    assert bootstrap_ci(scores, weights=[2.0] * 5) == pytest.approx(bootstrap_ci(scores))
    rng = random.Random(1)
    moves = [rng.randint(1, 6) for _ in range(2000)]
    kept = [sum(rng.random() < 0.7 for _ in range(m)) for m in moves]
    lo, hi = bootstrap_ci([k / m for k, m in zip(kept, moves, strict=True)], weights=moves)
    assert lo < sum(kept) / sum(moves) < hi and hi - lo < 0.05
    with pytest.raises(ValueError, match="positive weight"):
        bootstrap_ci(scores, weights=[1, 1, 0, 1, 1])


def test_paired_bootstrap_cancels_what_both_models_share():
    rng = random.Random(2)
    difficulty = [rng.random() for _ in range(256)]  # problems vary a lot; the end model adds 0.05 to each
    start = [min(1.0, d) for d in difficulty]
    end = [min(1.0, d + 0.05) for d in difficulty]
    lo, hi = paired_bootstrap_ci(start, end)
    assert 0.0 < lo <= hi < 0.06
    # unpaired, the same data cannot even tell the sign of the lift
    assert bootstrap_ci(end)[0] < bootstrap_ci(start)[1]
    diffs = [e - s for s, e in zip(start, end, strict=True)]
    assert paired_bootstrap_ci(start, end, seed=5) == bootstrap_ci(diffs, seed=5)
    assert paired_bootstrap_ci([0.0, 0.5], [0.25, 0.75]) == pytest.approx((0.25, 0.25))
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap_ci([0.0, 1.0], [1.0])


def test_stratified_bootstrap_keeps_each_group():
    # one group: the plain bootstrap; a constant group adds no width; group sizes do not weight the mean
    a = [0.0, 1.0, 1.0, 0.5, 0.25, 0.0]
    assert stratified_bootstrap_ci([a], seed=4) == pytest.approx(bootstrap_ci(a, seed=4))
    lo, hi = stratified_bootstrap_ci([a, [1.0] * 50])
    a_lo, a_hi = bootstrap_ci(a)
    assert lo == pytest.approx((a_lo + 1) / 2, abs=0.03) and hi == pytest.approx((a_hi + 1) / 2, abs=0.03)
    with pytest.raises(ValueError, match="at least one"):
        stratified_bootstrap_ci([a, []])
