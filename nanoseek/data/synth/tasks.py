"""Verifiable reasoning tasks: one `Problem` shape shared by pretraining text, SFT, RL and evaluation.

Like nanochat's `tasks/`, every consumer reads the same objects: pretraining documents show worked solutions,
SFT turns them into conversations, RL uses the question as a prompt and the answer as the reward's gold value,
and evaluation scores held-out problems with the task's own `check`.

Five tasks, each with difficulty levels 1..5. Level 1 is one step with single-digit numbers and a short
answer, because a ~1-10M parameter model pretrained for a few CPU minutes can only partly master that (a trial
with operands up to 20 left the base model at ~6% pass@1, too low for RL to sharpen); higher levels add steps,
digits and distractors.

Train and eval splits are disjoint by construction, and far enough apart that n-gram decontamination (any
shared 13-word window, or a whole eval text of 8-12 words) finds nothing. A problem's split is picked by a hash
of the words of its partition text:
  - arithmetic, countdown, logic, multihop: the problem's structure in a fixed wording and order (the
    expression, the sorted numbers and target, the sorted premises, the sorted facts), so every re-wording or
    re-ordering of an eval problem, and every other question about eval premises or facts, stays in eval;
    logic terms and multihop names (people too) are drawn from ~10^5 made-up words, so different problems
    share no window;
  - word_problems: the main character's name. Every sentence of a story and of its worked solution names that
    character and none is long enough to leave a 13-word window without it, so every window of an eval problem
    holds an eval-only name in a role train problems never give it.
Problems too short for decontamination to see at all (question and solution under MIN_INDEXED_WORDS words,
e.g. "What is 3 + 5?") are partitioned on their wording instead: eval then holds new wordings of single-digit
facts rather than withholding a fifth of the 100 facts from training. Arithmetic from level 2 up is the
exception (`Task.wording_levels`): its expressions are many, so an eval expression ("3 + 4 - 2", in any wording)
never appears in training, while every fact it is built from does, in other expressions. That is the held-out
set RL is judged on: new problems, not new wordings of problems the policy trained on. Words are lower-cased
`\\w+` tokens, the units decontamination compares, so "3 + 5" and "3 - 5" fall on the same side. The corpus writer
also checks every training text against its eval files' n-grams and drops the rare coincidence.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import operator
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from nanoseek.data.synth.vocab import CONTAINERS, NAMES, OBJECTS, count_noun, nonsense_noun, place_name

EVAL_FRACTION = 0.2  # share of the partition-key hash space reserved for held-out evaluation
# n-gram decontamination ignores texts shorter than this many words (curate.decontam's min_words): a problem
# whose question and solution are both shorter cannot be flagged, so it is partitioned on its wording
MIN_INDEXED_WORDS = 8
SPLITS = ("train", "eval")

# The R1-Zero prompt (DeepSeek-R1 §2.2.1, shortened for small context windows). Pretraining documents use it
# verbatim so the base model has seen the format RL will ask for; the completion starts with "<think>".
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process and then gives the answer. The reasoning and the "
    "answer are enclosed within <think> </think> and <answer> </answer> tags.\nUser: {question}\nAssistant:\n"
)


def r1_zero_prompt(question: str) -> str:
    """The R1-Zero prompt for one question; the model's completion should start with `<think>`."""
    return R1_ZERO_TEMPLATE.format(question=question)


@dataclass
class Problem:
    """One task instance. `answer` is the canonical final value; `solution` is the worked steps ending in a
    GSM8K-style line `#### <answer>`. Optional fields carry what a task's reward or metric needs."""

    question: str
    answer: str
    solution: str
    task: str
    difficulty: int
    passage: str | None = None  # multihop: the facts the answer must be grounded in
    numbers: list[int] | None = None  # countdown: the numbers to use, each exactly once
    target: int | None = None  # countdown: the value to reach
    paraphrases: list[str] = field(default_factory=list)  # same problem, other wording: consistency checks

    @property
    def steps(self) -> str:
        """The worked steps without the final `#### <answer>` line."""
        return self.solution.rsplit("\n####", 1)[0]

    def reasoning(self) -> str:
        """The completion in R1 format: `<think>\\n steps \\n</think>\\n<answer>\\n value \\n</answer>`."""
        return f"<think>\n{self.steps}\n</think>\n<answer>\n{self.answer}\n</answer>"

    @property
    def uid(self) -> str:
        """A stable id from the task and canonical question, e.g. `arithmetic-1-3f2a9c0d11`."""
        digest = hashlib.blake2b(canonical_key(self.question).encode(), digest_size=5).hexdigest()
        return f"{self.task}-{self.difficulty}-{digest}"

    def check(self, prediction: str) -> bool:
        """Is `prediction` (an extracted final answer, not a whole completion) correct for this problem?"""
        return TASKS[self.task].check(self, prediction)

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.uid, **dataclasses.asdict(self)}
        return {k: v for k, v in d.items() if v is not None and v != []}

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str = "record") -> Problem:
        """Build a Problem from a JSON record, naming the missing or unknown field."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("question", "answer", "solution", "task", "difficulty") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        unknown = sorted(set(record) - names - {"id", "prompt"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}")
        return cls(**{k: v for k, v in record.items() if k in names})


# ---------------------------------------------------------------------------------------------------------
# Split partition


def canonical_key(text: str) -> str:
    """Lower-cased word tokens: two questions with the same words share a key (and therefore a split), even
    if they differ in punctuation or operators, so a 'near' twin of an eval question never lands in train."""
    return " ".join(re.findall(r"\w+", text.lower()))


def split_of(text: str) -> str:
    """'eval' for the EVAL_FRACTION of partition texts whose words hash into the eval bucket, else 'train'."""
    h = int.from_bytes(hashlib.blake2b(canonical_key(text).encode(), digest_size=8).digest(), "big")
    return "eval" if h % 10_000 < EVAL_FRACTION * 10_000 else "train"


# ---------------------------------------------------------------------------------------------------------
# Answer checking


def parse_number(text: str) -> Fraction | None:
    """'1,234', '$5', '8.0', '3/4', '-2' -> an exact Fraction; None when it is not a plain number."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").strip()
    if not re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _check_number(problem: Problem, prediction: str) -> bool:
    got = parse_number(prediction)
    return got is not None and got == parse_number(problem.answer)


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _check_words(problem: Problem, prediction: str) -> bool:
    return _words(prediction) == _words(problem.answer) != ""


_OPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}


def eval_expression(expr: str) -> tuple[Fraction, list[int]]:
    """Exactly evaluate `+ - * /` over non-negative integer literals; returns (value, literals used).
    Raises ValueError for anything else (names, calls, powers, unary minus, division by zero)."""
    expr = expr.replace("×", "*").replace("÷", "/").strip()
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from e
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"unsupported element {ast.dump(node)[:40]} in {expr!r}")

    return walk(tree.body), literals


def _check_countdown(problem: Problem, prediction: str) -> bool:
    """Correct iff the expression uses each given number exactly once and equals the target. A trailing
    '= target' is allowed ('3 + 5 = 8')."""
    expr = prediction.split("=")[0] if prediction.count("=") == 1 else prediction
    try:
        value, used = eval_expression(expr)
    except ValueError:
        return False
    return sorted(used) == sorted(problem.numbers or []) and value == problem.target


# ---------------------------------------------------------------------------------------------------------
# arithmetic: "What is 3 + 5?"

# level -> (operations, largest operand, operators allowed). Level 2 chains two level-1 steps (single digits, + and -
# only): every fact it needs is a level-1 fact or a "teen" fact, so a small model that half-knows them solves it
# sometimes, and each of its ~1,900 expressions is a problem of its own (see `wording_levels`).
_ARITH_LEVELS = {1: (1, 9, "+-"), 2: (2, 9, "+-"), 3: (2, 9, "+-*"), 4: (3, 20, "+-*"), 5: (4, 100, "+-*/")}
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "over"}
_ARITH_TEMPLATES = [
    "What is {e}?", "Compute {e}.", "Calculate {e}.", "Find the value of {e}.", "What does {e} equal?",
    "Work out {e}.", "Evaluate {e}.", "{e} = ?",
]


def _apply(op: str, a: int, b: int) -> int:
    """Integer `a op b`; callers only divide when the division is exact."""
    if op == "/":
        return a // b
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_chain(rng: random.Random, steps: int, hi: int, ops: str) -> tuple[str, list[str], int]:
    """A left-to-right chain of operations with non-negative integer intermediates.
    Returns (expression with the parentheses standard precedence needs, one line per step, value)."""
    lo = 0 if steps == 1 else 1  # zeros make multi-step chains degenerate ("0 + 0 - 0")
    value = rng.randint(lo, hi)
    expr, lines, prev_op = str(value), [], ""
    for _ in range(steps):
        choices = [o for o in ops if o != "/" or (value > 0 and any(value % d == 0 for d in range(2, 10)))]
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(lo, hi)
        elif op == "-":
            b = rng.randint(min(lo, value), min(value, hi))
        elif op == "*":
            b = rng.randint(2, min(9, max(2, hi)))
        else:
            b = rng.choice([d for d in range(2, 10) if value % d == 0])
        new = _apply(op, value, b)
        left = f"({expr})" if op in "*/" and prev_op in ("+", "-") else expr
        lines.append(f"{value} {op} {b} = {new}")
        expr, value, prev_op = f"{left} {op} {b}", new, op
    return expr, lines, value


def spell_expression(expr: str) -> str:
    """An arithmetic structure with its operators as words, the text its split is drawn from: word keys drop
    symbols, and "2 - 1 + 8" is not "2 + 1 - 8"."""
    return " ".join(_OP_WORDS.get(t, t) for t in expr.split())


# Each generator returns (problem, identity, partition): `identity` tells two problems apart whatever their
# wording (for unique eval sets), `partition` picks the split (module docstring).


def _gen_arithmetic(rng: random.Random, difficulty: int) -> tuple[Problem, str, str]:
    steps, hi, ops = _ARITH_LEVELS[difficulty]
    expr, lines, value = _arith_chain(rng, steps, hi, ops)
    templates = rng.sample(_ARITH_TEMPLATES, len(_ARITH_TEMPLATES))
    spelled = spell_expression(expr)
    return Problem(
        question=templates[0].format(e=expr), answer=str(value), solution="\n".join(lines) + f"\n#### {value}",
        task="arithmetic", difficulty=difficulty, paraphrases=[t.format(e=expr) for t in templates[1:]],
    ), spelled, spelled


# ---------------------------------------------------------------------------------------------------------
# word_problems: "Tom has 3 apples. Tom gets 5 more. How many apples does Tom have now?"

# level -> (events, largest number, group purchases allowed, ends by sharing equally)
_WORD_LEVELS = {1: (1, 9, False, False), 2: (2, 9, False, False), 3: (2, 20, True, False),
                4: (3, 50, True, False), 5: (3, 100, True, True)}
_STARTS = ["{n} has {c}.", "{n} starts with {c}.", "{n} owns {c}."]
_GAINS = ["{n} gets {k} more.", "{n} finds {k} more.", "{n} buys {k} more.", "{o} gives {n} {k} more."]
_LOSSES = ["{n} gives {k} to {o}.", "{n} loses {k}.", "{n} gives away {k}.", "{o} takes {k} from {n}."]
_GROUPS = ["{n} buys {k} {box}s of {m} {obj}.", "{o} gives {n} {k} {box}s of {m} {obj}."]
_QUESTIONS = ["How many {obj} does {n} have now?", "How many {obj} does {n} have in the end?",
              "How many {obj} does {n} have?"]
_SHARE = "If {n} shares them equally among {k} friends, how many {obj} does each of {n}'s friends get?"


def _gen_word_problem(rng: random.Random, difficulty: int) -> tuple[Problem, str, str]:
    n_events, hi, groups, share = _WORD_LEVELS[difficulty]
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    box = rng.choice(CONTAINERS)
    value = rng.randint(1, hi)
    start = value
    events: list[tuple[str, int, int]] = []  # (kind, k, m)
    lines: list[str] = []  # worked steps; each names the character, like the story (module docstring)

    def step(expr: str, new: int) -> None:
        lines.append(f"{name} has {expr} = {count_noun(new, obj)}.")

    for _ in range(n_events):
        kinds = ["gain", "lose"] + (["group"] if groups else [])
        kind = rng.choice(kinds if value > 0 else [k for k in kinds if k != "lose"])
        if kind == "gain":
            k, m = rng.randint(1, hi), 0
            step(f"{value} + {k}", value + k)
            value += k
        elif kind == "lose":
            k, m = rng.randint(1, value), 0
            step(f"{value} - {k}", value - k)
            value -= k
        else:
            k, m = rng.randint(2, 5), rng.randint(2, 9)
            lines.append(f"{name} gets {k} * {m} = {count_noun(k * m, obj)}.")
            step(f"{value} + {k * m}", value + k * m)
            value += k * m
        events.append((kind, k, m))
    friends = 0
    if share:
        divisors = [d for d in range(2, 10) if value % d == 0]
        if not divisors:  # top up so the sharing step divides exactly
            k = (-value) % 4 or 4
            events.append(("gain", k, 0))
            step(f"{value} + {k}", value + k)
            value += k
            divisors = [d for d in range(2, 10) if value % d == 0]
        friends = rng.choice(divisors)
        lines.append(f"Each of {name}'s friends gets {value} / {friends} = {count_noun(value // friends, obj)}.")
        value //= friends

    def render(pick: Callable[[list[str]], str]) -> str:
        parts = [pick(_STARTS).format(n=name, c=count_noun(start, obj))]
        for kind, k, m in events:
            pool = {"gain": _GAINS, "lose": _LOSSES, "group": _GROUPS}[kind]
            parts.append(pick(pool).format(n=name, o=other, k=k, m=m, box=box, obj=obj[1]))
        if share:
            parts.append(_SHARE.format(n=name, k=friends, obj=obj[1]))
        else:
            parts.append(pick(_QUESTIONS).format(n=name, obj=obj[1]))
        return " ".join(parts)

    return Problem(
        question=render(rng.choice), answer=str(value), solution="\n".join(lines) + f"\n#### {value}",
        task="word_problems", difficulty=difficulty, paraphrases=[render(rng.choice) for _ in range(6)],
    ), render(lambda pool: pool[0]), name


# ---------------------------------------------------------------------------------------------------------
# logic: syllogisms over made-up terms, valid and invalid inferences

# level -> (chain premises, distractor premises, 'no' premises allowed, shuffled premise order)
_LOGIC_LEVELS = {1: (2, 0, False, False), 2: (3, 0, False, False), 3: (3, 1, False, True),
                 4: (4, 2, True, True), 5: (5, 3, True, True)}
_LOGIC_ASK = ["Does it follow that {q}?", "Can we conclude that {q}?"]


def _reach(edges: list[tuple[str, str]], start: str) -> dict[str, str | None]:
    """Terms reachable from `start` along 'all X are Y' edges, with the predecessor for path recovery."""
    prev: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        x = frontier.pop()
        for a, b in edges:
            if a == x and b not in prev:
                prev[b] = x
                frontier.append(b)
    return prev


def _path(edges: list[tuple[str, str]], a: str, b: str) -> list[tuple[str, str]]:
    prev = _reach(edges, a)
    out, node = [], b
    while prev[node] is not None:
        out.append((prev[node], node))
        node = prev[node]
    return out[::-1]


def _gen_logic(rng: random.Random, difficulty: int) -> tuple[Problem, str, str]:
    n_chain, n_distract, use_no, shuffle = _LOGIC_LEVELS[difficulty]
    want = rng.random() < 0.5  # valid or invalid inference, half each
    while True:
        terms = list(dict.fromkeys(nonsense_noun(rng) for _ in range(n_chain + 1 + n_distract + 2)))
        if len(terms) < n_chain + 1 + n_distract + 2:
            continue
        chain, spare = terms[: n_chain + 1], terms[n_chain + 1:]
        alls = [(chain[i], chain[i + 1]) for i in range(n_chain)]
        nos: list[tuple[str, str]] = []
        if difficulty == 1 and not want and rng.random() < 0.5:
            alls = [(chain[0], chain[1]), (chain[2], chain[1])]  # all A are B, all C are B: undistributed middle
        for _ in range(n_distract):
            known = sorted({t for e in alls for t in e})
            new = spare.pop()
            alls.append((new, rng.choice(known)) if rng.random() < 0.5 else (rng.choice(known), new))
        known = sorted({t for e in alls for t in e})
        if use_no:
            p, q = rng.sample(known, 2)
            nos.append((p, q))
        up = {t: set(_reach(alls, t)) for t in known}
        # a term forced empty (all X are P and all X are Q while no P are Q) makes every claim about it vacuously
        # true; such premise sets confuse more than they teach, so draw again
        if any(p in up[t] and q in up[t] for t in known for p, q in nos):
            continue
        ask_no = use_no and rng.random() < 0.5
        pairs = [(x, y) for x in known for y in known if x != y]
        if ask_no:  # "no x are y" follows iff the smallest set of terms holding both x and y contains a 'no' pair
            matching = [(x, y) for x, y in pairs
                        if any(p in up[x] | up[y] and q in up[x] | up[y] for p, q in nos) == want]
        else:  # "all x are y" follows iff a chain of 'all' premises leads from x to y
            matching = [(x, y) for x, y in pairs if (y in up[x]) == want]
            if want:  # prefer conclusions that need at least two premises
                matching = [(x, y) for x, y in matching if len(_path(alls, x, y)) >= 2] or matching
        if matching:
            break
    x, y = rng.choice(matching)
    premises = [f"All {a} are {b}." for a, b in alls] + [f"No {p} are {q}." for p, q in nos]
    claim = f"no {x} are {y}" if ask_no else f"all {x} are {y}"
    if want and not ask_no:
        lines = [f"All {a} are {b}." for a, b in _path(alls, x, y)] + [f"So {claim}."]
    elif want:
        p, q = next((p, q) for p, q in nos if {p, q} <= up[x] | up[y])
        if p not in up[x]:
            p, q = q, p
        lines = [f"All {a} are {b}." for a, b in _path(alls, x, p)] + [f"No {p} are {q}."]
        lines += [f"All {a} are {b}." for a, b in _path(alls, y, q)] + [f"So {claim}."]
    elif ask_no:
        lines = [f"Nothing in the premises keeps {x} and {y} apart."]
    else:
        lines = [f"No chain of premises leads from {x} to {y}."]
    answer = "yes" if want else "no"

    def render(r: random.Random, order: list[str]) -> str:
        return " ".join(order) + " " + r.choice(_LOGIC_ASK).format(q=claim)

    if shuffle:
        rng.shuffle(premises)
    question = render(rng, premises)
    paraphrases = [render(rng, rng.sample(premises, len(premises))) for _ in range(4)]
    # partitioned on the premise set: every claim about eval premises, in any order, is an eval problem
    return Problem(question=question, answer=answer, solution="\n".join(lines) + f"\n#### {answer}", task="logic",
                   difficulty=difficulty, paraphrases=paraphrases), " ".join(sorted(premises)) + " " + claim, \
        " ".join(sorted(premises))


# ---------------------------------------------------------------------------------------------------------
# multihop: follow a chain of facts in a short passage

# level -> (hops, distractor facts, shuffled passage)
_HOP_LEVELS = {1: (1, 1, True), 2: (2, 1, False), 3: (2, 3, True), 4: (3, 3, True), 5: (4, 4, True)}
_COUNTRY_ENDINGS = ["ia", "land", "or", "mar"]


def _gen_multihop(rng: random.Random, difficulty: int) -> tuple[Problem, str, str]:
    hops, n_distract, shuffle = _HOP_LEVELS[difficulty]
    # every entity, people included, gets a distinct made-up name: with ~10^5 names two passages practically
    # never share a fact, so an eval passage's words never turn up in training text
    names: list[str] = []
    while len(names) < 15:
        p = place_name(rng)
        if p not in names:
            names.append(p)
    people, cities, capitals = names[:6], names[6:9], names[9:12]
    countries = [c.rstrip("aeiou") + rng.choice(_COUNTRY_ENDINGS) for c in names[12:15]]
    p0, friend = people[0], people[1]
    # the chain, from the question's entity to the answer
    person = friend if hops >= 3 else p0
    facts = []
    if hops >= 3:
        facts.append(f"{p0}'s best friend is {friend}.")
    facts.append(f"{person} lives in {cities[0]}.")
    if hops >= 2:
        facts.append(f"{cities[0]} is in {countries[0]}.")
    if hops >= 4:
        facts.append(f"The capital of {countries[0]} is {capitals[0]}.")
    answer = {1: cities[0], 2: countries[0], 3: countries[0], 4: capitals[0]}[hops]
    chain = list(facts)
    # distractors: the same relations about other entities, so only the chain answers the question
    pool = [f"{people[2]} lives in {cities[1]}.", f"{cities[1]} is in {countries[1]}.",
            f"{people[3]}'s best friend is {people[4]}.", f"{people[4]} lives in {cities[2]}.",
            f"The capital of {countries[1]} is {capitals[1]}.", f"{cities[2]} is in {countries[2]}."]
    facts += rng.sample(pool, n_distract)
    ask = {1: [f"Where does {p0} live?", f"In which city does {p0} live?"],
           2: [f"In which country does {p0} live?", f"Which country does {p0} live in?"],
           3: [f"In which country does {p0}'s best friend live?", f"Which country does {p0}'s best friend live in?"],
           4: [f"What is the capital of the country where {p0}'s best friend lives?"]}[hops]

    def render(r: random.Random, order: list[str]) -> str:
        return " ".join(order) + " " + r.choice(ask)

    if shuffle:
        rng.shuffle(facts)
    passage = " ".join(facts)
    question = render(rng, facts)
    paraphrases = [render(rng, rng.sample(facts, len(facts))) for _ in range(4)]
    return Problem(question=question, answer=answer, solution="\n".join(chain) + f"\n#### {answer}",
                   task="multihop", difficulty=difficulty, passage=passage, paraphrases=paraphrases), \
        " ".join(sorted(facts)), " ".join(sorted(facts))


# ---------------------------------------------------------------------------------------------------------
# countdown: reach a target with + - * /, each number used once

# level -> (how many numbers, largest number, operators)
_COUNTDOWN_LEVELS = {1: (2, 9, "+-*"), 2: (3, 9, "+-*"), 3: (3, 20, "+-*/"), 4: (4, 25, "+-*/"),
                     5: (4, 100, "+-*/")}
# Short on purpose: the rules (each number once, + - * /) are the task's, as in the game; TinyZero's long
# instruction would dominate a small model's context.
_COUNTDOWN_ASK = ["Make {t} from {nums}.", "Use {nums} to make {t}.", "Reach {t} with {nums}.",
                  "Combine {nums} to get {t}."]
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(op: str, a: tuple[int, str, int], b: tuple[int, str, int]) -> tuple[int, str, int]:
    """(value, expression, precedence) of `a op b`, with only the parentheses the expression needs."""
    p = _PREC[op]
    left = f"({a[1]})" if a[2] < p else a[1]
    right = f"({b[1]})" if b[2] < p or (b[2] == p and op in "-/") else b[1]
    return _apply(op, a[0], b[0]), f"{left} {op} {right}", p


def _gen_countdown(rng: random.Random, difficulty: int) -> tuple[Problem, str, str]:
    count, hi, ops = _COUNTDOWN_LEVELS[difficulty]
    while True:
        numbers = [rng.randint(1, hi) for _ in range(count)]
        items = [(n, str(n), 3) for n in numbers]
        lines = []
        while len(items) > 1:
            i, j = rng.sample(range(len(items)), 2)
            a, b = items[i], items[j]
            allowed = [o for o in ops if (o != "-" or a[0] > b[0]) and (o not in "*/" or 1 not in (a[0], b[0]))
                       and (o != "/" or a[0] % b[0] == 0)]
            op = rng.choice(allowed)
            c = _combine(op, a, b)
            lines.append(f"{a[0]} {op} {b[0]} = {c[0]}")
            items = [it for k, it in enumerate(items) if k not in (i, j)] + [c]
        target, expr = items[0][0], items[0][1]
        if 0 < target <= 1000 and target not in numbers:
            break
    shown = rng.sample(numbers, len(numbers))
    nums = ", ".join(map(str, shown[:-1])) + f" and {shown[-1]}"
    templates = rng.sample(_COUNTDOWN_ASK, len(_COUNTDOWN_ASK))
    return Problem(
        question=templates[0].format(nums=nums, t=target), answer=expr, solution="\n".join(lines) + f"\n#### {expr}",
        task="countdown", difficulty=difficulty, numbers=shown, target=target,
        paraphrases=[t.format(nums=nums, t=target) for t in templates[1:]],
    ), f"{sorted(numbers)} {target}", f"{sorted(numbers)} {target}"


# ---------------------------------------------------------------------------------------------------------
# Registry and sampling


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    # (rng, difficulty) -> (problem of either split, identity, partition): see the generators' comment
    generate: Callable[[random.Random, int], tuple[Problem, str, str]]
    check: Callable[[Problem, str], bool]  # (problem, extracted answer) -> correct?
    levels: int = 5
    # levels whose problems too short for decontamination are partitioned on their wording (module docstring);
    # at the other levels they are partitioned on their structure like longer ones
    wording_levels: tuple[int, ...] = (1, 2, 3, 4, 5)


TASKS: dict[str, Task] = {
    t.name: t for t in [
        Task("arithmetic", "evaluate an expression: 1 step of single digits up to 4 steps with 3 digits",
             _gen_arithmetic, _check_number, wording_levels=(1,)),
        Task("word_problems", "GSM8K-style stories: 1 gain or loss of single digits up to 3 steps and sharing",
             _gen_word_problem, _check_number),
        Task("logic", "syllogisms over made-up terms: does the conclusion follow? (yes/no)", _gen_logic,
             _check_words),
        Task("multihop", "follow 1-4 facts in a short passage (with distractors) to a name", _gen_multihop,
             _check_words),
        Task("countdown", "reach a target from 2-4 numbers with + - * /, each used once", _gen_countdown,
             _check_countdown),
    ]
}


def _levels(task: str, difficulty: int | Sequence[int]) -> list[int]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    levels = [difficulty] if isinstance(difficulty, int) else list(difficulty)
    bad = [d for d in levels if not (isinstance(d, int) and 1 <= d <= TASKS[task].levels)]
    if not levels or bad:
        raise ValueError(f"{task}: difficulty must be in 1..{TASKS[task].levels}, got {difficulty!r}")
    return levels


def iter_problems(task: str, seed: int = 0, difficulty: int | Sequence[int] = 1, split: str = "train",
                  unique: bool = False) -> Iterator[Problem]:
    """An endless, seeded stream of `split` problems; levels taken in turn so any prefix is balanced.
    `unique` skips repeats of a problem (the same structure, or for short problems the same words)."""
    levels = _levels(task, difficulty)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{task}|{split}|{seed}|{levels}")
    seen: set[str] = set()
    made, misses = 0, 0
    while True:
        level = levels[made % len(levels)]
        problem, identity, partition = TASKS[task].generate(rng, level)
        texts = (problem.question, problem.solution)
        by_wording = level in TASKS[task].wording_levels and \
            all(len(canonical_key(t).split()) < MIN_INDEXED_WORDS for t in texts)
        if by_wording:
            identity = partition = problem.question
        key = canonical_key(identity)
        if split_of(partition) != split or (unique and key in seen):
            misses += 1
            if misses > 20_000 + 100 * made:
                raise ValueError(f"{task}: only {made} unique {split} problems found at difficulty {levels}; "
                                 "ask for fewer or add levels")
            continue
        seen.add(key)
        wordings = {canonical_key(problem.question)}
        kept = []
        for p in problem.paraphrases:  # a re-wording partitioned on its own words must fall in the same split
            k = canonical_key(p)
            if k not in wordings and (not by_wording or split_of(k) == split):
                wordings.add(k)
                kept.append(p)
                if len(kept) == 3:
                    break
        problem.paraphrases = kept
        made += 1
        yield problem


def make_problems(task: str, n: int, seed: int = 0, difficulty: int | Sequence[int] = 1, split: str = "train",
                  unique: bool | None = None) -> list[Problem]:
    """`n` problems of `task` from `split` ('train' or 'eval'), levels `difficulty` (an int or a list, mixed in
    turn). Eval problems are unique by default; train problems may repeat when the level's space is small."""
    stream = iter_problems(task, seed, difficulty, split, unique=(split == "eval") if unique is None else unique)
    return [next(stream) for _ in range(n)]
