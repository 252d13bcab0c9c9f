"""DPO, the Bradley-Terry reward model, and preference pairs (from files and from verified samples)."""

import json
import random

import pytest

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.rollout import Sample, Sampler, record_prompt
from nanoseek.posttrain.dpo import dpo
from nanoseek.posttrain.preferences import load_pairs, pair_samples, verified_pairs
from nanoseek.posttrain.reward_model import RewardModel, reward_function, train_reward_model
from nanoseek.train.metrics import read_metrics

GOOD = "<think>\n2 + 2 = 4\n</think>\n<answer>\n4\n</answer>"
BAD = "<think>\n2 + 2 = 5\n</think>\n<answer>\n5\n</answer>"


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "q", "chosen": "a"}, "missing \\['rejected'\\]"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "'rejected' must be a non-empty"),
    ({"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role"),
])
def test_bad_preference_records_name_file_and_line(policy_dir, tmp_path, record, message):
    tok = Tokenizer.load(policy_dir)
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "What is 2 + 2?", "chosen": GOOD, "rejected": BAD}, record])
    with pytest.raises(ValueError, match=message) as err:
        load_pairs(path, tok, 512)
    assert f"{path}:2" in str(err.value)
    pairs, skipped = load_pairs(path, tok, 512, skip_invalid=True)
    assert len(pairs) == 1 and skipped["invalid"] == 1
    pairs, skipped = load_pairs(path, tok, 10, skip_invalid=True)
    assert not pairs and skipped["too_long"] == 1


def test_dpo_prefers_the_chosen_side(policy_dir, tmp_path):
    data = write(tmp_path / "pairs.jsonl",
                 [{"prompt": f"What is 2 + 2? ({i})", "chosen": GOOD, "rejected": BAD} for i in range(20)])
    recipe = {"dpo": {"beta": 0.5, "lr": 3e-3, "batch_size": 4, "max_steps": 10, "warmup_steps": 1,
                      "val_fraction": 0.2, "val_every": 5, "device": "cpu"}}
    ckpt = dpo(recipe, tmp_path / "run", init=policy_dir, data=data, progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(records) == 10
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at the first step
    assert records[-1]["loss"] < 0.3 and records[-1]["val_rewards/accuracy"] == 1.0
    assert records[-1]["rewards/margin"] > 0
    assert json.loads((ckpt / "nanoseek.json").read_text())["stage"] == "dpo"
    nanoseek.load(tmp_path / "run")


def test_reward_model_learns_preferences_and_serves_as_a_reward(policy_dir, tmp_path):
    data = write(tmp_path / "pairs.jsonl",
                 [{"prompt": f"What is 2 + 2? ({i})", "chosen": GOOD, "rejected": BAD} for i in range(24)])
    recipe = {"reward_model": {"lr": 3e-3, "batch_size": 4, "max_steps": 12, "warmup_steps": 1, "device": "cpu",
                               "val_fraction": 0.25, "val_every": 6}}
    path = train_reward_model(recipe, tmp_path / "rm", init=policy_dir, data=data, progress=False)
    last = read_metrics(tmp_path / "rm" / "metrics.jsonl")[-1]
    assert last["val_accuracy"] == 1.0 and last["val_loss"] < 0.3
    model, _ = RewardModel.load(path)
    assert isinstance(model, RewardModel)
    reward = reward_function(path)
    good, bad = reward([GOOD, BAD], question=["What is 2 + 2? (99)"] * 2)
    assert good > bad


def test_pair_samples_pairs_a_correct_with_an_incorrect_sample(policy_dir):
    tok = Tokenizer.load(policy_dir)
    prompt = record_prompt(tok, {"question": "What is 2 + 2?", "answer": "4"}, "chat", "test")
    other = record_prompt(tok, {"question": "What is 3 + 3?", "answer": "6"}, "chat", "test")
    bad_cut = "<think>\n2 + 2 = 5\n</think>\n<answer>\n5"
    groups = [[Sample(prompt, [], GOOD, False), Sample(prompt, [], BAD, False), Sample(prompt, [], bad_cut, True)],
              [Sample(other, [], GOOD, False), Sample(other, [], BAD, False)],  # never right: no pair
              [Sample(prompt, [], GOOD, False), Sample(prompt, [], bad_cut, True)]]  # only a truncated wrong one
    records = pair_samples(groups, random.Random(0))
    assert records == [{"prompt": "What is 2 + 2?", "chosen": GOOD, "rejected": BAD, "answer": "4"}]


def test_verified_pairs_sample_and_grade(policy_dir):
    tok = Tokenizer.load(policy_dir)
    model = nanoseek.load(policy_dir)
    prompt = record_prompt(tok, {"question": "What is 2 + 2?", "answer": "4"}, "chat", "test")
    # an untrained model never answers correctly, so there is nothing to pair, whatever it samples
    assert verified_pairs(Sampler(model, tok, max_batch=8, max_new_tokens=8), [prompt], k=4, seed=0) == []
