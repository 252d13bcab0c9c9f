"""DeepSeek Sparse Attention (DeepSeek-V3.2): the lightning indexer, top-k selection, MLA over the selected
latents only, and the indexer's training objective.

The indexer scores query t against every earlier token s with a few small ReLU heads:

    I[t, s] = Σ_j w[t, j] · ReLU(q[t, j] · k[s]) / sqrt(d_I),     w = weights_proj(x_t) / sqrt(n_I)

q[t, j] = wq_b(query latent) (the q_a_norm(q_a_proj(x)) MLA computes anyway; x itself without q low-rank), one
key per token k[s] = LayerNorm(wk(x_s)) shared by the heads, the first qk_rope_head_dim dims of both rotated by
halves (`apply_rope_halves`, not MLA's adjacent pairs). Each query then attends to its index_topk best allowed
tokens: the main attention costs O(T·k) instead of O(T²); the indexer stays O(T²) but cheap, n_I·d_I = 8,192
multiply-adds per (query, key) for V3.2 against ~139K for its MLA (128 heads × (512 + 64) scores + 128 × 512
values). DeepSeek's kernels score in FP8 after a Hadamard rotation of q and k; both are precision devices (the
rotation is orthogonal: q·k is unchanged), so this scores in fp32, as transformers does.

Training (V3.2 §2.1): the indexer learns only from KL(p ‖ softmax(I)), p the main attention's distribution summed
over heads and L1-normalised, over all allowed keys in the dense warm-up and over the selected ones afterwards; its
inputs are detached, so the language-model loss never reaches it and its KL never reaches the main model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.rope import apply_rope_halves

# Queries per chunk are chosen so that one chunk's per-head scores stay under this many floats (64 MiB): a
# prefill of 8K tokens would otherwise hold [T, n_I, T] scores (1 GiB at n_I = 4) or [T, k, r] gathered latents.
CHUNK_ELEMENTS = 1 << 24


class Indexer(nn.Module):
    """The lightning indexer of one layer. Names and layout follow transformers' DeepseekV32Indexer (`indexer.wq_b`,
    `wk`, `k_norm` (a LayerNorm with bias), `weights_proj`), so checkpoints load either way."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = nn.Linear(cfg.q_lora_rank or cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim**-0.5

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.cat([apply_rope_halves(x[..., :self.rope], cos, sin), x[..., self.rope:]], dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> index keys [B, T, d_I] (what the cache keeps beside c_kv and k_pe)."""
        return self.rotate(self.k_norm(self.wk(x)), cos, sin)

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], q_latent [B, T, q_lora_rank or D] -> (queries [B, T, n_I, d_I], head weights [B, T, n_I]),
        both fp32."""
        B, T, _ = x.shape
        q = self.rotate(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim), cos, sin)
        w = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        return q.float(), w

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """queries [B, T, n_I, d_I], weights [B, T, n_I], keys [B, S, d_I] -> I [B, T, S] (fp32). One GEMM over
        all (query, head) rows, the scale folded into q (transformers broadcasts a [n_I, d_I] matmul per query
        and scales after: the same sums up to rounding, ~2x slower on CPU), then the weighted sum over heads."""
        B, T, n, d = q.shape
        s = torch.bmm((q * self.scale).reshape(B, T * n, d), keys.float().transpose(1, 2))  # [B, T·n_I, S]
        return torch.matmul(w.unsqueeze(-2), F.relu_(s).view(B, T, n, -1)).squeeze(-2)


def select(indexer: Indexer, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None,
           topk: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Each query's top-k keys by index score, among the allowed ones first.

    q [B, T, n_I, d_I], w [B, T, n_I], keys [B, S, d_I]; allowed [B or 1, T, S] (causal and valid keys; None: all).
    Returns (idx [B, T, k] key columns, valid [B, T, k] whether each is allowed (a query with fewer than k allowed
    keys also gets disallowed ones, as transformers does; they must stay masked), None when all are, and their
    index scores [B, T, k]). Queries go in chunks (`CHUNK_ELEMENTS`).
    """
    B, T = q.shape[:2]
    S = keys.shape[1]
    step = max(1, CHUNK_ELEMENTS // (B * indexer.n_heads * S))
    idx, valid, chosen = [], [], []
    for t0 in range(0, T, step):
        s = indexer.scores(q[:, t0:t0 + step], w[:, t0:t0 + step], keys)
        if allowed is not None:
            ok = allowed[:, t0:t0 + step].expand(B, -1, -1)
            s = s.masked_fill(~ok, float("-inf"))
        top = s.topk(topk, dim=-1).indices
        idx.append(top)
        chosen.append(s.gather(-1, top))
        if allowed is not None:
            valid.append(ok.gather(-1, top))
    return torch.cat(idx, 1), torch.cat(valid, 1) if valid else None, torch.cat(chosen, 1)


def sparse_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
                     idx: torch.Tensor, valid: torch.Tensor | None, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA in its absorbed form over each query's selected latents only.

    q_lat [B, T, H, r] (q_nope through W_UK: queries in latent space), q_pe [B, T, H, rope] (rotated), c_kv [B, S,
    r], k_pe [B, S, rope], idx/valid [B, T, k] from `select` -> (o_lat [B, T, H, r], still to go through W_UV,
    attention probabilities [B, T, H, k]). A query's scores are q_lat·c_kv[s] + q_pe·k_pe[s] for its k gathered
    columns: O(T·k·H·(r + rope)) instead of O(T·S·...).
    """
    B, T, H, r = q_lat.shape
    S, k, rope = c_kv.shape[1], idx.shape[-1], k_pe.shape[-1]
    # gather rows of the flattened [B·S, *] latents (index_select: ~1.5x faster than advanced indexing on CPU)
    flat = idx + torch.arange(B, device=idx.device)[:, None, None] * S
    c_rows, pe_rows = c_kv.reshape(B * S, r), k_pe.reshape(B * S, rope)
    step = max(1, CHUNK_ELEMENTS // (B * k * (r + rope + H)))
    outs, probs = [], []
    for t0 in range(0, T, step):
        cols = flat[:, t0:t0 + step]
        shape = (*cols.shape, -1)
        c_sel = c_rows.index_select(0, cols.flatten()).view(shape)  # [B, t, k, r]
        pe_sel = pe_rows.index_select(0, cols.flatten()).view(shape)  # [B, t, k, rope]
        scores = (torch.matmul(q_lat[:, t0:t0 + step], c_sel.transpose(-1, -2))
                  + torch.matmul(q_pe[:, t0:t0 + step], pe_sel.transpose(-1, -2))).float() * scale  # [B, t, H, k]
        if valid is not None:
            scores = scores.masked_fill(~valid[:, t0:t0 + step, None], float("-inf"))
        p = scores.softmax(-1)
        probs.append(p)
        outs.append(torch.matmul(p.to(c_sel.dtype), c_sel))
    return torch.cat(outs, 1), torch.cat(probs, 1)


def indexer_kl(logits: torch.Tensor, attention: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The indexer's loss, mean over queries of KL(p ‖ softmax(I)) over each query's keys.

    logits [B, T, K] index scores (K: all keys in the dense warm-up, the selected ones after), attention [B, T, H, K]
    the main attention's probabilities (p = their sum over heads, L1-normalised; no gradient), valid [B, T, K] the
    keys each query may see (None: all).
    """
    p = attention.detach().float().sum(-2)
    p = p / p.sum(-1, keepdim=True)
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    log_q = logits.log_softmax(-1)
    if valid is not None:
        log_q = log_q.masked_fill(~valid, 0.0)  # p is 0 there: no 0·(-inf)
    return (torch.xlogy(p, p) - p * log_q).sum(-1).mean()
