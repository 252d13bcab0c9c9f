"""`nanoseek model-info --preset NAME`: sizes of a preset without allocating it (the model is built on `meta`)."""

from __future__ import annotations

import argparse

import torch

from nanoseek.model.config import PRESETS, ModelConfig, preset
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
    return 0
