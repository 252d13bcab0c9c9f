"""Decoding speed: nanoseek's engine vs transformers `generate`, same weights, one process, fp32 on CPU.

Measures (greedy, EOS ignored so every run generates the same number of tokens):
  1. decode tokens/s at batch 1 with a 16-token prompt, batch 1 with a 1,024-token prompt, and batch 16
     (decode = after the first token; prefill time is reported apart), outputs checked identical;
  2. KV-cache bytes per token: nanoseek's latent cache, the cache transformers keeps, and an MHA of the same heads;
  3. MTP speculative decoding: speed-up over plain decoding at batch 1, and the draft acceptance rate;
  4. serving: p50/p99 request latency and throughput with 1 and 8 concurrent clients (OpenAI API over HTTP).
Both implementations are timed alternately, best of --repeats, so machine noise hits them alike.

    python bench/decode_speed.py --model runs/tiny                  # a trained checkpoint (meaningful MTP)
    python bench/decode_speed.py                                     # `tiny` preset, random weights
    python bench/decode_speed.py --new-tokens 8 --long-prompt 64 --repeats 1 --requests 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from roofline import decode_limit, fraction, machine

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams


def load(args):
    """(model, tokenizer): a checkpoint with its tokenizer, or the preset with random weights and a tokenizer
    trained on built-in problems (so the server has text to return)."""
    if args.model:
        from nanoseek.infer.engine import load_engine

        engine = load_engine(args.model, max_batch=1)
        return engine.model, engine.tokenizer
    from nanoseek.data.synth import make_problems
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model import Transformer, preset

    problems = make_problems("arithmetic", 400, difficulty=[1, 2, 3]) + make_problems("word_problems", 200)
    tok = train_tokenizer([p.question + "\n" + p.reasoning() for p in problems], 4096)
    torch.manual_seed(0)
    return Transformer(preset(args.preset, vocab_size=tok.vocab_size)).eval(), tok


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_case(model, hf, prompt: torch.Tensor, new: int, repeats: int, compile: bool = False) -> dict:
    """Tokens/s of both implementations on the same prompts; decode excludes the first token (prefill)."""
    B, P = prompt.shape
    ids = prompt.tolist()
    engine = Engine(model, max_batch=B, max_len=P + new + 2, compile=compile)
    ours = {}

    def run_ours(n):
        ours[n] = engine.generate(ids, SamplingParams(max_tokens=n, ignore_eos=True))

    def run_hf(n):
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)

    run_ours(2), run_hf(2)  # warm up
    t_ours_1, t_hf_1 = best(lambda: run_ours(1), repeats), best(lambda: run_hf(1), repeats)
    t_ours, t_hf, ref = float("inf"), float("inf"), None
    for _ in range(repeats):  # alternate, keep the best of each
        t0 = time.perf_counter()
        ref = run_hf(new)
        t_hf = min(t_hf, time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_ours(new)
        t_ours = min(t_ours, time.perf_counter() - t0)
    same = all(c.tokens == r[P:].tolist() for c, r in zip(ours[new], ref, strict=True))
    dec_ours = B * (new - 1) / max(t_ours - t_ours_1, 1e-9)
    dec_hf = B * (new - 1) / max(t_hf - t_hf_1, 1e-9)
    return {"batch": B, "prompt": P, "new_tokens": new, "identical": same,
            "prefill_s": {"nanoseek": t_ours_1, "transformers": t_hf_1},
            "decode_tok_s": {"nanoseek": dec_ours, "transformers": dec_hf}, "decode_speedup": dec_ours / dec_hf,
            "end_to_end_tok_s": {"nanoseek": B * new / t_ours, "transformers": B * new / t_hf},
            "end_to_end_speedup": t_hf / t_ours}


def cache_bytes(model, hf) -> dict:
    """Bytes per token of cache (all layers): measured for both implementations after a forward pass."""
    from nanoseek.model import LatentCache

    cfg = model.config
    T = 16
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    ours = LatentCache.empty(cfg, 1, T, layers=cfg.num_hidden_layers).bytes_per_token()
    with torch.no_grad():
        cache = hf(ids, use_cache=True).past_key_values
    hf_bytes = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)) / T
    # standard MHA with the same heads: a K and a V vector of d_h = v_head_dim per head and layer
    mha = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * cfg.v_head_dim * 4
    return {"nanoseek": ours, "transformers": hf_bytes, "mha_same_heads": mha, "mha_over_nanoseek": mha / ours}


def speculative_case(model, tok, new: int, repeats: int, prompts: list[list[int]], compile: bool = False) -> dict:
    plain = Engine(model, tok, max_batch=1, compile=compile)
    spec = Engine(model, tok, max_batch=1, speculative=True, compile=compile)
    params = SamplingParams(max_tokens=new)  # EOS ends both alike: outputs are identical, compare tokens/s
    out = {}

    def run(engine, key):
        out[key] = [engine.generate([p], params)[0] for p in prompts]

    run(plain, "plain"), run(spec, "spec")
    spec.drafter.proposed = spec.drafter.accepted = 0
    t_plain, t_spec = float("inf"), float("inf")
    for _ in range(repeats):
        t_plain = min(t_plain, best(lambda: run(plain, "plain"), 1))
        t_spec = min(t_spec, best(lambda: run(spec, "spec"), 1))
    tokens = sum(len(c.tokens) for c in out["plain"])
    return {"prompts": len(prompts), "tokens": tokens,
            "identical": [c.tokens for c in out["plain"]] == [c.tokens for c in out["spec"]],
            "tok_s": {"plain": tokens / t_plain, "speculative": tokens / t_spec}, "speedup": t_plain / t_spec,
            "acceptance": spec.drafter.acceptance_rate}


def serving_case(model, tok, prompts: list[list[int]], new: int, requests: int) -> dict:
    import httpx
    import uvicorn

    from nanoseek.infer.serve.app import Limits, create_app

    app = create_app(Engine(model, tok, max_batch=8), "bench", Limits(max_tokens_cap=new))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    results = {}
    try:
        for clients in (1, 8):
            def client(k: int) -> list[float]:
                lat = []
                with httpx.Client(timeout=600) as http:
                    for i in range(requests):
                        body = {"prompt": prompts[(k * requests + i) % len(prompts)], "max_tokens": new,
                                "temperature": 0, "ignore_eos": True}
                        t0 = time.perf_counter()
                        http.post(url, json=body).raise_for_status()
                        lat.append(time.perf_counter() - t0)
                return lat

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                lat = sorted(x for part in pool.map(client, range(clients)) for x in part)
            wall = time.perf_counter() - t0
            results[f"{clients}_clients"] = {
                "requests": len(lat), "p50_s": lat[len(lat) // 2],
                "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "throughput_tok_s": len(lat) * new / wall}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint or run directory (default: --preset with random weights)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8, help="requests per serving client")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--compile", action="store_true",
                    help="nanoseek's engine with its compiled decode step (compile time is paid in the warm-up)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model, tok = load(args)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d).float().eval()  # transformers' defaults (sdpa)
    g = torch.Generator().manual_seed(0)
    V, n = model.config.vocab_size, args.new_tokens
    report: dict = {"config": {"params": model.num_params(), "active": model.num_params(active=True),
                               "threads": torch.get_num_threads(), "model": args.model or args.preset,
                               "compile": args.compile}}
    report["machine"] = limits = machine()
    print(f"this machine: fp32 GEMM {limits['gemm_flop_s'] / 1e9:.1f} GFLOP/s, memory "
          f"{limits['bandwidth_bytes_s'] / 1e9:.1f} GB/s ({limits['threads']} threads)", flush=True)
    cases = {"b1_short": (1, 16), "b1_long": (1, args.long_prompt), "b16": (16, 16)}
    for name, (B, P) in cases.items():
        report[name] = decode_case(model, hf, torch.randint(10, V, (B, P), generator=g), n, args.repeats,
                                   args.compile)
        r = report[name]
        # bandwidth-bound ceiling: active weights once per step + each row's latent cache, mid-generation
        r["limit_tok_s"] = decode_limit(model, P + n // 2, B, limits["bandwidth_bytes_s"])
        print(f"{name:9s} B{B} P{P}: decode {r['decode_tok_s']['nanoseek']:8.1f} tok/s vs transformers "
              f"{r['decode_tok_s']['transformers']:8.1f} -> {r['decode_speedup']:.2f}x "
              f"(end to end {r['end_to_end_speedup']:.2f}x, identical={r['identical']}); ours "
              f"{fraction(r['decode_tok_s']['nanoseek'], r['limit_tok_s'])} ({r['limit_tok_s']:.0f} tok/s)",
              flush=True)
    report["kv_cache_bytes_per_token"] = kv = cache_bytes(model, hf)
    print(f"KV cache bytes/token: nanoseek {kv['nanoseek']}, transformers {kv['transformers']:.0f}, "
          f"MHA same heads {kv['mha_same_heads']} ({kv['mha_over_nanoseek']:.1f}x ours)", flush=True)
    from nanoseek.data.synth import make_problems

    chats = [tok.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                     thinking=True) for p in make_problems("arithmetic", 4, seed=1, split="eval")]
    report["speculative"] = sp = speculative_case(model, tok, n, args.repeats, chats, args.compile)
    print(f"speculative: {sp['speedup']:.2f}x ({sp['tok_s']['speculative']:.1f} vs {sp['tok_s']['plain']:.1f} tok/s),"
          f" acceptance {sp['acceptance']:.0%}, identical={sp['identical']}", flush=True)
    report["serving"] = sv = serving_case(model, tok, chats, min(n, 64), args.requests)
    for k, v in sv.items():
        print(f"serving {k}: p50 {v['p50_s'] * 1e3:.0f} ms, p99 {v['p99_s'] * 1e3:.0f} ms, "
              f"{v['throughput_tok_s']:.1f} tok/s over {v['requests']} requests", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
