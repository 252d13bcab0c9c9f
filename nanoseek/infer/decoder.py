"""The one decode implementation: the engine's decode and verification steps (start > 0), eager or compiled.

A decode step on CPU costs the time to read the weights it touches plus a few microseconds per tensor operation,
and the model's reference attention (decompress the latent cache, then ordinary attention) spends far more. This
is the same math with fewer and cheaper operations; the model's `forward_cached` stays the definition it is
tested against (tests compare both, and against transformers):

- attention on the latent cache as batched matmuls with the heads as the batch dimension (weight absorption):
  q_lat = q_nope @ W_UK, scores = q_lat @ c_kvᵀ + q_pe @ k_peᵀ, o = (probs @ c_kv) @ W_UVᵀ; W_UK and W_UV are
  views of kv_b_proj's weight (never stale copies: RL updates the model between rollouts);
- RMSNorm as one fused op;
- routed experts: a token routed to K experts reads just those K experts' weights when the step has few
  (token, expert) pairs, else the model's grouped matmul over experts sorted by id.

- DSA (DeepSeek-V3.2): the indexer scores the cached index keys (the cache's `index_k`, written beside c_kv and
  k_pe), and each query attends to its top-k columns only, gathered from the latent cache
  (`nanoseek.model.dsa.sparse_attention`, which the model's sparse prefill uses too).

Every step reads the keys already cached (`old`, under a validity mask) and its own new tokens. Eagerly, each
layer writes its new latents into the cache and attends over it in place. Compiled, the step mutates nothing (the
new keys join from registers and are written into the cache afterwards) and its shapes depend only on (rows, new
tokens, cached columns read), which is what lets `compile=True` run a whole step, all layers and routing
included, as one `torch.compile` graph: at batch 1 a 12M-parameter model spends more time
dispatching ~2,400 small ops per token than computing. A compiled step reads a power-of-two prefix of the cache
(at least 128 columns, masked), so there is one compilation per (rows, new tokens, prefix), each ~30-60 s on 2
busy CPU cores: meant for long-lived engines. Eager steps read exactly the cached columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.dsa import select, sparse_attention
from nanoseek.model.mla import LatentCache
from nanoseek.model.rope import apply_rope


def norm(module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused op in fp32 (same arithmetic: x·rsqrt(mean(x²) + eps)·w); other dtypes
    keep the module's normalise-in-fp32-then-cast order."""
    if x.dtype != torch.float32:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)


class Decoder:
    """Decode and verification steps of a Transformer on its latent cache (see the module docstring).

    forward(ids [n, t], cache, start, key_mask [n, S] or None, positions [n, t]) -> final normed hidden [n, t, D]
    (what the model's `forward_cached(..., hidden=True)` returns); mtp(h [n, t, D], next_ids [n, t], ...) -> the
    first MTP module's block output [n, t, D] (speculative drafting). Both write their layers' t new latents into
    the cache at columns start..start+t-1.
    """

    def __init__(self, model, compile: bool = False):
        self.model = model
        cfg = model.config
        self.H, self.nope, self.rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v, self.r = cfg.v_head_dim, cfg.kv_lora_rank
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.compiled = compile
        # dynamic=False: a new shape compiles a new graph instead of a slower symbolic one
        self.main_step_fn = torch.compile(self.main_step, dynamic=False) if compile else self.main_step
        self.mtp_step_fn = torch.compile(self.mtp_step, dynamic=False) if compile else self.mtp_step

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, cache: LatentCache, start: int, key_mask: torch.Tensor | None,
                positions: torch.Tensor, eager: bool = False) -> torch.Tensor:
        """eager=True runs a compiled decoder's step uncompiled (forward hooks, such as routing records, run)."""
        layers = slice(0, len(self.model.blocks))
        step = self.main_step if eager else self.main_step_fn
        return self.run(step, (ids,), layers, positions, start, key_mask, cache)

    @torch.no_grad()
    def mtp(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, start: int,
            key_mask: torch.Tensor | None, cache: LatentCache) -> torch.Tensor:
        L = self.model.mtp[0].block.attn.layer_idx
        return self.run(self.mtp_step_fn, (h, next_ids), slice(L, L + 1), positions, start, key_mask, cache)

    def run(self, step, inputs: tuple, layers: slice, positions: torch.Tensor, start: int,
            key_mask: torch.Tensor | None, cache: LatentCache) -> torch.Tensor:
        n, t = inputs[-1].shape
        positions = positions.expand(n, t)
        old = new = None  # valid cached keys [n, S], valid new keys [n, t]; None: all valid
        if self.compiled:
            # a power-of-two prefix of the cache: a few shapes, hence a few compilations. Every input is a fresh
            # contiguous tensor so that its strides (which the graph is specialised on) never change.
            S = min(cache.max_len, max(128, 1 << (start - 1).bit_length()))
            inputs, positions = tuple(x.contiguous() for x in inputs), positions.contiguous()
            old = (torch.arange(S, device=positions.device) < start).expand(n, S)
            old = old.contiguous() if key_mask is None else old & key_mask[:n, :S]
            new = torch.ones(n, t, dtype=torch.bool, device=positions.device)
        else:  # the cached columns and the t new ones, which the step writes in place
            S = start + t
            if key_mask is not None:
                old = key_mask[:n, :start]
        if key_mask is not None:
            new = key_mask[:n, start:start + t].contiguous()
        x, added = step(*inputs, positions, old, new, tuple(c[:, :, :S] for c in cache.tensors()))
        if self.compiled:
            for c, a in zip(cache.tensors(), added, strict=True):
                c[layers, :, start:start + t] = a
        return x

    def main_step(self, ids, positions, old, new, caches):
        """ids [n, t] -> (final normed hidden [n, t, D], the main layers' new cache entries)."""
        x, added = self.blocks(self.model.blocks, self.model.embed(ids), positions, old, new, caches)
        return norm(self.model.norm, x), added

    def mtp_step(self, h, next_ids, positions, old, new, caches):
        """h [n, t, D] main hidden states, next_ids [n, t] the token after each column -> (MTP block output
        [n, t, D], its layer's new cache entries)."""
        m = self.model.mtp[0]
        x = m.eh_proj(torch.cat([norm(m.enorm, self.model.embed(next_ids)), norm(m.hnorm, h)], dim=-1))
        return self.blocks([m.block], x, positions, old, new, caches)

    def blocks(self, blocks, x, positions, old, new, caches):
        """Blocks on x [n, t, D] -> (x [n, t, D], the new tokens' cache entries: c_kv [layers, n, t, r], k_pe
        [layers, n, t, rope] (and DSA's index keys [layers, n, t, d_I])). caches (`LatentCache.tensors()`, each
        [layers, n, S, *]) hold the cached columns (compiled), or the cached columns and t more that each layer
        writes its new entries into (eager); old/new mark the valid keys."""
        t = x.shape[1]
        cos, sin = self.model.rotary(positions)  # [n, t, rope/2]
        bias = self.attention_bias(old, new, caches[0].shape[2] - (0 if self.compiled else t), t, x.device)
        added = []
        for block in blocks:
            attn = block.attn
            y, new_entries = self.attention(attn, norm(block.attn_norm, x), cos, sin, bias,
                                            tuple(c[attn.layer_idx] for c in caches))
            x = x + y
            added.append(new_entries)
            hx = norm(block.ffn_norm, x)
            x = x + (self.moe(block.ffn, hx) if block.is_moe else block.ffn(hx))
        return x, tuple(torch.stack(a) for a in zip(*added, strict=True))

    @staticmethod
    def attention_bias(old: torch.Tensor | None, new: torch.Tensor | None, S: int, t: int, device
                       ) -> torch.Tensor | None:
        """Additive mask [n or 1, t, S + t] (0 allowed, -inf masked) over the S cached then t new keys: valid
        cached keys, and valid new keys up to the query's own column; None when nothing is masked (one new token,
        every key valid)."""
        if old is None and new is None and t == 1:
            return None
        allowed = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None]  # [1, t query, t key]
        if new is not None:
            allowed = allowed & new[:, None, :]
        cached = old[:, None, :] if old is not None else torch.ones(1, 1, S, dtype=torch.bool, device=device)
        rows = max(allowed.shape[0], cached.shape[0])
        allowed = torch.cat([cached.expand(rows, t, S), allowed.expand(rows, t, t)], dim=-1)
        return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))

    def attention(self, attn, x, cos, sin, bias, caches):
        """Absorbed MLA of x [n, t, D] over the cached latents and its own -> (output [n, t, D], the new cache
        entries: normed latents [n, t, r], rotated rope keys [n, t, rope], and DSA's index keys [n, t, d_I]).
        caches (c_kv [n, S, r], k_pe [n, S, rope], index_k [n, S, d_I]) are this layer's cached columns (compiled:
        the new keys join from registers) or those and the t new columns, written here (eager: no copy of the
        cache per step)."""
        n, t, _ = x.shape
        H, nope, rope, v, r = self.H, self.nope, self.rope, self.v, self.r
        q_latent = norm(attn.q_a_norm, attn.q_a_proj(x)) if attn.low_rank_q else x
        q = attn.q_b_proj(q_latent) if attn.low_rank_q else attn.q_proj(q_latent)
        q = q.view(n, t, H, nope + rope)
        q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], cos, sin)
        c, pe = attn.kv_a_proj(x).split([r, rope], dim=-1)
        c, pe = norm(attn.kv_a_norm, c).to(caches[0].dtype), apply_rope(pe, cos, sin).to(caches[1].dtype)
        new = (c, pe) if attn.indexer is None else (c, pe, attn.indexer.keys(x, cos, sin).to(caches[2].dtype))
        if self.compiled:
            every = tuple(torch.cat([old, add], dim=1) for old, add in zip(caches, new, strict=True))  # [n, S+t, *]
        else:
            for old, add in zip(caches, new, strict=True):
                old[:, -t:] = add
            every = caches
        c_all, pe_all = every[0], every[1]
        w = attn.kv_b_proj.weight.view(H, nope + v, r)
        # heads as the batch dim: [H, n*t, nope] @ [H, nope, r] -> queries in latent space, rows (t, h)
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, n * t, nope), w[:, :nope])
        q_lat = q_lat.view(H, n, t, r).permute(1, 2, 0, 3).reshape(n, t * H, r)
        S = c_all.shape[1]
        if attn.indexer is not None and attn.sparse and attn.indexer.topk < S:  # DSA: the top-k columns only
            q_index, w_index = attn.indexer.queries(x, q_latent, cos, sin)
            allowed = None if bias is None else bias == 0
            idx, valid, _ = select(attn.indexer, q_index, w_index, every[2], allowed, attn.indexer.topk)
            o_lat, _ = sparse_attention(q_lat.view(n, t, H, r), q_pe, c_all, pe_all, idx, valid, attn.scale)
        else:
            scores = torch.baddbmm(torch.bmm(q_pe.reshape(n, t * H, rope), pe_all.transpose(1, 2)),
                                   q_lat, c_all.transpose(1, 2)).float() * attn.scale  # [n, t*H, S + t]
            if bias is not None:
                scores = (scores.view(n, t, H, -1) + bias[:, :, None]).view(n, t * H, -1)
            probs = scores.softmax(-1).to(c_all.dtype)
            o_lat = torch.bmm(probs, c_all)  # [n, t*H, r]
        o = torch.bmm(o_lat.reshape(n, t, H, r).permute(2, 0, 1, 3).reshape(H, n * t, r),
                      w[:, nope:].transpose(1, 2))
        return attn.o_proj(o.view(H, n, t, v).permute(1, 2, 0, 3).reshape(n, t, H * v)), new

    def moe(self, moe, x: torch.Tensor) -> torch.Tensor:
        """Shared + routed experts of x [n, t, D], without data-dependent shapes."""
        n, t, D = x.shape
        flat = x.reshape(n * t, D)
        idx, weight, _ = moe.gate(flat)  # [N, K]
        ex = moe.experts
        I = ex.hidden
        if flat.shape[0] * self.top_k < self.n_experts:  # few pairs: read just the routed experts' weights
            h = torch.einsum("nd,nkid->nki", flat, ex.gate_up_proj[idx])
            y = torch.einsum("nki,nkdi->nkd", F.silu(h[..., :I]) * h[..., I:], ex.down_proj[idx])
            routed = (y * weight[..., None].to(y.dtype)).sum(1)
        else:  # many pairs: the model's sorted dispatch (a grouped matmul reads each used expert once)
            N, K = idx.shape
            pairs = idx.flatten()
            order = pairs.argsort(stable=True)
            # per-expert counts with a static shape (bincount's output size depends on the data)
            counts = (pairs[:, None] == torch.arange(self.n_experts, device=x.device)).sum(0)
            token = order // K
            y = ex.run_experts(flat[token], counts) * weight.flatten()[order, None].to(flat.dtype)
            routed = torch.zeros_like(flat).index_add_(0, token, y)
        return routed.view(n, t, D) + moe.shared_experts(x)
