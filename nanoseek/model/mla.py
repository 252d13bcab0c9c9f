"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent per token, c_kv [kv_lora_rank], plus one rotary key k_pe
[qk_rope_head_dim] shared by all heads; a cache holds only those: 576 numbers per token per layer for V3 instead
of 40,960. This module is the definition: it expands the latents through kv_b_proj into per-head k_nope and v
and attends with SDPA, in training, prefill and (through the cache) decoding alike. The engine decodes with the
equivalent absorbed form, W_UK folded into the query and W_UV into the output so attention runs on the latents
themselves (`nanoseek.infer.decoder`), and is tested against this one.

With `attention = "dsa"` (DeepSeek-V3.2) a lightning indexer picks each query's index_topk keys and the query
attends to those only, in the absorbed form over the gathered latents (`nanoseek.model.dsa`); while every key is
selected (index_topk >= keys, or `sparse` off for the dense warm-up) attention is exactly MLA's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.dsa import Indexer, indexer_kl, select, sparse_attention
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope


@dataclass
class LatentCache:
    """Preallocated MLA cache: c_kv [L, B, S, kv_lora_rank] and post-RoPE k_pe [L, B, S, qk_rope_head_dim], and for
    DSA the indexer's own keys index_k [L, B, S, index_head_dim] (None for MLA)."""

    c_kv: torch.Tensor
    k_pe: torch.Tensor
    index_k: torch.Tensor | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, layers: int | None = None,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> LatentCache:
        layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if layers is None else layers
        index_k = None
        if cfg.attention == "dsa":
            index_k = torch.zeros(layers, batch, max_len, cfg.index_head_dim, dtype=dtype, device=device)
        return cls(torch.zeros(layers, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(layers, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device), index_k)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every per-token tensor ([L, B, S, *]): what moving, shifting or packing columns must move alike."""
        return (self.c_kv, self.k_pe) if self.index_k is None else (self.c_kv, self.k_pe, self.index_k)

    def view(self, rows: slice | torch.Tensor = slice(None), cols: slice = slice(None)) -> LatentCache:
        """The cache of some rows and columns (a view for slices: writes go through)."""
        return LatentCache(*(t[:, rows, cols] for t in self.tensors()))

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[2]

    def bytes_per_token(self) -> int:
        """Bytes the cache holds per token, summed over layers."""
        return sum(t[:, 0, 0].numel() for t in self.tensors()) * self.c_kv.element_size()


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
        self.indexer = Indexer(cfg) if cfg.attention == "dsa" else None
        self.sparse = True  # DSA attends to the selected keys; False: to all (V3.2's dense warm-up)

    def query_latent(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> what the queries are projected from: the normed low-rank latent, or x itself."""
        return self.q_a_norm(self.q_a_proj(x)) if self.low_rank_q else x

    def query_heads(self, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query latent [B, T, *] -> q_nope [B, T, H, nope], q_pe [B, T, H, rope] (rotated)."""
        B, T, _ = q_latent.shape
        q = self.q_b_proj(q_latent) if self.low_rank_q else self.q_proj(q_latent)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q_nope [B, T, H, nope], q_pe [B, T, H, rope] (rotated)."""
        return self.query_heads(self.query_latent(x), cos, sin)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> c_kv [B, T, kv_rank] (normed latent), k_pe [B, T, rope] (rotated, shared by heads)."""
        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_rank, self.rope], dim=-1)
        return self.kv_a_norm(c_kv), apply_rope(k_pe, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                start: int = 0, key_mask: torch.Tensor | None = None, indexer_loss: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, T, D] at positions given by cos/sin -> (output [B, T, D], the indexer's KL loss when indexer_loss
        and DSA, else None).

        With a cache, the new latents are written at [start, start + T) and the queries attend to every cached
        column up to their own (decode and speculative verification when start > 0). key_mask [B, S] marks valid
        (non-padding) key positions.
        """
        q_latent = self.query_latent(x)
        q_nope, q_pe = self.query_heads(q_latent, cos, sin)
        c_kv, k_pe = self.project_kv(x, cos, sin)
        # the indexer learns from its KL alone (V3.2): its inputs leave the main model's graph
        learn = indexer_loss and torch.is_grad_enabled()
        index_k = None
        if self.indexer is not None:
            with torch.set_grad_enabled(learn):
                index_k = self.indexer.keys(x.detach(), cos, sin)
        end = start + x.shape[1]
        if cache is not None:
            L = self.layer_idx
            cache.c_kv[L, :, start:end] = c_kv.to(cache.c_kv.dtype)
            cache.k_pe[L, :, start:end] = k_pe.to(cache.k_pe.dtype)
            if index_k is not None:
                cache.index_k[L, :, start:end] = index_k.to(cache.index_k.dtype)
            if start > 0:
                c_kv, k_pe = cache.c_kv[L, :, :end].to(x.dtype), cache.k_pe[L, :, :end].to(x.dtype)
                if index_k is not None:
                    index_k = cache.index_k[L, :, :end].to(x.dtype)
        key_mask = None if key_mask is None else key_mask[:, :end]
        if self.indexer is None:
            return self.attend(q_nope, q_pe, c_kv, k_pe, start, key_mask), None
        with torch.set_grad_enabled(learn):
            q_index, w_index = self.indexer.queries(x.detach(), q_latent.detach(), cos, sin)
        S = c_kv.shape[1]
        allowed = causal_mask(key_mask, x.shape[1], start, S, x.device)[:, 0]  # [B or 1, T, S]
        if not self.sparse or self.indexer.topk >= S:  # every allowed key selected: MLA itself
            out = self.attend(q_nope, q_pe, c_kv, k_pe, start, key_mask)
            if not indexer_loss:
                return out, None
            with torch.set_grad_enabled(learn):
                logits = self.indexer.scores(q_index, w_index, index_k)
            probs = self.attention_probs(q_nope, q_pe, c_kv, k_pe, allowed)
            return out, indexer_kl(logits, probs, allowed.expand_as(logits))
        with torch.set_grad_enabled(learn):
            idx, valid, logits = select(self.indexer, q_index, w_index, index_k, allowed, self.indexer.topk)
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w[:, :self.nope])  # W_UK absorbed into the queries
        o_lat, probs = sparse_attention(q_lat, q_pe, c_kv, k_pe, idx, valid, self.scale)
        o = torch.einsum("bthr,hvr->bthv", o_lat, w[:, self.nope:])  # W_UV
        out = self.o_proj(o.flatten(2))
        return out, indexer_kl(logits, probs, valid) if indexer_loss else None

    def expand(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents -> per-head q [B, H, T, nope+rope], k [B, H, S, nope+rope], v [B, S, H, v_dim]."""
        B, S = c_kv.shape[:2]
        H = self.n_heads
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, self.rope)], dim=-1).transpose(1, 2)
        return q, k, v

    def attend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
               start: int = 0, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries q_* [B, T, H, *] at columns start..start+T-1 over keys c_kv [B, S, kv_rank], k_pe [B, S, rope],
        S = start + T: each query sees the valid keys up to its own column."""
        B, T, H, _ = q_nope.shape
        S = c_kv.shape[1]
        q, k, v = self.expand(q_nope, q_pe, c_kv, k_pe)
        # SDPA's fused CPU/GPU kernels need v's head dim to match q/k's: zero-pad v, slice the output back.
        v = F.pad(v, (0, q.shape[-1] - self.v_dim)).transpose(1, 2)
        if key_mask is None and start == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(key_mask, T, start, S, q.device),
                                               scale=self.scale)
        o = o[..., : self.v_dim]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    @torch.no_grad()
    def attention_probs(self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                        allowed: torch.Tensor) -> torch.Tensor:
        """The attention probabilities [B, T, H, S] over the allowed keys [B or 1, T, S] (the dense warm-up's
        target for the indexer; SDPA does not return them)."""
        q, k, _ = self.expand(q_nope, q_pe, c_kv, k_pe)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale  # [B, H, T, S]
        return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).transpose(1, 2)


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
