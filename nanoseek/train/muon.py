"""torch.optim.Muon, extended to the routed experts' stacked weights.

Muon (Keller Jordan; "Muon is Scalable for LLM Training", Moonlight) keeps a momentum of each hidden weight
matrix's gradient and steps along its orthogonalised form (Newton-Schulz iterations), so every direction of the
matrix moves at the same rate. torch.optim.Muon (torch >= 2.9) implements it for 2-D parameters only, but
DeepSeekMoE stores its routed experts stacked: gate_up_proj [E, 2I, D] and down_proj [E, D, I]
(nanoseek.model.moe.GroupedExperts). `Muon` lets such a weight count as its E expert matrices — each expert's
momentum and update are orthogonalised on their own, as Moonlight and Kimi K2 train MoE experts. The update
itself is torch's; this module only hands it per-expert views.

A fused gate_up_proj slice [2I, D] is orthogonalised as one matrix (the expert's gate and up rows together).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

if not hasattr(torch.optim, "Muon"):
    raise ImportError(f"pretrain.optimizer='muon' needs torch.optim.Muon (torch >= 2.9); this is torch "
                      f"{torch.__version__}")


class Muon(torch.optim.Muon):
    """torch.optim.Muon over 2-D matrices and stacked [E, A, B] weights (E matrices of [A, B])."""

    def __init__(self, params: Iterable, lr: float, weight_decay: float, momentum: float = 0.95,
                 nesterov: bool = True, adjust_lr_fn: str | None = None):
        # torch's constructor checks these settings and completes its defaults, but rejects 3-D parameters:
        # take its defaults from a throwaway instance and build the optimizer itself without that check.
        checked = torch.optim.Muon([torch.zeros(1, 1)], lr=lr, weight_decay=weight_decay, momentum=momentum,
                                   nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
        torch.optim.Optimizer.__init__(self, params, checked.defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon trains matrices [A, B] or stacked matrices [E, A, B]; got a parameter "
                                     f"of shape {tuple(p.shape)}")

    def _init_group(self, group: dict, params: list, grads: list, momentum_bufs: list) -> bool:
        """torch's bookkeeping (one momentum buffer per parameter, shaped like it), then every stacked tensor
        split into its matrices. The pieces are views, so torch's in-place updates land in the stacked tensors."""
        whole: tuple[list, list, list] = ([], [], [])
        has_complex = super()._init_group(group, *whole)
        for out, tensors in zip((params, grads, momentum_bufs), whole, strict=True):
            for t in tensors:
                out.extend(t.unbind(0) if t.ndim == 3 else [t])
        return has_complex
