"""Pipeline parallelism: the decoder cut into stages that torch.distributed.pipelining's schedules drive.

    torchrun --nproc_per_node=4 -m nanoseek pretrain --recipe r.toml --out runs/pp \\
        --pipeline-parallel 2 --pp-schedule dualpipev --parallel ddp --expert-parallel 2

The L decoder blocks are split as evenly as possible over S stages (the earlier stages take the remainder);
the embedding lives on stage 0, and the final norm, the head and the MTP modules on stage S-1 (MTP needs the
head and the main model's last hidden state). Single-stage schedules (gpipe, 1f1b) run S = pp stages, one per
rank; interleaved1f1b, zbv and dualpipev run S = 2·pp, two per rank: looped (rank r holds r and r+pp) or in a V
(rank r holds r and 2pp-1-r, so rank 0 holds both the embedding and the head, as DeepSeek-V3 deploys DualPipe).

What travels between stages, per micro-batch [b, T]:
    (x [b, T, D], emb [b, T, D], balance [])   the hidden state, the token embeddings (MTP depth k reads the
                                               embeddings of t_{i+k}) and the sum of the balance losses so far
so the last stage computes exactly the single-process loss  L = CE + λ·MTP + α·Σ_layers balance  and its
backward reaches every layer's router. Expert loads are kept by each stage for its own MoE layers; after the
step they are summed over all ranks and each stage updates the biases of the layers it holds.

A rank keeps one `Transformer` (its checkpoints and optimizer see it) pruned to the layers of its stages: the
blocks held elsewhere are `Elsewhere` placeholders, so every parameter keeps its full-model name and a DCP
checkpoint written by any layout loads into any other, one process included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from nanoseek.model.transformer import ModelOutput, Transformer
from nanoseek.train.objectives import pretrain_loss
from nanoseek.train.parallelize import Parallel, apply_expert_parallel, apply_fsdp

# schedule name -> (torch class, stages per rank, how stages map to ranks)
SCHEDULES = {
    "gpipe": (ScheduleGPipe, 1, "loop"),
    "1f1b": (Schedule1F1B, 1, "loop"),
    "interleaved1f1b": (ScheduleInterleaved1F1B, 2, "loop"),
    "zbv": (ScheduleZBVZeroBubble, 2, "v"),
    "dualpipev": (ScheduleDualPipeV, 2, "v"),
}


def stage_owner(stage: int, pp: int, style: str) -> int:
    """The pipeline rank holding `stage`: looped (s mod pp) or V-shaped (down the ranks, then back up)."""
    if style == "loop" or stage < pp:
        return stage % pp
    return 2 * pp - 1 - stage


def split_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous block ranges per stage, sizes differing by at most one (earlier stages take the extra)."""
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


def moe_rows(model: Transformer) -> dict[int, int]:
    """Layer index (main blocks 0..L-1, MTP blocks L..L+D-1) -> its row in `expert_counts` (MoE layers only)."""
    cfg = model.config
    n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    moe = [i for i in range(n) if cfg.is_moe_layer(i)]
    return {layer: row for row, layer in enumerate(moe)}


class Elsewhere(nn.Module):
    """Stands in for a decoder block that another pipeline stage holds (no parameters, never called)."""

    is_moe = False


class Stage(nn.Module):
    """Blocks `layers` of `model`, plus the embedding (first stage) or norm, head and MTP (last stage).

    Its submodules are the model's own (shared, not copied), registered under the model's names.
    """

    def __init__(self, model: Transformer, index: int, n_stages: int, layers: range):
        super().__init__()
        self.index, self.is_first, self.is_last = index, index == 0, index == n_stages - 1
        self.embed = model.embed if self.is_first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        if self.is_last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
        self.rotary = model.rotary
        rows = moe_rows(model)
        L = model.config.num_hidden_layers
        mine = [*layers, *(range(L, L + len(model.mtp)) if self.is_last else ())]
        self.rows = [rows[i] for i in mine if i in rows]  # this stage's rows of `expert_counts`
        self.counts: list[torch.Tensor] = []  # per forward call: [len(rows), E] routed (token, expert) pairs

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stage 0: (input_ids [b, T],); later stages: (x, emb, balance) as the previous one returned.
        Returns (x, emb, balance), or on the last stage (logits, *mtp_logits, balance)."""
        if self.is_first:
            x = emb = self.embed(args[0])
            balance = x.new_zeros((), dtype=torch.float32)
        else:
            x, emb, balance = args
        T = x.shape[1]
        cos, sin = self.rotary(torch.arange(T, device=x.device))
        counts = []
        for block in self.blocks.values():
            x, aux = block(x, cos, sin, stats=True)
            if aux is not None and "counts" in aux:  # a MoE layer
                balance = balance + aux["balance_loss"].float()
                counts.append(aux["counts"])
        if not self.is_last:
            self._record(counts)
            return x, emb, balance
        h = self.norm(x)
        logits, mtp_logits, h_prev = self.head(h), [], h
        for m in self.mtp:  # as Transformer.forward does it
            Tk = T - m.depth
            if Tk <= 0:
                break
            x = m.combine(h_prev[:, :Tk], emb[:, m.depth:])
            x, aux = m.block(x, cos[:Tk], sin[:Tk], stats=True)
            if aux is not None and "counts" in aux:  # a MoE layer
                balance = balance + aux["balance_loss"].float()
                counts.append(aux["counts"])
            mtp_logits.append(self.head(m.norm(x)))
            h_prev = x
        self._record(counts)
        return logits, *mtp_logits, balance

    def _record(self, counts: list[torch.Tensor]) -> None:
        if counts:
            self.counts.append(torch.stack(counts).detach())


class Pipeline:
    """This rank's stages of `model` and the schedule that runs them (prunes `model` in place).

    step() trains on one optimiser step's batch; calling the object runs a forward pass for validation.
    """

    def __init__(self, model: Transformer, par: Parallel, schedule: str, n_microbatches: int,
                 param_dtype: torch.dtype | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"--pp-schedule {schedule!r}: expected one of {list(SCHEDULES)}")
        cls, per_rank, self.style = SCHEDULES[schedule]
        self.model, self.par, self.pp = model, par, par.pp
        self.n_stages = per_rank * par.pp
        self.n_moe_rows = len(moe_rows(model))
        ranges = split_layers(model.config.num_hidden_layers, self.n_stages)
        mine = [s for s in range(self.n_stages) if stage_owner(s, par.pp, self.style) == par.pp_rank]
        held = {i for s in mine for i in ranges[s]}
        for i in range(len(model.blocks)):
            if i not in held:
                model.blocks[i] = Elsewhere()
        if 0 not in mine:
            model.embed = None
        if self.n_stages - 1 not in mine:
            model.norm = model.head = None
            model.mtp = nn.ModuleList()
        if par.ep > 1:
            apply_expert_parallel(model, par)
        self.stages = {s: Stage(model, s, self.n_stages, ranges[s]) for s in mine}
        wrapped = {s: self._data_parallel(stage, param_dtype) for s, stage in self.stages.items()}
        self.torch_stages = [PipelineStage(wrapped[s], s, self.n_stages, par.device, group=par.pp_group)
                             for s in mine]
        self.n_microbatches = n_microbatches
        self.lam, self.alpha, self.parts = 0.0, 0.0, []
        if per_rank == 1:
            self.schedule = cls(self.torch_stages[0], n_microbatches, loss_fn=self.loss)
        else:
            self.schedule = cls(self.torch_stages, n_microbatches, loss_fn=self.loss)
        self.has_first, self.has_last = 0 in mine, self.n_stages - 1 in mine

    def _data_parallel(self, stage: Stage, param_dtype: torch.dtype | None) -> nn.Module:
        """FSDP2 over this stage's data-parallel ranks (a stage without parameters needs none). Under "ddp" the
        stage stays plain and `step` averages its gradients: torch's DDP reducer rebuilds its buckets from the
        first step's gradient order and fails on the pipeline's split forward/backward calls."""
        if self.par.mode == "fsdp" and any(p.requires_grad for p in stage.parameters()):
            blocks = [*stage.blocks.values(), *(m.block for m in getattr(stage, "mtp", ()))]
            apply_fsdp(stage, blocks, self.par, param_dtype)
        return stage

    def loss(self, output: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss on the last stage, one micro-batch: the single-process objective."""
        logits, *mtp_logits, balance = output
        loss, p = pretrain_loss(ModelOutput(logits, mtp_logits, balance), labels, self.lam, self.alpha)
        self.parts.append(torch.stack([p["ce"], p["mtp"], p["balance"]]).double())
        return loss

    def step(self, inputs: torch.Tensor, labels: torch.Tensor, lam: float, alpha: float
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimiser step's forward and backward over inputs/labels [B, T], cut into n_microbatches.

        Returns (ce, mtp, balance) averaged over the micro-batches (zeros on ranks without the last stage) and
        this rank's expert loads as a full [n_moe_layers, E] table (zeros in other stages' rows), both to be
        summed over all ranks. Gradients are left as the single-process run would have them before clipping.
        """
        if inputs.shape[0] % self.n_microbatches:
            raise ValueError(f"[pretrain] pipeline_microbatches={self.n_microbatches} does not divide the "
                             f"{inputs.shape[0]} sequences of a step on each data-parallel rank")
        self.lam, self.alpha, self.parts = lam, alpha, []
        for stage in self.stages.values():
            stage.counts = []
        args = (inputs,) if self.has_first else ()
        self.schedule.step(*args, target=labels if self.has_last else None, return_outputs=False)
        if self.par.mode == "ddp" and self.par.dp_size > 1:
            self._average_gradients()
        # the first step's metadata inference runs each stage once more first (on placeholder inputs past
        # stage 0): only the last n_microbatches calls are the batch's
        n = self.n_microbatches
        parts = (torch.stack(self.parts[-n:]).mean(0) if self.has_last
                 else torch.zeros(3, dtype=torch.float64, device=self.par.device))
        return parts, self._counts(n)

    def _average_gradients(self) -> None:
        """Data-parallel mean of the replicated gradients over this stage's ranks (experts: reduce_expert_grads)."""
        experts = {id(p) for p in self.par.expert_params.values()}
        group = self.par.dp_mesh.get_group()
        for p in self.model.parameters():
            if p.grad is not None and id(p) not in experts:
                dist.all_reduce(p.grad, group=group)
                p.grad.div_(self.par.dp_size)

    def _counts(self, calls: int) -> torch.Tensor | None:
        """[n_moe_layers, E]: this rank's stages' loads over their last `calls` forward calls in their rows,
        zeros elsewhere (None: a dense model)."""
        if not self.n_moe_rows:
            return None
        E = self.model.config.n_routed_experts
        table = torch.zeros(self.n_moe_rows, E, dtype=torch.long, device=self.par.device)
        for stage in self.stages.values():
            if stage.counts:
                table[stage.rows] += torch.stack(stage.counts[-calls:]).sum(0).to(table.dtype)
        return table

    @property
    def moe_rows(self) -> list[int]:
        """The rows of `expert_counts` whose layers this rank holds, in `self.model.moe_layers()` order."""
        return sorted(r for stage in self.stages.values() for r in stage.rows)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, extras: bool = True) -> ModelOutput:
        """Validation forward of input_ids [B, T] through all stages in order (no schedule, no backward).

        Each stage's output is broadcast to the pipeline's ranks, so every rank returns the same full
        ModelOutput; validation sums then count each batch once per pipeline rank, which cancels in their
        ratios (loss per token, bits per byte, accuracy, MaxVio).
        """
        for stage in self.stages.values():
            stage.counts = []
        carry: tuple = (input_ids,)
        for s in range(self.n_stages):
            owner = stage_owner(s, self.pp, self.style)
            if owner == self.par.pp_rank:
                carry = self.stages[s](*carry)
            last = s == self.n_stages - 1
            if last or stage_owner(s + 1, self.pp, self.style) != owner:
                box = [carry]
                dist.broadcast_object_list(box, group=self.par.pp_group, group_src=owner)
                carry = box[0]
        logits, *mtp_logits, balance = carry
        counts = self._counts(1)
        if counts is not None:
            dist.all_reduce(counts, group=self.par.pp_group)
        return ModelOutput(logits, mtp_logits, balance, counts)
