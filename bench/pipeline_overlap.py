"""DualPipeV overlap under pipeline x expert parallelism, measured in a torch profiler trace (4 CPU processes).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 bench/pipeline_overlap.py [--no-overlap]

pp=2 x ep=2 (dp 2 per stage), the debug model with 4 layers and wider experts, 8 micro-batches per step.
Each rank profiles a few steps and reports: time inside expert all-to-alls, time inside compute ops (aten
matmuls) on the other thread, and the time with both running at once: the forward of one micro-batch
exchanging tokens while the backward of another computes (train/pipeline.py). With --no-overlap torch runs the
pair one after the other and the overlap is ~0. On a shared 2-core CPU the step times are noise; the overlap
seconds are the point.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from nanoseek.model import Transformer, preset
from nanoseek.train.parallelize import init_parallel, reduce_expert_grads, shutdown
from nanoseek.train.pipeline import Pipeline


def intervals(events, match) -> dict[int, list[tuple[float, float]]]:
    """thread id -> [(start, end)] µs of the profiler events whose name `match` accepts."""
    out: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if match(e.name):
            out.setdefault(e.thread, []).append((e.time_range.start, e.time_range.end))
    return out


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def length(spans) -> float:
    return sum(b - a for a, b in spans)


def intersect(x, y) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0.0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-overlap", action="store_true", help="torch's sequential OVERLAP_F_B")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    par = init_parallel("ddp", ep=2, device="cpu", pp=2)
    torch.manual_seed(0)
    cfg = preset("debug", num_hidden_layers=4, hidden_size=256, moe_intermediate_size=256, n_routed_experts=8)
    model = Transformer(cfg)
    pipe = Pipeline(model, par, "dualpipev", n_microbatches=8, overlap=not args.no_overlap)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (16, 129), generator=torch.Generator().manual_seed(par.dp_rank))

    def step() -> None:
        pipe.step(ids[:, :-1], ids[:, 1:], 0.3, 1e-4)
        reduce_expert_grads(par)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # metadata inference and warm-up outside the trace
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.events()
    a2a = intervals(events, lambda n: "all_to_all" in n or "alltoall" in n)
    compute = intervals(events, lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm"))
    comm_union = union([s for spans in a2a.values() for s in spans])
    both = 0.0  # a2a on one thread while another thread computes
    for t, spans in a2a.items():
        others = union([s for u, c in compute.items() if u != t for s in c])
        both += intersect(union(spans), others)
    threads = sorted(set(a2a) | set(compute))
    wall = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    line = (f"rank {par.rank} (pp {par.pp_rank}, ep {par.ep_rank}) overlap={'off' if args.no_overlap else 'on'}: "
            f"{args.steps} steps {wall / 1e6:.2f}s, all-to-all {length(comm_union) / 1e6:.3f}s on "
            f"{len(a2a)} thread(s), compute {length(union([s for c in compute.values() for s in c])) / 1e6:.3f}s, "
            f"all-to-all while another thread computes {both / 1e6:.3f}s "
            f"({100 * both / max(1.0, length(comm_union)):.0f}% of all-to-all time), threads {len(threads)}")
    lines = par.all_gather_object(line)
    if par.is_main:
        print("\n".join(lines))
        if os.environ.get("TRACE"):
            prof.export_chrome_trace(os.environ["TRACE"])
    shutdown(par)


if __name__ == "__main__":
    main()
