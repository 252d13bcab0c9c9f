"""Sampling against transformers' logits processors (an independent implementation) and against exact
probabilities (frequency tests with fixed seeds)."""

import pytest
import torch

from nanoseek.infer.sampling import (
    Penalties,
    RowParams,
    SamplingParams,
    apply_penalties,
    distribution,
    draw,
    filter_logits,
    row_generator,
    sample,
)

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def hf_filter(logits, temperature, top_k, top_p, min_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (0.9, 0, 1.0, 0.1), (0.6, 20, 0.9, 0.05),
    (2.0, 1, 0.5, 0.0),
])
def test_filter_matches_transformers_warpers(temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    ours = filter_logits(logits, torch.full((4,), temperature), torch.full((4,), top_k), torch.full((4,), top_p),
                         torch.full((4,), min_p))
    ref = hf_filter(logits, temperature, top_k, top_p, min_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], atol=1e-6)


def test_per_row_parameters_are_independent():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    params = [(1.0, 3, 1.0, 0.0), (0.5, 0, 0.7, 0.0), (1.5, 0, 1.0, 0.2)]
    ours = filter_logits(logits, *(torch.tensor([p[i] for p in params]) for i in range(4)))
    for row, p in enumerate(params):
        ref = hf_filter(logits[row:row + 1], *p)
        assert torch.equal(torch.isinf(ours[row:row + 1]), torch.isinf(ref))


def test_repetition_penalty_matches_transformers_and_presence_frequency_formula():
    torch.manual_seed(2)
    logits = torch.randn(2, 30)
    prompt, output = [[1, 4, 4, 9], [2]], [[4, 5, 5, 5], []]
    pen = Penalties(2, 30)
    for row in range(2):
        pen.reset_row(row, prompt[row])
        for t in output[row]:
            pen.add(torch.tensor([row]), torch.tensor([t]))
    rep = apply_penalties(logits, pen.output_counts, pen.prompt_seen, torch.tensor([1.3, 1.3]),
                          torch.zeros(2), torch.zeros(2))
    for row in range(2):
        seen = torch.tensor([prompt[row] + output[row]])
        ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits[row:row + 1].clone())
        assert torch.allclose(rep[row:row + 1], ref)
    out = apply_penalties(logits, pen.output_counts, pen.prompt_seen, torch.ones(2), torch.tensor([0.5, 0.5]),
                          torch.tensor([0.25, 0.25]))
    expected = logits.clone()
    expected[0, 4] -= 0.5 + 0.25 * 1
    expected[0, 5] -= 0.5 + 0.25 * 3
    assert torch.allclose(out, expected)  # presence/frequency count output tokens only (prompt's 1 and 9 untouched)


def test_draw_follows_the_probabilities():
    """Inverse-CDF draws from fixed uniforms: frequencies within 4 sigma of the probabilities, zeros never drawn."""
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    ids = draw(probs.expand(n, -1), u)
    freq = torch.bincount(ids, minlength=5).float() / n
    assert freq[1] == 0 and freq[4] == 0
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all()


def test_sample_greedy_and_seeded_reproducibility():
    torch.manual_seed(3)
    logits = torch.randn(2, 100)
    greedy = RowParams.stack([SamplingParams(), SamplingParams()])
    assert torch.equal(sample(logits, greedy, []), logits.argmax(-1))
    params = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0, seed=8)]
    rp = RowParams.stack(params)

    def run():
        gens = [row_generator(p.seed) for p in params]
        return torch.stack([sample(logits, rp, gens) for _ in range(50)])

    a, b = run(), run()
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # different seeds, different streams


def test_distribution_marks_greedy_rows_one_hot():
    logits = torch.randn(2, 10)
    rp = RowParams.stack([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)])
    p = distribution(logits, rp)
    assert p[0, logits[0].argmax()] == 1 and p[0].sum() == 1
    assert torch.allclose(p[1], logits[1].softmax(-1))


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
                                         ("max_tokens", 0), ("n", 0), ("stop", [""]), ("presence_penalty", 3.0)])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_row_generator_streams_differ_per_sample_index():
    a = torch.rand(4, generator=row_generator(5, 0))
    b = torch.rand(4, generator=row_generator(5, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.rand(4, generator=row_generator(5, 0)))
