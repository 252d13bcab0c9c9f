"""Logit parity with transformers' DeepseekV3ForCausalLM (fp32, random weights) in both directions, and greedy
generation identical to transformers `generate`."""

import pytest
import torch

import nanoseek
from nanoseek.model import ModelConfig, Transformer, preset

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # n_group > 1 with q low-rank, one dense layer first
    "groups": preset("debug", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                     routed_scaling_factor=2.5, first_k_dense_replace=1, num_hidden_layers=3),
    # q_lora_rank None (V2-Lite style), all layers MoE
    "no_q_lora": preset("debug", q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1,
                        norm_topk_prob=False),
    # YaRN with DeepSeek-style mscale
    "yarn": preset("debug", max_position_embeddings=512, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # YaRN with mscale != mscale_all_dim (non-unit cos/sin amplitude), two dense layers
    "yarn_amplitude": preset("debug", num_hidden_layers=3, first_k_dense_replace=2, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.9,
        "mscale_all_dim": 0.7}),
}


def hf_model(cfg: ModelConfig, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = DeepseekV3Config(**cfg.to_hf_dict())
    hf_cfg.initializer_range = 0.05  # large enough that routing and attention patterns are far from uniform
    model = DeepseekV3ForCausalLM._from_config(hf_cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)  # a non-zero bias must steer selection only
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_nanoseek_logits(name, tmp_path):
    cfg = CONFIGS[name]
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_to_hf_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[name]
    torch.manual_seed(1)
    ours = Transformer(cfg).eval()
    ours.init_weights(std=0.05)
    for moe in ours.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    ours.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert ref.config.model_type == "deepseek_v3"
    ids = torch.randint(0, cfg.vocab_size, (3, 29))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-5


def test_sharded_hf_checkpoint_loads(tmp_path):
    cfg = CONFIGS["no_q_lora"]
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, cfg.vocab_size, (1, 11))
    with torch.no_grad():
        assert (nanoseek.load(tmp_path)(ids) - ref(ids).logits).abs().max().item() <= 1e-5


def test_greedy_generation_matches_transformers(tmp_path):
    cfg = CONFIGS["groups"]
    ref = hf_model(cfg, seed=3)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    torch.manual_seed(0)
    for prompt_len in (1, 5, 17):
        prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len))
        expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                eos_token_id=None, pad_token_id=0)
        got = ours.generate(prompt, max_new_tokens=32)
        assert torch.equal(got, expected)


def test_config_json_round_trip(tmp_path):
    cfg = CONFIGS["yarn"]
    model = Transformer(cfg)
    model.save_pretrained(tmp_path)
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(tmp_path)
    assert hf_cfg.n_group == cfg.n_group and hf_cfg.kv_lora_rank == cfg.kv_lora_rank
    assert hf_cfg.rope_parameters["factor"] == 4.0
    back = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    assert back.to_hf_dict()["rope_parameters"] == cfg.to_hf_dict()["rope_parameters"]
    assert back.num_nextn_predict_layers == cfg.num_nextn_predict_layers
