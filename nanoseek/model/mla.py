"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent per token, c_kv [kv_lora_rank], plus one rotary key k_pe
[qk_rope_head_dim] shared by all heads; a cache holds only those: 576 numbers per token per layer for V3 instead
of 40,960. This module is the definition: it expands the latents through kv_b_proj into per-head k_nope and v
and attends with SDPA, in training, prefill and (through the cache) decoding alike. The engine decodes with the
equivalent absorbed form, W_UK folded into the query and W_UV into the output so attention runs on the latents
themselves (`nanoseek.infer.decoder`), and is tested against this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


@dataclass
class LatentCache:
    """Preallocated MLA cache: c_kv [L, B, S, kv_lora_rank] and post-RoPE k_pe [L, B, S, qk_rope_head_dim]."""

    c_kv: torch.Tensor
    k_pe: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, layers: int | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LatentCache:
        layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if layers is None else layers
        return cls(torch.zeros(layers, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(layers, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[2]

    def bytes_per_token(self) -> int:
        """Bytes the cache holds per token, summed over layers."""
        return (self.c_kv[:, 0, 0].numel() + self.k_pe[:, 0, 0].numel()) * self.c_kv.element_size()


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        H, D, bias = self.n_heads, cfg.hidden_size, cfg.attention_bias
        self.low_rank_q = cfg.q_lora_rank is not None  # q through a normed low-rank latent (V3), or one projection
        if not self.low_rank_q:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank)  # latent norms use eps 1e-6 whatever rms_norm_eps says
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(D, self.kv_rank + self.rope, bias=bias)  # rows: [latent | rope key]
        self.kv_a_norm = RMSNorm(self.kv_rank)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope + self.v_dim), bias=False)  # per head [k_nope | v]
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, T, H, nope], q_pe [B, T, H, rope] (rotated)."""
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.low_rank_q else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> c_kv [B, T, kv_rank] (normed latent), k_pe [B, T, rope] (rotated, shared by heads)."""
        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_rank, self.rope], dim=-1)
        return self.kv_a_norm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                start: int = 0, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] at positions given by cos/sin -> [B, T, D].

        With a cache, the new latents are written at [start, start + T) and the queries attend to every cached
        column up to their own (decode and speculative verification when start > 0). key_mask [B, S] marks valid
        (non-padding) key positions.
        """
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_kv(x, cos, sin)
        end = start + x.shape[1]
        if cache is not None:
            L = self.layer_idx
            cache.c_kv[L, :, start:end] = c_kv.to(cache.c_kv.dtype)
            cache.k_pe[L, :, start:end] = k_pe.to(cache.k_pe.dtype)
            if start > 0:
                c_kv, k_pe = cache.c_kv[L, :, :end].to(x.dtype), cache.k_pe[L, :, :end].to(x.dtype)
        return self.attend(q_nope, q_pe, c_kv, k_pe, start, None if key_mask is None else key_mask[:, :end])

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               start: int = 0, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries q_* [B, T, H, *] at columns start..start+T-1 over keys c_kv [B, S, kv_rank], k_pe [B, S, rope],
        S = start + T: each query sees the valid keys up to its own column."""
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, nope+rope]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, self.rope)], dim=-1).transpose(1, 2)
        # SDPA's fused CPU/GPU kernels need v's head dim to match q/k's: zero-pad v, slice the output back.
        v = F.pad(v, (0, q.shape[-1] - self.v_dim)).transpose(1, 2)
        if key_mask is None and start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(key_mask, T, start, S, q.device),
                                               scale=self.scale)
        o = o[..., : self.v_dim]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))


def causal_mask(key_mask: torch.Tensor | None, T: int, start: int = 0, S: int | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean SDPA mask [B or 1, 1, T, S] for queries at columns start..start+T-1: the valid keys (key_mask
    [B, S], None: all) up to each query's own column. In a prefill each query also sees itself, so a left-padding
    query has no empty row (later queries always have the prompt's keys)."""
    S = start + T if S is None else S
    device = key_mask.device if key_mask is not None else device
    cols = torch.arange(S, device=device)
    own = start + torch.arange(T, device=device)[:, None]  # [T, 1]
    allowed = (cols <= own)[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    return allowed | (cols == own) if start == 0 else allowed
