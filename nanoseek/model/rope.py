"""Decoupled rotary embeddings for MLA: adjacent-pair rotation, with optional YaRN context extension.

Only the `qk_rope_head_dim` slice of queries and the single shared rope key rotate. DeepSeek rotates ADJACENT pairs
(x0, x1), (x2, x3), ... (the complex-number form of its reference code); rotating the two halves instead
(`rotate_half`) gives different numbers with DeepSeek weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.model.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim / 2] and the cos/sin amplitude factor.

    YaRN (arXiv 2309.00071) keeps high-frequency dims (many rotations within the original context) as they are,
    interpolates low-frequency dims by 1/factor, and ramps linearly in between:
        low  = floor(d·ln(L0 / (2π·β_fast)) / (2·ln θ)),  high = ceil(d·ln(L0 / (2π·β_slow)) / (2·ln θ))
        ramp_i = clamp((i − low) / (high − low), 0, 1);   f_i' = f_i/s · ramp_i + f_i · (1 − ramp_i)
    The amplitude factor is mscale(s, mscale) / mscale(s, mscale_all_dim) — 1.0 for DeepSeek-V3, whose YaRN
    correction goes into the softmax scale instead (`ModelConfig.softmax_scale`).
    """
    dim, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not cfg.uses_yarn:
        return inv_freq, 1.0
    rs = cfg.rope_scaling
    factor = rs["factor"]
    original = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = math.floor(correction_dim(beta_fast)), math.ceil(correction_dim(beta_slow))
    if not rs.get("truncate", True):
        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if rs.get("attention_factor") is not None:
        amplitude = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        amplitude = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    else:
        amplitude = yarn_mscale(factor)
    return inv_freq, amplitude


class Rotary(nn.Module):
    """Computes (cos, sin) [T, rope_dim / 2] for given positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.amplitude = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [..., T, rope/2]
        return freqs.cos() * self.amplitude, freqs.sin() * self.amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim. x: [B, T, ..., rope]; cos/sin: [T, rope/2] or [B, T, rope/2]."""
    for _ in range(x.dim() - 3):  # broadcast over the head dims between T and rope
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate dim i with dim i + rope/2 (the `rotate_half` layout), as DeepSeek-V3.2's indexer does, unlike MLA's
    adjacent pairs. x: [B, T, ..., rope]; cos/sin: [T, rope/2] or [B, T, rope/2]."""
    for _ in range(x.dim() - 3):
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
