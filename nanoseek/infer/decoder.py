"""The engine's decode forward: `Transformer.forward_cached` for start > 0, with fewer and cheaper operations.

A decode step on CPU costs the time to read the weights it touches plus a few microseconds per tensor operation,
and the model's readable absorbed attention spends ~60 operations per layer in einsums and pair rotations.
Same math as the model, fewer operations:

- attention on the latent cache as three batched matmuls with the heads as the batch dimension:
  q_lat = q_nope @ W_UK, scores = q_lat @ c_kvᵀ + q_pe @ k_peᵀ, o = (probs @ c_kv) @ W_UVᵀ; W_UK and W_UV are
  views of kv_b_proj's weight (never stale copies: RL updates the model between rollouts);
- RoPE as one complex multiplication (DeepSeek's own form) instead of split/stack of pairs, RMSNorm as one op;
- a token routed to K experts runs those K experts directly (2 matmuls each) instead of a grouped matmul over
  all E experts, which on CPU loops over every expert; bigger batches use the model's grouped dispatch.

Prefill (start == 0) stays on the model's own path. Tests check this path against the model's full forward and
against transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.mla import LatentCache

# (token, expert) pairs up to which routed experts run one by one; above it the model's grouped matmul wins
SMALL_DISPATCH = 16


def norm(module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused op in fp32 (same arithmetic: x·rsqrt(mean(x²) + eps)·w); other dtypes
    keep the module's normalise-in-fp32-then-cast order."""
    if x.dtype != torch.float32:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)


class Decoder:
    """Runs a Transformer's blocks on the latent cache for decode and verification steps (see module docstring)."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.H, self.nope, self.rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v, self.r = cfg.v_head_dim, cfg.kv_lora_rank

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: LatentCache, start: int, key_mask: torch.Tensor | None,
                positions: torch.Tensor) -> torch.Tensor:
        """input_ids [B, t] at columns start..start+t-1 (start > 0), positions [B, t] -> final normed hidden
        state [B, t, D] (what the model's `forward_cached(..., hidden=True)` returns)."""
        rot, bias = self.prepare(positions, key_mask, start, input_ids.shape[1])
        x = self.model.embed(input_ids)
        for block in self.model.blocks:
            x = self.block(block, x, rot, cache, start, bias)
        return norm(self.model.norm, x)

    def prepare(self, positions: torch.Tensor, key_mask: torch.Tensor | None, start: int, t: int):
        """Rotation and additive attention mask shared by every layer of one step."""
        cos, sin = self.model.rotary(positions)  # [B, t, rope/2]
        rot = torch.complex(cos, sin)[:, :, None] if cos.dtype == self.model.embed.weight.dtype else (cos, sin)
        return rot, self.attention_bias(key_mask, start, t, positions.device)

    def block(self, block, x: torch.Tensor, rot, cache: LatentCache, start: int,
              bias: torch.Tensor | None) -> torch.Tensor:
        """One decoder block (a main block or an MTP module's) on x [B, t, D]."""
        x = x + self.attention(block.attn, norm(block.attn_norm, x), rot, cache, start, bias)
        return x + self.ffn(block, norm(block.ffn_norm, x))

    @staticmethod
    def attention_bias(key_mask: torch.Tensor | None, start: int, t: int, device) -> torch.Tensor | None:
        """Additive mask [B or 1, t, S] (0 allowed, -inf masked), S = start + t; None when nothing is masked."""
        S = start + t
        allowed = None
        if t > 1:
            allowed = torch.arange(S, device=device) <= (start + torch.arange(t, device=device))[:, None]
            allowed = allowed[None]
        if key_mask is not None:
            keys = key_mask[:, None, :S]
            allowed = keys if allowed is None else allowed & keys
        if allowed is None:
            return None
        return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))

    def rotate(self, x: torch.Tensor, rot) -> torch.Tensor:
        """Adjacent-pair RoPE of x [B, t, ..., rope]; rot is complex [B, t, 1, rope/2] (fp32) or (cos, sin)."""
        if isinstance(rot, tuple):
            from nanoseek.model.rope import apply_rope

            return apply_rope(x, *rot)
        if x.dim() == 3:
            rot = rot[:, :, 0]
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * rot).flatten(-2)

    def attention(self, attn, x: torch.Tensor, rot, cache: LatentCache, start: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
        B, t, _ = x.shape
        H, nope, rope, v, r = self.H, self.nope, self.rope, self.v, self.r
        if hasattr(attn, "q_proj"):
            q = attn.q_proj(x)
        else:
            q = attn.q_b_proj(norm(attn.q_a_norm, attn.q_a_proj(x)))
        q = q.view(B, t, H, nope + rope)
        q_nope, q_pe = q[..., :nope], self.rotate(q[..., nope:], rot)
        c, k_pe = attn.kv_a_proj(x).split([r, rope], dim=-1)
        end = start + t
        L = attn.layer_idx
        cache.c_kv[L, :, start:end] = norm(attn.kv_a_norm, c)
        cache.k_pe[L, :, start:end] = self.rotate(k_pe, rot)
        c_all, pe_all = cache.c_kv[L, :, :end], cache.k_pe[L, :, :end]  # [B, S, r], [B, S, rope]
        w = attn.kv_b_proj.weight.view(H, nope + v, r)
        # heads as the batch dim: [H, B*t, nope] @ [H, nope, r] -> queries in latent space
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * t, nope), w[:, :nope])
        q_lat = q_lat.view(H, B, t, r).permute(1, 2, 0, 3).reshape(B, t * H, r)
        scores = torch.baddbmm(torch.bmm(q_pe.reshape(B, t * H, rope), pe_all.transpose(1, 2)),
                               q_lat, c_all.transpose(1, 2)).float()  # [B, t*H, S], rows (t, h)
        scores = scores.mul_(attn.scale)
        if bias is not None:
            scores = (scores.view(B, t, H, -1) + bias[:, :, None]).view(B, t * H, -1)
        probs = scores.softmax(-1).to(c_all.dtype)
        o_lat = torch.bmm(probs, c_all)  # [B, t*H, r]
        o = torch.bmm(o_lat.view(B, t, H, r).permute(2, 0, 1, 3).reshape(H, B * t, r), w[:, nope:].transpose(1, 2))
        return attn.o_proj(o.view(H, B, t, v).permute(1, 2, 0, 3).reshape(B, t, H * v))

    def ffn(self, block, x: torch.Tensor) -> torch.Tensor:
        if not block.is_moe:
            return block.ffn(x)
        moe = block.ffn
        B, t, D = x.shape
        flat = x.view(B * t, D)
        idx, weight, _ = moe.gate(flat)
        if idx.numel() > SMALL_DISPATCH:
            routed = moe.experts(flat, idx, weight)
        else:
            routed = self.few_experts(moe.experts, flat, idx, weight)
        return routed.view(B, t, D) + moe.shared_experts(x)

    @staticmethod
    def few_experts(experts, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · expert_k(x) for few tokens: x [N, D], idx/weight [N, K]; each used expert runs once on the
        rows routed to it (views of the stacked weights, no copies)."""
        I = experts.hidden
        out = torch.zeros_like(x)
        weight = weight.to(x.dtype)
        by_expert: dict[int, list[tuple[int, int]]] = {}
        for n, row in enumerate(idx.tolist()):
            for k, e in enumerate(row):
                by_expert.setdefault(e, []).append((n, k))
        for e, pairs in by_expert.items():
            if len(pairs) == 1:
                n, k = pairs[0]
                xe, we = x[n:n + 1], weight[n:n + 1, k:k + 1]
            else:
                rows = torch.tensor([n for n, _ in pairs], device=x.device)
                xe, we = x[rows], weight[rows, torch.tensor([k for _, k in pairs], device=x.device)][:, None]
            h = F.linear(xe, experts.gate_up_proj[e])
            y = F.linear(F.silu(h[:, :I]) * h[:, I:], experts.down_proj[e]) * we
            if len(pairs) == 1:
                out[n:n + 1] += y
            else:
                out.index_add_(0, rows, y)
        return out
