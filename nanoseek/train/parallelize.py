"""Data and expert parallelism, composed onto an unchanged model (the model never imports this file).

Process layout for `torchrun --nproc_per_node=W` with `--pipeline-parallel S` and `--expert-parallel P`
(S divides W, P divides the data-parallel size W/S):

    pp, dp [S, W/S]          pipeline stage outermost: rank = pp_rank · W/S + dp_rank (see train/pipeline.py)
    dp mesh [W/S]            every process of a stage holds a different slice of the batch
    expert mesh [W/S/P, P]   ("replica", "ep") inside a stage: routed experts are split over the P ranks of an
                             "ep" row and replicated over the rows; dp_rank = replica · P + ep_rank

- DDP: the model is replicated, gradients averaged by all-reduce (torch DDP, buffers kept in sync by us).
- FSDP2: `fully_shard` per decoder block (MTP blocks included) and once at the root, over the dp mesh, with a
  mixed-precision policy; the MoE router keeps fp32 parameters even when the rest is gathered in bf16.
- Expert parallelism: each rank keeps E/P experts. A MoE layer sends every (token, expert) row to the rank
  owning the expert with `all_to_all_single`, runs its local experts on what it received, and sends the results
  back. Expert weights are plain local tensors outside DDP/FSDP; their gradients are summed over the replica
  rows here and scaled like the data-parallel ones. Checkpoints see them as DTensors sharded over "ep".
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nanoseek.model.moe import GroupedExperts

MODES = ("none", "ddp", "fsdp")


@dataclass
class Parallel:
    """Where this process sits; `Parallel()` is a single process."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ep: int = 1
    pp: int = 1
    dp_mesh: DeviceMesh | None = None
    expert_mesh: DeviceMesh | None = None  # [replica, ep]
    expert_params: dict[str, nn.Parameter] = field(default_factory=dict)  # FQN -> local expert slice
    pp_group: dist.ProcessGroup | None = None  # the S ranks of one pipeline (same dp_rank)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_size(self) -> int:
        """Processes that share one step's batch (each pipeline stage has this many replicas)."""
        return self.world_size // self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp_size

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """In place over all processes (a no-op in a single process); returns t."""
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj: object) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init_parallel(mode: str | None, ep: int = 1, device: str = "auto", pp: int = 1) -> Parallel:
    """Read torchrun's environment, start the process group (NCCL on GPU, gloo on CPU) and build the meshes.

    mode None picks "ddp" under torchrun and "none" for a single process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    mode = mode or ("ddp" if world > 1 else "none")
    if mode not in MODES:
        raise ValueError(f"--parallel {mode!r}: expected one of {MODES}")
    for flag, n in (("--expert-parallel", ep), ("--pipeline-parallel", pp)):
        if n < 1:
            raise ValueError(f"{flag} {n}: expected a process count of at least 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        if ep > 1 or pp > 1:
            flag, n = ("--expert-parallel", ep) if ep > 1 else ("--pipeline-parallel", pp)
            raise ValueError(f"{flag} {n} needs {n} processes: torchrun --nproc_per_node={n} ...")
        return Parallel(device=torch.device(device))
    if mode == "none":
        raise ValueError(f"{world} processes need --parallel ddp or --parallel fsdp")
    if world % pp:
        raise ValueError(f"--pipeline-parallel {pp} must divide the number of processes ({world})")
    if (world // pp) % ep:
        raise ValueError(f"--expert-parallel {ep} must divide the processes per pipeline stage ({world // pp})")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    dp = world // pp
    if pp == 1:
        dp_mesh, pp_group = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",)), None
        expert_mesh = (init_device_mesh(dev.type, (dp // ep, ep), mesh_dim_names=("replica", "ep"))
                       if ep > 1 else None)
    else:  # every mesh below is this rank's stage's slice of the [pp, ...] mesh
        mesh = init_device_mesh(dev.type, (pp, dp), mesh_dim_names=("pp", "dp"))
        dp_mesh, pp_group = mesh["dp"], mesh.get_group("pp")
        expert_mesh = (init_device_mesh(dev.type, (pp, dp // ep, ep), mesh_dim_names=("pp", "replica", "ep"))
                       ["replica", "ep"] if ep > 1 else None)
    return Parallel(mode, rank, world, local_rank, dev, ep, pp, dp_mesh, expert_mesh, pp_group=pp_group)


def shutdown(par: Parallel) -> None:
    if par.distributed and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, par: Parallel, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Apply expert parallelism, then DDP or FSDP2. Returns the module to call for forward passes (the DDP
    wrapper, or `model` itself, which FSDP2 modifies in place). param_dtype: FSDP2's compute dtype (bf16)."""
    if par.ep > 1:
        apply_expert_parallel(model, par)
    if par.mode == "ddp":
        return apply_ddp(model, par)
    if par.mode == "fsdp":
        # MTP modules are driven through their methods, not forward(): shard their decoder block; their norms
        # and projection are gathered with the root's parameters.
        apply_fsdp(model, [*model.blocks, *(m.block for m in model.mtp)], par, param_dtype)
    return model


def apply_ddp(module: nn.Module, par: Parallel) -> nn.Module:
    """module wrapped in DDP over the data-parallel ranks; expert slices (reduced by us) are left out."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(module, list(par.expert_params))
    device_ids = [par.local_rank] if par.device.type == "cuda" else None
    # Buffers (balancing biases, rotary tables) stay identical on every rank by construction, so DDP need
    # not re-broadcast them before every forward (the argument was renamed in torch 2.13).
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(module, device_ids=device_ids, process_group=par.dp_mesh.get_group(), **no_sync)


def apply_fsdp(root: nn.Module, blocks: list[nn.Module], par: Parallel, param_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """FSDP2 over the data-parallel ranks: each decoder block, then `root` (the model, or a pipeline stage).

    reshard_after_forward=False keeps gathered blocks until the pipeline schedule's RESHARD action (see
    train/pipeline.py: the split backward of zbv/dualpipev needs them gathered between forward and backward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    ignored = set(par.expert_params.values()) or None
    if param_dtype not in (None, torch.float32):
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in blocks:  # routing decisions need fp32 router weights
            if block.is_moe:
                fully_shard(block.ffn.gate, mesh=par.dp_mesh, mp_policy=fp32)
    for block in blocks:
        fully_shard(block, mesh=par.dp_mesh, mp_policy=mp, ignored_params=ignored,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(root, mesh=par.dp_mesh, mp_policy=mp, ignored_params=ignored,
                reshard_after_forward=reshard_after_forward)


# --- expert parallelism -------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with a backward pass: gradients travel the reverse route, on `backward_group` (the same
    ranks as `group`, a separate communicator): a pipeline can then run one micro-batch's forward and another's
    backward at once (DualPipe, train/pipeline.py) without their exchanges interleaving differently per rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup,
                backward_group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), backward_group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None, None


class ExpertParallel:
    """Mixin placed in front of a GroupedExperts class: same call signature, experts spread over the "ep" ranks.

    Attributes set by `apply_expert_parallel`: ep_group, ep_backward_group (the same ranks, for the gradients'
    exchanges), ep_size, n_local (experts on this rank).
    """

    ep_group: dist.ProcessGroup
    ep_backward_group: dist.ProcessGroup
    ep_size: int
    n_local: int

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], topk_idx/topk_weight [N, K] (global expert ids) -> Σ_k w_k · expert_k(x) [N, D]."""
        N, K = topk_idx.shape
        P, El = self.ep_size, self.n_local
        flat = topk_idx.flatten()
        order = flat.argsort(stable=True)  # rows grouped by global expert = by owning rank, then local expert
        token = order // K
        send_counts = torch.bincount(flat, minlength=P * El).view(P, El)  # [dest rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.ep_group)
        in_splits, out_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        groups = self.ep_group, self.ep_backward_group
        x_recv = _AllToAll.apply(x[token], out_splits, in_splits, *groups)  # [R, D] by source rank
        # regroup what arrived (source-major) by local expert, run the experts, restore the arrival order
        expert_of_row = torch.arange(El, device=x.device).repeat(P).repeat_interleave(recv_counts.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        y_sorted = self.run_experts(x_recv[by_expert], recv_counts.sum(0))
        y_recv = y_sorted[by_expert.argsort()]
        y = _AllToAll.apply(y_recv, in_splits, out_splits, *groups)  # [N*K, D] in `order`
        y = y * topk_weight.flatten()[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def apply_expert_parallel(model: nn.Module, par: Parallel) -> None:
    """Keep this rank's E/P experts of every MoE layer and switch the layer to token exchange."""
    group = par.expert_mesh.get_group("ep")
    backward_group = None
    for first in range(0, par.world_size, par.ep):  # "ep" rows are runs of ep consecutive ranks; all ranks
        row = dist.new_group(list(range(first, first + par.ep)))  # create every row's group, in order
        if first <= par.rank < first + par.ep:
            backward_group = row
    for name, module in model.named_modules():
        if not isinstance(module, GroupedExperts):
            continue
        E = module.n_experts
        if E % par.ep:
            raise ValueError(f"n_routed_experts={E} is not divisible by --expert-parallel {par.ep}")
        El = E // par.ep
        lo = par.ep_rank * El
        for pname in ("gate_up_proj", "down_proj"):
            local = nn.Parameter(getattr(module, pname).detach()[lo:lo + El].clone())
            setattr(module, pname, local)
            par.expert_params[f"{name}.{pname}"] = local
        module.__class__ = type(f"ExpertParallel{type(module).__name__}", (ExpertParallel, type(module)), {})
        module.ep_group, module.ep_backward_group, module.ep_size, module.n_local = group, backward_group, par.ep, El


def reduce_expert_grads(par: Parallel) -> None:
    """Expert gradients hold the contributions of every rank's tokens (they arrived via all-to-all): sum them
    over replica rows, then divide by the data-parallel size like the data-parallel average does."""
    if not par.expert_params:
        return
    replica = par.expert_mesh.get_group("replica") if par.dp_size > par.ep else None
    for p in par.expert_params.values():
        if p.grad is None:
            continue
        if replica is not None:
            dist.all_reduce(p.grad, group=replica)
        p.grad.div_(par.dp_size)


def clip_grad_norm(model: nn.Module, max_norm: float, par: Parallel) -> torch.Tensor:
    """Global L2 norm of all gradients (identical on every rank), then scale them to at most max_norm.

    Each rank adds the squares of the gradient elements it holds, divided by how many ranks hold the same
    elements: FSDP shards are unique, expert slices are repeated over the replica rows, DDP/plain gradients
    over the data-parallel ranks (a pipeline stage's parameters live on its ranks only). One all-reduce then
    gives the exact global sum. A non-finite norm leaves gradients alone.
    """
    from torch.distributed.tensor import DTensor

    expert_ids = {id(p) for p in par.expert_params.values()}
    total = torch.zeros((), dtype=torch.float64, device=par.device)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        grads.append(g)
        if isinstance(g, DTensor):
            local, copies = g.to_local(), 1
        elif id(p) in expert_ids:
            local, copies = g, par.dp_size // par.ep
        else:
            local, copies = g, par.dp_size
        total += local.double().pow(2).sum() / copies
    norm = par.all_reduce(total).sqrt().float()
    if torch.isfinite(norm):
        coef = min(1.0, max_norm / (norm.item() + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm


def gather_full_state_dict(model: nn.Module, par: Parallel) -> dict[str, torch.Tensor] | None:
    """The complete, unsharded model state dict on CPU on rank 0 (None on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not par.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # cpu_offload keeps the full tensors on global rank 0 only; under pipeline parallelism every stage gathers
    # its own on all its ranks and its first data-parallel rank sends them to rank 0
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=par.pp == 1))
    for name, p in par.expert_params.items():
        parts = [torch.empty_like(p.detach()) for _ in range(par.ep)]
        dist.all_gather(parts, p.detach().contiguous(), group=par.expert_mesh.get_group("ep"))
        sd[name] = torch.cat(parts).cpu()
    if par.pp > 1:
        mine = {k: v.detach().cpu() for k, v in sd.items()} if par.dp_rank == 0 else {}
        stages: list | None = [None] * par.world_size if par.is_main else None
        dist.gather_object(mine, stages, dst=0)
        sd = {k: v for stage in stages or [] for k, v in stage.items()}
    return sd if par.is_main else None


def expert_dtensors(sd: dict, par: Parallel) -> dict:
    """Wrap the local expert slices of a model or optimizer state dict (FQN keys, as `get_state_dict` returns)
    as DTensors sharded over "ep", so torch.distributed.checkpoint stores one global tensor per key."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def wrap(t: torch.Tensor) -> torch.Tensor:
        return DTensor.from_local(t, par.expert_mesh, [Replicate(), Shard(0)], run_check=False)

    out = dict(sd)
    for name in par.expert_params:
        if name in out:  # model state dict
            out[name] = wrap(out[name])
        elif name in out.get("state", {}):  # optimizer state dict
            out["state"] = dict(out["state"])
            out["state"][name] = {k: wrap(v) if torch.is_tensor(v) and v.ndim > 0 else v
                                  for k, v in out["state"][name].items()}
    return out


def local_experts(sd: dict, par: Parallel) -> dict:
    """Inverse of `expert_dtensors`, and also slices full (unsharded) expert tensors down to this rank's."""
    from torch.distributed.tensor import DTensor

    def unwrap(t: torch.Tensor, n_local: int) -> torch.Tensor:
        if isinstance(t, DTensor):
            return t.to_local()
        if t.shape[0] != n_local:  # a full tensor from a checkpoint written without expert parallelism
            return t[par.ep_rank * n_local:(par.ep_rank + 1) * n_local]
        return t

    out = dict(sd)
    for name, p in par.expert_params.items():
        n = p.shape[0]
        if name in out:
            out[name] = unwrap(out[name], n)
        elif name in out.get("state", {}):
            out["state"] = dict(out["state"])
            out["state"][name] = {k: unwrap(v, n) if torch.is_tensor(v) and v.ndim > 0 else v
                                  for k, v in out["state"][name].items()}
    return out

