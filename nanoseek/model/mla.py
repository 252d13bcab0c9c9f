"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent per token, c_kv [kv_lora_rank], plus one rotary key k_pe
[qk_rope_head_dim] shared by all heads. Two equivalent ways to attend:

- naive (training, prefill): expand the latent through kv_b_proj into per-head k_nope and v, then SDPA;
- absorbed (decode): fold W_UK into the query and W_UV into the output, so attention runs directly on the cached
  latents. The cache then holds only c_kv and k_pe: 576 numbers per token per layer for V3 instead of 40,960.
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
        if cfg.q_lora_rank is None:
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
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> c_kv [B, T, kv_rank] (normed latent), k_pe [B, T, rope] (rotated, shared by heads)."""
        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_rank, self.rope], dim=-1)
        return self.kv_a_norm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                start: int = 0, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] at positions given by cos/sin -> [B, T, D].

        With a cache, the new latents are written at [start, start + T). A prefill (start == 0) attends with the
        naive path; later calls (decode, speculative verification) attend to the cache through absorbed weights.
        key_mask [B, S] marks valid (non-padding) key positions.
        """
        q_nope, q_pe = self.project_q(x, cos, sin)
        c_kv, k_pe = self.project_kv(x, cos, sin)
        if cache is not None:
            end = start + x.shape[1]
            cache.c_kv[self.layer_idx, :, start:end] = c_kv.to(cache.c_kv.dtype)
            cache.k_pe[self.layer_idx, :, start:end] = k_pe.to(cache.k_pe.dtype)
            if start > 0:
                c_all, pe_all = cache.c_kv[self.layer_idx, :, :end], cache.k_pe[self.layer_idx, :, :end]
                mask = None if key_mask is None else key_mask[:, :end]
                return self.attend_absorbed(q_nope, q_pe, c_all.to(x.dtype), pe_all.to(x.dtype), start, mask)
        mask = None if key_mask is None else key_mask[:, : x.shape[1]]
        return self.attend_naive(q_nope, q_pe, c_kv, k_pe, mask)

    def attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, nope+rope]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, H, self.rope)], dim=-1).transpose(1, 2)
        # SDPA's fused CPU/GPU kernels need v's head dim to match q/k's: zero-pad v, slice the output back.
        v = F.pad(v, (0, q.shape[-1] - self.v_dim)).transpose(1, 2)
        if key_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(key_mask, T), scale=self.scale)
        o = o[..., : self.v_dim]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        start: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q_* [B, T, H, *] for positions start..start+T-1; c_kv [B, S, kv_rank], k_pe [B, S, rope], S = start+T."""
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [H, nope, r], [H, v, r]
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)  # query absorbed into latent space
        scores = torch.einsum("bthr,bsr->bhts", q_lat, c_kv) + torch.einsum("bthp,bsp->bhts", q_pe, k_pe)
        scores = scores.float() * self.scale
        allowed = torch.arange(S, device=c_kv.device) <= (start + torch.arange(T, device=c_kv.device))[:, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]  # [B, 1, T, S]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        o = torch.einsum("bthr,hvr->bthv", o_lat, w_uv)
        return self.o_proj(o.reshape(B, T, H * self.v_dim))


def causal_mask(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T] valid-key mask -> boolean SDPA mask [B, 1, T, T]; each query always sees itself (no empty rows)."""
    causal = torch.ones(T, T, dtype=torch.bool, device=key_mask.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=key_mask.device)
    return (causal & key_mask[:, None, None, :]) | eye
