"""Learning-rate shapes against their closed forms, the AdamW parameter groups, and the Muon/AdamW split."""

import math

import pytest
import torch

from nanoseek.model import Transformer, preset
from nanoseek.train.muon import Muon
from nanoseek.train.optim import build_muon, build_optimizer, lr_multiplier, param_groups


def test_cosine_schedule_warmup_constant_then_half_cosine_to_final_ratio():
    total, warmup = 100, 10
    lr = [lr_multiplier(s, total, warmup, "cosine", decay_start=0.6, final_ratio=0.1) for s in range(total)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lr[:9], lr[1:10], strict=True))  # linear warmup
    assert lr[10:61] == [1.0] * 51  # constant until 60% of training
    assert lr[-1] == pytest.approx(0.1)
    mid = 60 + (99 - 60) / 2  # halfway through the decay the cosine is at its midpoint
    assert lr_multiplier(int(mid), total, warmup, "cosine", 0.6, 0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 60) / 39)))
    assert all(b <= a for a, b in zip(lr[60:], lr[61:], strict=False))


def test_wsd_schedule_decays_linearly():
    total = 50
    lr = [lr_multiplier(s, total, 5, "wsd", decay_start=0.8, final_ratio=0.0) for s in range(total)]
    decay = lr[40:]
    steps = [a - b for a, b in zip(decay, decay[1:], strict=False)]
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(0.0)
    assert max(steps) == pytest.approx(min(steps))  # a straight line


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        lr_multiplier(0, 10, 1, "linear")


def test_param_groups_exempt_norms_biases_and_embeddings_from_decay():
    model = Transformer(preset("debug", attention_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in exempt and "blocks.0.attn_norm.weight" in exempt
    assert "blocks.0.attn.kv_a_proj.bias" in exempt
    assert "head.weight" in decayed and "blocks.1.ffn.experts.gate_up_proj" in decayed
    assert "blocks.1.ffn.gate.weight" in decayed
    assert len(decayed) + len(exempt) == len(list(model.parameters()))


def test_optimizer_uses_deepseek_betas_and_decoupled_decay():
    model = torch.nn.Linear(4, 4, bias=False)
    opt = build_optimizer(model, lr=0.1)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    w0 = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(w0)
    opt.step()
    # zero gradient: AdamW's only change is the decoupled decay w -= lr * wd * w
    torch.testing.assert_close(model.weight.detach(), w0 * (1 - 0.1 * 0.1))


def optimizer_names(model: torch.nn.Module, groups: list[dict]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in groups for p in g["params"]]


@pytest.mark.parametrize("experts", [True, False])
def test_muon_split_puts_every_parameter_in_exactly_one_optimizer(experts):
    model = Transformer(preset("debug", attention_bias=True))
    adamw, muon = build_muon(model, lr=1e-3, muon_lr=2e-3, experts=experts)
    on_adamw, on_muon = optimizer_names(model, adamw.param_groups), optimizer_names(model, muon.param_groups)
    assert sorted(on_adamw + on_muon) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    shapes = dict(model.named_parameters())
    assert all(shapes[n].ndim == 2 or n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in on_muon)
    assert ("blocks.1.ffn.experts.down_proj" in on_muon) == experts
    assert {"blocks.0.attn.q_b_proj.weight", "blocks.0.ffn.gate_proj.weight", "mtp.0.eh_proj.weight",
            "blocks.1.ffn.shared_experts.up_proj.weight", "mtp.0.block.attn.o_proj.weight"} <= set(on_muon)
    # tokens in and out, norms, biases and router gates stay on AdamW (with its no-decay group for the 1-D ones)
    assert {"embed.weight", "head.weight", "norm.weight", "blocks.0.attn.kv_a_proj.bias",
            "blocks.1.ffn.gate.weight"} <= set(on_adamw)
    decayed, exempt = adamw.param_groups
    assert exempt["weight_decay"] == 0.0 and "embed.weight" in optimizer_names(model, [exempt])
    assert "head.weight" in optimizer_names(model, [decayed])


def test_muon_steps_each_expert_matrix_as_torch_muon_steps_a_matrix():
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 8, 5))
    single = [torch.nn.Parameter(w.detach().clone()) for w in stacked]
    ours = Muon([stacked], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    theirs = torch.optim.Muon(single, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):  # momentum carries over between steps
        grad = torch.randn(3, 8, 5)
        stacked.grad = grad
        for p, g in zip(single, grad, strict=True):
            p.grad = g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in single]), rtol=0, atol=0)
    torch.testing.assert_close(ours.state[stacked]["momentum_buffer"],
                               torch.stack([theirs.state[p]["momentum_buffer"] for p in single]), rtol=0, atol=0)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        Muon([torch.nn.Parameter(torch.zeros(4))], lr=0.02, weight_decay=0.0)
