"""The engine against independent references: transformers `generate` on exported weights, the model's full
(uncached) forward pass, and single-request runs for continuous batching."""

import pytest
import torch

import nanoseek
from nanoseek.infer.decoder import Decoder
from nanoseek.infer.engine import Engine, Request
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import LatentCache, Transformer, preset

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)


def random_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(preset("debug", **overrides)).eval()
    model.init_weights(std=0.05)  # far from uniform attention and routing
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("fast", [True, False])
def test_greedy_matches_transformers_generate(tmp_path, fast):
    from transformers import AutoModelForCausalLM

    ours = random_model(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                        routed_scaling_factor=2.5, num_hidden_layers=3)
    ours.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    engine = Engine(nanoseek.load(tmp_path), max_batch=4, fast=fast)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (1, 5, 17, 30)]
    got = engine.generate(prompts, GREEDY)  # one ragged (left-padded) batch
    for prompt, c in zip(prompts, got, strict=True):
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert c.tokens == expected.tolist()
        assert c.finish_reason == "length"


def test_greedy_tokens_are_the_argmax_of_the_full_forward():
    model = random_model(1)
    torch.manual_seed(2)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (3, 11)]
    assert_engine_is_greedy_forward(Engine(model, max_batch=2), prompts, 12)


def assert_engine_is_greedy_forward(engine: Engine, prompts: list[list[int]], max_tokens: int) -> None:
    """The engine's greedy tokens (a batch of ragged prompts) equal the argmax of the model's full forward over
    prompt + completion."""
    completions = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    for c, prompt in zip(completions, prompts, strict=True):
        seq = torch.tensor([prompt + c.tokens])
        with torch.no_grad():
            argmax = engine.model(seq).argmax(-1)[0, len(prompt) - 1:-1]
        assert argmax.tolist() == c.tokens


@pytest.mark.parametrize("compile", [False, True])
def test_decoder_matches_the_model_with_holes_and_several_tokens(compile):
    """The one decode implementation, eager and compiled (a power-of-two cache prefix under a mask, gathered or
    dense experts), equals the model's own cached forward on a ragged cache (key_mask holes, own positions per
    row, a speculative hole among the new tokens) for one and two new tokens, and writes the same latents."""
    assert_decoder_matches_model(random_model(3, num_experts_per_tok=2, num_hidden_layers=2), compile)


def assert_decoder_matches_model(model, compile: bool) -> None:
    """Decoder steps of one and two new tokens vs the model's `forward_cached` on a ragged cache: the same hidden
    states, and the same cache contents afterwards (every cache tensor: latents, rotary keys, index keys)."""
    cfg = model.config
    torch.manual_seed(4)
    B, S = 3, 20
    ids = torch.randint(3, 512, (B, S + 1))
    key_mask = torch.rand(B, S + 2) > 0.3
    key_mask[:, S - 1:] = True
    key_mask[0, S] = False  # a speculative hole among the new tokens
    positions = torch.stack([torch.arange(S - 1, S + 1) + i for i in range(B)])
    decoder = Decoder(model, compile=compile)
    for t in (1, 2):
        caches = []
        for _ in range(2):
            cache = LatentCache.empty(cfg, B, S + 2, layers=cfg.num_hidden_layers)
            with torch.no_grad():
                model.forward_cached(ids[:, :S - 1], cache, 0)
            caches.append(cache)
        new = ids[:, S - 1:S - 1 + t]
        with torch.no_grad():
            ref = model.forward_cached(new, caches[0], S - 1, key_mask=key_mask, positions=positions[:, :t],
                                       hidden=True)
        got = decoder.forward(new, caches[1], S - 1, key_mask, positions[:, :t])
        assert (got - ref).abs().max().item() <= 1e-5
        for a, b in zip(caches[0].tensors(), caches[1].tensors(), strict=True):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_compiled_engine_greedy_equals_the_reference_path():
    model = random_model(1)
    torch.manual_seed(2)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (3, 11)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = Engine(model, max_batch=2, fast=False).generate(prompts, params)
    got = Engine(model, max_batch=2, max_len=64, compile=True).generate(prompts, params)
    assert [c.tokens for c in got] == [c.tokens for c in ref]

def run_staggered(engine, requests, arrive_every=3):
    """Add requests one at a time while others run; returns {request id: tokens}."""
    out = {r.id: [] for r in requests}
    pending = list(requests)
    step = 0
    while pending or engine.has_work():
        if pending and step % arrive_every == 0:
            engine.add_request(pending.pop(0))
        for ev in engine.step():
            if ev.token is not None:
                out[ev.request_id].append(ev.token)
        step += 1
    return out


@pytest.mark.parametrize("max_len", [128, 40])
def test_continuous_batching_equals_running_alone(max_len):
    """Requests joining and leaving a running batch (row moves, right shifts for longer prompts and, with a short
    cache, left compaction) produce the tokens each gets alone."""
    model = random_model(5)
    torch.manual_seed(6)
    lengths, budgets = (4, 9, 2, 13, 6), (12, 5, 20, 8, 14)
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in lengths]
    alone = [Engine(model, max_batch=1, max_len=64).generate([p], SamplingParams(max_tokens=m, ignore_eos=True))[0]
             for p, m in zip(prompts, budgets, strict=True)]
    requests = [Request(p, SamplingParams(max_tokens=m, ignore_eos=True))
                for p, m in zip(prompts, budgets, strict=True)]
    got = run_staggered(Engine(model, max_batch=3, max_len=max_len), requests)
    for r, a in zip(requests, alone, strict=True):
        assert got[r.id] == a.tokens


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    model = random_model(7)
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    alone = Engine(model, max_batch=4).generate([prompt], params)[0].tokens
    again = Engine(model, max_batch=4).generate([prompt], params)[0].tokens
    crowd = Engine(model, max_batch=4).generate(
        [[9, 9, 9], prompt, [1, 2]], [SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True), params,
                                      SamplingParams(max_tokens=20, ignore_eos=True)])[1].tokens
    other = Engine(model, max_batch=4).generate([prompt], SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.9, seed=124, ignore_eos=True))[0].tokens
    assert alone == again == crowd
    assert alone != other


def test_n_samples_differ_and_come_in_order():
    model = random_model(8)
    out = Engine(model, max_batch=4).generate([[3, 4, 5]], SamplingParams(max_tokens=10, temperature=1.0, n=3,
                                                                          seed=0, ignore_eos=True))
    assert [c.index for c in out] == [0, 1, 2]
    assert len({tuple(c.tokens) for c in out}) > 1


def test_a_requests_samples_share_one_prefill():
    """n samples of a prompt prefill it once and copy its cache to their rows: each sample's tokens are what it
    gets alone or beside other requests, and the prefill runs one row per distinct prompt."""
    model = random_model(9)
    a = ([3, 4, 5, 6, 7], SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=7, ignore_eos=True))
    b = ([8, 9, 10, 11, 12, 13, 14, 15, 16], SamplingParams(max_tokens=10, n=2, ignore_eos=True))
    alone = [Engine(model, max_batch=3).generate([p], params) for p, params in (a, b)]
    prefill_rows = []
    forward = model.forward_cached

    def record(ids, *args, **kwargs):
        if args[1] == 0:  # start 0: a prefill
            prefill_rows.append(ids.shape[0])
        return forward(ids, *args, **kwargs)

    model.forward_cached = record
    crowd = Engine(model, max_batch=8).generate([a[0], b[0]], [a[1], b[1]])
    del model.forward_cached
    assert prefill_rows == [2]
    assert [c.tokens for c in crowd] == [c.tokens for c in alone[0] + alone[1]]
    assert alone[1][0].tokens == alone[1][1].tokens  # greedy samples agree
    assert len({tuple(c.tokens) for c in alone[0]}) > 1  # sampled ones differ


def test_stop_token_stop_string_max_tokens_and_stream(chat_model, tokenizer):
    from .conftest import REPLY

    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                        thinking=True)
    engine = Engine(chat_model, tokenizer, max_batch=2)
    full = engine.generate([ids], SamplingParams(max_tokens=60))[0]
    assert full.finish_reason == "stop" and "<think>\n" + full.text == REPLY  # EOS stops, and is not in the text
    events = []
    cut = engine.generate([ids], SamplingParams(max_tokens=60, stop=["so I"]), stream=events.append)[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index("so I")]
    assert "".join(e.text for e in events) == cut.text and events[-1].finish_reason == "stop"
    short = engine.generate([ids], SamplingParams(max_tokens=3))[0]
    assert short.finish_reason == "length" and short.tokens == full.tokens[:3]
    end_think = engine.generate([ids], SamplingParams(max_tokens=60, stop_token_ids=[tokenizer.end_think_id]))[0]
    assert end_think.text == full.text[:full.text.index("</think>")]


def test_routing_is_the_gates_choice_in_a_full_forward():
    model = random_model(9)
    prompt = [11, 12, 13, 14, 15]
    c = Engine(model, max_batch=1).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True),
                                             routing=True)[0]
    picks = []
    hooks = [m.gate.register_forward_hook(lambda _m, _i, out: picks.append(out[0])) for m in
             [b.ffn for b in model.blocks if b.is_moe]]
    with torch.no_grad():
        model(torch.tensor([prompt + c.tokens]))
    for h in hooks:
        h.remove()
    for k in range(len(c.tokens)):  # token k was produced by position len(prompt) - 1 + k
        expected = [sorted(p[len(prompt) - 1 + k].tolist()) for p in picks]
        assert [sorted(e) for e in c.experts[k]] == expected


@pytest.mark.parametrize("prompt,match", [([], "empty"), ([1] * 600, "context"), ([3, 10**6], "vocabulary")])
def test_bad_requests_are_refused(prompt, match):
    engine = Engine(random_model(), max_batch=1)
    with pytest.raises(ValueError, match=match):
        engine.add_request(Request(prompt))


def test_forward_cached_hidden_is_the_normed_state_under_the_head():
    """The model option the engine relies on: hidden=True returns what the head and MTP module 1 consume."""
    model = random_model(10)
    ids = torch.randint(3, 512, (2, 9))
    with torch.no_grad():
        full = model(ids, extras=True)
        h = model.forward_cached(ids, LatentCache.empty(model.config, 2, 9), 0, hidden=True)
    assert torch.allclose(h, full.hidden, atol=1e-6)
    assert torch.allclose(model.head(h), full.logits, atol=1e-5)
