"""This machine's limits, measured in the benchmark's own process: the fp32 GEMM peak and the memory bandwidth.

A speed figure means little without the limit it runs against: decoding a small model must read its active
weights and its cache once per step, so its ceiling is bandwidth ÷ bytes per token; a training step does its
FLOPs, so its ceiling is the GEMM peak. Benches print each figure beside the fraction of its limit it reaches.

    python bench/roofline.py            # print this machine's limits
"""

from __future__ import annotations

import time

import torch


def gemm_peak(n: int = 1024, repeats: int = 5) -> float:
    """fp32 FLOP/s of a square n × n matmul with torch's current threads, best of `repeats` (what dense layers can
    reach at best on this machine)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up the BLAS
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a STREAM-style copy of a `mib` MiB fp32 array (bytes read + bytes written), best of `repeats`:
    far larger than the caches, so it is main memory's speed."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def decode_bytes(model, context: int, batch: int = 1) -> float:
    """Bytes one decode step must read per generated token: the active weights once for the step (shared by its
    `batch` rows; routed experts counted at top-k, the least a token needs) plus each row's latent cache of
    `context` columns."""
    cfg = model.config
    weight = model.num_params(active=True) * next(model.parameters()).element_size()
    per_column = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    return weight / batch + context * per_column


def decode_limit(model, context: int, batch: int, bandwidth_bytes_s: float) -> float:
    """Tokens/s if decoding were bound by memory alone: bandwidth ÷ bytes per token."""
    return bandwidth_bytes_s / decode_bytes(model, context, batch)


def fraction(achieved: float, limit: float) -> str:
    return f"{100 * achieved / limit:.1f}% of the limit"


def machine() -> dict[str, float]:
    """Both limits, measured now (a few seconds)."""
    return {"gemm_flop_s": gemm_peak(), "bandwidth_bytes_s": bandwidth(), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    m = machine()
    print(f"fp32 GEMM peak {m['gemm_flop_s'] / 1e9:.1f} GFLOP/s, memory bandwidth {m['bandwidth_bytes_s'] / 1e9:.1f} "
          f"GB/s ({m['threads']} threads)")
