"""Tasks: built-in held-out sets, file formats (GSM8K, MATH, multiple choice), and answer grading per task."""

import json
from pathlib import Path

import pytest

from nanoseek.data.synth import split_of
from nanoseek.eval.tasks import BUILTIN, choice_prompt, load_task
from nanoseek.rewards import extract_answer
from tests import GSM8K


def r1(think: str, answer: str) -> str:
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_tasks_are_held_out_and_grade_their_own_solutions(name):
    task = load_task(name, n=20, seed=3)
    assert task.kind == "generate" and len(task.examples) == 20
    assert len({ex.id for ex in task.examples}) == 20  # unique problems
    for ex in task.examples:
        p = ex.problem
        # held out: the problem's partition text falls in the eval split (single-line tasks: the question itself)
        if name in ("arithmetic", "countdown"):
            assert split_of(ex.question) == "eval"
        # the worked solution in R1 format is graded right, an answer hidden in the thinking is not
        assert task.check(ex, extract_answer(r1(p.steps, p.answer)))
        assert not task.check(ex, extract_answer(f"<think>\n<answer>{p.answer}</answer>\n</think>\n"))
        assert not task.check(ex, None)


@pytest.mark.parametrize(("name", "wrong"), [("arithmetic", "1000"), ("word_problems", "1000"),
                                             ("multihop", "Nowhere"), ("countdown", "1 + 1 + 1 + 1 + 1")])
def test_builtin_tasks_reject_wrong_answers(name, wrong):
    task = load_task(name, n=10)
    assert not any(task.check(ex, wrong) for ex in task.examples)


def test_logic_answers_yes_or_no():
    task = load_task("logic", n=20)
    assert {ex.answer for ex in task.examples} == {"yes", "no"}
    for ex in task.examples:
        other = "no" if ex.answer == "yes" else "yes"
        assert task.check(ex, ex.answer.capitalize()) and not task.check(ex, other)


def test_countdown_accepts_any_valid_expression_and_votes_by_meaning():
    task = load_task("countdown", n=10)
    same = task.same()
    for ex in task.examples:
        a, b = ex.problem.numbers
        assert task.check(ex, ex.answer)
        assert task.check(ex, f"{ex.answer} = {ex.problem.target}")
        if "+" in ex.answer:
            assert task.check(ex, f"{b} + {a}") and same(f"{a} + {b}", f"{b} + {a}")
    assert not same("2 * 4", "3 + 5")  # equal values, different numbers: different answers
    assert same("2 * 4", "4*2")


def test_arithmetic_multiple_choice():
    task = load_task("arithmetic_mc", n=15)
    plain = load_task("arithmetic", n=15)  # the same held-out problems, generative
    assert task.kind == "choice"
    for ex, problem in zip(task.examples, plain.examples, strict=True):
        assert len(ex.choices) == 4 == len(set(ex.choices))
        assert ex.choices["ABCD".index(ex.answer)] == problem.answer  # the gold letter points at the value
        assert all(int(c) >= 0 for c in ex.choices)
    assert len({ex.answer for ex in task.examples}) > 1  # the gold letter moves around
    prompt = choice_prompt("What is 2 + 2?", ["3", "4"])
    assert prompt == "Question: What is 2 + 2?\nA. 3\nB. 4\nAnswer:"


def test_gsm8k_file(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "Big number?", "answer": "so\n#### 1,080"},
    ])
    task = load_task(f"gsm8k:{path}")
    assert [ex.answer for ex in task.examples] == ["7", "1,080"]
    assert task.check(task.examples[0], extract_answer(r1("3 + 4 = 7", "7")))
    assert task.check(task.examples[1], extract_answer("The answer is $1080."))
    assert not task.check(task.examples[1], "108")
    assert load_task(str(path)).name == task.name  # the format is recognised without the prefix
    assert len(load_task(str(path), n=1).examples) == 1


@pytest.mark.parametrize(("record", "message"), [
    ({"question": "q", "answer": "7"}, r"g.jsonl:2: field 'answer' has no final '#### value'"),
    ({"answer": "#### 7"}, r"g.jsonl:2: field 'question' must be a non-empty string"),
    ("{not json", r"g.jsonl:2: not valid JSON"),
    ("[1, 2]", r"g.jsonl:2: expected a JSON object"),
])
def test_gsm8k_file_errors_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, record])
    with pytest.raises(ValueError, match=message):
        load_task(f"gsm8k:{path}")


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K data not present")
def test_real_gsm8k_golds_grade_their_own_solutions():
    task = load_task(f"gsm8k:{GSM8K}", n=200)
    lines = [json.loads(x) for x in GSM8K.read_text().splitlines()[:200]]
    for ex, record in zip(task.examples, lines, strict=True):
        assert task.check(ex, extract_answer(record["answer"]))  # the worked solution's `#### value` line


def test_math_file(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "Root?", "solution": "x", "answer": "\\sqrt{2}"},
    ])
    task = load_task(f"math:{path}")
    assert [ex.answer for ex in task.examples] == ["\\frac{1}{2}", "\\sqrt{2}"]
    assert task.check(task.examples[0], extract_answer("so \\boxed{0.5}"))
    assert task.check(task.examples[0], extract_answer(r1("half", "1/2")))
    assert task.check(task.examples[1], extract_answer("\\boxed{\\sqrt{2}}"))
    assert not task.check(task.examples[1], "2")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "solution": "no box here"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'solution' has no single \\boxed"):
        load_task(f"math:{bad}")


def test_multiple_choice_file(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"question": "Sky?", "choices": ["green", "blue"], "answer": "b"},
        {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1},
    ])
    task = load_task(str(path))
    assert task.kind == "choice" and [ex.answer for ex in task.examples] == ["B", "B"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": "C"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer' must be a letter A-B"):
        load_task(f"mc:{bad}")
    bad2 = write_jsonl(tmp_path / "bad2.jsonl", [{"question": "q", "choices": ["a"], "answer": 0}])
    with pytest.raises(ValueError, match=r"bad2.jsonl:1: field 'choices'"):
        load_task(f"mc:{bad2}")


def test_unknown_task_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'algebra'"):
        load_task("algebra", n=5)
    with pytest.raises(FileNotFoundError, match="no such task file"):
        load_task(f"gsm8k:{tmp_path / 'missing.jsonl'}")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(ValueError, match="odd.jsonl:1: cannot tell the task format"):
        load_task(str(odd))
    with pytest.raises(ValueError, match="needs a number of problems"):
        load_task("arithmetic")
