"""Evaluation tasks: the built-in held-out sets, GSM8K / MATH / multiple-choice files, and their grading.

A task spec (what `nanoseek eval --tasks` takes) is one of
    arithmetic | word_problems | logic | multihop | countdown   built-in held-out problems (the "eval" split of
                                                               nanoseek.data.synth, disjoint from all training data)
    arithmetic_mc                                              built-in multiple choice (4 options per question)
    gsm8k:PATH   JSONL with `question` and `answer` ending in `#### value`
    math:PATH    JSONL with `problem` (or `question`) and `solution` holding a `\\boxed{}` answer (or `answer`)
    mc:PATH      JSONL with `question`, `choices` (a list) and `answer` (a letter or a 0-based index)
    PATH         a .jsonl file whose first record says which of the three formats it is
Generative tasks are graded on the answer extracted from the completion (`nanoseek.rewards.extract_answer`):
built-in problems by their own task's checker, file tasks by value equality (`answers_equal`, math-verify for
LaTeX). Multiple choice is scored without generation, by the log-likelihood of each answer letter.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.common import read_jsonl as read_records
from nanoseek.data.synth import TASKS as SYNTH_TASKS
from nanoseek.data.synth import Problem, eval_expression, make_problems
from nanoseek.eval.metrics import same_answer
from nanoseek.rewards import check_answer, extract_answer, gold_answer

BUILTIN = ("arithmetic", "word_problems", "logic", "multihop", "countdown")
BUILTIN_CHOICE = ("arithmetic_mc",)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Example:
    """One evaluation item. `answer` is the gold value (a letter for multiple choice)."""

    id: str
    question: str
    answer: str
    paraphrases: list[str] = field(default_factory=list)  # the same problem reworded / premises reordered
    choices: list[str] | None = None  # multiple choice options, in letter order
    passage: str | None = None  # facts the answer must be grounded in (multi-hop)
    problem: Problem | None = None  # built-in problems keep their generator's checker


@dataclass
class EvalTask:
    name: str
    kind: str  # "generate" (sample, extract, grade) or "choice" (log-likelihood of the letters)
    examples: list[Example]

    def check(self, example: Example, answer: str | None) -> bool:
        """Is the extracted `answer` right? (`rewards.check_answer`, as in training.)"""
        return check_answer(answer, example.answer, example.problem)

    def same(self) -> Callable[[str, str], bool]:
        """How two answers are compared for majority vote and consistency."""
        return _same_countdown if self.name == "countdown" else same_answer


def _countdown_key(answer: str) -> tuple[Any, ...]:
    """A countdown answer's meaning: (value, numbers used) for an expression, else its bare text."""
    expr = answer.split("=")[0] if answer.count("=") == 1 else answer
    try:
        value, used = eval_expression(expr)
    except ValueError:
        return ("text", " ".join(answer.split()))
    return ("expr", value, tuple(sorted(used)))


def _same_countdown(a: str, b: str) -> bool:
    """"3 + 5" and "5 + 3" are one answer; "2 * 4" is another (other numbers), though all equal 8."""
    return _countdown_key(a) == _countdown_key(b)


# --- built-in tasks ---------------------------------------------------------------------------------------

def builtin_task(name: str, n: int, seed: int = 0, difficulty: int | list[int] = 1) -> EvalTask:
    """`n` held-out problems of a built-in task (the synth "eval" split, unique, seeded)."""
    if name in BUILTIN_CHOICE:
        return _arithmetic_choice(n, seed, difficulty)
    if name not in SYNTH_TASKS:
        raise ValueError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN + BUILTIN_CHOICE)}")
    problems = make_problems(name, n, seed=seed, difficulty=difficulty, split="eval")
    examples = [Example(p.uid, p.question, p.answer, list(p.paraphrases), passage=p.passage, problem=p)
                for p in problems]
    return EvalTask(name, "generate", examples)


def _arithmetic_choice(n: int, seed: int, difficulty: int | list[int]) -> EvalTask:
    """Held-out arithmetic as 4-way multiple choice: the value and three near misses (±1..3, never negative),
    in a seeded order per question."""
    examples = []
    for p in make_problems("arithmetic", n, seed=seed, difficulty=difficulty, split="eval"):
        rng = random.Random(f"mc|{p.uid}")
        gold = int(p.answer)
        near = [gold + d for d in (-3, -2, -1, 1, 2, 3) if gold + d >= 0]
        options = [gold] + rng.sample(near, 3)
        rng.shuffle(options)
        examples.append(Example(p.uid + "-mc", p.question, LETTERS[options.index(gold)],
                                choices=[str(o) for o in options]))
    return EvalTask("arithmetic_mc", "choice", examples)


# --- file tasks -------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line of a task file; a clear error naming file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    out = list(read_records(path))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def load_gsm8k(path: str | Path, n: int | None = None) -> EvalTask:
    """GSM8K format: `question`, and `answer` = worked solution whose last line is `#### value`."""
    examples = []
    for line, r in read_jsonl(path)[:n]:
        where = f"{path}:{line}"
        answer = _text(r, "answer", where)
        if "####" not in answer:
            raise ValueError(f"{where}: field 'answer' has no final '#### value' line")
        examples.append(Example(str(r.get("id", f"line{line}")), _text(r, "question", where), gold_answer(answer)))
    return EvalTask(f"gsm8k:{Path(path).stem}", "generate", examples)


def load_math(path: str | Path, n: int | None = None) -> EvalTask:
    """MATH format: `problem` (or `question`) and `solution` with one `\\boxed{}` answer (or a bare `answer`)."""
    examples = []
    for line, r in read_jsonl(path)[:n]:
        where = f"{path}:{line}"
        question = _text(r, "problem" if "problem" in r else "question", where)
        if "answer" in r:
            gold = _text(r, "answer", where).strip()
        else:
            gold = extract_answer(_text(r, "solution", where))
            if gold is None:
                raise ValueError(f"{where}: field 'solution' has no single \\boxed{{}} answer")
        examples.append(Example(str(r.get("id", r.get("unique_id", f"line{line}"))), question, gold))
    return EvalTask(f"math:{Path(path).stem}", "generate", examples)


def load_choice(path: str | Path, n: int | None = None) -> EvalTask:
    """Multiple choice: `question`, `choices` (2-26 strings) and `answer` (a letter, or a 0-based index)."""
    examples = []
    for line, r in read_jsonl(path)[:n]:
        where = f"{path}:{line}"
        choices = r.get("choices")
        if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) and c.strip() for c in choices)):
            raise ValueError(f"{where}: field 'choices' must be a list of 2-26 non-empty strings")
        answer = r.get("answer")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            letter = LETTERS[answer]
        elif isinstance(answer, str) and answer.strip().upper() in LETTERS[:len(choices)]:
            letter = answer.strip().upper()
        else:
            raise ValueError(f"{where}: field 'answer' must be a letter A-{LETTERS[len(choices) - 1]} or an index "
                             f"0-{len(choices) - 1}, got {answer!r}")
        examples.append(Example(str(r.get("id", f"line{line}")), _text(r, "question", where), letter,
                                choices=choices))
    return EvalTask(f"mc:{Path(path).stem}", "choice", examples)


FILE_FORMATS: dict[str, Callable[[str | Path, int | None], EvalTask]] = {
    "gsm8k": load_gsm8k, "math": load_math, "mc": load_choice,
}


def _detect_format(path: str | Path) -> str:
    """The format of a task file from its first record's fields."""
    line, r = read_jsonl(path)[0]
    if "choices" in r:
        return "mc"
    if "problem" in r or "solution" in r:
        return "math"
    if isinstance(r.get("answer"), str) and "####" in r["answer"]:
        return "gsm8k"
    raise ValueError(f"{path}:{line}: cannot tell the task format from fields {sorted(r)}; prefix the path with "
                     f"gsm8k:, math: or mc:")


def load_task(spec: str, n: int | None = None, seed: int = 0, difficulty: int | list[int] = 1) -> EvalTask:
    """A task from its spec (see the module docstring); `n` caps the number of examples (built-ins need it)."""
    kind, sep, path = spec.partition(":")
    if sep and kind in FILE_FORMATS:
        return FILE_FORMATS[kind](path, n)
    if spec in BUILTIN or spec in BUILTIN_CHOICE:
        if n is None:
            raise ValueError(f"built-in task {spec!r} needs a number of problems n")
        return builtin_task(spec, n, seed, difficulty)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        return FILE_FORMATS[_detect_format(spec)](spec, n)
    raise ValueError(f"unknown task {spec!r}: expected one of {', '.join(BUILTIN + BUILTIN_CHOICE)}, "
                     f"gsm8k:PATH, math:PATH, mc:PATH or a .jsonl path")


# --- prompts ----------------------------------------------------------------------------------------------
# Generative prompts are rendered by `nanoseek.infer.rollout.render` (R1-Zero or chat template), the same ids
# RL trains on; multiple choice uses a plain-text prompt for every model.

def choice_prompt(question: str, choices: list[str]) -> str:
    """A multiple-choice question as plain text ending in "Answer:"; each option is then scored as " A", " B"..."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {question}\n{options}\nAnswer:"
