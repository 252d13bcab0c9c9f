"""Image requests through the one continuous-batching engine: greedy tokens equal `VLModel.generate` with the same
images (ragged batches, several images per prompt, n samples, a request joining a running batch, both decode
paths), and requests whose images do not fit their prompt are refused before they reach a batch."""

import pytest
import torch

from nanoseek.infer.engine import Engine, Request
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import Transformer, preset
from nanoseek.model.vl import VLModel, vl_preset

IMAGE = 511  # the last id of the debug vocabulary: the engine's left padding must not be taken for a placeholder
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = VLModel(vl_preset("vl-debug", IMAGE)).eval()
    model.init_weights(std=0.05)  # far from uniform logits: greedy ties would make the comparison arbitrary
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def prompt(model, before: int, images: int, after: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    text = [int(t) for t in torch.randint(3, 500, (before + after,), generator=g)]
    return text[:before] + [IMAGE] * (images * model.vl_config.image_tokens) + text[before:]


def pixels(k: int, seed: int) -> torch.Tensor:
    return torch.rand(k, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def alone(model, ids: list[int], images: torch.Tensor | None, n: int = GREEDY.max_tokens) -> list[int]:
    return model.generate(torch.tensor([ids]), n, images=images)[0, len(ids):].tolist()


@pytest.mark.parametrize("fast", [True, False])
def test_image_requests_equal_vl_generate(model, fast):
    cases = [(prompt(model, 3, 1, 6, 0), pixels(1, 0)),
             (prompt(model, 1, 2, 1, 1), pixels(2, 1)),  # two images, a shorter prompt: left-padded
             (prompt(model, 9, 0, 0, 2), None)]  # text only, in the same prefill
    engine = Engine(model, max_batch=4, fast=fast)
    got = engine.generate([p for p, _ in cases], GREEDY, images=[im for _, im in cases])
    for (ids, images), c in zip(cases, got, strict=True):
        assert c.tokens == alone(model, ids, images)
    other = engine.generate([cases[0][0]], GREEDY, images=[pixels(1, 7)])[0].tokens
    assert other == alone(model, cases[0][0], pixels(1, 7)) != got[0].tokens  # the image decides the answer


def test_image_request_joins_a_running_batch_with_n_samples(model):
    engine = Engine(model, max_batch=4)
    text = prompt(model, 4, 0, 0, 3)
    engine.add_request(Request(text, SamplingParams(max_tokens=14, ignore_eos=True), id="text"))
    tokens: dict[tuple[str, int], list[int]] = {}

    def collect(events):
        for ev in events:
            if ev.token is not None:
                tokens.setdefault((ev.request_id, ev.index), []).append(ev.token)

    for _ in range(3):
        collect(engine.step())
    ids, images = prompt(model, 5, 1, 4, 4), pixels(1, 4)  # longer than the frontier: the batch shifts right
    engine.add_request(Request(ids, SamplingParams(max_tokens=8, ignore_eos=True, n=2), id="image", images=images))
    while engine.has_work():
        collect(engine.step())
    assert tokens[("text", 0)] == alone(model, text, None, 14)
    assert tokens[("image", 0)] == tokens[("image", 1)] == alone(model, ids, images, 8)


def test_requests_whose_images_do_not_fit_are_refused(model):
    engine = Engine(model, max_batch=2)
    ids = prompt(model, 2, 1, 2, 5)
    for bad, match in [(Request(ids), "holds 4 image ids; 0 image"),
                       (Request(ids, images=pixels(2, 0)), "2 image"),
                       (Request(ids, images=torch.zeros(1, 3, 16, 16)), "shape"),
                       (Request(prompt(model, 3, 0, 0, 6), images=pixels(1, 0)), "0 image ids")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request(bad)
    assert not engine.has_work()
    torch.manual_seed(0)
    text = Engine(Transformer(preset("debug")).eval(), max_batch=2)
    with pytest.raises(ValueError, match="takes no images"):
        text.add_request(Request([1, 2, 3], images=pixels(1, 0)))
