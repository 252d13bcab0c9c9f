"""Built-in task generators and corpus: answers recomputed by independent solvers, split disjointness,
decontamination against the curation stage's checker, formats and determinism."""

from __future__ import annotations

import itertools
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from nanoseek.data.synth import (
    R1_ZERO_TEMPLATE,
    TASKS,
    Problem,
    canonical_key,
    iter_problems,
    make_problems,
    parse_number,
    write_synth,
)

LEVELS = range(1, 6)
R1_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.S)
GSM8K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def problems(task: str, n: int = 60, split: str = "train") -> list[Problem]:
    return [p for d in LEVELS for p in make_problems(task, n, seed=7, difficulty=d, split=split)]


# ---------------------------------------------------------------------------------------------------------
# Independent solvers: read the question text only, never the generator's internals


def frac_eval(expr: str) -> Fraction:
    """Evaluate + - * / ( ) over integers exactly, by Python itself on Fraction literals."""
    assert re.fullmatch(r"[\d\s+\-*/()]+", expr), expr
    return eval(re.sub(r"\d+", lambda m: f"F({m.group()})", expr), {"F": Fraction})  # noqa: S307


def solve_arithmetic(question: str) -> Fraction:
    return frac_eval(re.search(r"[\d(][\d\s+\-*/()]*[\d)]", question).group())


def solve_word_problem(question: str) -> Fraction:
    value = None
    for sentence in re.split(r"(?<=[.?])\s+", question):
        if m := re.fullmatch(r"(\w+) (?:has|starts with|owns) (\d+) \w+\.", sentence):
            value = Fraction(int(m[2]))
        elif m := re.fullmatch(r"\w+ (?:gets|finds|buys) (\d+) more\.|\w+ gives \w+ (\d+) more\.", sentence):
            value += int(m[1] or m[2])
        elif m := re.fullmatch(r"\w+ (?:gives (\d+) to \w+|loses (\d+)|gives away (\d+)|takes (\d+) from \w+)\.",
                               sentence):
            value -= int(next(g for g in m.groups() if g))
        elif m := re.fullmatch(r"\w+ (?:buys|gives \w+) (\d+) \w+s of (\d+) \w+\.", sentence):
            value += int(m[1]) * int(m[2])
        elif m := re.fullmatch(r"If \w+ shares them equally among (\d+) friends, how many .*", sentence):
            value /= int(m[1])
        else:
            assert sentence.startswith("How many"), sentence
    return value


def solve_logic(question: str) -> str:
    """Entailment by brute force over 'types' (which terms an individual belongs to): a conclusion follows
    iff no individual allowed by the premises is a counterexample. Independent of the generator's graph search."""
    alls = re.findall(r"All (\w+) are (\w+)\.", question)
    nos = re.findall(r"No (\w+) are (\w+)\.", question)
    kind, x, y = re.search(r"that (all|no) (\w+) are (\w+)\?$", question).groups()
    terms = sorted({t for pair in alls + nos for t in pair})
    for bits in itertools.product([False, True], repeat=len(terms)):
        has = dict(zip(terms, bits, strict=True))
        if any(has[a] and not has[b] for a, b in alls) or any(has[a] and has[b] for a, b in nos):
            continue  # no individual of this type can exist
        if (kind == "all" and has[x] and not has[y]) or (kind == "no" and has[x] and has[y]):
            return "no"
    return "yes"


def solve_multihop(question: str) -> str:
    lives = dict(re.findall(r"(\w+) lives in (\w+)\.", question))
    country = dict(re.findall(r"(\w+) is in (\w+)\.", question))
    friend = dict(re.findall(r"(\w+)'s best friend is (\w+)\.", question))
    capital = dict(re.findall(r"The capital of (\w+) is (\w+)\.", question))
    if m := re.search(r"capital of the country where (\w+)'s best friend lives\?$", question):
        return capital[country[lives[friend[m[1]]]]]
    if m := re.search(r"does (\w+)'s best friend live", question):
        return country[lives[friend[m[1]]]]
    if m := re.search(r"(?:In which country does|Which country does) (\w+) live", question):
        return country[lives[m[1]]]
    m = re.search(r"(?:Where does|In which city does) (\w+) live\?$", question)
    return lives[m[1]]


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_recomputed_independently(task: str, split: str) -> None:
    for p in problems(task, 40, split):
        assert p.task == task and p.solution.endswith(f"\n#### {p.answer}"), p
        assert p.check(p.answer)
        if task == "arithmetic":
            assert solve_arithmetic(p.question) == Fraction(p.answer)
        elif task == "word_problems":
            assert solve_word_problem(p.question) == Fraction(p.answer), p.question
        elif task == "logic":
            assert solve_logic(p.question) == p.answer, p.question
        elif task == "multihop":
            assert solve_multihop(p.question) == p.answer, p.question
            assert p.passage and p.question.startswith(p.passage)
        else:  # countdown: the numbers and target are the question's, the expression uses each number once
            shown = [int(n) for n in re.findall(r"\d+", p.question)]
            assert sorted(shown) == sorted(p.numbers + [p.target])
            assert sorted(int(n) for n in re.findall(r"\d+", p.answer)) == sorted(p.numbers)
            assert frac_eval(p.answer) == p.target
        for para in p.paraphrases:  # a paraphrase is the same problem: the same answer
            if task == "word_problems":
                assert solve_word_problem(para) == Fraction(p.answer)
            elif task == "logic":
                assert solve_logic(para) == p.answer
            elif task == "multihop":
                assert solve_multihop(para) == p.answer


@pytest.mark.parametrize("task", ["arithmetic", "word_problems", "countdown"])
def test_worked_steps_are_true_equations(task: str) -> None:
    for p in problems(task, 30):
        steps = re.findall(r"(\d+) ([+\-*/]) (\d+) = (\d+)", p.steps)
        assert steps, p.solution
        for a, op, b, c in steps:
            assert frac_eval(f"{a} {op} {b}") == int(c), p.solution


def test_check_rejects_wrong_answers() -> None:
    for task in ("arithmetic", "word_problems"):
        for p in problems(task, 5):
            assert not p.check(str(int(p.answer) + 1)) and not p.check("") and not p.check("8 or 9")
            assert p.check(f"{p.answer}.0") and p.check(f" {p.answer} ")
    for p in problems("logic", 5):
        assert p.check(p.answer.upper() + ".") and not p.check({"yes": "no", "no": "yes"}[p.answer])
        assert not p.check("yes or no")
    for p in problems("multihop", 5):
        assert p.check(p.answer.lower()) and not p.check(p.answer + "ia") and not p.check("")
    for p in problems("countdown", 5):
        assert p.check(p.answer) and p.check(f"{p.answer} = {p.target}")
        first = p.numbers[0]
        assert not p.check(f"({p.answer}) + {first} - {first}")  # a number used twice
        assert not p.check(str(p.target)) and not p.check(f"{p.answer} + 1") and not p.check("__import__('os')")


def test_level_one_is_single_step_single_digit() -> None:
    for task in ("arithmetic", "word_problems", "countdown"):
        for p in make_problems(task, 200, seed=3, difficulty=1):
            numbers = [int(n) for n in re.findall(r"\d+", p.question)]
            operands = numbers if task != "countdown" else p.numbers
            assert all(n <= 9 for n in operands), p.question
            assert len(p.steps.splitlines()) == 1 and len(p.answer) <= 5, p
            assert len(p.question) <= 110, p.question


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_eval_are_disjoint(task: str) -> None:
    train = problems(task, 200, "train")
    evals = problems(task, 50, "eval")
    # arithmetic from level 2 partitions on the expression, operators included ("2 - 1 + 8" is not "2 + 1 - 8")
    def key(text: str) -> str:
        return " ".join(re.findall(r"\w+|[-+*/]", text.lower())) if task == "arithmetic" else canonical_key(text)

    train_keys = {key(t) for p in train for t in [p.question, *p.paraphrases]}
    eval_keys = {key(t) for p in evals for t in [p.question, *p.paraphrases]}
    assert not train_keys & eval_keys
    # and no 13-word window of an eval text appears in a training text (an independent, plain check)
    def grams(text: str) -> set[tuple[str, ...]]:
        w = re.findall(r"\w+", text.lower())
        return {tuple(w[i: i + 13]) for i in range(len(w) - 12)}

    eval_grams = set().union(*(grams(t) for p in evals for t in [p.question, p.solution, *p.paraphrases]))
    assert not any(grams(t) & eval_grams for p in train for t in [p.question, p.solution, *p.paraphrases])


def test_arithmetic_level_two_holds_out_whole_expressions() -> None:
    """Level 2 is what RL is judged on: its held-out problems are expressions training never shows, in any
    wording, while every fact they are built from is trained on; and there are enough of them for a 256-problem
    evaluation."""
    def expression(p) -> str:
        return " ".join(re.findall(r"\d+|[-+*/]", p.question))

    train = make_problems("arithmetic", 3000, seed=0, difficulty=2, split="train")
    evals = make_problems("arithmetic", 300, seed=0, difficulty=2, split="eval")
    assert len({expression(p) for p in evals}) == 300
    assert not {expression(p) for p in evals} & {expression(p) for p in train}
    facts = {line for p in train for line in p.steps.splitlines()}
    assert sum(all(line in facts for line in p.steps.splitlines()) for p in evals) >= 0.95 * len(evals)


def test_eval_sets_are_unique_and_seeded() -> None:
    a = make_problems("logic", 50, seed=1, difficulty=[1, 2], split="eval")
    assert a == make_problems("logic", 50, seed=1, difficulty=[1, 2], split="eval")
    assert a != make_problems("logic", 50, seed=2, difficulty=[1, 2], split="eval")
    assert len({p.question for p in a}) == 50 and [p.difficulty for p in a[:4]] == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="difficulty"):
        make_problems("logic", 1, difficulty=6)
    with pytest.raises(ValueError, match="unknown task"):
        make_problems("chess", 1)


def test_word_problem_windows_always_name_the_character() -> None:
    """The split argument for word problems: no 13-word window of a story or solution misses the main name."""
    for p in problems("word_problems", 200) + problems("word_problems", 50, "eval"):
        name = p.question.split()[0].lower()
        for text in [p.question, p.solution, *p.paraphrases]:
            words = re.findall(r"\w+", text.lower())
            assert all(name in words[i: i + 13] for i in range(len(words) - 12)), text


def test_problem_record_round_trip() -> None:
    p = make_problems("countdown", 1, seed=5, difficulty=3)[0]
    record = json.loads(json.dumps(p.to_dict()))
    assert Problem.from_dict(record) == p and record["id"] == p.uid
    with pytest.raises(ValueError, match="missing field"):
        Problem.from_dict({"question": "q"}, "x.jsonl:3")


def test_parse_number_reads_gsm8k_answers() -> None:
    if not GSM8K.exists():
        pytest.skip("GSM8K data not available")
    with open(GSM8K) as f:
        finals = [json.loads(line)["answer"].rsplit("####", 1)[1] for line in itertools.islice(f, 2000)]
    assert all(parse_number(v) is not None for v in finals)
    assert parse_number("1,234") == 1234 and parse_number("$5.50") == Fraction(11, 2) and parse_number("x") is None


# ---------------------------------------------------------------------------------------------------------
# The written data set


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, docs=400, seed=3, difficulty="1-3", sft=200, rl=200, eval_per_level=30)
    return out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_layout_and_records(synth_dir: Path) -> None:
    manifest = json.loads((synth_dir / "synth.json").read_text())
    docs = [r for f in sorted((synth_dir / "corpus").glob("*.jsonl")) for r in read(f)]
    assert len(docs) == 400 and len({d["id"] for d in docs}) == 400 and len({d["text"] for d in docs}) == 400
    assert {d["domain"] for d in docs} == {"general", "knowledge", "math_logic", "dialogue"}
    assert all(set(d) == {"id", "text", "source", "domain", "license"} and d["text"].strip() for d in docs)
    counts = manifest["counts"]["corpus"]
    assert counts == {k: sum(d["domain"] == k for d in docs) for k in counts}
    math_docs = [d["text"] for d in docs if d["domain"] == "math_logic"]
    assert any(R1_ZERO_TEMPLATE.split("\n")[0] in t and "<think>" in t for t in math_docs)
    assert any("\n#### " in t for t in math_docs)

    sft = read(synth_dir / "sft.jsonl")
    assert len(sft) == 200 and {r["style"] for r in sft} == {"reasoning", "instruct"}
    for r in sft:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
        first_reply = r["messages"][roles.index("assistant")]["content"]
        assert bool(R1_FORMAT.match(first_reply)) == (r["style"] == "reasoning"), r
    assert any(r["messages"][0]["role"] == "system" for r in sft) and any(len(r["messages"]) >= 4 for r in sft)

    rl = read(synth_dir / "rl.jsonl")
    assert len(rl) == 200 and {r["task"] for r in rl} == set(TASKS)
    for r in rl:
        p = Problem.from_dict(r)
        assert r["prompt"] == R1_ZERO_TEMPLATE.format(question=p.question) and p.check(p.answer)
    for task in TASKS:
        ev = [Problem.from_dict(r) for r in read(synth_dir / "eval" / f"{task}.jsonl")]
        assert len(ev) == 90 and {p.difficulty for p in ev} == {1, 2, 3}


def test_written_set_is_deterministic(synth_dir: Path, tmp_path: Path) -> None:
    write_synth(tmp_path, docs=400, seed=3, difficulty="1-3", sft=200, rl=200, eval_per_level=30)
    for f in sorted(synth_dir.rglob("*.json*")):
        assert f.read_bytes() == (tmp_path / f.relative_to(synth_dir)).read_bytes(), f


def test_training_text_passes_curation_decontamination(synth_dir: Path) -> None:
    """The curation stage's own checker, with the built-in eval splits and this run's eval files registered,
    and without its boilerplate allowance (every shared n-gram counts), flags no training text."""
    from nanoseek.data.curate import decontam

    config = decontam.DecontamConfig(builtin_per_level=50, builtin_seeds=(0, 3), max_item_frequency=10**9,
                                     paths=(str(synth_dir / "eval"),))
    index = decontam.load_index(config)
    texts = [r["text"] for f in (synth_dir / "corpus").glob("*.jsonl") for r in read(f)]
    texts += ["\n".join(m["content"] for m in r["messages"]) for r in read(synth_dir / "sft.jsonl")]
    texts += [r["question"] + "\n" + r["solution"] for r in read(synth_dir / "rl.jsonl")]
    flagged = [t for t, hit in zip(texts, index.match(texts), strict=True) if hit]
    assert not flagged, flagged[:3]
    # the checker is live: an eval problem pasted into a document is caught
    eval_problem = read(synth_dir / "eval" / "word_problems.jsonl")[-1]
    assert index.match(["Some homework. " + eval_problem["question"]])[0]


def test_no_near_duplicate_documents(synth_dir: Path) -> None:
    """datasketch MinHash LSH at the curation defaults (word 5-grams, 14 bands x 8 rows, Jaccard >= 0.72)."""
    datasketch = pytest.importorskip("datasketch")
    texts = [r["text"] for f in sorted((synth_dir / "corpus").glob("*.jsonl")) for r in read(f)]
    lsh = datasketch.MinHashLSH(threshold=0.72, num_perm=112, params=(14, 8))
    hashes = []
    for i, text in enumerate(texts):
        words = re.findall(r"\w+", text.lower())
        m = datasketch.MinHash(num_perm=112)
        for j in range(max(1, len(words) - 4)):
            m.update(" ".join(words[j: j + 5]).encode())
        lsh.insert(i, m)
        hashes.append(m)
    near = [i for i, m in enumerate(hashes) if any(j != i and m.jaccard(hashes[j]) >= 0.72 for j in lsh.query(m))]
    assert not near, [texts[i][:200] for i in near[:2]]


def test_iter_problems_reports_an_exhausted_level() -> None:
    stream = iter_problems("arithmetic", seed=0, difficulty=1, split="eval", unique=True)
    with pytest.raises(ValueError, match="unique eval problems"):
        for _ in range(5000):
            next(stream)


def test_fact_sheets_are_true_running_totals_that_hold_no_held_out_expression() -> None:
    from nanoseek.data.synth.corpus import fact_sheet
    from nanoseek.data.synth.tasks import spell_expression, split_of

    for seed in range(200):
        lines = fact_sheet(random.Random(seed)).splitlines()[1:]
        steps = [re.fullmatch(r"(\d+) ([-+]) (\d+) = (\d+)", line).groups() for line in lines]
        for a, op, b, c in steps:
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and 0 <= int(c) <= 18
        for (a, op, b, c), (a2, op2, b2, _) in zip(steps, steps[1:], strict=False):
            assert a2 == c  # each line starts from the last result
            assert split_of(spell_expression(f"{a} {op} {b} {op2} {b2}")) == "train"


def test_task_mix_weights_the_worked_problem_documents(tmp_path: Path) -> None:
    write_synth(tmp_path, docs=200, seed=1, difficulty="1-2", sft=10, rl=10, eval_per_level=10,
                mix={"math_logic": 1.0}, task_mix={"arithmetic": 3.0, "logic": 1.0}, game_share=0.0)
    sources = [json.loads(line)["source"] for line in (tmp_path / "corpus" / "math_logic.jsonl").open()]
    tasks = [s.split(":")[1] for s in sources]
    assert tasks.count("arithmetic") == 150 and tasks.count("logic") == 50
    assert any(s.endswith("arithmetic:facts") for s in sources)
    with pytest.raises(ValueError, match="task_mix"):
        write_synth(tmp_path / "bad", docs=20, task_mix={"chess": 1.0})
