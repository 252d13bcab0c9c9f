"""Rejection sampling's filters and output, and distillation into a student (with logit distillation)."""

import json
import random

import pytest
import torch

import nanoseek
from nanoseek.data.synth.games import game_sft_record
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.rollout import Sample, record_prompt
from nanoseek.model import Transformer
from nanoseek.posttrain.distill import distill, is_nanoseek_checkpoint
from nanoseek.posttrain.rejection import FilterConfig, mixed_in_records, reject_reason, rejection, select, sft_record
from nanoseek.posttrain.sft import sft
from nanoseek.train.metrics import read_metrics


def r1(think, answer):
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


@pytest.fixture()
def prompt(policy_dir):
    record = {"question": "What is 2 + 2?", "answer": "4", "task": "arithmetic"}
    return record_prompt(Tokenizer.load(policy_dir), record, "chat", "test")


@pytest.mark.parametrize(("text", "truncated", "reason"), [
    (r1("2 + 2 = 4", "4"), False, None),
    (r1("2 + 2 = 4", "4"), True, "overlong"),
    (r1("2 + 2 = 5", "5"), False, "incorrect"),
    ("<think>\n2 + 2 = 4\n</think>\n4 <answer>4</answer>", False, "format"),
    (r1("二加二 is four", "4"), False, "mixed_language"),
    (r1("add add add add add add add add two", "4"), False, "repetition"),
    (r1("```python\nprint(2 + 2)\n```", "4"), False, "code_block"),
    (r1(" ".join(f"step{i}" for i in range(60)), "4"), False, "long_paragraph"),
])
def test_reject_reason(prompt, text, truncated, reason):
    f = FilterConfig(max_paragraph_chars=200, max_repetition=0.3)
    assert reject_reason(Sample(prompt, [1] * 10, text, truncated), f) == reason


def test_select_keeps_distinct_answers_up_to_the_limit(prompt):
    good, other = r1("2 + 2 = 4", "4"), r1("two and two make 4", "4")
    group = [Sample(prompt, [1], t, False) for t in (good, good, other, r1("x", "5"))]
    kept, counts = select([group], FilterConfig(), keep_per_prompt=2)
    assert [s.text for s in kept] == [good, other]
    assert counts == {"kept": 2, "duplicate_or_surplus": 1, "incorrect": 1}
    kept, _ = select([group], FilterConfig(), keep_per_prompt=1)
    assert len(kept) == 1
    record = sft_record(kept[0])
    assert record["messages"][0] == {"role": "user", "content": "What is 2 + 2?"}
    assert record["messages"][1]["content"] == good and record["style"] == "reasoning"


def test_distill_trains_a_fresh_student_with_logit_distillation(policy_dir, tmp_path):
    # a teacher that answers one question; its verified samples are given as data.jsonl (stage 1's output)
    out = tmp_path / "distill"
    out.mkdir()
    convs = [{"messages": [{"role": "user", "content": f"What is {a} + 2?"},
                           {"role": "assistant", "content": r1(f"{a} + 2 = {a + 2}", a + 2)}], "style": "reasoning"}
             for a in range(8)]
    (out / "data.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    assert is_nanoseek_checkpoint(policy_dir) and not is_nanoseek_checkpoint(tmp_path)
    recipe = {"distill": {"student_preset": "debug", "logit_alpha": 0.5, "logit_temperature": 2.0, "device": "cpu"},
              "distill_sft": {"seq_len": 64, "batch_size": 4, "max_steps": 6, "lr": 3e-3, "warmup_steps": 1,
                              "val_fraction": 0.0, "device": "cpu"}}
    ckpt = distill(recipe, out, teacher=policy_dir, progress=False)
    assert ckpt.parent.parent == out / "student"
    losses = [r["loss"] for r in read_metrics(out / "student" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    student = nanoseek.load(ckpt)
    assert student.config.vocab_size == Tokenizer.load(policy_dir).vocab_size
    assert (out / "student_init" / "tokenizer.json").exists()


def test_logit_distillation_pulls_the_student_toward_the_teacher(policy_dir, tmp_path):
    # alpha = 1: pure KL to the teacher, so a student started from the teacher's own weights has zero loss
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2 + 2?"},
                                             {"role": "assistant", "content": r1("2 + 2 = 4", 4)}]}) + "\n")
    teacher = nanoseek.load(policy_dir)
    recipe = {"sft": {"seq_len": 64, "batch_size": 1, "max_steps": 1, "kd_alpha": 1.0, "val_fraction": 0.0,
                      "device": "cpu", "lr": 1e-3}}
    sft(recipe, tmp_path / "same", init=policy_dir, data=[data], progress=False, teacher=teacher)
    loss = read_metrics(tmp_path / "same" / "metrics.jsonl")[-1]["loss"]
    assert loss == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(1)
    stranger = Transformer(teacher.config)
    stranger.init_weights(std=0.2)  # large weights: peaked next-token distributions, far from the student's
    sft(recipe, tmp_path / "other", init=policy_dir, data=[data], progress=False, teacher=stranger)
    assert read_metrics(tmp_path / "other" / "metrics.jsonl")[-1]["loss"] > 0.01


def test_mixed_in_records_pick_instruct_conversations_or_game_transcripts(tmp_path):
    rng = random.Random(0)
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
            "style": "instruct"}
    solved = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": r1("2+2=4", "4")}],
              "style": "reasoning", "task": "arithmetic", "answer": "4"}
    games = [game_sft_record(rng) for _ in range(5)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [chat, solved, *games, chat]))
    picked = mixed_in_records(path, "game", 3, seed=0)
    assert len(picked) == 3 and all(r["task"] == "nim" and r["origin"] == "game" for r in picked)
    assert len(mixed_in_records(path, "game", 50, seed=0)) == 5  # no more than the file has
    instruct = mixed_in_records(path, "instruct", 50, seed=0)
    assert len(instruct) == 2 and all(r["style"] == "instruct" and r["origin"] == "instruct" for r in instruct)


def test_rejection_refuses_mixed_in_shares_that_leave_no_room(tmp_path):
    with pytest.raises(ValueError, match="instruct_fraction \\+ game_fraction"):
        rejection({"rejection": {"init": "unused", "instruct_fraction": 0.5, "game_fraction": 0.5}}, tmp_path)
