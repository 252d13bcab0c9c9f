"""MTP speculative decoding: identical greedy output, and the exact sampling distribution of the main model
(checked against probabilities computed by full forward passes, not against the engine itself)."""

import math

import pytest
import torch

from nanoseek.infer.engine import Engine, Request
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.speculative import accept_draft
from nanoseek.model import Transformer, preset

from .test_engine import random_model, run_staggered


def chi2_limit(dof: int, z: float = 4.0) -> float:
    """Upper quantile of chi-square(dof) at ~z sigma (Wilson-Hilferty approximation)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (the rest pooled into one cell)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def test_rejection_step_reproduces_the_target_distribution():
    torch.manual_seed(0)
    V, n = 6, 40000
    p = torch.tensor([0.35, 0.05, 0.3, 0.0, 0.2, 0.1])
    q = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.1, 0.1])  # a poor draft, including mass where p has none
    g = torch.Generator().manual_seed(1)
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    accepted, repl = accept_draft(p.expand(n, V), q.expand(n, V), draft, torch.rand(n, generator=g),
                                  torch.rand(n, generator=g))
    out = torch.where(accepted, draft, repl)
    stat, dof = chi2(torch.bincount(out, minlength=V).float(), p)
    assert stat < chi2_limit(dof)
    assert (out != 3).all()
    assert abs(accepted.float().mean() - torch.minimum(p, q).sum()) < 0.01  # P(accept) = Σ min(p, q)


@pytest.mark.parametrize("max_len", [128, 36])
def test_greedy_speculative_equals_plain_decoding(max_len):
    model = random_model(11)
    torch.manual_seed(12)
    lengths, budgets = (3, 8, 1, 12), (15, 6, 20, 9)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in lengths]

    def run(speculative):
        reqs = [Request(p, SamplingParams(max_tokens=m, ignore_eos=True))
                for p, m in zip(prompts, budgets, strict=True)]
        got = run_staggered(Engine(model, max_batch=3, max_len=max_len, speculative=speculative), reqs, 2)
        return [got[r.id] for r in reqs]

    assert run(True) == run(False)



@pytest.mark.slow  # torch.compile of the verification and drafting steps
def test_compiled_greedy_speculative_equals_plain_decoding():
    model = random_model(11)
    torch.manual_seed(12)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (3, 8)]
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    plain = Engine(model, max_batch=2, max_len=64).generate(prompts, params)
    spec = Engine(model, max_batch=2, max_len=64, speculative=True, compile=True).generate(prompts, params)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]

def test_speculative_on_a_trained_model_accepts_drafts(chat_model, tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                        thinking=True)
    plain = Engine(chat_model, tokenizer).generate([ids], SamplingParams(max_tokens=40))[0]
    engine = Engine(chat_model, tokenizer, speculative=True)
    spec = engine.generate([ids], SamplingParams(max_tokens=40))[0]
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert engine.drafter.acceptance_rate > 0.5  # the MTP head learned the reply too


def test_mixed_batch_keeps_greedy_rows_exact():
    model = random_model(13)
    prompt = [4, 5, 6]
    plain = Engine(model).generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].tokens
    mixed = Engine(model, max_batch=3, speculative=True).generate(
        [[7, 8], prompt, [9]], [SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True),
                                SamplingParams(max_tokens=12, ignore_eos=True),
                                SamplingParams(max_tokens=12, temperature=0.8, top_k=5, seed=2, ignore_eos=True)])
    assert mixed[1].tokens == plain


def test_sampled_speculative_tokens_follow_the_main_model():
    """Three sampled tokens per run, thousands of runs: the first is drawn from the prefill, the second is the
    verified draft (accepted or resampled) and the third a bonus or a post-rejection token. Their frequencies
    match the main model's exact probabilities computed by full forward passes."""
    V, T = 8, 2.0
    torch.manual_seed(14)
    model = Transformer(preset("debug", vocab_size=V)).eval()
    model.init_weights(std=0.05)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.3)  # at T=2 about half the drafts are accepted: both paths run
    prompt = [1, 2, 3]
    n, runs = 128, 16
    engine = Engine(model, max_batch=n, speculative=True)
    samples = []
    for r in range(runs):
        out = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=T, n=n, seed=r,
                                                       ignore_eos=True))
        samples += [c.tokens for c in out]
    samples = torch.tensor(samples)  # [n * runs, 3]
    assert 0.2 < engine.drafter.acceptance_rate < 0.8  # accepted (bonus) and rejected (resampled) paths both run
    with torch.no_grad():
        p1 = (model(torch.tensor([prompt])) / T).softmax(-1)[0, -1]  # [V]
        pairs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        probs = (model(pairs) / T).softmax(-1)
        p2 = probs[:V * V:V, -2]  # P(t2 | t1=a) for each a: rows a*V (any b) at position of t1
        p12 = (p1[:, None] * p2).flatten()  # joint of (t1, t2)
        p123 = (p12[:, None] * probs[:, -1]).flatten()  # joint of (t1, t2, t3)
    stat, dof = chi2(torch.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V).float(), p12)
    assert stat < chi2_limit(dof), (stat, dof)
    cells = (samples[:, 0] * V + samples[:, 1]) * V + samples[:, 2]
    stat, dof = chi2(torch.bincount(cells, minlength=V ** 3).float(), p123)
    assert stat < chi2_limit(dof), (stat, dof)


def test_engine_without_mtp_refuses_speculation():
    model = Transformer(preset("debug", num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        Engine(model, speculative=True)
