"""GRPO's machinery learns: on the debug model, in seconds on one thread, it raises a reward the policy rarely
earns at first, and it sharpens a policy whose pass@8 is far above its pass@1 toward pass@8. A run that cannot
learn says so, in stderr and in its metrics."""

import json
import random
import time
from dataclasses import replace

import torch

from nanoseek.eval.report import signal_warnings
from nanoseek.infer.rollout import Sampler, evaluate, record_prompt
from nanoseek.posttrain.grpo import GRPOConfig, GRPOStage, grpo
from nanoseek.posttrain.sft import sft
from nanoseek.posttrain.stage import load_policy
from nanoseek.rewards import REWARDS, build_rewards
from nanoseek.train.metrics import read_metrics

ONE_THREAD = {"device": "cpu", "threads": 1, "eval_problems": 0, "template": "chat"}


def test_grpo_learns_a_behaviour_the_policy_rarely_shows(policy_dir, tmp_path, monkeypatch):
    """The untrained policy writes a given digit in 8 tokens about 2% of the time; GRPO makes it a habit."""
    target = load_policy(str(policy_dir), torch.device("cpu")).tokenizer.encode("7")
    assert len(target) == 1  # digits are single tokens

    def says_seven(completions, completion_ids, **_):
        return [float(target[0] in ids) for ids in completion_ids]

    monkeypatch.setitem(REWARDS, "says_seven", says_seven)  # a reward like any other in the registry
    recipe = {"grpo": {**ONE_THREAD, "rewards": {"says_seven": 1.0}, "prompts_per_step": 8, "num_generations": 8,
                       "max_new_tokens": 8, "mask_truncated": False, "lr": 3e-3, "max_steps": 40}}
    start = time.perf_counter()
    grpo(recipe, tmp_path, init=policy_dir, progress=False)
    seconds = time.perf_counter() - start
    rewards = [r["reward"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert rewards[0] < 0.3, rewards
    assert min(rewards[-3:]) >= 0.9, rewards
    assert seconds < 60


ANSWERS = ["3", "5", "7", "9"]


def hint_question(rng: random.Random) -> dict[str, str]:
    return {"question": f"Guess my number, hint {rng.choice(['red', 'blue', 'green', 'gold'])}", "answer": "7"}


def test_grpo_sharpens_pass_at_8_into_pass_at_1(policy_dir, tmp_path):
    """SFT teaches the format and to answer one of four numbers at random: pass@1 about 0.25, pass@8 about 0.9.
    GRPO with the default rewards (accuracy, format) turns pass@8 into pass@1: the right number was already among
    the policy's samples, RL makes it the first one."""
    torch.set_num_threads(1)
    rng = random.Random(0)
    sft_data, rl_data, test_data = (tmp_path / name for name in ("sft.jsonl", "rl.jsonl", "test.jsonl"))
    sft_data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": hint_question(rng)["question"]},
        {"role": "assistant", "content": f"<think>\n\n</think>\n<answer>\n{rng.choice(ANSWERS)}\n</answer>"}
    ]}) + "\n" for _ in range(2000)))
    for path, n in ((rl_data, 2000), (test_data, 64)):
        path.write_text("".join(json.dumps(hint_question(rng)) + "\n" for _ in range(n)))
    cold = sft({"sft": {"data": [str(sft_data)], "mix": {"reasoning": 1.0}, "seq_len": 64, "batch_size": 16,
                        "max_steps": 150, "lr": 1e-2, "warmup_steps": 5, "val_fraction": 0.0, "device": "cpu"}},
               tmp_path / "sft", init=policy_dir, progress=False)

    def pass_at(ckpt):
        policy = load_policy(str(ckpt), torch.device("cpu"))
        prompts = [record_prompt(policy.tokenizer, json.loads(line), "chat", "test")
                   for line in test_data.read_text().splitlines()]
        return evaluate(Sampler(policy.model, policy.tokenizer, 512, 16), prompts, 8, 1.0, 1.0, seed=5)

    before = pass_at(cold)
    assert before["pass@1"] < 0.35 and before["pass@8"] - before["pass@1"] > 0.4, before
    recipe = {"grpo": {**ONE_THREAD, "data": str(rl_data), "prompts_per_step": 8, "num_generations": 8,
                       "max_new_tokens": 12, "lr": 2e-3, "max_steps": 30}}
    after = pass_at(grpo(recipe, tmp_path / "grpo", init=cold, progress=False))
    assert after["pass@1"] >= before["pass@8"] - 0.1, (before, after)


def test_a_run_without_signal_says_so_and_leaves_the_weights_alone(policy_dir, tmp_path, capsys, monkeypatch):
    """The untrained policy never writes EOS or </answer>: under mask_truncated every completion is masked. With
    overlong filtering off, the accuracy reward is 0 everywhere: no group has a reward spread."""
    base = {**ONE_THREAD, "prompts_per_step": 2, "num_generations": 4, "max_new_tokens": 6, "max_steps": 3,
            "dynamic_sampling": False, "lr": 1e-2, "no_signal_warn_steps": 2}
    recipe = {"grpo": {**base, "rewards": {"language": 1.0}, "mask_truncated": True}}
    grpo(recipe, tmp_path / "masked", init=policy_dir, progress=False)
    err = capsys.readouterr().err
    assert err.count("every completion ran to max_new_tokens=6") == 1  # at once, and once
    assert "raise max_new_tokens or set mask_truncated = false" in err
    assert "2 steps in a row without learning signal" in err
    records = read_metrics(tmp_path / "masked" / "metrics.jsonl")
    steps = [r for r in records if r["step"] > 0]
    assert [(r["masked_all"], r["no_signal"], r["no_signal_streak"]) for r in steps] == [(1, 1, 1), (1, 1, 2),
                                                                                         (1, 1, 3)]
    assert all("grad_norm" not in r for r in steps)  # no update was made
    assert signal_warnings({"r1_zero": records}) == [
        "r1_zero: 3 of 3 RL steps had no learning signal (3 had every completion truncated and masked); they "
        "changed nothing"]

    # one step with signal gives Adam momentum; the steps without signal after it must not move the weights
    monkeypatch.setitem(REWARDS, "length", lambda completions, **_: [float(len(c)) for c in completions])
    cfg = GRPOConfig(**{**base, "rewards": {"length": 1.0}, "mask_truncated": False, "max_steps": 1})
    trainer = GRPOStage.load(cfg, str(policy_dir), tmp_path / "flat")
    trainer.train()
    assert trainer.optimizer.state
    trainer.rewards = build_rewards({"accuracy": 1.0})
    trainer.cfg = replace(cfg, max_steps=4)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train(resume=True)  # continue in memory: step 2 onwards
    err = capsys.readouterr().err
    assert "2 steps in a row without learning signal" in err and "equal rewards (mean 0.00)" in err
    assert "mask_truncated" not in err
    steps = [r for r in read_metrics(tmp_path / "flat" / "metrics.jsonl") if r["step"] > 0]
    assert [(r["masked_all"], r["no_signal"], r["no_signal_streak"]) for r in steps] == [
        (0, 0, 0), (0, 1, 1), (0, 1, 2), (0, 1, 3)]
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
