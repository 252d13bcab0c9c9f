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

Overlap (DualPipe's idea): DualPipeV pairs the forward of one micro-batch with the backward of another
(OVERLAP_F_B), which torch runs one after the other. With expert parallelism we run the forward on a helper
thread while the backward runs here, so one's all-to-all dispatch/combine proceeds while the other computes.
Forward and backward exchanges use separate process groups of the same ranks (train/parallelize.py), so their
order per group is the same on every rank. bench/pipeline_overlap.py measures the overlap in a profiler trace.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import OVERLAP_F_B, _wait_batch_p2p

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
                 param_dtype: torch.dtype | None = None, overlap: bool = True):
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
        try:
            self.schedule = cls(self.torch_stages[0] if per_rank == 1 else self.torch_stages, n_microbatches,
                                loss_fn=self.loss)
        except ValueError as e:  # e.g. too few micro-batches for the schedule's stages
            raise ValueError(f"[pretrain] pipeline_microbatches={n_microbatches} (--pp-schedule {schedule}): {e}") \
                from e
        self.has_first, self.has_last = 0 in mine, self.n_stages - 1 in mine
        # OVERLAP_F_B pairs run through _overlap_forward_backward: on two threads while self.overlap, one after
        # the other otherwise (bench/pipeline_overlap.py switches between steps). FSDP's unshard/reshard
        # bookkeeping is left to torch's sequential runner.
        self.overlap = overlap
        if schedule == "dualpipev" and par.ep > 1 and par.mode != "fsdp":
            self.schedule.register_custom_function(OVERLAP_F_B, self._overlap_forward_backward)

    def _data_parallel(self, stage: Stage, param_dtype: torch.dtype | None) -> nn.Module:
        """FSDP2 over this stage's data-parallel ranks (a stage without parameters needs none). Under "ddp" the
        stage stays plain and `step` averages its gradients: torch's DDP reducer rebuilds its buckets from the
        first step's gradient order and fails on the pipeline's split forward/backward calls.

        The blocks stay gathered from forward to backward (the schedule's UNSHARD/RESHARD actions gather and
        free a whole stage, as torchtitan does under PP): zbv and dualpipev split the backward into an input pass
        and a later weight pass, and the input pass collects the weights to differentiate from
        `stage.parameters()`. A block resharded after its forward shows its sharded parameters there, which are
        not in the autograd graph, so that micro-batch's weight pass added nothing (measured with FSDP's
        default: the gradients of a stage whose last action was a forward came out 30-40% short)."""
        if self.par.mode == "fsdp" and any(p.requires_grad for p in stage.parameters()):
            blocks = [*stage.blocks.values(), *(m.block for m in getattr(stage, "mtp", ()))]
            apply_fsdp(stage, blocks, self.par, param_dtype, reshard_after_forward=False)
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

    def _overlap_forward_backward(self, action, ctx) -> None:
        """OVERLAP_F_B: the forward sub-action on a helper thread, the full backward on this one, then join
        (without self.overlap: forward, then backward, here). Both mirror torch's sequential runner
        (_PipelineScheduleRuntime._step_microbatches)."""
        sched = ctx.schedule_ref
        fwd, bwd = action.sub_actions
        if not self.overlap:
            self._forward_action(sched, fwd.stage_index, fwd.microbatch_index, ctx)
            self._backward_action(sched, bwd.stage_index, bwd.microbatch_index)
            return
        errors: list[BaseException] = []
        dev = self.par.device.type
        autocast = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)  # thread-local state

        def forward() -> None:
            try:
                with torch.autocast(dev, dtype=autocast[1], enabled=autocast[0]):
                    self._forward_action(sched, fwd.stage_index, fwd.microbatch_index, ctx)
            except BaseException as e:  # re-raised on the schedule's thread
                errors.append(e)

        helper = threading.Thread(target=forward, name=f"pp-forward-mb{fwd.microbatch_index}")
        helper.start()
        try:
            self._backward_action(sched, bwd.stage_index, bwd.microbatch_index)
        finally:
            helper.join()
        if errors:
            raise errors[0]

    def _local(self, sched, stage_index: int) -> bool:
        return sched.stage_index_to_group_rank.get(stage_index) == self.par.pp_rank

    def _forward_action(self, sched, s: int, mb: int, ctx) -> None:
        stage = self._torch_stage(s)
        if not stage.is_first and not self._local(sched, s - 1):
            _wait_batch_p2p(sched.fwd_recv_ops.pop((s, mb)))
        output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], save_forward_output=False)
        sched._maybe_compute_loss(stage, output, ctx.target_mbs, mb)
        if self._local(sched, s + 1):
            self._torch_stage(s + 1).set_local_fwd_input(output, mb)

    def _backward_action(self, sched, s: int, mb: int) -> None:
        stage = self._torch_stage(s)
        if not stage.is_last and not self._local(sched, s + 1):
            _wait_batch_p2p(sched.bwd_recv_ops.pop((s, mb)))
        sched.backward_counter[s] += 1
        last = sched.backward_counter[s] == self.n_microbatches
        stage.backward_one_chunk(mb, loss=sched._maybe_get_loss(stage, mb), full_backward=True, last_backward=last)
        if self._local(sched, s - 1):
            self._torch_stage(s - 1).set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

    def _torch_stage(self, s: int) -> PipelineStage:
        return next(t for t in self.torch_stages if t.stage_index == s)

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
        for stage in self.stages.values():  # FSDP roots stay unsharded after forward: give the memory back,
            for module in stage.modules():  # and leave the schedule's unshard/reshard bookkeeping as it was
                if isinstance(module, FSDPModule):
                    module.reshard()
        logits, *mtp_logits, balance = carry
        counts = self._counts(1)
        if counts is not None:
            dist.all_reduce(counts, group=self.par.pp_group)
        return ModelOutput(logits, mtp_logits, balance, counts)
