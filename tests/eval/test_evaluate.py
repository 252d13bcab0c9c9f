"""`evaluate` / `nanoseek eval` end to end on a small random checkpoint, and its parts checked independently."""

import argparse
import json
import math

import pytest
import torch

from nanoseek.cli import main as cli
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.evaluate import Asker, _choice_task, add_arguments, evaluate, main, resolve_template
from nanoseek.eval.tasks import LETTERS, choice_prompt, load_task
from nanoseek.model.hf import load


@pytest.fixture(scope="module")
def result(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    r = evaluate(checkpoint, ["arithmetic", "multihop", "arithmetic_mc", "nim"], k=2, n=2, max_new_tokens=6,
                 games=2, batch=8, out=out, progress=False)
    return r, out


def test_result_structure(result):
    r, _ = result
    assert r["template"] == "r1_zero"  # no nanoseek.json: a pretrained base model
    assert list(r["tasks"]) == ["arithmetic", "multihop", "arithmetic_mc", "nim"]
    for name in ("arithmetic", "multihop"):
        m = r["tasks"][name]
        assert m["n"] == 2 and m["k"] == 2
        for key in ("pass@1", "pass@k", "maj@k", "format", "greedy", "consistency", "hallucination",
                    "hallucination_verified", "abstention"):
            assert 0.0 <= m[key] <= 1.0, key
        assert m["pass@1"] <= m["pass@k"]
        assert 0 < m["completion_tokens"] <= 6 and m["latency_s"] > 0 and m["tokens_per_s"] > 0
    assert "unsupported_claims" in r["tasks"]["multihop"]  # multi-hop problems carry a passage
    assert 0.0 <= r["tasks"]["arithmetic_mc"]["pass@1"] <= 1.0
    nim = r["tasks"]["nim"]
    assert nim["games"] == 2
    for opp in ("optimal", "random"):
        assert nim[f"win_vs_{opp}"] + nim[f"draw_vs_{opp}"] + nim[f"loss_vs_{opp}"] == pytest.approx(1.0)
        for key in ("win", "forfeit"):
            lo, hi = nim[f"{key}_vs_{opp}_ci"]
            assert 0.0 <= lo <= nim[f"{key}_vs_{opp}"] <= hi <= 1.0
    assert nim["moves"] >= 4  # at least one move per game, two matches of two games
    lo, hi = nim["optimal_move_rate_ci"]
    assert 0.0 <= lo <= nim["optimal_move_rate"] <= hi <= 1.0
    assert math.isfinite(r["bpb"]) and r["bpb"] > 0
    assert r["speed"]["tokens_per_s"] > 0 and r["speed"]["latency_b1_s"] > 0
    assert 0.0 <= r["speed"]["mtp_acceptance"] <= 1.0  # the debug preset has an MTP module


def test_results_and_samples_are_written(result):
    r, out = result
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(r))
    records = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    generated = [x for x in records if x["task"] in ("arithmetic", "multihop")]
    assert len(generated) == 2 * 2 * 2  # tasks × problems × samples
    assert all(set(x) >= {"id", "sample", "completion", "answer", "gold", "correct"} for x in generated)
    assert len([x for x in records if x["task"] == "arithmetic_mc"]) == 2
    # pass@1 is the mean correctness of the written samples; per problem, the mean of its k samples
    arith = [x for x in generated if x["task"] == "arithmetic"]
    m = r["tasks"]["arithmetic"]
    assert m["pass@1"] == pytest.approx(sum(x["correct"] for x in arith) / len(arith))
    ids = list(dict.fromkeys(x["id"] for x in arith))
    assert m["per_problem"]["ids"] == ids
    assert m["per_problem"]["pass@1"] == pytest.approx(
        [sum(x["correct"] for x in arith if x["id"] == i) / 2 for i in ids])
    for name in ("arithmetic", "multihop", "arithmetic_mc"):
        m = r["tasks"][name]
        lo, hi = m["pass@1_ci"]
        assert 0.0 <= lo <= m["pass@1"] <= hi <= 1.0
        assert len(m["per_problem"]["ids"]) == len(m["per_problem"]["pass@1"]) == m["n"]


def test_multiple_choice_scores_match_one_option_at_a_time(checkpoint):
    model, tok = load(checkpoint), Tokenizer.load(checkpoint)
    task = load_task("arithmetic_mc", n=3)
    metrics, records = _choice_task(model, tok, task, batch=5)  # batches cut across questions
    hits = 0
    for ex, rec in zip(task.examples, records, strict=True):
        prompt = tok.encode(choice_prompt(ex.question, ex.choices), bos=True)
        expected = []
        for i in range(len(ex.choices)):
            letter = tok.encode(" " + LETTERS[i])
            ids = torch.tensor([prompt + letter])
            with torch.no_grad():
                logp = model(ids[:, :-1]).float().log_softmax(-1)[0]
            expected.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(letter)))
        assert rec["logprobs"] == pytest.approx(expected, abs=1e-4)
        assert rec["answer"] == LETTERS[max(range(len(expected)), key=expected.__getitem__)]
        hits += rec["answer"] == ex.answer
    assert metrics["pass@1"] == pytest.approx(hits / 3)


def test_chat_template_completions_start_with_the_prefilled_think(checkpoint):
    model, tok = load(checkpoint), Tokenizer.load(checkpoint)
    gen = Asker(model, tok, "chat", batch=4, max_new_tokens=4, progress=False)
    outs = gen(["What is 2 + 2?", "What is 3 + 1?"], samples=2, temperature=1.0, seed=1)
    assert [len(o) for o in outs] == [2, 2]
    assert all(s.text.startswith("<think>\n") and 1 <= len(s.ids) <= 5 for o in outs for s in o)  # + a stop token
    again = gen(["What is 2 + 2?"], samples=2, temperature=1.0, seed=1)
    assert [s.text for s in again[0]] == [s.text for s in outs[0]]  # seeded per question, not per batch


@pytest.mark.parametrize(("meta", "expected"), [
    (None, "r1_zero"),
    ({"stage": "pretrain"}, "r1_zero"),
    ({"stage": "sft"}, "chat"),
    ({"stage": "grpo", "template": "r1_zero"}, "r1_zero"),
    ({"stage": "grpo", "recipe": {"grpo": {"template": "r1_zero"}}}, "r1_zero"),
])
def test_resolve_template(tmp_path, meta, expected):
    if meta is not None:
        (tmp_path / "nanoseek.json").write_text(json.dumps(meta))
    assert resolve_template(tmp_path, "auto") == expected
    assert resolve_template(tmp_path, "chat") == "chat"
    with pytest.raises(ValueError, match="unknown template"):
        resolve_template(tmp_path, "alpaca")


def test_bad_arguments(checkpoint):
    with pytest.raises(ValueError, match="must be >= 1"):
        evaluate(checkpoint, ["arithmetic"], k=0)
    with pytest.raises(ValueError, match="threshold"):
        evaluate(checkpoint, ["arithmetic"], threshold=1.5)
    with pytest.raises(FileNotFoundError):
        evaluate(checkpoint / "missing", ["arithmetic"])


def test_command_line(checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(checkpoint), "--tasks", "logic", "--k", "1", "--n", "1",
                              "--max-new-tokens", "2", "--template", "chat", "--no-bpb", "--out", str(tmp_path),
                              "--no-progress"])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "chat template" in printed and "logic" in printed and "pass@1" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["bpb"] is None and set(saved["tasks"]) == {"logic"} and saved["template"] == "chat"


def test_format_table_shows_intervals():
    from nanoseek.eval.evaluate import format_table

    result = {"tasks": {"arithmetic": {"pass@1": 0.412, "pass@1_ci": [0.371, 0.455], "maj@k": 0.5},
                        "nim": {"win_vs_random": 0.6, "win_vs_random_ci": [0.3, 0.9], "forfeit_vs_random": 0.1,
                                "optimal_move_rate": 0.25}},
              "bpb": None, "speed": {}}
    lines = format_table(result).splitlines()
    assert lines[0].split() == ["task", "pass@1", "maj@k", "win_vs_random", "forfeit_vs_random", "optimal_move_rate"]
    assert "0.412 [0.371, 0.455]" in lines[1] and "0.600 [0.300, 0.900]" in lines[2]
    assert len({len(x) for x in lines}) == 1  # aligned


def test_paired_models_see_the_same_problems_and_too_few_problems_fail_in_one_line(checkpoint, tmp_path, capsys):
    a = evaluate(checkpoint, ["logic"], k=2, n=3, max_new_tokens=4, seed=7, consistency=False, bpb=False,
                 progress=False)
    b = evaluate(checkpoint, ["logic"], k=2, n=3, max_new_tokens=4, seed=7, template="chat", bpb=False,
                 progress=False)
    assert a["tasks"]["logic"]["per_problem"]["ids"] == b["tasks"]["logic"]["per_problem"]["ids"]
    assert "consistency" not in a["tasks"]["logic"] and "consistency" in b["tasks"]["logic"]
    assert cli(["eval", "--model", str(checkpoint), "--tasks", "arithmetic", "--difficulty", "1", "--n", "100000",
                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nanoseek eval: error: arithmetic: only ") and "Traceback" not in err
