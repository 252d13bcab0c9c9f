"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules, each predicting one token further ahead.

Depth k at position i combines the previous depth's hidden state h^{k-1}_i with the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      (embedding FIRST, as the released weights expect)
    h^k_i = Block_k(h'_i);   logits = Head(norm_k(h^k_i))  -> predicts t_{i+k+1}
Embedding and output head are the main model's. h^0 is the main model's final (normed) hidden state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.config import ModelConfig
from nanoseek.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, depth: int, block: nn.Module):
        super().__init__()
        self.depth = depth  # k, 1-based
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # `shared_head.norm` in DeepSeek checkpoints

    def combine(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """h_prev, emb_next [B, T, D] -> block input [B, T, D]."""
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean over depths of the cross-entropy of each MTP module: (1/D) Σ_k CE_k (multiply by λ).

    labels [B, T] are the ordinary next-token targets (labels[:, i] = t_{i+1}). Depth k's logits [B, T-k, V] at
    position i predict t_{i+k+1} = labels[:, i+k], so its targets are labels[:, k:].
    """
    if not mtp_logits:
        return labels.new_zeros((), dtype=torch.float32)
    losses = []
    for k, logits in enumerate(mtp_logits, start=1):
        target = labels[:, k:]
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=ignore_index))
    return torch.stack(losses).mean()
