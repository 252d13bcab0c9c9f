"""Rewards and answer checking: extraction, numeric equivalence, reward-hacking cases, combining, GSM8K."""

import json
import logging
import math
import random

import pytest

from nanoseek.rewards import (
    accuracy_reward,
    answers_equal,
    build_rewards,
    cosine_length_reward,
    countdown_reward,
    evaluate_arithmetic,
    extract_answer,
    format_reward,
    gold_answer,
    grounding_reward,
    language_consistency_reward,
    repetition_penalty,
    score,
    soft_overlong,
    steps_reward,
    tag_count_reward,
)
from tests import GSM8K


def r1(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


@pytest.mark.parametrize(("text", "expected"), [
    (r1("3+4=7", "7"), "7"),
    ("so the final answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("Adding up, the answer is $1,234.50.", "$1,234.50"),
    ("The answer is 3.5.", "3.5"),
    (r1("x", "The answer is 12."), "12"),
    (r1("x", "$\\boxed{4}$"), "4"),
    ("no marker at all: 42", None),
    (r1("x", ""), None),                                    # empty answer
    ("<think>\nit is <answer>7</answer>\n</think>\n", None),  # answer hidden in the thinking
    ("<think>\nit is 7, <answer>7</answer>", None),          # thinking never closed
    ("<think>\nx\n</think>\n<answer>\n7", None),             # truncated inside the answer
    ("<answer>7</answer> <answer>8</answer>", None),         # several different answers
    ("<answer>7</answer> <answer>7.0</answer>", "7.0"),      # the same answer twice is one answer
    ("\\boxed{2} or maybe \\boxed{7}", None),
    ("<answer>" + "1" * 300 + "</answer>", None),            # prose-length "answer"
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("pred", "gold", "equal"), [
    ("72", "72", True), ("72.00", "72", True), ("$72", "72", True), ("72 dollars", "72", True),
    ("1,080", "1080", True), ("1080", "1,080", True), ("$1,234.50", "1234.5", True), ("50%", "50", True),
    ("-3", "-3", True), ("−3", "-3", True), ("3/4", "0.75", True), ("0.75", "3/4", True),
    ("x = 5", "5", True), ("3 + 4", "7", True), ("(2+3)*4", "20", True), ("3 + 4 = 7", "7", True),
    ("\\frac{1}{2}", "0.5", True), ("\\sqrt{8}", "2\\sqrt{2}", True), ("Yes.", "yes", True),
    ("The Alice", "alice", True), ("72", "Natalia sold 24 clips.\n#### 72", True),
    ("73", "72", False), ("7.2", "72", False), ("72", "", False), ("", "72", False), (None, "72", False),
    ("2 or 7", "7", False), ("7 or 2", "7", False), ("2, 7", "7", False), ("yes or no", "yes", False),
    ("A or B", "A", False), ("7 and 7", "7", True), ("Bob", "alice", False), ("seven", "7", False),
])
def test_answers_equal(pred, gold, equal):
    assert answers_equal(pred, gold) is equal


def test_evaluate_arithmetic_is_exact_and_refuses_code():
    assert evaluate_arithmetic("(1 + 2) * 3 / 4") == 9 / 4
    assert evaluate_arithmetic("0.1 + 0.2") * 10 == 3  # exact fractions, no float error
    for bad in ["__import__('os')", "2 ** 100000", "abs(-1)", "1/0", "x"]:
        with pytest.raises(ValueError):
            evaluate_arithmetic(bad)


def test_accuracy_reward_hacking_cases():
    completions = [
        r1("24 + 48 = 72", "72"),
        r1("24 + 48 = 72", ""),                       # empty answer tag: paid 1.0 by substring matchers
        r1("it is 72 or 73", "72 or 73"),             # hedging
        "<think>\nthe answer is <answer>72</answer>\n</think>\n",  # answer only inside the thinking
        r1("...", "71"),
        [{"role": "assistant", "content": r1("x", "$72.00")}],  # chat-style completion
    ]
    assert accuracy_reward(completions, answer=["#### 72"] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_format_and_tag_count():
    good = r1("2 + 2 = 4", "4")
    assert format_reward([good, good + "\n"]) == [1.0, 1.0]
    bad = [
        "<think>\n2+2\n</think>\n4",                                   # no answer tags
        r1("2+2", ""),                                                # empty answer
        good + "\n<answer>\n5\n</answer>",                            # a second answer
        "<think>2+2</think><answer>4</answer>",                       # missing newlines
        "Sure! " + good,                                              # text before the thinking
    ]
    assert format_reward(bad) == [0.0] * 5
    assert tag_count_reward([good, "<think>\nx\n</think>\n4", "nothing"]) == [1.0, 0.5, 0.0]


def test_language_consistency():
    english = r1("first add the two numbers then halve", "5")
    mixed = r1("first 我们 add 两个 numbers", "5")  # 3 English words, 4 CJK characters
    chinese = r1("我们先加", "5")
    scores = language_consistency_reward([english, mixed, chinese, r1("2+3=5", "5")], language="en")
    assert scores == [1.0, pytest.approx(3 / 7), 0.0, 1.0]
    assert language_consistency_reward([chinese], language=["zh"]) == [1.0]
    with pytest.raises(ValueError, match="klingon"):
        language_consistency_reward([english], language="klingon")


def test_cosine_length_reward_endpoints_and_order():
    right, wrong = r1("x", "4"), r1("x", "5")
    kw = dict(answer=["4"] * 4, max_len=100)
    ids = [[0] * 0, [0] * 100, [0] * 0, [0] * 100]
    out = cosine_length_reward([right, right, wrong, wrong], completion_ids=ids, **kw)
    assert out == pytest.approx([1.0, 0.5, -1.0, -0.5])
    mid = cosine_length_reward([right], answer=["4"], completion_ids=[[0] * 50], max_len=100)
    assert mid == pytest.approx([0.75])  # half way along the cosine


def test_repetition_penalty():
    assert repetition_penalty(["a b c d e f"]) == [0.0]
    looped = "so so so so so so"  # 4 trigrams, 1 distinct
    assert repetition_penalty([looped], ngram_size=3, max_penalty=-1.0) == [pytest.approx(-0.75)]
    assert repetition_penalty(["a b"]) == [0.0]
    with pytest.raises(ValueError):
        repetition_penalty(["a"], max_penalty=0.5)


def test_soft_overlong_matches_dapo_formula():
    L_max, L_cache = 20, 8
    lengths = [5, 12, 13, 16, 20, 25]
    expected = [0.0, 0.0, (12 - 13) / 8, (12 - 16) / 8, -1.0, -1.0]
    out = soft_overlong(["x"] * 6, completion_ids=[[0] * n for n in lengths], max_completion_len=L_max,
                        cache_len=L_cache)
    assert out == pytest.approx(expected)


def test_grounding_reward_penalises_unsupported_claims():
    passage = "Mara lives in Oslo. Oslo has 12 museums and 3 parks."
    grounded = r1("Oslo has 12 museums and 3 parks, 12 + 3 = 15.", "15")
    hallucinated = r1("Oslo has 40 museums, says Professor Lund.", "40")
    scores = grounding_reward([grounded, hallucinated], passage=[passage] * 2)
    assert scores[0] == 0.0
    assert scores[1] < -0.5  # 40 (twice) and Lund and Professor are nowhere in the passage
    wrong_sum = r1("12 + 3 = 16", "16")  # a stated equation that is wrong does not ground its result
    assert grounding_reward([wrong_sum], passage=[passage]) == [pytest.approx(-2 / 4)]  # 12 3 16 16


def test_countdown_reward():
    numbers, target = [[3, 5, 7]] * 5, [22] * 5
    completions = [
        r1("x", "(3 + 7) * 5 / 2"),    # uses 2, which is not given, and equals 25
        r1("x", "3 * 5 + 7"),          # 22, each number once
        r1("x", "3 * 5 + 7 = 22"),     # the same with its result written out
        r1("x", "5 * 5 - 3"),          # 22 but reuses 5 and drops 7
        "no answer",
    ]
    assert countdown_reward(completions, numbers=numbers, target=target) == [0.1, 1.0, 1.0, 0.1, 0.0]
    # accuracy on countdown rows follows the countdown rule: "5 * 5 - 3" equals the gold's 22 but reuses 5
    gold = ["3 * 5 + 7"] * 5
    assert accuracy_reward(completions, answer=gold, numbers=numbers, target=target) == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert accuracy_reward(completions, answer=gold) == [0.0, 1.0, 1.0, 1.0, 0.0]  # without the columns


def test_score_isolates_a_raising_reward_and_logs_the_sample(caplog):
    def fragile(completions, **_):
        if any("boom" in c for c in completions):
            raise RuntimeError("bad sample")
        return [0.5] * len(completions)

    rewards = build_rewards({"accuracy": 1.0, "fragile": 2.0}, extra={"fragile": fragile})
    completions = [r1("x", "4"), r1("boom", "4"), r1("x", "5")]
    with caplog.at_level(logging.WARNING, logger="nanoseek.rewards"):
        totals, per_fn = score(rewards, completions, {"answer": ["4", "4", "4"]})
    assert per_fn["fragile"] == [0.5, 0.0, 0.5]
    assert totals == [2.0, 1.0, 1.0]
    assert "fragile" in caplog.text and "boom" in caplog.text and "RuntimeError" in caplog.text


def test_score_gate_makes_format_a_precondition():
    rewards = build_rewards({"accuracy": 1.0, "format": 0.1})
    completions = [r1("x", "4"), "the answer is 4", r1("x", "5")]
    totals, _ = score(rewards, completions, {"answer": ["4"] * 3}, gate=["format"])
    assert totals == pytest.approx([1.1, 0.0, 0.1])
    with pytest.raises(ValueError, match="gate"):
        score(rewards, completions, {"answer": ["4"] * 3}, gate=["cosine"])


def test_build_rewards_binds_parameters_and_rejects_unknown_names():
    [overlong] = build_rewards({"soft_overlong": 1.0}, {"soft_overlong": {"max_completion_len": 10,
                                                                           "cache_len": 5}})
    assert overlong.fn(["x"], completion_ids=[[0] * 8]) == [pytest.approx(-0.6)]
    with pytest.raises(ValueError, match="acuracy"):
        build_rewards({"acuracy": 1.0})


def test_column_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(["a", "b"], answer=["1"])


# --- real data ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gsm8k():
    if not GSM8K.exists():
        pytest.skip(f"{GSM8K} not present")
    return [json.loads(line) for line in GSM8K.read_text().splitlines()]


def test_gsm8k_reference_solutions_score_one_and_perturbations_zero(gsm8k):
    golds = [r["answer"] for r in gsm8k]
    assert accuracy_reward(golds, answer=golds) == [1.0] * len(golds)  # each worked solution against itself
    values = [gold_answer(g) for g in golds]
    in_tags = [r1(g.rsplit("####", 1)[0].strip(), f"${v}") for g, v in zip(golds, values, strict=True)]
    assert sum(accuracy_reward(in_tags, answer=golds)) == len(golds)
    off_by_one = [r1("...", str(int(v.replace(",", "")) + 1)) for v in values]
    hedged = [r1("...", f"{v} or {int(v.replace(',', '')) + 1}") for v in values]
    assert sum(accuracy_reward(off_by_one, answer=golds)) == 0
    assert sum(accuracy_reward(hedged, answer=golds)) == 0


def test_gsm8k_numeric_verdicts_agree_with_math_verify(gsm8k):
    math_verify = pytest.importorskip("math_verify")
    rng = random.Random(0)
    values = [gold_answer(r["answer"]) for r in rng.sample(gsm8k, 150)]
    checked = 0
    for v in values:
        n = int(v.replace(",", ""))
        for pred in (str(n), f"{n}.00", f"{n:,}", f"{n + 1}", f"{n / 10:g}", f"{n}/2"):
            reference = math_verify.verify(math_verify.parse(v), math_verify.parse(pred))
            assert answers_equal(pred, v) == reference, (pred, v)
            checked += 1
    assert checked == 900 and not math.isnan(checked)


def test_steps_reward_is_the_share_of_worked_steps_stated_in_the_reasoning():
    solution = "3 + 4 = 7\n7 - 2 = 5\n#### 5"
    both = "<think>\n3 + 4 = 7\n7  -  2 = 5\n</think>\n<answer>\n5\n</answer>"  # spacing inside a line is free
    first = "<think>\n3 + 4 = 7\n7 - 2 = 4\n</think>\n<answer>\n4\n</answer>"
    hidden_after = "<think>\n3 + 4 = 8\n</think>\n3 + 4 = 7\n7 - 2 = 5\n<answer>\n5\n</answer>"
    assert steps_reward([both, first, hidden_after, "5"], solution=[solution] * 4) == [1.0, 0.5, 0.0, 0.0]
    assert steps_reward([both], solution=[None]) == [0.0]  # a row without a worked solution
    assert steps_reward([both]) == [0.0]
    chained = "3 + 4 - 2 = 7 - 2 = 5\n#### 5"  # arithmetic's worked line: each side restates what is left
    right, fact2, copy = ("<think>\n3 + 4 - 2 = 7 - 2 = 5\n</think>", "<think>\n3 + 4 - 2 = 7 - 2 = 4\n</think>",
                          "<think>\n3 + 4 - 2 = 7 + 4 = 11\n</think>")
    assert steps_reward([right, fact2, copy, both], solution=[chained] * 4) == [1.0, 0.5, 0.0, 0.5]
