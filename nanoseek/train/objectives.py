"""The pretraining objective of DeepSeek-V3 and the schedules of its two auxiliary weights.

    L = CE(next token) + λ · (1/D) Σ_k CE_k(MTP depth k) + α · Σ_layers Σ_i f_i P_i

λ follows V3's step schedule (0.3 for the first 10T of 14.8T tokens, then 0.1). The balancing bias rate γ
(applied after each optimiser step, not part of L) is constant and then 0 for the final stretch of training
(V3: γ = 0.001, 0 for the last 500B tokens), so routing is frozen while the learning rate anneals.

DSA models (V3.2) add the indexers' KL (`nanoseek.model.dsa.indexer_kl`): its gradient reaches the indexers only
and theirs only it (their inputs and target are detached), so it adds to L without a weight. In the dense
warm-up it is the whole loss: only the indexers learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.mtp import mtp_loss
from nanoseek.model.transformer import ModelOutput


def pretrain_loss(out: ModelOutput, labels: torch.Tensor, mtp_lambda: float, balance_alpha: float,
                  indexer_only: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """out: the model's extras=True output for inputs [B, T]; labels [B, T] next-token targets (-100 = ignore).
    indexer_only: DSA's dense warm-up, the indexers' KL alone.

    Returns (total loss to backpropagate, detached parts: ce, mtp, balance (before α), indexer_kl (0 without DSA)).
    """
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    mtp = mtp_loss(out.mtp_logits, labels)
    balance = out.balance_loss.float()
    kl = out.indexer_loss.float() if out.indexer_loss is not None else ce.new_zeros(())
    total = kl if indexer_only else ce + mtp_lambda * mtp + balance_alpha * balance + kl
    return total, {"ce": ce.detach(), "mtp": mtp.detach(), "balance": balance.detach(), "indexer_kl": kl.detach()}


def mtp_lambda_at(step: int, total_steps: int, start: float, final: float, switch: float) -> float:
    """λ = start until `switch` × total_steps, then `final` (V3: 0.3 -> 0.1 at 10/14.8 of training)."""
    return start if step < switch * total_steps else final


def bias_rate_at(step: int, total_steps: int, rate: float, stop: float) -> float:
    """γ = rate until `stop` × total_steps, then 0."""
    return rate if step < stop * total_steps else 0.0


def mtp_accuracy(out: ModelOutput, labels: torch.Tensor) -> list[tuple[int, int]]:
    """Per MTP depth k: (correct, counted) argmax predictions of t_{i+k+1} (labels[:, k:]), padding excluded."""
    result = []
    for k, logits in enumerate(out.mtp_logits, start=1):
        target = labels[:, k:]
        valid = target != -100
        result.append((int(((logits.argmax(-1) == target) & valid).sum()), int(valid.sum())))
    return result
