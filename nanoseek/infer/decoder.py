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

`CompiledStep` goes further for engines built with compile=True: at batch 1 a 12M-parameter model spends more
time dispatching ~2,400 small ops per token than computing, so the whole step (all layers, routing included) is
one `torch.compile` graph with static shapes. Shapes never change from step to step because attention runs over
the whole preallocated cache under a validity mask (plus the step's own new tokens, attended from registers: the
graph mutates nothing, the caller writes the new latents into the cache afterwards), and the routed experts are
read through gathered indices (few tokens) or all at once (many tokens) instead of a data-dependent loop. One
compilation per (rows, new tokens, power-of-two prefix of the cache the step reads), each ~30-60 s on 2 busy CPU
cores: meant for long-lived engines.
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


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Adjacent-pair RoPE written with real ops (complex tensors do not compile on CPU); cos/sin broadcast to
    x[..., rope/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class CompiledStep:
    """Decode/verification steps as compiled graphs (see the module docstring): one for the main blocks and one
    for the first MTP module's block (speculative drafting).

    __call__(ids [n, t], positions [n, t], start, key_mask [n, S] or None, cache view) -> hidden [n, t, D];
    mtp(h [n, t, D], next_ids [n, t], ...) -> the MTP block's output [n, t, D]. Both write the t new latents of
    their layers into the cache at columns start..start+t-1.
    """

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.H, self.nope, self.rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v, self.r = cfg.v_head_dim, cfg.kv_lora_rank
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        # dynamic=False: a new shape compiles a new graph instead of a slower symbolic one
        self.main_graph = torch.compile(self.main_step, dynamic=False)
        self.mtp_graph = torch.compile(self.mtp_step, dynamic=False)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, start: int, key_mask: torch.Tensor | None,
                 cache: LatentCache) -> torch.Tensor:
        layers = slice(0, len(self.model.blocks))
        return self.run(self.main_graph, (ids.contiguous(),), layers, positions, start, key_mask, cache)

    @torch.no_grad()
    def mtp(self, h: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, start: int,
            key_mask: torch.Tensor | None, cache: LatentCache) -> torch.Tensor:
        L = self.model.mtp[0].block.attn.layer_idx
        return self.run(self.mtp_graph, (h.contiguous(), next_ids.contiguous()), slice(L, L + 1), positions, start,
                        key_mask, cache)

    @staticmethod
    def run(graph, inputs: tuple, layers: slice, positions: torch.Tensor, start: int, key_mask: torch.Tensor | None,
            cache: LatentCache) -> torch.Tensor:
        n, t = inputs[-1].shape
        # attend over a power-of-two prefix of the cache (at least 128 columns): a few shapes, hence a few
        # compilations, instead of reading all max_len columns for short sequences
        S = min(cache.max_len, max(128, 1 << (start - 1).bit_length()))
        cols = torch.arange(S, device=positions.device)
        # keys already in the cache; the new ones are attended from the graph's own values. Every input is a
        # fresh contiguous tensor so that its strides (which the compiled graph is specialised on) never change.
        old = (cols < start).expand(n, S)
        if key_mask is None:
            old, new = old.contiguous(), torch.ones(n, t, dtype=torch.bool, device=positions.device)
        else:
            old, new = old & key_mask[:n, :S], key_mask[:n, start:start + t].contiguous()
        x, c_new, pe_new = graph(*inputs, positions.expand(n, t).contiguous(), old, new,
                                         cache.c_kv[:, :, :S], cache.k_pe[:, :, :S])
        cache.c_kv[layers, :, start:start + t] = c_new
        cache.k_pe[layers, :, start:start + t] = pe_new
        return x

    def main_step(self, ids, positions, old, new, c_kv, k_pe):
        """Traced: ids [n, t] -> (final normed hidden [n, t, D], new latents of the main layers)."""
        x, c, pe = self.blocks(self.model.blocks, self.model.embed(ids), positions, old, new, c_kv, k_pe)
        return norm(self.model.norm, x), c, pe

    def mtp_step(self, h, next_ids, positions, old, new, c_kv, k_pe):
        """Traced: h [n, t, D] main hidden states, next_ids [n, t] the token after each column -> (MTP block
        output [n, t, D], new latents of its layer)."""
        m = self.model.mtp[0]
        x = m.eh_proj(torch.cat([norm(m.enorm, self.model.embed(next_ids)), norm(m.hnorm, h)], dim=-1))
        x, c, pe = self.blocks([m.block], x, positions, old, new, c_kv, k_pe)
        return x, c, pe

    def blocks(self, blocks, x, positions, old, new, c_kv, k_pe):
        """Blocks on x [n, t, D]; old [n, S] bool (valid cached keys), new [n, t] bool (valid new keys).
        Returns (x [n, t, D], c_kv of the new tokens [layers, n, t, r], k_pe [layers, n, t, rope])."""
        m = self.model
        n, t, _ = x.shape
        H, nope, rope, v, r = self.H, self.nope, self.rope, self.v, self.r
        cos, sin = m.rotary(positions)  # [n, t, rope/2]
        cos, sin = cos.to(c_kv.dtype), sin.to(c_kv.dtype)
        inf = float("-inf")
        bias_old = torch.zeros(old.shape, dtype=torch.float32, device=x.device).masked_fill(~old, inf)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # [t query, t key]
        allowed_new = causal[None] & new[:, None, :]
        bias_new = torch.zeros(allowed_new.shape, dtype=torch.float32, device=x.device).masked_fill(
            ~allowed_new, inf)  # [n, t, t]
        cs, pes = [], []
        for block in blocks:
            attn = block.attn
            hx = norm(block.attn_norm, x)
            q = attn.q_proj(hx) if hasattr(attn, "q_proj") else attn.q_b_proj(norm(attn.q_a_norm, attn.q_a_proj(hx)))
            q = q.view(n, t, H, nope + rope)
            q_nope, q_pe = q[..., :nope], rope_pairs(q[..., nope:], cos[:, :, None], sin[:, :, None])
            c, pe = attn.kv_a_proj(hx).split([r, rope], dim=-1)
            c, pe = norm(attn.kv_a_norm, c), rope_pairs(pe, cos, sin)  # [n, t, r], [n, t, rope]
            cs.append(c)
            pes.append(pe)
            w = attn.kv_b_proj.weight.view(H, nope + v, r)
            q_lat = torch.einsum("nthd,hdr->nthr", q_nope, w[:, :nope])
            L = attn.layer_idx
            s_old = (torch.einsum("nthr,nsr->nths", q_lat, c_kv[L]) + torch.einsum("nthp,nsp->nths", q_pe, k_pe[L]))
            s_new = torch.einsum("nthr,nsr->nths", q_lat, c) + torch.einsum("nthp,nsp->nths", q_pe, pe)
            scores = torch.cat([s_old.float() * attn.scale + bias_old[:, None, None],
                                s_new.float() * attn.scale + bias_new[:, :, None]], dim=-1)
            probs = scores.softmax(-1).to(c.dtype)
            S = c_kv.shape[2]
            o_lat = (torch.einsum("nths,nsr->nthr", probs[..., :S], c_kv[L])
                     + torch.einsum("nths,nsr->nthr", probs[..., S:], c))
            o = torch.einsum("nthr,hvr->nthv", o_lat, w[:, nope:])
            x = x + attn.o_proj(o.reshape(n, t, H * v))
            hx = norm(block.ffn_norm, x)
            x = x + (self.moe(block.ffn, hx) if block.is_moe else block.ffn(hx))
        return x, torch.stack(cs), torch.stack(pes)

    def moe(self, moe, x: torch.Tensor) -> torch.Tensor:
        """Shared + routed experts of x [n, t, D] without data-dependent shapes."""
        n, t, D = x.shape
        flat = x.reshape(n * t, D)
        idx, weight, _ = moe.gate(flat)  # [N, K]
        ex = moe.experts
        I = ex.hidden
        if flat.shape[0] * self.top_k < self.n_experts:  # few pairs: read just the routed experts' weights
            h = torch.einsum("nd,nkid->nki", flat, ex.gate_up_proj[idx])
            y = torch.einsum("nki,nkdi->nkd", F.silu(h[..., :I]) * h[..., I:], ex.down_proj[idx])
            routed = (y * weight[..., None].to(y.dtype)).sum(1)
        else:  # many pairs: the model's sorted dispatch (grouped matmul reads each used expert once)
            N, K = idx.shape
            pairs = idx.flatten()
            order = pairs.argsort(stable=True)
            # per-expert counts with a static shape (bincount's output size depends on the data)
            counts = (pairs[:, None] == torch.arange(self.n_experts, device=x.device)).sum(0)
            token = order // K
            y = ex.run_experts(flat[token], counts) * weight.flatten()[order, None].to(flat.dtype)
            routed = torch.zeros_like(flat).index_add_(0, token, y)
        return routed.view(n, t, D) + moe.shared_experts(x)
