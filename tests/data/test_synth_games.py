"""Game transcripts in the built-in data: every move legal, optimal where a winning move exists, in the exact
question/answer exchange the evaluator uses, and written into the corpus and SFT conversations."""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

import pytest

from nanoseek.data.synth import R1_ZERO_TEMPLATE, write_synth
from nanoseek.data.synth.games import NIM_DOCUMENTS, Nim, NimState, game_document, game_sft_record, nim_completion
from nanoseek.rewards import extract_answer

R1_FORMAT = re.compile(r"^<think>\n[^\n]+\n</think>\n<answer>\n\d+ \d+\n</answer>$")


@functools.cache
def wins(heaps: tuple[int, ...]) -> bool:
    """Brute force, no nim-sum theory: does the player to move win?"""
    return any(not wins(tuple(sorted(heaps[:i] + (h - k,) + heaps[i + 1:])))
               for i, h in enumerate(heaps) for k in range(1, h + 1))


def heaps_of(question: str) -> tuple[int, ...]:
    """The position read back from the question text alone."""
    found = re.findall(r"heap (\d+) has (\d+)", question)
    assert [int(i) for i, _ in found] == list(range(1, len(found) + 1)), question
    return tuple(int(h) for _, h in found)


def check_exchange(question: str, completion: str) -> None:
    """The answer parses to a legal move of the described position, and wins when a win exists."""
    heaps = heaps_of(question)
    assert question == Nim().describe(NimState(heaps))
    assert R1_FORMAT.match(completion), completion
    move = Nim().parse_move(extract_answer(completion))
    assert move is not None and move in Nim().moves(NimState(heaps)), (heaps, completion)
    i, k = move
    after = tuple(sorted(heaps[:i] + (heaps[i] - k,) + heaps[i + 1:]))
    if wins(tuple(sorted(heaps))):
        assert not wins(after), (heaps, completion)  # the move leaves the opponent lost
    else:
        assert k == 1 and heaps[i] == max(heaps) and "is the largest" in completion
    # the reasoning restates the heaps as a XOR chain, copies the chosen heap's size by its label and names the
    # move it answers with, heap then how many
    chain = " xor ".join(map(str, heaps))
    assert re.match(rf"<think>\n{chain} = \d+\. Heap {i + 1}: {heaps[i]} .*, take {k}\.\n</think>", completion), \
        completion


def exchanges(text: str) -> list[tuple[str, str]]:
    return re.findall(r"User: (.*?)\nAssistant:\n(<think>.*?</answer>)", text, re.S)


def test_documents_are_one_exchange_that_fits_a_row() -> None:
    rng = random.Random(0)
    seen, shapes = set(), set()
    for _ in range(300):
        source, text = game_document(rng)
        assert source == "nanoseek-synth:nim:r1"
        preamble = R1_ZERO_TEMPLATE.split("User:")[0]
        shapes.add(text.startswith(preamble))
        assert text.startswith((preamble + "User: ", "User: "))
        pairs = exchanges(text)
        assert len(pairs) == text.count("User:") == 1 and text.endswith("</answer>")
        question, completion = pairs[0]
        check_exchange(question, completion)
        seen.add(heaps_of(question))
        # one 128-token pretraining row holds the whole exchange: with the run's tokenizer it is <= 125 tokens,
        # about one per word or punctuation mark here (a tag such as <think> counts 3 here, 1 there)
        assert len(re.findall(r"\w+|[^\w\s]", text)) <= 122, text
    assert shapes == {True, False}  # the R1-Zero template and its last lines alone
    evaluated = {h for h in seen if max(h) <= 5}
    assert len(seen) > 150 and len(evaluated) > 80 and any(max(h) > 5 for h in seen) and any(0 in h for h in seen)


def test_short_documents_are_not_near_duplicates() -> None:
    """Curation's MinHash filter links documents whose word 5-grams overlap by ~0.64 or more: documents of
    different positions in the short shape stay well below it, so they survive deduplication."""
    def shingles(text: str) -> set[str]:
        words = re.findall(r"\w+", text.lower())
        return {" ".join(words[i:i + 5]) for i in range(len(words) - 4)}

    rng = random.Random(2)
    docs = {text for text in (game_document(rng)[1] for _ in range(200)) if not text.startswith("A ")}
    sets = [shingles(text) for text in docs]
    assert len(sets) > 50
    assert max(len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:]) < 0.5


def test_sft_records_are_chat_exchanges() -> None:
    rng = random.Random(1)
    seen = set()
    for _ in range(200):
        r = game_sft_record(rng)
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["style"] == "reasoning" and r["task"] == "nim"
        check_exchange(r["messages"][0]["content"], r["messages"][1]["content"])
        assert extract_answer(r["messages"][1]["content"]) == r["answer"]
        seen.add(heaps_of(r["messages"][0]["content"]))
    assert any(0 in h for h in seen) and len(seen) > 50  # mid-game positions too, not only starts


def test_every_position_explained_and_round_tripped() -> None:
    nim = Nim()
    for heaps in ((a, b, c) for a in range(6) for b in range(6) for c in range(6) if a or b or c):
        state = NimState(heaps)
        assert heaps_of(nim.describe(state)) == heaps
        check_exchange(nim.describe(state), nim_completion(state, nim))
        for move in nim.moves(state):
            assert nim.parse_move(nim.format_move(move)) == move


@pytest.mark.parametrize(("text", "move"), [
    ("2 1", (1, 1)), ("2, 1", (1, 1)), (" 2  1 ", (1, 1)), ("heap 2, take 1", (1, 1)), ("heap 2 take 1", (1, 1)),
    ("take 1 from heap 2", (1, 1)), ("Heap 3: take 4", (2, 4)), ("heap2, take1", (1, 1)),
    ("2", None), ("1 2 3", None), ("heap 1 or heap 2, take 1", None), ("take 1", None), ("heap 2, 1", None),
    ("", None), ("two one", None),
])
def test_parse_move_is_robust_but_takes_no_non_moves(text: str, move: tuple[int, int] | None) -> None:
    assert Nim().parse_move(text) == move


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_writer_includes_game_transcripts(tmp_path: Path) -> None:
    manifest = write_synth(tmp_path, docs=200, seed=1, difficulty="1", sft=100, rl=10, eval_per_level=10,
                           game_share=0.2)
    math = read(tmp_path / "corpus" / "math_logic.jsonl")
    games = [d for d in math if d["source"] == "nanoseek-synth:nim:r1"]
    assert len(games) == round(len(math) * 0.2) and manifest["game_share"] == 0.2
    assert sum(d["source"].startswith("nanoseek-synth:nim") for d in math) == len(games)
    for d in games:
        for question, completion in exchanges(d["text"]):
            check_exchange(question, completion)
    sft = read(tmp_path / "sft.jsonl")
    nim = [r for r in sft if r.get("task") == "nim"]
    assert len(nim) == 20 and len(sft) == 100
    assert [i for i, r in enumerate(sft) if r.get("task") == "nim"] != list(range(80, 100))  # spread, not a block
    write_synth(tmp_path / "none", docs=50, seed=1, difficulty="1", sft=20, rl=5, eval_per_level=5, game_share=0.0)
    assert not any("Nim:" in d["text"] for d in read(tmp_path / "none" / "corpus" / "math_logic.jsonl"))
    with pytest.raises(ValueError, match="game_share"):
        write_synth(tmp_path / "bad", docs=10, game_share=1.5)


def test_corpus_holds_each_distinct_document_at_most_once(tmp_path: Path) -> None:
    """More game slots than distinct documents: the writer caps them (NIM_DOCUMENTS) instead of redrawing
    duplicates forever, and gives the rest to worked problems."""
    write_synth(tmp_path, docs=NIM_DOCUMENTS + 40, seed=0, difficulty="1", sft=10, rl=5, eval_per_level=5,
                mix={"math_logic": 1.0}, game_share=1.0)
    math = read(tmp_path / "corpus" / "math_logic.jsonl")
    games = [d["text"] for d in math if d["source"] == "nanoseek-synth:nim:r1"]
    assert len(games) == len(set(games)) == NIM_DOCUMENTS and len(math) == NIM_DOCUMENTS + 40
