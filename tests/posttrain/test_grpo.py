"""GRPO end to end on the debug policy: generation, rewards, dynamic sampling, the batch, the update, metrics,
checkpoints and resume. (That GRPO raises accuracy on a pretrained model is measured by the r1-zero recipe.)"""

import json

import pytest
import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.rollout import Sample, record_prompt
from nanoseek.posttrain.grpo import GRPOConfig, GRPOStage, grpo, guess_rates, headroom, pick_candidate
from nanoseek.posttrain.losses import token_logps
from nanoseek.train.metrics import read_metrics

# the share of Latin-script words in random text varies from sample to sample: a reward with signal even for
# an untrained model, so the whole update path runs
BASE = {"rewards": {"language": 1.0, "format": 0.1}, "prompts_per_step": 2, "num_generations": 4,
        "max_new_tokens": 8, "micro_batch": 4, "eval_problems": 2, "eval_samples": 2, "device": "cpu",
        "mask_truncated": False, "dynamic_sampling": False, "lr": 1e-3, "threads": 2}


def test_grpo_step_metrics_checkpoint_and_resume(policy_dir, tmp_path):
    recipe = {"grpo": {**BASE, "max_steps": 2, "beta": 0.05, "mu": 2, "ref_refresh_every": 1}}
    out = tmp_path / "run"
    ckpt = grpo(recipe, out, init=policy_dir, progress=False)
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["step"] == 0 and "eval/pass@1" in records[0] and "eval/pass@2" in records[0]
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "reward_std", "rewards/language", "rewards/format", "format",
                "completion_length", "completion_length_max", "clip_frac", "kl", "entropy", "frac_reward_zero_std",
                "time/generation", "time/reference", "time/update", "loss", "grad_norm"):
        assert key in steps[-1], key
    assert steps[-1]["kl"] >= 0 and steps[-1]["entropy"] > 0 and steps[-1]["time/reference"] > 0
    assert "eval/pass@1" in steps[-1]
    assert json.loads((ckpt / "nanoseek.json").read_text())["stage"] == "grpo"
    assert (ckpt / "reference.safetensors").exists()
    recipe["grpo"]["max_steps"] = 3
    ckpt = grpo(recipe, out, init=policy_dir, resume=True, progress=False)
    assert ckpt.name == "step_0000003"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["step"] > 0] == [1, 2, 3]


def test_dynamic_sampling_drops_groups_without_signal(policy_dir, tmp_path):
    # an untrained model never answers correctly: every accuracy group is all zeros, so every group is dropped
    cfg = GRPOConfig(**{**BASE, "rewards": {"accuracy": 1.0}, "dynamic_sampling": True, "max_sampling_rounds": 2})
    trainer = GRPOStage.load(cfg, str(policy_dir), tmp_path)
    groups, rewards, stats = trainer.rollout()
    assert groups == [] and stats["frac_reward_zero_std"] == 1.0 and stats["sampling_rounds"] == 2
    assert trainer.prompts_used == 4


def test_batch_masks_exactly_the_completion_tokens(policy_dir, tmp_path):
    cfg = GRPOConfig(**{**BASE, "mask_truncated": True, "num_generations": 2})
    trainer = GRPOStage.load(cfg, str(policy_dir), tmp_path)
    tok = Tokenizer.load(policy_dir)
    prompt = record_prompt(tok, {"question": "What is 2 + 2?", "answer": "4"}, "r1_zero", "test")
    done = Sample(prompt, [5, 6, tok.end_answer_id], "x", truncated=False)
    cut = Sample(prompt, [5, 6, 7, 8], "x", truncated=True)
    batch = trainer.make_batch([[done, cut]], [[1.0, 0.0]])
    P = len(prompt.ids)
    # rows go longest first (the truncated one), each keeping its own advantage
    assert batch.lengths == [P + 4, P + 3] and batch.advantages.tolist() == [-0.5, 0.5]  # scale_rewards "none"
    assert batch.ids[1, P:P + 3].tolist() == [5, 6, tok.end_answer_id]
    # position t predicts token t+1: the completion's 3 tokens are predicted from positions P-1 .. P+1
    assert batch.mask[1].nonzero().flatten().tolist() == [P - 1, P, P + 1]
    assert batch.mask[0].sum() == 0  # truncated: overlong filtering


def test_micro_batches_are_cut_to_their_rows_without_changing_log_probs(policy_dir, tmp_path):
    """Chunks of short rows skip the padding the longest row forces on the batch; the log-probabilities of the
    completion tokens are the ones one full-width forward gives."""
    cfg = GRPOConfig(**{**BASE, "mask_truncated": False, "num_generations": 3, "micro_batch": 1})
    trainer = GRPOStage.load(cfg, str(policy_dir), tmp_path)
    prompt = record_prompt(trainer.tok, {"question": "What is 2 + 2?", "answer": "4"}, "r1_zero", "test")
    rows = [Sample(prompt, list(range(5, 5 + n)), "x", truncated=False) for n in (2, 9, 5)]
    batch = trainer.make_batch([rows], [[1.0, 0.0, 0.5]])
    assert [c for _, c in batch.chunks(1)] == sorted(batch.lengths, reverse=True) == batch.lengths
    model = trainer.model.eval()
    with torch.no_grad():
        full = token_logps(model(batch.ids[:, :-1]), batch.ids[:, 1:], batch.mask)
    torch.testing.assert_close(trainer.logps(model, batch), full, rtol=1e-5, atol=1e-5)


def row(task, level, pass1, passk, chance, chance_k):
    return {"task": task, "level": level, "pass@1": pass1, "pass@k": passk, "chance": chance, "chance@k": chance_k}


def test_pick_candidate_measures_headroom_against_chance():
    # a yes/no task at 50% has no headroom, however far its pass@8 sits above its pass@1: guessing explains it
    logic, arithmetic = row("logic", 2, 0.31, 0.94, 0.57, 1.0), row("arithmetic", 2, 0.13, 0.44, 0.18, 0.62)
    assert headroom(logic) == 0.0 and abs(headroom(arithmetic) - 0.31 * 0.13) < 1e-9
    assert pick_candidate([logic, arithmetic], [0.05, 0.9]) is arithmetic  # a measured default-run case
    # a gap with few successes to learn from counts for less than the same gap with more of them
    rare = row("word_problems", 2, 0.05, 0.38, 0.11, 0.57)
    assert pick_candidate([rare, arithmetic], [0.0, 0.9]) is arithmetic
    table = [row("arithmetic", 1, 0.95, 1.0, 0.16, 0.7),  # mastered: nothing to sharpen
             row("arithmetic", 2, 0.3, 0.7, 0.18, 0.6),  # 0.12
             row("countdown", 1, 0.25, 0.75, 0.03, 0.18),  # 0.125
             row("countdown", 2, 0.4, 0.8, 0.01, 0.06),  # 0.16: the most headroom
             row("multihop", 1, 0.02, 0.9, 0.01, 0.04)]  # below the band
    assert pick_candidate(table, [0.05, 0.9]) is table[3]
    assert pick_candidate(table, [0.05, 0.9], tolerance=0.05) is table[2]  # within noise: the easier level
    assert pick_candidate(table, [0.0, 0.9]) is table[3]
    nothing = [row("a", 2, 0.0, 0.0, 0.0, 0.0), row("a", 1, 0.0, 0.0, 0.0, 0.0)]
    assert pick_candidate(nothing, [0.05, 0.9])["level"] == 1  # no signal anywhere: the easiest level


def test_guess_rates_come_from_the_answers():
    chance, chance_k = guess_rates("logic", 1, 8, seed=0)
    assert 0.4 < chance < 0.6 and chance_k == 1.0  # yes or no
    chance, chance_k = guess_rates("multihop", 1, 1, seed=0)
    assert chance == chance_k < 0.05  # made-up names: nothing to guess


def test_auto_curriculum_is_measured_once_and_kept(policy_dir, tmp_path):
    cfg = GRPOConfig(**{**BASE, "curriculum": "auto", "tasks": {"arithmetic": 1.0, "logic": 1.0},
                        "difficulty": [1, 2], "curriculum_prompts": 2, "curriculum_samples": 2})
    trainer = GRPOStage.load(cfg, str(policy_dir), tmp_path)
    choice = json.loads((tmp_path / "curriculum.json").read_text())
    assert len(choice["table"]) == 4 and {r["task"] for r in choice["table"]} == {"arithmetic", "logic"}
    logic = next(r for r in choice["table"] if r["task"] == "logic")
    assert 0.4 < logic["chance"] < 0.6 and logic["chance@k"] == 1.0 and logic["score"] == headroom(logic)
    assert trainer.cfg.tasks == {choice["task"]: 1.0} and trainer.cfg.difficulty == [choice["level"]]
    assert all(p.columns["task"] == choice["task"] for p in trainer.held_out)
    choice["task"], choice["level"] = "logic", 2  # a resumed run reads the file rather than measuring again
    (tmp_path / "curriculum.json").write_text(json.dumps(choice))
    again = GRPOStage.load(cfg, str(policy_dir), tmp_path)
    assert again.cfg.tasks == {"logic": 1.0} and again.cfg.difficulty == [2]


def test_sharing_each_groups_prompt_gives_the_same_log_probs_and_gradients(policy_dir, tmp_path):
    """share_prompt runs each group's prompt once for its G completions: the completion log-probabilities and
    the gradients equal the plain forward's, for prompts and completions of different lengths."""
    from nanoseek.posttrain.grpo import completion_logps, shared_prompt_logps

    cfg = GRPOConfig(**{**BASE, "mask_truncated": False, "num_generations": 3, "share_prompt": True})
    stage = GRPOStage.load(cfg, str(policy_dir), tmp_path)
    tok = stage.tok
    groups = []
    for question, lengths in (("What is 2 + 2?", (2, 9, 5)), ("What is 13 + 28 - 5?", (7, 1, 4))):
        prompt = record_prompt(tok, {"question": question, "answer": "4"}, "r1_zero", "test")
        groups.append([Sample(prompt, list(range(5, 5 + n)), "x", truncated=False) for n in lengths])
    batch = stage.make_batch(groups, [[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
    assert batch.group == 3 and len({*batch.prompt_lens}) == 2
    model = stage.model.train()
    shared, shared_logits = shared_prompt_logps(model, batch.ids, batch.mask, batch.prompt_lens, 3)
    (shared * batch.mask).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert grads and batch.mask.sum() > 0
    model.zero_grad()
    plain, plain_logits = completion_logps(model, batch.ids, batch.mask)
    (plain * batch.mask).sum().backward()
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared_logits, plain_logits, rtol=1e-4, atol=1e-4)
    for k, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_sharing_prompts_is_refused_for_a_sparse_attention_model(policy_dir, tmp_path):
    """shared_prompt_logps attends densely; a DSA policy must not be trained on it (its rollouts attend sparsely)."""
    import shutil

    from nanoseek.model import Transformer, preset

    dsa_dir = tmp_path / "dsa"
    shutil.copytree(policy_dir, dsa_dir)
    vocab = Tokenizer.load(policy_dir).vocab_size
    Transformer(preset("debug", vocab_size=vocab, attention="dsa")).save_pretrained(dsa_dir)
    with pytest.raises(ValueError, match=r"\[grpo\] share_prompt = true is for MLA models"):
        GRPOStage.load(GRPOConfig(**{**BASE, "share_prompt": True}), str(dsa_dir), tmp_path / "out")
