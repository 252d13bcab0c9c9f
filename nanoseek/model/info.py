"""`nanoseek model-info --preset NAME`: sizes of a preset without allocating it (the model is built on `meta`).

`--plan pp=16,ep=64,dp=2` adds the per-rank memory, communication and bubble of that parallel layout
(nanoseek/model/plan.py)."""

from __future__ import annotations

import argparse

import torch

from nanoseek.model.config import PRESETS, ModelConfig, preset
from nanoseek.model.plan import parse_plan, plan_layout
from nanoseek.model.transformer import Transformer


def model_info(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, float]:
    with torch.device("meta"):
        model = Transformer(cfg)
    H = cfg.num_attention_heads
    mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # cached elements per token per layer
    naive = H * (cfg.qk_head_dim + cfg.v_head_dim)  # per-head K and V after expanding the latent
    mha = 2 * H * cfg.v_head_dim  # a plain MHA with the same heads and head size
    L = cfg.num_hidden_layers
    return {
        "total_params": model.num_params(),
        "active_params": model.num_params(active=True),
        "mtp_params": model.num_params(mtp=True) - model.num_params(),
        "flops_per_token": model.flops_per_token(seq_len),
        "seq_len": seq_len,
        "kv_elems_per_token_layer_mla": mla,
        "kv_elems_per_token_layer_naive": naive,
        "kv_elems_per_token_layer_mha": mha,
        "kv_bytes_per_token_mla_bf16": 2 * L * mla,
        "kv_bytes_per_token_mha_bf16": 2 * L * mha,
    }


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset")
    parser.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    parser.add_argument("--plan", metavar="pp=N,ep=N,dp=N[,schedule=S]",
                        help="per-rank memory, all-to-all bytes and bubble of this layout (world = pp·ep·dp)")
    parser.add_argument("--micro-batch", type=int, default=1, help="--plan: sequences per micro-batch")
    parser.add_argument("--global-batch-tokens", type=int, default=15360 * 4096,
                        help="--plan: tokens per optimiser step (default: DeepSeek-V3's 15360 × 4096)")


def main(args: argparse.Namespace) -> int:
    info = model_info(preset(args.preset), args.seq_len)
    print(f"preset {args.preset}")
    print(f"  parameters      total {_human(info['total_params'])}   active per token {_human(info['active_params'])}"
          f"   (+ MTP modules {_human(info['mtp_params'])})")
    print(f"  training FLOPs  {_human(info['flops_per_token'])} per token at seq_len {args.seq_len} (fwd + bwd)")
    print(f"  KV cache / token / layer   MLA {info['kv_elems_per_token_layer_mla']} elements   "
          f"expanded K,V {info['kv_elems_per_token_layer_naive']}   MHA {info['kv_elems_per_token_layer_mha']}")
    ratio = info["kv_bytes_per_token_mha_bf16"] / info["kv_bytes_per_token_mla_bf16"]
    print(f"  KV cache / token (bf16, all layers)   MLA {_human(info['kv_bytes_per_token_mla_bf16'])}B   "
          f"MHA {_human(info['kv_bytes_per_token_mha_bf16'])}B   ({ratio:.1f}x smaller)")
    if args.plan:
        try:
            plan = parse_plan(args.plan)
            layout = plan_layout(preset(args.preset), plan["pp"], plan["ep"], plan["dp"], plan["schedule"],
                                 args.seq_len, args.micro_batch, args.global_batch_tokens)
        except ValueError as e:
            raise SystemExit(f"nanoseek model-info: {e}") from None
        print_plan(layout, args)
    return 0


def print_plan(layout: dict, args: argparse.Namespace) -> None:
    print(f"plan  {layout['world']} ranks = pp {layout['pp']} × ep {layout['ep']} × dp {layout['dp']}   "
          f"schedule {layout['schedule']} ({layout['stages']} stages)   {layout['microbatches']} micro-batches of "
          f"{args.micro_batch}×{args.seq_len} tokens per step and pipeline   "
          f"bubble {100 * layout['bubble']:.1f}%")
    print("  per rank (all ep·dp ranks of a stage alike): bf16 params, fp32 grads, ZeRO-1 AdamW state, "
          "activations in flight, expert all-to-all sent per step")
    print(f"  {'rank':>4} {'stages':>7} {'layers':>11} {'params':>8} {'params':>9} {'grads':>9} {'optimizer':>9} "
          f"{'activ.':>9} {'a2a/step':>9}")
    for r in layout["ranks"]:
        layers = ",".join(f"{a}-{b}" if b > a else str(a) for a, b in r["layers"]) or "-"
        print(f"  {r['rank']:>4} {','.join(map(str, r['stages'])):>7} {layers:>11} {_human(r['params']):>8} "
              + " ".join(f"{r[k] / 2**30:>5.1f}GiB" for k in ("param_bytes", "grad_bytes", "optimizer_bytes",
                                                              "activation_bytes", "all_to_all_bytes")))
