"""Rule-based rewards for reasoning RL, and the answer checking that eval and the verification loop reuse.

Every reward follows TRL's convention `f(completions, **columns) -> list[float]`: `completions` are strings
(or chat turns `[{"role": "assistant", "content": ...}]`), and each dataset column arrives as a list with one
value per completion (`answer`, `passage`, `numbers`, ...). Unknown columns are ignored, so one batch can feed
all of them. Parameters (lengths, penalties) are keyword arguments with defaults; recipes bind them by name.

Answer checking is deliberately strict, because a lenient checker is the first thing RL learns to exploit:
the answer must sit after the reasoning (an answer hidden inside `<think>` does not count), must be non-empty,
and must be one value ("2 or 7" is wrong even when the gold is 7). Values compare as numbers when they are
numbers (commas, currency signs, units, trailing zeros, fractions, simple arithmetic), as LaTeX maths through
math-verify when they look like LaTeX, and otherwise as case-folded text.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
import re
import threading
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any

log = logging.getLogger(__name__)

Completion = str | list[dict[str, str]]
RewardFn = Callable[..., list[float]]

# --- answer extraction --------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_HASHES = re.compile(r"####[ \t]*(.+?)[ \t]*$", re.MULTILINE)
_THE_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE | re.DOTALL)
_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*)?:?\s*", re.IGNORECASE)
MAX_ANSWER_CHARS = 200  # longer "answers" are prose, not a value; refusing them bounds math-verify's work


def completion_text(completion: Completion) -> str:
    """A completion as text: a plain string, or the content of a chat-style list of turns."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(str(m["content"]) for m in completion)
    raise TypeError(f"a completion must be a string or a list of chat turns, got {completion!r:.80}")


def final_section(text: str) -> str | None:
    """The part of a completion that may carry its answer: everything after the last `</think>`.

    None when a `<think>` is opened and never closed: the whole completion is still reasoning, so any answer
    in it is hidden in the thinking and must not be paid."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def _boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` in order, braces matched; unbalanced ones skipped."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\{", text):
        depth = 1
        for j in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[m.end():j])
                break
    return out


def _unwrap(answer: str) -> str:
    """Strip what a model wraps around a value: `$..$`, `\\boxed{}`, `####`, "the answer is", a last "."."""
    answer = answer.strip()
    boxed = _boxed(answer)
    if boxed:
        answer = boxed[-1].strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left):-len(right)].strip()
    answer = answer.removeprefix("####").strip()
    answer = _PREFIX.sub("", answer)
    return answer.rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None when it gives none or several different ones.

    Looked for after the reasoning, the first kind found wins: `<answer>...</answer>`, `\\boxed{...}`,
    `#### value` lines, "the answer is ..." sentences. An `<answer>` opened but never closed (a truncated
    completion) is no answer; so is one longer than MAX_ANSWER_CHARS."""
    section = final_section(text)
    if section is None:
        return None
    if "<answer>" in section:
        candidates = _ANSWER_TAG.findall(section)  # none when the tag is never closed
    else:
        candidates = _boxed(section) or _HASHES.findall(section) or _THE_ANSWER_IS.findall(section)
    answers = [a for a in map(_unwrap, candidates) if a]
    if not answers or not all(answers_equal(a, answers[-1]) for a in answers):
        return None  # no answer, only empty ones, or several different ones
    found = answers[-1]
    return found if found and len(found) <= MAX_ANSWER_CHARS else None


def gold_answer(answer: str) -> str:
    """The gold value of a dataset answer: a bare value, or a worked GSM8K solution ending in `#### value`."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    return answer.strip()


# --- value comparison ---------------------------------------------------------------------------------------

_BIN_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_HINT = re.compile(r"\\[a-zA-Z]+|\^|_\{|\bsqrt\b|\bpi\b")
_SYMBOLS = str.maketrans({"−": "-", "–": "-", "×": "*", "·": "*", "÷": "/", "\u00a0": " "})


def evaluate_arithmetic(expr: str) -> Fraction:
    """Exact value of `expr` built from numbers, + - * / and parentheses (also x for *), as a Fraction.

    A whitelist over Python's AST: no names, calls or powers, so it is safe on model output. Raises ValueError
    for anything else (including division by zero)."""
    expr = expr.translate(_SYMBOLS).replace("x", "*").replace("X", "*")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from e

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError(f"division by zero in {expr!r}")
            return _BIN_OPS[type(node.op)](left, right)
        raise ValueError(f"not an arithmetic expression: {expr!r}")

    return walk(tree.body)


def _as_number(part: str) -> Fraction | None:
    """A number written the many ways models write one: "1,234.50", "$18", "18 dollars", "-3", "3/4", "50%",
    "x = 5", "3 + 4". None if `part` is not a single number or arithmetic expression."""
    s = part.translate(_SYMBOLS).replace("\\$", "").replace("\\%", "").replace("\\!", "").replace("{,}", ",")
    if "=" in s:
        s = s.rsplit("=", 1)[1]  # "x = 5" or "3 + 4 = 7": the value is the right-hand side
    s = _THOUSANDS.sub("", s).strip()
    s = re.sub(r"^[$€£¥]\s*|\s*%$", "", s).strip()
    numbers = _NUMBER.findall(s)
    if len(numbers) == 1:
        # one number amid words ("18 dollars", "$18.00 in total"): the words are units or filler
        rest = s.replace(numbers[0], " ", 1)
        if re.fullmatch(r"[\sA-Za-z$€£¥%.:']*", rest):
            return Fraction(numbers[0])
    if numbers and re.fullmatch(r"[\d\s.+\-*/()x×]+", s):
        try:
            return evaluate_arithmetic(s)
        except ValueError:
            return None
    return None


def _split_values(answer: str) -> list[str]:
    """Split an answer into the values it states: at top-level commas, semicolons, newlines, "or" and "and"
    (thousands separators and commas inside brackets do not split)."""
    answer = _THOUSANDS.sub("", answer)
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(answer):
        depth += 1 if ch in "({[" else -1 if ch in ")}]" else 0
        if depth == 0 and ch in ",;\n":
            parts.append(answer[start:i])
            start = i + 1
    parts.append(answer[start:])
    out = []
    for part in parts:
        out.extend(re.split(r"\s+(?:or|and)\s+", part, flags=re.IGNORECASE))
    return [p.strip() for p in out if p.strip()]


def _text_key(value: str) -> str:
    value = unicodedata.normalize("NFKC", value).casefold().strip().strip(".,;:!?\"'`")
    value = re.sub(r"^(?:the|a|an)\s+", "", value)
    return re.sub(r"\s+", " ", value)


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify  # sympy-based: imported only when an answer looks like LaTeX

    # math-verify's timeouts use SIGALRM, which exists only in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _value_equal(pred: str, gold: str) -> bool:
    p, g = _as_number(pred), _as_number(gold)
    if p is not None and g is not None:
        return abs(p - g) <= Fraction(1, 10**9) * max(1, abs(g))  # exact but for float-noise decimals
    if _LATEX_HINT.search(pred) or _LATEX_HINT.search(gold):
        return _math_verify_equal(pred, gold)
    if p is not None or g is not None:
        return False  # a number against a word
    return _text_key(pred) == _text_key(gold)


def check_answer(answer: str | None, gold: str, problem: Any = None) -> bool:
    """The one grading rule of training and evaluation: no answer is wrong; a built-in problem (anything with a
    `check(answer)` method, such as `data.synth.Problem`) is graded by its own checker, anything else by
    `answers_equal` against the gold answer."""
    if answer is None:
        return False
    if problem is not None:
        return problem.check(answer)
    return answers_equal(answer, gold)


def answers_equal(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer states exactly the gold value(s).

    Both sides are split into the values they state and compared as sets: "7" matches "7.00", "$7" and
    "7 apples", but "2 or 7" does not match "7" (hedging is not an answer). None or empty never matches."""
    if pred is None or not pred.strip():
        return False
    preds, golds = _split_values(pred), _split_values(gold_answer(gold))
    if not preds or not golds:
        return False
    return all(any(_value_equal(p, g) for g in golds) for p in preds) and all(
        any(_value_equal(p, g) for p in preds) for g in golds)


# --- rewards ------------------------------------------------------------------------------------------------

def _column(values: Any, n: int, name: str) -> list[Any]:
    """A dataset column as one value per completion (a scalar is broadcast)."""
    if isinstance(values, (list, tuple)):
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
        return list(values)
    return [values] * n


def _lengths(completions: Sequence[Completion], completion_ids: Sequence[Sequence[int]] | None) -> list[int]:
    """Lengths in tokens when token ids are given (TRL passes `completion_ids`), else in characters."""
    if completion_ids is not None:
        return [len(ids) for ids in _column(completion_ids, len(completions), "completion_ids")]
    return [len(completion_text(c)) for c in completions]


def accuracy_reward(completions: Sequence[Completion], answer: Sequence[str],
                    numbers: Sequence[Sequence[int] | None] | None = None,
                    target: Sequence[int | None] | None = None, **_: Any) -> list[float]:
    """1.0 when the extracted answer equals the gold `answer` (a value or a `#### value` solution), else 0.

    A countdown problem (a row with `numbers` and `target`) is right only when its expression uses each given
    number once and reaches the target: any expression equal to the gold's value would not do."""
    n = len(completions)
    golds = _column(answer, n, "answer")
    nums = _column(numbers, n, "numbers") if numbers is not None else [None] * n
    targets = _column(target, n, "target") if target is not None else [None] * n
    out = []
    for c, gold, available, goal in zip(completions, golds, nums, targets, strict=True):
        if available is not None and goal is not None:
            out.append(float(countdown_reward([c], numbers=[available], target=[goal])[0] == 1.0))
        else:
            out.append(float(answers_equal(extract_answer(completion_text(c)), gold)))
    return out


_FORMAT = re.compile(r"<think>\n(.*?)\n</think>\n<answer>\n(.*?)\n</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completions: Sequence[Completion], **_: Any) -> list[float]:
    """1.0 for exactly `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`: each tag once, an answer."""
    out = []
    for c in completions:
        text = completion_text(c).strip()
        m = _FORMAT.fullmatch(text)
        ok = m is not None and m.group(2).strip() != "" and all(text.count(t) == 1 for t in _TAGS)
        out.append(float(ok))
    return out


def tag_count_reward(completions: Sequence[Completion], **_: Any) -> list[float]:
    """0.25 for each of the four tags placed once with its newlines: a dense signal on the way to format."""
    pieces = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
    return [sum(0.25 for p in pieces if completion_text(c).count(p) == 1) for c in completions]


_SCRIPTS = {"en": "LATIN", "fr": "LATIN", "de": "LATIN", "es": "LATIN", "zh": "CJK", "ja": "CJK",
            "ru": "CYRILLIC", "el": "GREEK", "ar": "ARABIC", "he": "HEBREW", "ko": "HANGUL"}


def _script(word: str) -> str:
    name = unicodedata.name(word[0], "")
    if name.startswith(("CJK", "HIRAGANA", "KATAKANA")):
        return "CJK"
    return name.split(" ")[0]


def language_consistency_reward(completions: Sequence[Completion], language: str | Sequence[str] = "en",
                                **_: Any) -> list[float]:
    """Share of the reasoning's words written in the target language's script (DeepSeek-R1's reward against
    language mixing). A CJK character counts as a word; digits and symbols do not count. 1.0 with no words."""
    langs = _column(language, len(completions), "language")
    out = []
    for c, lang in zip(completions, langs, strict=True):
        if lang not in _SCRIPTS:
            raise ValueError(f"language {lang!r} unknown; known: {sorted(_SCRIPTS)}")
        text = completion_text(c)
        thinking = text.split("<think>", 1)[-1].split("</think>", 1)[0]
        words = re.findall(r"[\u3040-\u30ff\u3400-\u9fff]|[^\W\d_\u3040-\u30ff\u3400-\u9fff]+", thinking)
        out.append(sum(_script(w) == _SCRIPTS[lang] for w in words) / len(words) if words else 1.0)
    return out


def cosine_length_reward(completions: Sequence[Completion], answer: Sequence[str],
                         completion_ids: Sequence[Sequence[int]] | None = None, max_len: int = 1000,
                         min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                         min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                         **_: Any) -> list[float]:
    """Correctness scaled by length on a cosine (Kimi k1.5 / open-r1): a correct answer earns more when short
    (max_value_correct at length 0 down to min_value_correct at max_len); a wrong one is punished less when
    long (min_value_wrong at 0 up to max_value_wrong at max_len): keep thinking when unsure."""
    correct = accuracy_reward(completions, answer)
    out = []
    for ok, length in zip(correct, _lengths(completions, completion_ids), strict=True):
        cosine = math.cos(min(length / max_len, 1.0) * math.pi)
        lo, hi = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
        out.append(lo + 0.5 * (hi - lo) * (1.0 + cosine))
    return out


def repetition_penalty(completions: Sequence[Completion], ngram_size: int = 3, max_penalty: float = -1.0,
                       **_: Any) -> list[float]:
    """max_penalty × the share of repeated word n-grams (0 without repeats or with fewer than n words)."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
    out = []
    for c in completions:
        words = completion_text(c).lower().split()
        ngrams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
        out.append((1 - len(set(ngrams)) / len(ngrams)) * max_penalty if ngrams else 0.0)
    return out


def soft_overlong(completions: Sequence[Completion], completion_ids: Sequence[Sequence[int]] | None = None,
                  max_completion_len: int = 512, cache_len: int = 64, **_: Any) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to max_completion_len - cache_len, then a linear ramp to -1 at
    max_completion_len, -1 beyond. Lengths in tokens when `completion_ids` is given."""
    if not 0 < cache_len <= max_completion_len:
        raise ValueError(f"need 0 < cache_len <= max_completion_len, got {cache_len}, {max_completion_len}")
    free = max_completion_len - cache_len
    return [0.0 if n <= free else max(-1.0, (free - n) / cache_len)
            for n in _lengths(completions, completion_ids)]


_CLAIM_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([-+*/x×])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")
_SENTENCE = re.compile(r"(?<=[.!?:\n])\s+|\n")


def _entities(text: str) -> list[str]:
    """Capitalised words that are not the first word of a sentence: names (a heuristic; no NER model here)."""
    text = re.sub(r"</?(?:think|answer)>", "\n", text)
    out = []
    for sentence in _SENTENCE.split(text):
        words = re.findall(r"[A-Za-z][\w']*", sentence)
        out.extend(w for w in words[1:] if w[0].isupper() and w != "I")
    return out


def _supported_numbers(text: str, sources: list[str]) -> tuple[list[Fraction], set[Fraction]]:
    """Numbers claimed in `text`, and those grounded: stated in a source, one arithmetic step from two
    grounded numbers, or the correct result of an equation in `text` whose operands are grounded."""
    grounded = {Fraction(n) for s in sources for n in _CLAIM_NUMBER.findall(s)}
    base = sorted(grounded)
    for a in base:
        for b in base:
            grounded |= {a + b, a - b, a * b}
            if b:
                grounded.add(a / b)
    for a, op, b, c in _EQUATION.findall(text):
        fa, fb, fc = Fraction(a), Fraction(b), Fraction(c)
        value = {"+": fa + fb, "-": fa - fb, "*": fa * fb, "x": fa * fb, "×": fa * fb,
                 "/": fa / fb if fb else None}[op]
        if fa in grounded and fb in grounded and value == fc:
            grounded.add(fc)
    return [Fraction(n) for n in _CLAIM_NUMBER.findall(text)], grounded


def grounding_reward(completions: Sequence[Completion], passage: Sequence[str],
                     prompt: Sequence[Any] | None = None, **_: Any) -> list[float]:
    """Minus the share of claims the source does not back: numbers neither in the passage (or prompt) nor
    derivable from it in one arithmetic step or by a correct stated equation, and capitalised names absent
    from it. 0.0 when every claim is grounded (or nothing is claimed, or the row has no passage), down to -1.0
    when none is."""
    passages = _column(passage, len(completions), "passage")
    prompts = _column(prompt, len(completions), "prompt") if prompt is not None else [""] * len(completions)
    out = []
    for c, src, q in zip(completions, passages, prompts, strict=True):
        if src is None:  # a task without a source passage (in a mixed batch): nothing to check against
            out.append(0.0)
            continue
        text = completion_text(c)
        sources = [str(src), completion_text(q) if isinstance(q, list) else str(q or "")]
        numbers, grounded = _supported_numbers(text, sources)
        source_text = " ".join(sources).casefold()
        entities = _entities(text)
        claims = len(numbers) + len(entities)
        unsupported = sum(n not in grounded for n in numbers)
        unsupported += sum(e.casefold() not in source_text for e in entities)
        out.append(-unsupported / claims if claims else 0.0)
    return out


def countdown_reward(completions: Sequence[Completion], numbers: Sequence[Sequence[int]],
                     target: Sequence[int], format_score: float = 0.1, **_: Any) -> list[float]:
    """TinyZero's countdown reward: 1.0 for an equation in the answer that uses each given number exactly once
    and equals the target, `format_score` for a well-formed equation that does not, 0.0 without one."""
    nums = _column(numbers, len(completions), "numbers")
    targets = _column(target, len(completions), "target")
    out = []
    for c, available, goal in zip(completions, nums, targets, strict=True):
        answer = extract_answer(completion_text(c))
        if answer is None:
            out.append(0.0)
            continue
        equation = answer.split("=", 1)[0]
        used = sorted(int(n) for n in re.findall(r"\d+", equation))
        try:
            value = evaluate_arithmetic(equation)
        except ValueError:
            out.append(0.0)
            continue
        ok = used == sorted(int(n) for n in available) and value == Fraction(goal)
        out.append(1.0 if ok else format_score)
    return out


def _steps(text: str) -> list[tuple[str, str]]:
    """The equalities a text states, whitespace inside a line ignored: each pair of neighbouring sides of each
    line, so "3 + 4 = 7" is one step and the chained "3 + 4 - 2 = 7 - 2 = 5" two."""
    out = []
    for line in text.splitlines():
        sides = [" ".join(side.split()) for side in line.split("=")]
        out += list(zip(sides, sides[1:], strict=False))
    return out


def steps_reward(completions: Sequence[Completion], solution: Sequence[str | None] | None = None,
                 **_: Any) -> list[float]:
    """Partial credit for a task with steps: the share of the worked `solution`'s steps (the equalities of its
    lines before the `#### value` line: "3 + 4 = 7" and "7 - 2 = 5", or "3 + 4 - 2 = 7 - 2" and "7 - 2 = 5" of a
    chained line "3 + 4 - 2 = 7 - 2 = 5") that the reasoning inside `<think>` states in the same place of a line.
    A two-step problem whose first step is right earns 0.5 even when the second is not, so a small model that
    half-knows the facts gets credit for each fact it uses well, not only for whole chains. Rows without a
    solution score 0."""
    n = len(completions)
    sols = _column(solution, n, "solution") if solution is not None else [None] * n
    out = []
    for c, sol in zip(completions, sols, strict=True):
        steps = _steps(sol.rsplit("####", 1)[0]) if sol else []
        text = completion_text(c)
        think = text.split("<think>", 1)[-1].split("</think>", 1)[0] if "<think>" in text else ""
        said = set(_steps(think))
        out.append(sum(step in said for step in steps) / len(steps) if steps else 0.0)
    return out


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "steps": steps_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "language": language_consistency_reward,
    "cosine": cosine_length_reward,
    "repetition": repetition_penalty,
    "soft_overlong": soft_overlong,
    "grounding": grounding_reward,
    "countdown": countdown_reward,
}


# --- combining rewards --------------------------------------------------------------------------------------

@dataclass
class WeightedReward:
    name: str
    weight: float
    fn: RewardFn


def build_rewards(weights: dict[str, float], params: dict[str, dict[str, Any]] | None = None,
                  extra: dict[str, RewardFn] | None = None) -> list[WeightedReward]:
    """Reward functions by registry name with their recipe weights; `params[name]` binds keyword parameters;
    `extra` adds callables (e.g. a trained reward model) under their own names."""
    registry = {**REWARDS, **(extra or {})}
    params = params or {}
    unknown = sorted((set(weights) | set(params)) - set(registry))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(registry)}")
    return [WeightedReward(name, float(w), partial(registry[name], **params.get(name, {})))
            for name, w in weights.items()]


def _call_safely(name: str, fn: RewardFn, completions: list[Completion], columns: dict[str, list[Any]]
                 ) -> list[float]:
    """Run one reward function; if it raises on the batch, score sample by sample so that only the samples
    that raise get 0.0, each logged with its text."""
    try:
        values = fn(completions, **columns)
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} rewards for {len(completions)} completions")
        return [0.0 if v is None else float(v) for v in values]
    except Exception:  # a reward bug must not end a long run: isolate the bad samples below
        pass
    out = []
    for i, c in enumerate(completions):
        try:
            value = fn([c], **{k: [v[i]] for k, v in columns.items()})[0]
            out.append(0.0 if value is None else float(value))
        except Exception as e:
            log.warning("reward %r raised %s: %s on completion %r (columns %r); scored 0", name,
                        type(e).__name__, e, completion_text(c)[:500], {k: v[i] for k, v in columns.items()})
            out.append(0.0)
    return out


def score(rewards: list[WeightedReward], completions: list[Completion], columns: dict[str, list[Any]],
          gate: Sequence[str] = ()) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted total per completion and each function's raw scores.

    `gate` names rewards that must be positive for the completion to earn anything: the total is multiplied by
    [every gate reward > 0]. A gate makes format a precondition rather than a bonus, so a policy cannot trade
    accuracy for cheap format points."""
    per_fn = {r.name: _call_safely(r.name, r.fn, completions, columns) for r in rewards}
    missing = sorted(set(gate) - set(per_fn))
    if missing:
        raise ValueError(f"gate reward(s) {missing} are not among the rewards {sorted(per_fn)}")
    totals = []
    for i in range(len(completions)):
        total = sum(r.weight * per_fn[r.name][i] for r in rewards)
        totals.append(total if all(per_fn[g][i] > 0 for g in gate) else 0.0)
    return totals, per_fn
