"""AdamW with DeepSeek-V3's settings, Muon as pretraining's alternative, and the two learning-rate shapes.

V3 (§4.2): AdamW β=(0.9, 0.95), weight decay 0.1, gradient clipping 1.0; the learning rate warms up linearly,
stays constant for most of training, then follows a cosine decay. Warmup-stable-decay (WSD) replaces the cosine
by a short linear decay at the end, so a run can be extended from any checkpoint of its stable phase.

Muon (pretrain.optimizer = "muon") trains the hidden weight matrices — attention projections, dense and shared
MLPs, the MTP projection, every routed expert's matrices — and AdamW the rest: embeddings, the output head (which
MTP shares), norms, biases and router gates, the split of nanochat and the modded-nanogpt speedrun.

The schedule is a pure function of the step: a checkpoint only needs the step to resume it exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nanoseek.model.moe import GroupedExperts

SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")


def param_groups(model: nn.Module, weight_decay: float, exclude: tuple[nn.Parameter, ...] = ()) -> list[dict]:
    """Decay weight matrices (2-D and expert 3-D tensors); exempt norms, biases and embeddings.

    Decaying a norm gain or a bias pulls it toward 0 rather than toward its neutral value, and embedding rows of
    rare tokens would shrink merely for being rare. The groups are the same however the model is distributed,
    so optimizer checkpoints move between process counts. `exclude`: parameters another optimizer trains.
    """
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip = {id(p) for p in exclude}
    decay, other = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in skip:
            (decay if p.ndim >= 2 and id(p) not in no_decay else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, foreach: bool = True,
                    exclude: tuple[nn.Parameter, ...] = ()) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups`; each group's lr is set every step by `set_lr`.

    foreach=True uses the multi-tensor kernels (on CPU too, where torch's default is a per-tensor loop); they
    cannot mix FSDP's DTensors with plain tensors, which FSDP + expert parallelism has (experts stay local).
    """
    return torch.optim.AdamW(param_groups(model, weight_decay, exclude), lr=lr, betas=betas, eps=eps,
                             foreach=foreach)


def muon_params(model: nn.Module, experts: bool = True) -> list[nn.Parameter]:
    """The hidden weight matrices Muon trains: every nn.Linear weight but the output head's, and (experts=True)
    the routed experts' stacked weights [E, A, B], one matrix per expert.

    The output head and embeddings map to and from tokens rather than between hidden states, and router gates
    are [E, D] score tables rather than layers: these stay on AdamW (Gate is not an nn.Linear).
    """
    head = getattr(model, "head", None)
    found = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not head:
            found.append(m.weight)
        elif experts and isinstance(m, GroupedExperts):
            found += [m.gate_up_proj, m.down_proj]
    return [p for p in found if p.requires_grad]


def build_muon(model: nn.Module, lr: float, muon_lr: float, weight_decay: float = 0.1,
               betas: tuple[float, float] = (0.9, 0.95), momentum: float = 0.95, nesterov: bool = True,
               adjust_lr_fn: str | None = "match_rms_adamw", experts: bool = True,
               foreach: bool = True) -> list[torch.optim.Optimizer]:
    """[AdamW at `lr` over everything but `muon_params`, Muon at `muon_lr` over those]; both decay decoupled.

    adjust_lr_fn="match_rms_adamw" scales each matrix's step to AdamW's update size (0.2·√max(A, B), Moonlight),
    so AdamW's lr and weight decay carry over; "original" is Keller Jordan's √max(1, A/B) (lr ~0.02).
    """
    from nanoseek.train.muon import Muon  # only here: torch < 2.9 has no Muon

    matrices = muon_params(model, experts)
    adamw = build_optimizer(model, lr, weight_decay, betas, foreach=foreach, exclude=tuple(matrices))
    muon = Muon(matrices, lr=muon_lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                adjust_lr_fn=adjust_lr_fn)
    return [adamw, muon]


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
