"""Training-step speed: nanoseek vs transformers' DeepseekV3ForCausalLM, same config and weights, fp32 on CPU.

One step = forward + cross-entropy + backward + AdamW. Both models start from the same weights (nanoseek saves,
transformers loads), run the same batches, and are timed alternately in one process so machine noise hits both.

    python bench/model_speed.py                 # ~12M-parameter V3 config, batch 8 x 256
    python bench/model_speed.py --steps 3 --batch 2 --seq 64   # smoke test
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from nanoseek.model import Transformer, preset


def bench_config():
    # hidden 256, 6 layers, 16 routed experts top-4 (+1 shared), MLA with q low-rank: ~12M parameters
    return preset("tiny", q_lora_rank=128, num_nextn_predict_layers=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile nanoseek's model (the trainer's default)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = bench_config()
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    print(f"config: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, experts {cfg.n_routed_experts} "
          f"top-{cfg.num_experts_per_tok}, params {ours.num_params() / 1e6:.1f}M; batch {args.batch} x {args.seq}; "
          f"threads {torch.get_num_threads()}; transformers experts={ref.config._experts_implementation}, "
          f"attention={ref.config._attn_implementation}")

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    forward = torch.compile(ours) if args.compile else ours

    def step_ours(x, y):
        loss = F.cross_entropy(forward(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_ref(x, y):
        logits = ref(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        return loss.item()

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
               for _ in range(args.warmup + args.steps)]
    times = {"nanoseek": [], "transformers": []}
    first = {}
    for i, b in enumerate(batches):
        x, y = b[:, :-1], b[:, 1:]
        for name, fn in (("nanoseek", step_ours), ("transformers", step_ref)):
            t0 = time.perf_counter()
            loss = fn(x, y)
            dt = time.perf_counter() - t0
            first.setdefault(name, loss)
            if i >= args.warmup:
                times[name].append(dt)
    tokens = args.batch * args.seq
    tps = {k: tokens * len(v) / sum(v) for k, v in times.items()}
    print(f"first-step loss: nanoseek {first['nanoseek']:.6f}  transformers {first['transformers']:.6f}")
    for k, v in tps.items():
        print(f"{k:>12}: {v:9.0f} tokens/s  ({sum(times[k]) / len(times[k]) * 1000:.0f} ms/step)")
    print(f"ratio nanoseek / transformers: {tps['nanoseek'] / tps['transformers']:.2f}x")


if __name__ == "__main__":
    main()
