"""DeepSeekMoE: shared experts + fine-grained routed experts behind a sigmoid gate with group-limited routing.

Routing (V3): s = sigmoid(x W_gᵀ) in fp32; the correction bias b is added for SELECTION only; groups are ranked by
the sum of their top-2 biased scores and all but `topk_group` groups are masked to −inf; the top-K experts of the
rest are chosen; their weights are the UNbiased scores, normalised to sum to 1 and multiplied by
`routed_scaling_factor`. No token is dropped.

Dispatch: (token, expert) pairs are sorted by expert and every expert's slice goes through one grouped matmul
(`torch._grouped_mm`), so there is no Python loop over experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid router. Weight [E, D]; `e_score_correction_bias` [E] is the aux-loss-free balancing bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` must not round the balancing bias: its updates (γ = 1e-3) are below bf16 resolution.
        super()._apply(fn, recurse)
        self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> topk_idx [N, K], topk_weight [N, K] (fp32), scores [N, E] (fp32, unbiased)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_group > 1:
            N, E = biased.shape
            grouped = biased.view(N, self.n_group, E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(N, E)
        idx = biased.topk(self.top_k, dim=-1).indices
        weight = scores.gather(1, idx)
        if self.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return idx, weight * self.scaling, scores


class GroupedExperts(nn.Module):
    """All routed experts as two 3-D weights (HF's in-memory layout):
    gate_up_proj [E, 2I, D] (rows [gate | up]) and down_proj [E, D, I]."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], topk_idx/topk_weight [N, K] -> Σ_k w_k · expert_k(x) [N, D]."""
        N, K = topk_idx.shape
        flat = topk_idx.flatten()
        order = flat.argsort(stable=True)  # (token, k) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // K
        y = self.run_experts(x[token], counts)  # [N*K, D], sorted by expert
        y = y * topk_weight.flatten()[order, None].to(y.dtype)
        # y has the GEMMs' dtype: bf16 under autocast when an expert class's GEMMs autocast (FP8's do)
        return x.new_zeros(x.shape, dtype=y.dtype).index_add_(0, token, y)

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [M, D] rows grouped by expert, counts [E] -> [M, D]."""
        offsets = counts.cumsum(0).to(torch.int32)
        h = grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offsets)  # [M, 2I]
        gate, up = h.split(self.hidden, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offsets)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] @ w[e] for every expert e. x [M, K], w [E, K, N] -> [M, N]."""
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], w.shape[2]))  # kernel needs 16-byte rows
    if hasattr(torch, "_grouped_mm") and x.dtype in (torch.float32, torch.bfloat16) and aligned:
        if torch.compiler.is_compiling():
            return _grouped_mm_op(x, w.to(x.dtype), offsets)
        return torch._grouped_mm(x, w.to(x.dtype), offs=offsets)  # eager: skip the custom-op dispatch cost
    # Fallback for builds without _grouped_mm: pad every group to the longest and use one batched matmul.
    E, M = w.shape[0], x.shape[0]
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)
    slot = torch.arange(M, device=x.device) - (offsets.long() - counts)[expert]
    padded = x.new_zeros(E, int(counts.max()) if M else 0, x.shape[1])
    padded[expert, slot] = x
    return torch.bmm(padded, w.to(x.dtype))[expert, slot]


# torch._grouped_mm runs in fp32 on CPU, but its compile-time shape function only admits bf16; wrapping it as an
# opaque custom op (with its own backward) lets torch.compile fuse everything around it.
@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offsets)


@_grouped_mm_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("nanoseek::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Σ over each expert's rows of xᵀ·grad: [M, K], [M, N] -> [E, K, N]."""
    return torch._grouped_mm(x.t(), grad, offs=offsets)


@_grouped_mm_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    return _grouped_mm_op(grad, w.transpose(1, 2), offsets), _grouped_mm_weight_grad(x, grad, offsets), None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor, stats: bool = False) -> tuple[torch.Tensor, dict | None]:
        """x [B, T, D] -> (y [B, T, D], None or {"counts": [E], "balance_loss": scalar})."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        idx, weight, scores = self.gate(flat)
        y = self.experts(flat, idx, weight).view(B, T, D) + self.shared_experts(x)
        if not stats:
            return y, None
        counts = torch.bincount(idx.flatten(), minlength=self.n_experts)
        return y, {"counts": counts, "balance_loss": sequence_balance_loss(scores.view(B, T, -1),
                                                                          idx.view(B, T, -1))}


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """The V3 complementary sequence-wise balance loss Σ_i f_i·P_i, averaged over sequences (multiply by α).

    scores [B, T, E] sigmoid affinities; topk_idx [B, T, K].
      f_i = E / (K·T) · Σ_t 1[i ∈ TopK_t]      (fraction of routed slots, 1.0 when perfectly balanced)
      P_i = 1/T · Σ_t s'_{i,t},  s' = s / Σ_j s_j  (normalised affinity; carries the gradient)
    """
    B, T, E = scores.shape
    K = topk_idx.shape[-1]
    hits = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, topk_idx.reshape(B, T * K), torch.ones(B, T * K, device=scores.device))
    f = hits * E / (K * T)
    P = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * P).sum(-1).mean()
