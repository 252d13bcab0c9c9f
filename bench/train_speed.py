"""Training throughput: nanoseek's full pretraining step vs transformers' DeepseekV3ForCausalLM + torch AdamW.

Both models get the same config and the same weights (nanoseek's checkpoint loaded by transformers; logits are
checked to agree first), fp32 on CPU, one process, the same batch. A step is what each framework needs to
train: forward, loss, backward, gradient clipping to 1.0 and an AdamW step (nanoseek's also computes the
sequence-wise balance loss and applies the aux-loss-free bias update). MTP is off in both, since transformers
does not train it. Steps alternate between the two models so that machine noise hits both alike; the median
step time is reported.

    python bench/train_speed.py                     # tiny preset, 8 × 256 tokens per step
    python bench/train_speed.py --compile           # both models under torch.compile
    python bench/train_speed.py --preset debug --steps 3 --batch 2 --seq-len 64   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from roofline import fraction, gemm_peak

from nanoseek.model import Transformer, preset
from nanoseek.model.balance import update_bias
from nanoseek.train.objectives import pretrain_loss
from nanoseek.train.optim import build_optimizer


def nanoseek_step(model: Transformer, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    out = model(ids[:, :-1], extras=True)
    loss, _ = pretrain_loss(out, ids[:, 1:], mtp_lambda=0.0, balance_alpha=1e-4)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_bias(getattr(model, "_orig_mod", model), out.expert_counts, 1e-3)
    return loss.item()


def hf_step(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    ap.add_argument("--hf-experts", default=None, help="transformers experts_implementation (default: its own)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile both models (nanoseek's pretrain.compile; compile time is not counted)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = preset(args.preset, num_nextn_predict_layers=0)
    ours = Transformer(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        kwargs = {"attn_implementation": args.hf_attn, "dtype": torch.float32}
        if args.hf_experts:
            kwargs["experts_implementation"] = args.hf_experts
        theirs = DeepseekV3ForCausalLM.from_pretrained(d, **kwargs).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids[:, :-1]) - theirs(ids[:, :-1]).logits).abs().max().item()
    if diff > 1e-4:
        print(f"models disagree before training (max |Δlogit| = {diff:.2e}); not comparable", file=sys.stderr)
        return 1
    opts = (build_optimizer(ours, 1e-3),
            torch.optim.AdamW(theirs.parameters(), 1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True))
    if args.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    runs = {"nanoseek": (ours, opts[0], nanoseek_step), "transformers": (theirs, opts[1], hf_step)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.steps + 2):
        for name, (model, opt, step) in runs.items():
            t0 = time.perf_counter()
            losses[name].append(step(model, opt, ids))
            if i >= 2:  # warm-up steps allocate buffers and pick kernels
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.seq_len
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    plain, hf_config = getattr(ours, "_orig_mod", ours), getattr(theirs, "_orig_mod", theirs).config
    print(f"config: preset={args.preset} ({plain.num_params() / 1e6:.1f}M params, "
          f"{plain.num_params(active=True) / 1e6:.1f}M active), compile={args.compile}, "
          f"batch {args.batch} × {args.seq_len} tokens, fp32, {torch.get_num_threads()} threads, "
          f"transformers experts={getattr(hf_config, '_experts_implementation', None)}, attn={args.hf_attn}")
    print(f"first-step loss: nanoseek {losses['nanoseek'][0]:.6f}  transformers {losses['transformers'][0]:.6f}")
    peak = gemm_peak()  # the ceiling of a training step: its matmul FLOPs at this machine's fp32 GEMM speed
    flops = plain.flops_per_token(args.seq_len)
    print(f"this machine's fp32 GEMM peak: {peak / 1e9:.1f} GFLOP/s -> at most {peak / flops:.0f} tokens/s")
    print("| framework | median step (s) | tokens/s | fraction of the GEMM limit |")
    print("|---|---|---|---|")
    for name in runs:
        share = fraction(tps[name] * flops, peak)
        print(f"| {name} | {statistics.median(times[name]):.3f} | {tps[name]:.0f} | {share} |")
    print(f"speed-up nanoseek / transformers: {tps['nanoseek'] / tps['transformers']:.2f}x (goal >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
