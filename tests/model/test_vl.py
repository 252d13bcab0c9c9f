"""The VL model: the projector's pixel shuffle, image features over the placeholders (and nowhere else), the
checkpoint directory through `nanoseek.load` (parts readable by transformers), generation with an image, and the
tokenizer's `<image>` expansion that leaves text-only ids unchanged."""

import pytest
import torch
from PIL import Image

import nanoseek
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model.transformer import Transformer
from nanoseek.model.vision import to_pixels
from nanoseek.model.vl import Projector, VLModel, vl_preset


@pytest.fixture(scope="module")
def tok():
    texts = ["the red circle is left of the blue square", "how many shapes? 3", "largest bar: 42"] * 20
    return train_tokenizer(texts, 300).add_image_token()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return VLModel(vl_preset("vl-debug", tok.image_id)).eval()


def test_pixel_shuffle_groups_2x2_blocks():
    cfg = vl_preset("vl-debug", 5)
    p = Projector(cfg)
    g, C = 4, 3
    x = torch.arange(g * g * C, dtype=torch.float).reshape(1, g * g, C)
    y = p.shuffle(x)  # [1, 4, 12]
    grid = x.reshape(g, g, C)
    block = grid[2:4, 0:2]  # output cell (1, 0): rows 2-3, columns 0-1
    assert y.shape == (1, 4, C * 4)
    assert torch.equal(y[0, 2], block.permute(2, 0, 1).reshape(-1))  # channel-major, as F.unfold (DeepSeek-VL2)
    odd = p.shuffle(torch.ones(1, 9, C))  # 3×3 grid: padded to 4×4, four cells, the edge ones partly zero
    assert odd.shape == (1, 4, C * 4) and odd[0, 3].sum() == C


def test_features_replace_placeholders_only(model, tok):
    n = model.vl_config.image_tokens
    ids, _ = tok.encode_chat([{"role": "user", "content": "<image>\nhow many shapes?"}], True, image_tokens=n)
    ids = torch.tensor([ids])
    assert int((ids == tok.image_id).sum()) == n
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with_image = model(ids, images=images)
        without = model(ids)
        text = model.language_model()(ids)
    assert torch.equal(without, text)  # no images: the language model itself
    first = int((ids[0] == tok.image_id).nonzero()[0])
    assert torch.allclose(with_image[0, :first], without[0, :first])  # causal: the prefix is unchanged
    assert not torch.allclose(with_image[0, first:], without[0, first:])
    with pytest.raises(ValueError, match="placeholder"):
        model(ids, images=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no <image> placeholder"):
        model(torch.tensor([tok.encode("hi")]), images=images)
    assert model.embed.pending is None


def test_gradients_reach_projector_and_tower(model, tok):
    n = model.vl_config.image_tokens
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "<image>"}], True, image_tokens=n)[0]])
    model.zero_grad()
    model(ids, images=torch.randn(1, 3, 32, 32)).sum().backward()
    assert model.projector.layers[0].weight.grad.abs().sum() > 0
    assert model.vision.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_checkpoint_directory_round_trip(model, tok, tmp_path):
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    model.save_pretrained(tmp_path)
    loaded = nanoseek.load(tmp_path)
    assert isinstance(loaded, VLModel) and loaded.vl_config.image_token_id == tok.image_id
    n = model.vl_config.image_tokens
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "<image> colour?"}], True,
                                        image_tokens=n)[0]])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(ids, images=images), loaded(ids, images=images))
        hf_vision = SiglipVisionModel.from_pretrained(tmp_path / "vision_tower").eval()
        assert (hf_vision(pixel_values=images).last_hidden_state - model.vision(images)).abs().max() <= 1e-5
        hf_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "language_model").eval()
        text = torch.tensor([tok.encode("the red circle")])
        assert (hf_lm(text).logits - model(text)).abs().max() <= 1e-4
    # the language model alone is a text checkpoint, loaded as before
    assert type(nanoseek.load(tmp_path / "language_model")) is Transformer


def test_generate_with_image_matches_full_forward(model, tok):
    n = model.vl_config.image_tokens
    ids = torch.tensor([tok.encode_chat([{"role": "user", "content": "<image>"}], True, image_tokens=n)[0]])
    images = to_pixels([Image.new("RGB", (40, 40), (200, 30, 30))], 32)
    out = model.generate(ids, max_new_tokens=4, images=images)
    seq = ids
    for _ in range(4):  # greedy by full forwards
        with torch.no_grad():
            nxt = model(seq, images=images)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_image_token_leaves_text_ids_unchanged(tok):
    plain = train_tokenizer(["the red circle is left of the blue square", "how many shapes? 3",
                             "largest bar: 42"] * 20, 300)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "how many <image> shapes?"},
            {"role": "assistant", "content": "3"}]
    assert plain.image_id is None and tok.image_id == plain.vocab_size
    text_only = [{"role": "user", "content": "how many shapes?"}, {"role": "assistant", "content": "3"}]
    assert tok.encode_chat(text_only) == plain.encode_chat(text_only)  # the added id changes no text's ids
    ids, mask = tok.encode_chat(chat, image_tokens=5)
    assert ids.count(tok.image_id) == 5 and all(m == 0 for i, m in zip(ids, mask, strict=True) if i == tok.image_id)
    assert tok.encode("<image>") != [tok.image_id]  # text can never produce the control token
    with pytest.raises(ValueError, match="no <image> token"):
        plain.encode_chat(chat, image_tokens=5)


def test_projector_faults_are_named(model, tmp_path):
    from safetensors.torch import load_file, save_file

    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "projector" / "model.safetensors")
    tensors["layers.0.weight"] = tensors["layers.0.weight"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "projector" / "model.safetensors")
    with pytest.raises(ValueError, match="projector.layers.0.weight.*shape"):
        nanoseek.load(tmp_path)
    del tensors["layers.0.weight"]
    save_file(tensors, tmp_path / "projector" / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor.*projector.layers.0.weight"):
        nanoseek.load(tmp_path)
