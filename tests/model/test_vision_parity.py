"""The SigLIP tower against transformers' SiglipVisionModel: weights load from and save to its directory format,
and the patch features (and the pooling head's output) agree to 1e-5, in both directions, on two configs."""

import json

import pytest
import torch
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from nanoseek.model.vision import VisionConfig, VisionEncoder, load_vision, save_vision, to_pixels

CONFIGS = [
    dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
         patch_size=8, vision_use_head=True),
    dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=28,
         patch_size=4, vision_use_head=False, layer_norm_eps=1e-5, hidden_act="gelu"),
]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (LayerNorm scales and biases included), so no term of the maths hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kw", CONFIGS)
def test_hf_to_nanoseek(tmp_path, kw):
    hf = SiglipVisionModel(SiglipVisionConfig(**kw)).eval()
    _randomise(hf, 0)
    hf.save_pretrained(tmp_path)
    ours = load_vision(tmp_path)
    x = torch.randn(2, 3, kw["image_size"], kw["image_size"])
    with torch.no_grad():
        ref = hf(pixel_values=x)
        feats = ours(x)
    assert feats.shape == ref.last_hidden_state.shape
    assert (feats - ref.last_hidden_state).abs().max() <= 1e-5
    if kw["vision_use_head"]:
        assert (ours.pool(feats) - ref.pooler_output).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", CONFIGS)
def test_nanoseek_to_hf(tmp_path, kw):
    ours = VisionEncoder(VisionConfig(**kw)).eval()
    _randomise(ours, 1)
    save_vision(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "siglip_vision_model"
    hf = SiglipVisionModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, kw["image_size"], kw["image_size"])
    with torch.no_grad():
        ref = hf(pixel_values=x)
        feats = ours(x)
    assert (feats - ref.last_hidden_state).abs().max() <= 1e-5
    if kw["vision_use_head"]:
        assert (ours.pool(feats) - ref.pooler_output).abs().max() <= 1e-5
    # and back: a save of the HF model reloads to the same weights
    hf.save_pretrained(tmp_path / "again")
    again = load_vision(tmp_path / "again")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_transformers4_prefix_and_bad_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    ours = VisionEncoder(VisionConfig(**CONFIGS[1]))
    save_vision(ours, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({"vision_model." + k: v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    assert torch.equal(load_vision(tmp_path).post_layernorm.weight, ours.post_layernorm.weight)
    tensors["post_layernorm.weight"] = torch.zeros(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="post_layernorm.weight.*shape"):
        load_vision(tmp_path)
    with pytest.raises(ValueError, match="hidden_size=48 must be divisible"):
        VisionConfig(**{**CONFIGS[1], "num_attention_heads": 5})


def test_to_pixels_matches_siglip_normalisation():
    im = Image.new("RGB", (16, 16), (255, 0, 128))
    x = to_pixels([im], 16)
    assert x.shape == (1, 3, 16, 16)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
