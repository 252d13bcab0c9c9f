"""Load-balancing primitives of DeepSeek-V3 (§2.1.2): the auxiliary-loss-free bias update and the MaxVio metric.

The complementary sequence-wise balance loss lives beside the router (`moe.sequence_balance_loss`).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_bias(model: nn.Module, counts: torch.Tensor, gamma: float) -> None:
    """b_i += γ · sign(mean_load − load_i) for every MoE layer.

    counts [n_moe_layers, E]: tokens routed to each expert since the last update (summed over micro-batches and,
    in distributed runs, over ranks). Overloaded experts lose bias and get picked less; the bias never touches the
    gating weights, so balance costs no gradient interference.
    """
    layers = model.moe_layers()
    if counts.shape[0] != len(layers):
        raise ValueError(f"counts has {counts.shape[0]} rows, model has {len(layers)} MoE layers")
    for moe, load in zip(layers, counts.float(), strict=True):
        bias = moe.gate.e_score_correction_bias
        bias += gamma * torch.sign(load.mean() - load).to(bias.device)


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i − mean load) / mean load, per row of counts [..., E] (0 = perfectly balanced)."""
    load = counts.float()
    mean = load.mean(-1)
    return (load.max(-1).values - mean) / mean.clamp_min(1e-9)
