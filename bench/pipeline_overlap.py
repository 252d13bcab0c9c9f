"""DualPipeV overlap under pipeline x expert parallelism: how long one micro-batch's all-to-all is in flight while
another micro-batch computes, with the overlap on and off (4 CPU processes).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 bench/pipeline_overlap.py \\
        [--steps 4] [--json overlap.json] [--trace trace.json]

pp=2 x ep=2 (dp 2 per stage), the debug model with 4 layers and wider experts, 8 micro-batches per step. The
steps alternate overlap on / off in the same processes (train/pipeline.py: on, DualPipeV's OVERLAP_F_B pairs run
the forward of one micro-batch on a helper thread while the backward of another runs on the schedule's thread;
off, one after the other), so both sides see the same neighbours on a shared CPU.

torch's profiler records only the thread that started it (ops on a Python thread it did not start are not in its
trace), so the spans are timed here with perf_counter on every thread:
  - chunk: PipelineStage.forward_one_chunk / backward_one_chunk / backward_weight_one_chunk of (stage, micro-batch)
  - all-to-all: each dist.all_to_all_single (the expert dispatch and combine, forward and backward, and their
    count exchanges), attributed to the chunk that encloses it on its thread.
Compute is chunk time minus its all-to-alls. "Overlapped" is the wall time during which one thread is inside an
all-to-all of one chunk while another thread computes another chunk (with the overlap off there is one thread,
so it is 0 by construction). --trace writes the spans in the Chrome trace format (chrome://tracing, Perfetto),
one row per process and thread.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time

import torch
import torch.distributed as dist

from nanoseek.common import write_json
from nanoseek.model import Transformer, preset
from nanoseek.train.parallelize import init_parallel, reduce_expert_grads, shutdown
from nanoseek.train.pipeline import Pipeline

Span = tuple[str, int, int, int, float, float]  # (kind, stage, micro-batch, thread, start, end); a2a: stage=mb=-1


class Spans:
    """Wall-clock spans appended from any thread (list.append is atomic under the GIL)."""

    def __init__(self):
        self.spans: list[Span] = []
        self.recording = False

    def timed(self, fn, kind: str, stage: int = -1):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.recording:
                    mb = args[0] if stage >= 0 else -1  # the chunk methods take the micro-batch first
                    self.spans.append((kind, stage, mb, threading.get_ident(), t0, time.perf_counter()))
        return wrapper


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def summarize(spans: list[Span], wall: float) -> dict:
    """Per-thread states over time -> totals (seconds) for one rank and one mode."""
    chunks = [s for s in spans if s[0] != "a2a"]
    a2a = []
    for kind, _, _, thread, t0, t1 in spans:  # attribute each all-to-all to its enclosing chunk
        if kind == "a2a":
            owner = [c for c in chunks if c[3] == thread and c[4] <= t0 and t1 <= c[5]]
            label = min(owner, key=lambda c: c[5] - c[4])[1:3] if owner else (-1, -1)
            a2a.append((label, thread, t0, t1))
    # sweep over every span boundary: in each elementary interval each thread is in an all-to-all (of a chunk),
    # computing (a chunk) or neither
    bounds = sorted({t for s in chunks for t in s[4:]} | {t for s in a2a for t in s[2:]})
    comm_t = comp_t = both_t = 0.0
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        mid = (lo + hi) / 2
        comm = {a[1]: a[0] for a in a2a if a[2] <= mid < a[3]}
        comp = {c[3]: c[1:3] for c in chunks if c[4] <= mid < c[5] and c[3] not in comm}
        comm_t += (hi - lo) * bool(comm)
        comp_t += (hi - lo) * bool(comp)
        both_t += (hi - lo) * any(u != t and comp[u] != label for t, label in comm.items() for u in comp)
    return {"step_s": wall, "all_to_all_s": comm_t, "compute_s": comp_t, "overlapped_s": both_t}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4, help="measured steps per mode (alternating on, off)")
    parser.add_argument("--json", help="write the summary to this file")
    parser.add_argument("--trace", help="write every rank's spans to this Chrome trace file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    par = init_parallel("ddp", ep=2, device="cpu", pp=2)
    torch.manual_seed(0)
    cfg = preset("debug", num_hidden_layers=4, hidden_size=256, moe_intermediate_size=256, n_routed_experts=8)
    model = Transformer(cfg)
    pipe = Pipeline(model, par, "dualpipev", n_microbatches=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (16, 129), generator=torch.Generator().manual_seed(par.dp_rank))

    rec = Spans()
    for stage in pipe.torch_stages:
        for name, kind in (("forward_one_chunk", "F"), ("backward_one_chunk", "B"),
                           ("backward_weight_one_chunk", "W")):
            setattr(stage, name, rec.timed(getattr(stage, name), kind, stage.stage_index))
    dist.all_to_all_single = rec.timed(dist.all_to_all_single, "a2a")  # parallelize.py calls it through `dist`

    def step() -> None:
        pipe.step(ids[:, :-1], ids[:, 1:], 0.3, 1e-4)
        reduce_expert_grads(par)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # metadata inference and warm-up, not measured
    results: dict[str, list[dict]] = {"on": [], "off": []}
    trace = []
    for i in range(2 * args.steps):
        mode = "on" if i % 2 == 0 else "off"
        pipe.overlap = mode == "on"
        dist.barrier()
        rec.spans, rec.recording = [], True
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
        rec.recording = False
        results[mode].append(summarize(rec.spans, wall))
        trace += [(mode, i, *s) for s in rec.spans]

    keys = ("step_s", "all_to_all_s", "compute_s", "overlapped_s")
    mine = {mode: {k: sum(r[k] for r in rs) / len(rs) for k in keys} for mode, rs in results.items()}
    per_rank = par.all_gather_object({"rank": par.rank, "pp": par.pp_rank, "ep": par.ep_rank, **mine})
    traces = par.all_gather_object(trace) if args.trace else []
    if par.is_main:
        header = (f"{'rank':>4} {'pp,ep':>5} {'overlap':>7} {'step s':>7} {'a2a s':>7} {'compute s':>9} "
                  f"{'a2a||compute s':>14} fraction")
        print(f"DualPipeV, pp=2 x ep=2, 8 micro-batches; per-step means over {args.steps} steps per mode "
              f"(alternating); a2a||compute: an all-to-all of one chunk in flight while another chunk computes")
        print(header)
        def line(rank: str, where: str, mode: str, m: dict) -> None:
            print(f"{rank:>4} {where:>5} {mode:>7} {m['step_s']:7.3f} {m['all_to_all_s']:7.3f} "
                  f"{m['compute_s']:9.3f} {m['overlapped_s']:14.3f} {m['fraction']:8.1%}")

        rows = []
        for r in per_rank:
            for mode in ("on", "off"):
                m = r[mode]
                m["fraction"] = m["overlapped_s"] / m["all_to_all_s"] if m["all_to_all_s"] else 0.0
                rows.append({"rank": r["rank"], "pp": r["pp"], "ep": r["ep"], "overlap": mode, **m})
                line(str(r["rank"]), f"{r['pp']},{r['ep']}", mode, m)
        mean = {mode: {k: sum(r[mode][k] for r in per_rank) / len(per_rank) for k in keys} for mode in ("on", "off")}
        for mode, m in mean.items():
            m["fraction"] = m["overlapped_s"] / m["all_to_all_s"] if m["all_to_all_s"] else 0.0
            line("mean", "", mode, m)
        if args.json:
            write_json(args.json, {"schedule": "dualpipev", "pp": 2, "ep": 2, "microbatches": 8,
                                   "steps_per_mode": args.steps, "per_rank": rows, "mean": mean})
        if args.trace:
            events = []
            base = min(s[6] for spans in traces for s in spans)  # perf_counter: one monotonic clock per machine
            for rank, spans in enumerate(traces):
                tids = {t: n for n, t in enumerate(dict.fromkeys(s[5] for s in spans))}
                for mode, i, kind, stage, mb, thread, s0, s1 in spans:
                    name = "all_to_all" if kind == "a2a" else f"{kind} stage {stage} mb {mb}"
                    events.append({"name": name, "ph": "X", "pid": rank, "tid": tids[thread], "ts": (s0 - base) * 1e6,
                                   "dur": (s1 - s0) * 1e6, "args": {"overlap": mode, "step": i}})
            write_json(args.trace, {"traceEvents": events})
    shutdown(par)


if __name__ == "__main__":
    main()
