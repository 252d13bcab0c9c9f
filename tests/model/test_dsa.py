"""DeepSeek Sparse Attention (V3.2): logit parity with transformers' DeepseekV32ForCausalLM in both directions
(index_topk below the sequence length, so the indexer really drops keys), config.json round trip, and the
engine's sparse decode over its index-key cache against the full forward and transformers `generate`."""

import pytest
import torch

import nanoseek
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import ModelConfig, Transformer, preset
from tests.infer.test_engine import assert_decoder_matches_model, assert_engine_is_greedy_forward

transformers = pytest.importorskip("transformers")

# 8 indexer heads: a key scores exactly 0 (every head's ReLU off) with probability 2^-8, so top-k boundaries
# rarely fall among ties, whose order is up to torch.topk.
CONFIGS = {
    # the debug preset's dense + MoE layers, top-8 of up to 37 keys
    "top8": preset("debug", attention="dsa", index_n_heads=8, index_topk=8, num_hidden_layers=3),
    # group-limited routing, every layer MoE, a wider indexer (head dim > rope dim), top-5
    "groups_top5": preset("debug", attention="dsa", index_n_heads=8, index_head_dim=32, index_topk=5,
                          n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=0,
                          routed_scaling_factor=2.5),
    # YaRN (the indexer rotates with the same frequencies), index head dim = rope dim, top-12
    "yarn_top12": preset("debug", attention="dsa", index_n_heads=8, index_head_dim=8, index_topk=12,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def hf_model(cfg: ModelConfig, seed: int = 0):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = DeepseekV32Config(**cfg.to_hf_dict())
    hf_cfg.initializer_range = 0.05  # attention, routing and index scores far from uniform
    model = DeepseekV32ForCausalLM._from_config(hf_cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.1)
    return model


def random_model(cfg: ModelConfig, seed: int = 1) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.05)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_to_nanoseek_logits(name, tmp_path):
    cfg = CONFIGS[name]
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    assert ours.config.attention == "dsa" and ours.config.index_topk == cfg.index_topk
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
        ours.sparse_attention(False)  # every key: the selection must have mattered
        dense = ours(ids)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (dense - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_to_hf_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[name]
    ours = random_model(cfg)
    ours.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    assert ref.config.model_type == "deepseek_v32"
    ids = torch.randint(0, cfg.vocab_size, (3, 29))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-5


def test_config_json_round_trip(tmp_path):
    from transformers import AutoConfig

    cfg = CONFIGS["yarn_top12"]
    Transformer(cfg).save_pretrained(tmp_path)
    hf_cfg = AutoConfig.from_pretrained(tmp_path)
    assert type(hf_cfg).__name__ == "DeepseekV32Config" and hf_cfg.architectures == ["DeepseekV32ForCausalLM"]
    assert (hf_cfg.index_n_heads, hf_cfg.index_head_dim, hf_cfg.index_topk) == (8, 8, 12)
    back = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    assert back.attention == "dsa" and back.to_hf_dict() == {**cfg.to_hf_dict(), **back.extra}
    # MLA configs stay DeepSeek-V3 and carry no indexer fields
    mla = preset("debug").to_hf_dict()
    assert mla["model_type"] == "deepseek_v3" and "index_topk" not in mla and "attention" not in mla


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="attention='sparse'"):
        preset("debug", attention="sparse")
    with pytest.raises(ValueError, match="index_head_dim=4"):
        preset("debug", attention="dsa", index_head_dim=4)  # below qk_rope_head_dim=8
    with pytest.raises(ValueError, match="index_topk=0"):
        preset("debug", attention="dsa", index_topk=0)
    d = preset("debug", attention="dsa").to_hf_dict()
    with pytest.raises(ValueError, match="mlp_layer_types"):
        ModelConfig.from_hf_dict({**d, "mlp_layer_types": ["sparse", "sparse"]})


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_engine_greedy_is_the_full_forward_argmax(q_lora_rank):
    """Sparse decode over the cache (index keys beside the latents), ragged left-padded batch, prompts longer and
    shorter than index_topk: every token is the argmax of the uncached full forward over the sequence so far."""
    model = random_model(preset("debug", attention="dsa", index_n_heads=8, index_topk=6, q_lora_rank=q_lora_rank))
    torch.manual_seed(2)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (3, 11, 20)]
    engine = Engine(model, max_batch=3)
    assert engine.cache.index_k is not None and engine.cache.index_k.shape[-1] == 16
    assert_engine_is_greedy_forward(engine, prompts, 16)


@pytest.mark.parametrize("compile", [False, True])
def test_decoder_matches_the_model_on_a_ragged_cache(compile):
    """The decoder's sparse step (eager, and compiled over a masked power-of-two prefix) equals the model's cached
    forward with key_mask holes and one or two new tokens, and writes the same index keys."""
    model = random_model(preset("debug", attention="dsa", index_n_heads=8, index_topk=6, num_hidden_layers=2))
    assert_decoder_matches_model(model, compile)


def test_greedy_generation_matches_transformers(tmp_path):
    cfg = CONFIGS["top8"]
    ref = hf_model(cfg, seed=3)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load(tmp_path)
    engine = Engine(ours, max_batch=1)
    torch.manual_seed(0)
    for prompt_len in (3, 17):  # shorter and longer than index_topk
        prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len))
        expected = ref.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                eos_token_id=None, pad_token_id=0)
        assert torch.equal(ours.generate(prompt, max_new_tokens=20), expected)
        got = engine.generate([prompt[0].tolist()], SamplingParams(max_tokens=20, ignore_eos=True))[0]
        assert got.tokens == expected[0, prompt_len:].tolist()
