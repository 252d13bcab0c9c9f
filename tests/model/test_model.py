"""Unit tests of the model's parts against hand computations and independent formulas."""

import json
import math

import pytest
import torch

import nanoseek
from nanoseek.model import LatentCache, ModelConfig, Transformer, preset
from nanoseek.model.balance import max_violation, update_bias
from nanoseek.model.moe import Gate, GroupedExperts, grouped_mm, sequence_balance_loss
from nanoseek.model.mtp import mtp_loss
from nanoseek.model.rope import rope_frequencies


def test_absorbed_decode_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(preset("debug")).eval()
    model.init_weights(std=0.05)
    ids = torch.randint(0, 512, (3, 24))
    with torch.no_grad():
        full = model(ids)
        cache = LatentCache.empty(model.config, 3, 24)
        steps = [model.forward_cached(ids[:, :8], cache, 0)]  # naive prefill
        steps += [model.forward_cached(ids[:, t:t + 1], cache, t) for t in range(8, 16)]  # absorbed decode
        steps.append(model.forward_cached(ids[:, 16:], cache, 16))  # absorbed, several tokens (verification)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_cache_holds_only_latent_and_rope_key():
    cfg = preset("671B")
    cache = LatentCache.empty(cfg, batch=1, max_len=1, layers=1)
    assert cache.c_kv.shape[-1] + cache.k_pe.shape[-1] == 576  # 512 + 64 per token per layer


def make_gate(n_group=4, topk_group=2, top_k=2, E=8, scaling=2.5, norm=True):
    cfg = preset("debug", n_routed_experts=E, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k,
                 routed_scaling_factor=scaling, norm_topk_prob=norm)
    gate = Gate(cfg)
    gate.weight.data.zero_()
    return gate


def test_group_limited_routing_and_bias_for_selection_only():
    gate = make_gate(topk_group=1)
    # Make x @ W^T equal chosen logits: x = one-hot over the first 8 dims, W = logits^T
    logits = torch.tensor([[3.0, -1.0, 2.5, 2.4, 0.0, 0.1, 0.2, 0.3]])
    gate.weight.data[:, :1] = logits.T
    x = torch.zeros(1, 64)
    x[0, 0] = 1.0
    s = torch.sigmoid(logits)[0]
    # groups (of 2): {0,1}: s0+s1 = 1.22; {2,3}: s2+s3 = 1.84 (the only group kept); {4,5}; {6,7}
    idx, w, scores = gate(x)
    assert set(idx[0].tolist()) == {2, 3}  # expert 0 is best alone but its group loses to {2, 3}
    assert torch.allclose(scores[0], s)
    # A bias lifting expert 6's group changes the selection but not the weights' source (unbiased scores)
    gate.e_score_correction_bias[6] = 5.0
    idx, w, _ = gate(x)
    chosen = idx[0].tolist()
    assert 6 in chosen
    expected = s[idx[0]] / s[idx[0]].sum() * 2.5
    assert torch.allclose(w[0], expected)
    # masked groups are -inf, not 0: with all scores negative-biased an unmasked expert still wins
    gate.e_score_correction_bias.fill_(-10.0)
    idx, _, _ = gate(x)
    groups = {i // 2 for i in idx[0].tolist()}
    assert len(groups) == 1


def test_norm_topk_prob_off_keeps_raw_scores():
    gate = make_gate(n_group=1, topk_group=1, top_k=3, scaling=1.0, norm=False)
    x = torch.randn(5, 64)
    gate.weight.data.normal_()
    idx, w, scores = gate(x)
    assert torch.allclose(w, scores.gather(1, idx))


def test_expert_counts_and_grouped_dispatch_against_a_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(6, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(20, 16)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(20)])
    idx[:, :] = idx.clamp(max=4)  # expert 5 gets nothing: empty groups must work
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % 5, idx[:, 1])
    w = torch.rand(20, 2)
    ref = torch.zeros_like(x)
    for n in range(20):
        for k in range(2):
            e = idx[n, k]
            g, u = (experts.gate_up_proj[e] @ x[n]).chunk(2)
            ref[n] += w[n, k] * (experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    assert torch.allclose(experts(x, idx, w), ref, atol=1e-5)
    model = Transformer(preset("debug")).eval()
    out = model(torch.randint(0, 512, (2, 10)), extras=True)
    n_moe = len(model.moe_layers())
    assert out.expert_counts.shape == (n_moe, 8)
    K = model.config.num_experts_per_tok
    assert out.expert_counts[0].sum() == 2 * 10 * K  # main MoE layer: every token routed to K experts
    assert out.expert_counts[-1].sum() == 2 * 9 * K  # MTP depth 1 sees T - 1 positions


def test_grouped_mm_fallback_equals_torch():
    x = torch.randn(11, 8)
    w = torch.randn(4, 8, 12)
    offs = torch.tensor([3, 3, 8, 11], dtype=torch.int32)
    ref = torch.cat([x[0:3] @ w[0], x[3:8] @ w[2], x[8:11] @ w[3]])
    assert torch.allclose(grouped_mm(x, w, offs), ref, atol=1e-6)
    assert torch.allclose(grouped_mm(x.double(), w.double(), offs).float(), ref, atol=1e-6)  # padded-bmm path


def test_bias_sign_update_by_hand():
    model = Transformer(preset("debug", n_routed_experts=4, n_group=1, topk_group=1, num_nextn_predict_layers=0))
    counts = torch.tensor([[10, 2, 4, 4]])  # mean 5: expert 0 overloaded, others under
    update_bias(model, counts, gamma=0.01)
    assert model.moe_layers()[0].gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert max_violation(counts).item() == pytest.approx((10 - 5) / 5)


def test_balance_loss_hand_computed():
    # one sequence, T=2 tokens, E=2 experts, K=1
    scores = torch.tensor([[[0.8, 0.2], [0.6, 0.6]]])
    idx = torch.tensor([[[0], [0]]])
    # f = E/(K·T)·hits = 2/2·[2, 0] = [2, 0];  P = mean_t(s/Σs) = [(0.8 + 0.5)/2, (0.2 + 0.5)/2] = [0.65, 0.35]
    assert sequence_balance_loss(scores, idx).item() == pytest.approx(2 * 0.65)


def test_bias_stays_fp32_under_dtype_casts():
    model = Transformer(preset("debug")).to(torch.bfloat16)
    for moe in model.moe_layers():
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
    model(torch.randint(0, 512, (1, 5)))


def test_mtp_target_shifting():
    V, T = 7, 6
    labels = torch.randint(0, V, (2, T))
    # perfect depth-k logits predict labels[:, k:]; shifting by one more must be far worse
    perfect = [torch.nn.functional.one_hot(labels[:, k:], V).float() * 50 for k in (1, 2)]
    assert mtp_loss(perfect, labels).item() < 1e-6
    wrong = [torch.nn.functional.one_hot(labels[:, k - 1:T - 1], V).float() * 50 for k in (1, 2)]
    assert mtp_loss(wrong, labels).item() > 1.0
    model = Transformer(preset("debug", num_nextn_predict_layers=2))
    out = model(torch.randint(0, 512, (2, 9)), extras=True)
    assert [t.shape[1] for t in out.mtp_logits] == [8, 7]


def test_yarn_frequencies_against_the_formula():
    cfg = preset("debug", qk_rope_head_dim=32, rope_theta=10000.0, rope_scaling={
        "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    inv_freq, amplitude = rope_frequencies(cfg)
    d, theta, L0, s = 32, 10000.0, 256, 16.0
    low = math.floor(d * math.log(L0 / (2 * math.pi * 32)) / (2 * math.log(theta)))
    high = math.ceil(d * math.log(L0 / (2 * math.pi * 1)) / (2 * math.log(theta)))
    for i in range(d // 2):
        f = theta ** (-2 * i / d)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        assert inv_freq[i].item() == pytest.approx(f / s * ramp + f * (1 - ramp), rel=1e-6)
    assert amplitude == 1.0
    mscale = 0.1 * 1.0 * math.log(16.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(mscale**2 / math.sqrt(cfg.qk_head_dim))


def test_load_errors_name_the_key(tmp_path):
    model = Transformer(preset("debug"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["kv_lora_rank"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"kv_a_norm.weight.*\(32,\).*\(48,\)"):
        nanoseek.load(tmp_path)
    config["kv_lora_rank"] = 32
    config["scoring_func"] = "softmax"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="scoring_func"):
        nanoseek.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        nanoseek.load(tmp_path / "nope")


def test_round_trip_through_own_format(tmp_path):
    model = Transformer(preset("debug", num_nextn_predict_layers=2))
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    back = nanoseek.load(tmp_path / "ckpt")
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.3.eh_proj.weight" in keys and "model.layers.2.shared_head.norm.weight" in keys
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig(n_routed_experts=10, n_group=3)
