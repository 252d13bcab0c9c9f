"""GRPO, DPO and reward-model losses held against TRL's trainers on identical inputs.

TRL's GRPOTrainer and DPOTrainer are built for real (a tiny Llama, a character tokenizer) and their own
`_compute_loss` runs; for GRPO only the model call that produces per-token log-probs is replaced, so both
implementations see the same log-probs, advantages and masks. Loss values and gradients must agree.
"""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.posttrain.losses import (
    LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    k3_kl,
    token_logps,
)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

MAX_COMPLETION = 12


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A saved 1-layer Llama and a character-level tokenizer, enough for TRL's trainers to start."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *"abcdefgh"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=1))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path), hf_tok


def _grpo_trainer(path, tokenizer, tmp_path, loss_type, beta, kl_bias_correction):
    config = trl.GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=beta, epsilon=0.2,
                            use_bias_correction_kl=kl_bias_correction,
                            epsilon_high=0.28, max_completion_length=MAX_COMPLETION, num_generations=4,
                            per_device_train_batch_size=8, report_to=[], use_cpu=True)
    trainer = trl.GRPOTrainer(model=path, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                              args=config, train_dataset=datasets.Dataset.from_dict({"prompt": ["ab", "cd"]}),
                              processing_class=tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); one micro-batch per step here
    return trainer


def _grpo_inputs(seed=0, B=8, T=MAX_COMPLETION):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = (logps.detach() + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0)  # some ratios beyond the clip
    ref = (logps.detach() + 0.5 * torch.randn(B, T, generator=g)).clamp(max=0)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    return logps, old, ref, mask, rewards


@pytest.mark.parametrize(("loss_type", "beta", "kl_bias_correction"),
                         [(t, 0.04, True) for t in LOSS_TYPES] + [("dapo", 0.0, True), ("grpo", 0.04, False)])
def test_grpo_loss_and_gradients_match_trl(tiny_hf_model, tmp_path, loss_type, beta, kl_bias_correction):
    path, tokenizer = tiny_hf_model
    trainer = _grpo_trainer(path, tokenizer, tmp_path, loss_type, beta, kl_bias_correction)
    logps, old, ref, mask, rewards = _grpo_inputs()
    advantages, _ = group_advantages(rewards, 4, "group")
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.ones(B, 3, dtype=torch.long), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
        "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    trl_logps = logps.detach().clone().requires_grad_()
    # the one replaced piece: the model forward that yields (per-token log-probs, entropies, aux loss)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (trl_logps, torch.zeros(B, T), None)
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    ours, stats = grpo_loss(logps, old, advantages, mask, loss_type=loss_type, eps_low=0.2, eps_high=0.28,
                            beta=beta, ref_logps=ref, max_completion_length=MAX_COMPLETION,
                            num_items_in_batch=mask.sum(), kl_bias_correction=kl_bias_correction)
    ours.backward()
    torch.testing.assert_close(ours, trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logps.grad, trl_logps.grad, rtol=1e-6, atol=1e-8)
    assert logps.grad.abs().sum() > 0
    metrics = trainer._metrics["train"]
    assert stats["clip_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"][-1], abs=1e-6)
    assert stats["clip_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"][-1], abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(metrics["clip_ratio/region_mean"][-1], abs=1e-6)
    assert stats["clip_frac"] > 0  # the inputs do exercise the clip
    if beta:
        assert stats["kl"].item() == pytest.approx(metrics["kl"][-1], rel=1e-5)


def test_group_advantages_match_trl_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero = group_advantages(rewards, 4, "group")
    g = rewards.view(2, 4)
    expected = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)  # DeepSeekMath §4.1.2
    torch.testing.assert_close(adv, expected.flatten())
    assert zero.tolist() == [False] * 4 + [True] * 4
    adv_none, _ = group_advantages(rewards, 4, "none")
    torch.testing.assert_close(adv_none, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    adv_batch, _ = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(adv_batch, (rewards - g.mean(1).repeat_interleave(4)) / (rewards.std() + 1e-4))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_mu1_without_kl_has_zero_loss_but_a_gradient():
    # the frequent "my GRPO loss is 0" confusion (trl#2703): with μ=1, β=0 the value is 0, the gradient is not
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(logps, None, adv, torch.ones(2, 2), loss_type="grpo")
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))


def test_kl_clamp_keeps_a_far_drifted_token_finite():
    logps = torch.tensor([[-200.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-0.1, -1.0]])
    kl = k3_kl(logps, ref)
    assert torch.isfinite(kl).all() and kl[0, 1] == 0
    loss, stats = grpo_loss(logps, logps.detach() - 100, torch.tensor([1.0]), torch.ones(1, 2), beta=0.1,
                            ref_logps=ref)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all() and torch.isfinite(stats["kl"])


def test_token_logps_equals_log_softmax_gather():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    expected = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logps(logits, targets), expected)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]])
    torch.testing.assert_close(token_logps(logits, targets, mask), expected * mask)


def _hf_sequence_logps(model, input_ids, attention_mask, completion_mask):
    """Σ over completion tokens of log p(token | prefix), from the model's plain logits and token_logps."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    per_token = token_logps(logits[:, :-1], input_ids[:, 1:])
    return (per_token * completion_mask[:, 1:]).sum(-1)


def test_dpo_loss_matches_trl(tiny_hf_model, tmp_path):
    path, tokenizer = tiny_hf_model
    config = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to=[], use_cpu=True)
    data = datasets.Dataset.from_dict({"prompt": ["ab"], "chosen": ["cd"], "rejected": ["ee"]})
    trainer = trl.DPOTrainer(model=path, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.model.train()
    torch.manual_seed(1)
    # batch layout TRL expects: [chosen rows; rejected rows], prompt then completion, right-padded
    input_ids = torch.randint(2, 10, (6, 9))
    completion_mask = torch.zeros(6, 9, dtype=torch.long)
    for row, (start, end) in enumerate([(3, 9), (4, 7), (2, 8), (3, 5), (4, 9), (2, 6)]):
        completion_mask[row, start:end] = 1
    attention_mask = torch.ones(6, 9, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[3, 5:] = 0
    attention_mask[5, 6:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    trl_loss = trainer._compute_loss(trainer.model, dict(inputs), return_outputs=False)
    trl_grads = torch.autograd.grad(trl_loss, list(trainer.model.parameters()))

    logps = _hf_sequence_logps(trainer.model, input_ids, attention_mask, completion_mask)
    with torch.no_grad():
        ref = _hf_sequence_logps(trainer.ref_model, input_ids, attention_mask, completion_mask)
    ours, chosen_r, rejected_r = dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], beta=0.3)
    grads = torch.autograd.grad(ours, list(trainer.model.parameters()))
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, trl_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert chosen_r.shape == rejected_r.shape == (3,)


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_chosen_rises():
    zero = torch.zeros(4)
    loss, _, _ = dpo_loss(zero, zero, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    better, _, _ = dpo_loss(zero + 1, zero, zero, zero, beta=0.1)
    assert better < loss


def test_bradley_terry_loss_matches_trl_reward_trainer_formula():
    # TRL RewardTrainer.compute_loss: -logsigmoid(c - r - margin).mean() + coef * mean((c + r)^2)
    c, r, m = torch.tensor([1.0, 0.2, -0.3]), torch.tensor([0.0, 0.5, -1.0]), torch.tensor([0.5, 0.0, 0.1])
    expected = -F.logsigmoid(c - r - m).mean() + 0.01 * ((c + r) ** 2).mean()
    torch.testing.assert_close(bradley_terry_loss(c, r, m, center_coef=0.01), expected)
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([0.0])) < bradley_terry_loss(
        torch.tensor([0.0]), torch.tensor([5.0]))
