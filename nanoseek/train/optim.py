"""AdamW with DeepSeek-V3's settings and the two learning-rate shapes used for pretraining.

V3 (§4.2): AdamW β=(0.9, 0.95), weight decay 0.1, gradient clipping 1.0; the learning rate warms up linearly,
stays constant for most of training, then follows a cosine decay. Warmup-stable-decay (WSD) replaces the cosine
by a short linear decay at the end, so a run can be extended from any checkpoint of its stable phase.

The schedule is a pure function of the step: a checkpoint only needs the step to resume it exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices (2-D and expert 3-D tensors); exempt norms, biases and embeddings.

    Decaying a norm gain or a bias pulls it toward 0 rather than toward its neutral value, and embedding rows of
    rare tokens would shrink merely for being rare. The groups are the same however the model is distributed,
    so optimizer checkpoints move between process counts.
    """
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in no_decay else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, foreach: bool = True) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups`; each group's lr is set every step by `set_lr`.

    foreach=True uses the multi-tensor kernels (on CPU too, where torch's default is a per-tensor loop); they
    cannot mix FSDP's DTensors with plain tensors, which FSDP + expert parallelism has (experts stay local).
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=foreach)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                  decay_start: float = 0.8, final_ratio: float = 0.1) -> float:
    """Fraction of the peak learning rate for optimiser step `step` (0-based) of `total_steps`.

    warmup: linear from 1/warmup to 1 over the first `warmup_steps` steps;
    stable: 1 until `decay_start` × total_steps;
    decay:  to `final_ratio` at the last step, a half cosine ("cosine", DeepSeek-V3) or a line ("wsd").
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start = max(warmup_steps, int(decay_start * total_steps))
    if step < start or total_steps - 1 <= start:
        return 1.0
    progress = min(1.0, (step - start) / (total_steps - 1 - start))  # 0 at decay start, 1 at the last step
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return final_ratio + (1 - final_ratio) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
