"""Post-training losses: GRPO (with its DAPO / Dr. GRPO variants), DPO, and the Bradley-Terry reward loss.

Each takes log-probabilities (or scores) already computed, so the same functions serve the trainers here and
the tests that hold them against TRL's implementations on identical inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
REWARD_SCALES = ("group", "batch", "none")


def token_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target) per position: logits [B, T, V], targets [B, T] -> [B, T] float32.

    cross_entropy is log_softmax + gather without materialising the [B, T, V] log-probabilities. With a mask
    [B, T], only the masked positions are computed (0 elsewhere): RL scores completion tokens only, and the
    prompt is most of each sequence."""
    B, T, V = logits.shape
    if mask is None:
        flat = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none")
        return -flat.view(B, T)
    keep = mask.bool()
    out = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
    out[keep] = -F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    return out


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: logits [..., V] -> [...] (a metric, so no gradient)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's outcome advantage: rewards [N] (N = prompts × G, groups contiguous) -> advantages, zero_std [N].

    Â_i = r_i - mean(group), divided by the group's std (scale="group", DeepSeekMath), the batch std
    ("batch"), or not at all ("none", Dr. GRPO: the std division over-weights near-unanimous groups).
    zero_std marks samples whose group had identical rewards (no learning signal)."""
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale_rewards={scale!r}; expected one of {REWARD_SCALES}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # [P, G]
    mean = grouped.mean(1).repeat_interleave(group_size)
    if scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = grouped.std(1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor, clamp: float = 20.0) -> torch.Tensor:
    """Per-token KL(π || π_ref) by Schulman's k3 estimator, exp(d) - d - 1 with d = ref - logp (always >= 0,
    unbiased). d is clamped before exp: one token that drifted far would otherwise overflow to inf and NaN."""
    d = (ref_logps - logps).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, loss_type: str = "dapo", eps_low: float = 0.2, eps_high: float = 0.2,
              beta: float = 0.0, ref_logps: torch.Tensor | None = None,
              max_completion_length: int | None = None, num_items_in_batch: int | torch.Tensor | None = None,
              num_micro_batches: int = 1, kl_bias_correction: bool = True, log_ratio_clamp: float = 20.0
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO surrogate loss on one micro-batch, and detached statistics.

    logps, old_logps, ref_logps, mask: [B, T] over completion tokens; advantages: [B] or [B, T].
    Per token: -min(ρ·Â, clip(ρ, 1-eps_low, 1+eps_high)·Â) + β·KL_k3, with ρ = exp(logp - old_logp).
    old_logps=None means the sampling policy is the current one (μ = 1): ρ = 1, yet the gradient is Â·∇logp.
    kl_bias_correction multiplies the KL term by ρ (DeepSeek-V3.2; TRL's default): the samples come from
    π_old, so without the weight the k3 gradient is a biased estimate of ∇KL(π || π_ref).

    How the masked token losses are reduced (`loss_type`, TRL's names):
      grpo     mean over each sequence's tokens, then over sequences (DeepSeekMath); ÷ num_micro_batches
      bnpo     sum ÷ active tokens in this micro-batch; ÷ num_micro_batches
      dr_grpo  sum ÷ (B × max_completion_length): no length bias (Dr. GRPO); ÷ num_micro_batches
      dapo     sum ÷ active tokens in the whole generation batch (`num_items_in_batch`; DAPO's token loss)
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # [B, 1]: one outcome advantage for every token
    if old_logps is None:
        old_logps = logps.detach()
    log_ratio = (logps - old_logps).clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # [B, T]
    kl = None
    if beta != 0.0:
        kl = k3_kl(logps, ref_logps, log_ratio_clamp)
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / num_micro_batches
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) / num_micro_batches
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length) / num_micro_batches
    else:
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token * mask).sum() / torch.as_tensor(n, dtype=logps.dtype).clamp(min=1.0)

    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - eps_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (advantages > 0)).to(mask.dtype)
        stats = {
            "clip_low": (low * mask).sum() / tokens,
            "clip_high": (high * mask).sum() / tokens,
            "clip_frac": (torch.maximum(low, high) * mask).sum() / tokens,
            "ratio": (ratio * mask).sum() / tokens,
        }
        if kl is not None:
            stats["kl"] = (kl * mask).sum() / tokens
    return loss, stats


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023): -log σ(β[(log π_c - log π_ref,c) - (log π_r - log π_ref,r)]), batch mean.

    Inputs are sequence log-probabilities [B] (sums over completion tokens). Returns the loss and the
    implicit rewards β·(log π - log π_ref) of the chosen and rejected sides (detached): the usual metrics."""
    chosen = chosen_logps - ref_chosen_logps
    rejected = rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coef: float | None = None) -> torch.Tensor:
    """Reward-model loss: -log σ(s_chosen - s_rejected - margin), batch mean (Bradley-Terry preference model).

    center_coef adds coef·mean((s_c + s_r)²), which pins the otherwise free offset of the scores near 0 so a
    reward model's outputs stay comparable across checkpoints."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef is not None:
        loss = loss + center_coef * ((chosen_scores + rejected_scores) ** 2).mean()
    return loss
