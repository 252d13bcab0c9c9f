"""The report card of a run: `report.json` (every number) and `report.md` with PNG plots.

    write_report(run_dir, stages=[{"name": "pretrain", "wall_seconds": 312.0}, ...],
                 evals={"base": evaluate(...), "r1_zero": evaluate(...), ...}, config=recipe)

Every pass@1 carries its 95% interval, a percentile bootstrap over problems (nanoseek.eval.metrics); a lift
is paired: the same problems for both models, the interval that of the mean per-problem difference.
Everything in the report is read from the run: evaluation results (`evaluate`'s return value, or the
`results.json` it wrote under RUN/eval/<model>/), each stage's metrics.jsonl (training and validation loss,
reward, accuracy, completion length, KL, expert loads and MaxVio), and the stage timings. The only constants
are the paper rows' *reported* figures, each with its source, printed beside what this run measured.

report.json:
    run_dir, created, config, hardware, total_wall_seconds,
    stages: [{name, wall_seconds, ...}],
    eval:   {model: {task: {"pass@1", "pass@1_ci", "pass@k", "maj@k", "format", ..., "per_problem"}}}
            (results.json's task metrics), models base, sft, r1_zero, r1, student (distilled), student_rl (GRPO
            on the student base),
    bpb, speed, lift: {"r1_zero_vs_base": {task: Δpass@1, "mean": ..., "mean_ci": [lo, hi]}, "r1_vs_sft": ...},
    rl_task_lift: {rl stage: {trained_on, start_model, start, end, lift, start_ci, end_ci, lift_ci, n_problems,
                              k}}  (held-out pass@1 of the start and end models on the stage's own task and
                              level, paired problem by problem),
    training: {stage: {key: {"first", "last", "steps"}}}, balance: {stage: {...}},
    warnings: [one line per RL stage with steps that had no learning signal],
    paper_comparison: [{"topic", "paper", "source", "measured"}], plots: [paths relative to run_dir]
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import atomic_write
from nanoseek.eval.metrics import bootstrap_ci, paired_bootstrap_ci, stratified_bootstrap_ci
from nanoseek.train.metrics import read_metrics

MODELS = ("base", "sft", "r1_zero", "r1", "student", "student_rl")
# (starting model, RL model): the lifts the pipeline is judged on
LIFTS = (("base", "r1_zero"), ("sft", "r1"))
PLOT_DIR = "report_plots"

# curve file -> (title, y label, metrics.jsonl key); one line per stage that logs the key
CURVES: dict[str, tuple[str, str, str]] = {
    "loss.png": ("training loss", "cross-entropy (nats/token)", "loss"),
    "val_loss.png": ("validation loss", "cross-entropy (nats/token)", "val_loss"),
    "reward.png": ("RL reward (batch mean)", "reward", "reward"),
    "accuracy.png": ("RL training accuracy", "share correct", "accuracy"),
    "heldout_pass1.png": ("held-out pass@1 during RL", "pass@1", "eval/pass@1"),
    "completion_length.png": ("completion length during RL", "tokens", "completion_length"),
    "kl.png": ("KL to the reference", "KL (k3)", "kl"),
}
# generative-task metrics shown per model (means over the tasks that report them)
SUMMARY = ("pass@1", "pass@k", "maj@k", "greedy", "format", "consistency", "hallucination",
           "hallucination_verified", "abstention", "unsupported_claims")
GAME_KEYS = ("win_vs_optimal", "draw_vs_optimal", "win_vs_random", "draw_vs_random", "forfeit_vs_random",
             "optimal_move_rate")  # shown with their 95% intervals where the results carry them ("<key>_ci")


# --- reading the run --------------------------------------------------------------------------------------

def load_evals(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Evaluation results written by `evaluate(..., out=RUN/eval/<model>)`, by model name."""
    out = {}
    for path in sorted(Path(run_dir).glob("eval/*/results.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    return out


def stage_metrics(run_dir: Path, stages: Sequence[dict[str, Any]],
                  stage_dirs: dict[str, str | Path] | None) -> dict[str, list[dict[str, Any]]]:
    """Each stage's metrics.jsonl records. A stage's directory is stage_dirs[name], else its `dir` entry, else
    RUN/<name> (relative paths are taken from the run directory); stages without metrics are left out."""
    out = {}
    for stage in stages:
        name = stage["name"]
        where = Path((stage_dirs or {}).get(name) or stage.get("dir") or name)
        path = (where if where.is_absolute() else run_dir / where) / "metrics.jsonl"
        if path.exists():
            out[name] = read_metrics(path)
    return out


def hardware() -> dict[str, Any]:
    """What the report was produced on (the run's machine when written at the end of `nanoseek run`)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory, 1) if memory else None, "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# --- summaries --------------------------------------------------------------------------------------------

def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r
            and math.isfinite(r[key])]


def _ends(points: list[tuple[int, float]]) -> dict[str, float]:
    """Mean of the first and of the last tenth of a curve (at least one point each): robust to noisy steps."""
    m = max(1, len(points) // 10)
    return {"first": sum(v for _, v in points[:m]) / m, "last": sum(v for _, v in points[-m:]) / m,
            "steps": points[-1][0]}


def training_summary(metrics: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    keys = sorted({c[2] for c in CURVES.values()} | {"val_bpb", "max_vio_mean", "val_max_vio_mean", "format"})
    out = {}
    for stage, records in metrics.items():
        found = {key: _ends(pts) for key in keys if (pts := _series(records, key))}
        if found:
            out[stage] = found
    return out


def signal_warnings(metrics: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per RL stage with steps that could not learn: GRPO logs `no_signal` (no group with a reward
    spread, or every completion masked) and `masked_all` (every completion truncated under mask_truncated)."""
    out = []
    for stage, records in metrics.items():
        steps = [r for r in records if "no_signal" in r]
        idle = sum(r["no_signal"] for r in steps)
        if idle:
            masked = sum(r.get("masked_all", 0) for r in steps)
            why = (f"{masked} had every completion truncated and masked" if masked
                   else "every group's rewards were equal")
            out.append(f"{stage}: {idle} of {len(steps)} RL steps had no learning signal ({why}); they changed nothing")
    return out


def max_violation(loads: Sequence[float]) -> float:
    """MaxVio = (max load - mean load) / mean load (Wang et al. 2024): 0 is perfect balance."""
    mean = sum(loads) / len(loads)
    return (max(loads) - mean) / mean if mean > 0 else 0.0


def _final_loads(records: list[dict[str, Any]]) -> list[list[float]] | None:
    """Expert loads [layers][experts] summed over the last tenth of the steps that logged them."""
    logged = [r["expert_loads"] for r in records if r.get("expert_loads")]
    if not logged:
        return None
    tail = logged[-max(1, len(logged) // 10):]
    return [[sum(step[layer][e] for step in tail) for e in range(len(tail[0][layer]))]
            for layer in range(len(tail[0]))]


def balance_summary(metrics: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for stage, records in metrics.items():
        loads = _final_loads(records)
        if loads is None:
            continue
        entry: dict[str, Any] = {"max_vio_per_layer": [max_violation(layer) for layer in loads]}
        val = _series(records, "val_max_vio_mean")
        if val:
            entry["val_max_vio_mean"] = val[-1][1]
        entry["max_vio_mean"] = sum(entry["max_vio_per_layer"]) / len(loads)
        mtp = [r["val_mtp_acc"] for r in records if r.get("val_mtp_acc")]
        if mtp:
            entry["val_mtp_acc"] = mtp[-1]
        out[stage] = entry
    return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def model_summary(tasks: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Means over a model's tasks of each SUMMARY metric (tasks that do not report one are skipped)."""
    return {key: _mean([m[key] for m in tasks.values() if isinstance(m.get(key), (int, float))])
            for key in SUMMARY}


def mean_pass1_ci(tasks: dict[str, dict[str, Any]]) -> list[float] | None:
    """95% interval of a model's pass@1 averaged over its tasks (model_summary's mean): each task's problems
    resampled within the task. None when a task lacks per-problem scores."""
    scored = [m for m in tasks.values() if isinstance(m.get("pass@1"), (int, float))]
    if not scored or any("per_problem" not in m for m in scored):
        return None
    return list(stratified_bootstrap_ci([m["per_problem"]["pass@1"] for m in scored]))


def _paired(start: dict[str, Any], end: dict[str, Any], task: str) -> tuple[list[float], list[float]]:
    """Per-problem pass@1 of two models on one task, checked to be the same problems in the same order."""
    a, b = start[task].get("per_problem"), end[task].get("per_problem")
    if a is None or b is None:
        raise ValueError(f"{task}: no per-problem scores to pair (results from before nanoseek wrote them)")
    if a["ids"] != b["ids"]:
        raise ValueError(f"{task}: the two models were evaluated on different problems; a paired lift needs the "
                         f"same task, difficulty, n and seed for both")
    return a["pass@1"], b["pass@1"]


def lifts(evals: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """pass@1 gained by each RL model over the model it started from, per shared task and on average; the
    average's interval is paired (per-problem differences, resampled within each task)."""
    out = {}
    for start, rl in LIFTS:
        if start in evals and rl in evals:
            shared = [t for t in evals[rl] if "pass@1" in evals[rl][t] and "pass@1" in evals[start].get(t, {})]
            if shared:
                delta = {t: evals[rl][t]["pass@1"] - evals[start][t]["pass@1"] for t in shared}
                entry: dict[str, Any] = {**delta, "mean": sum(delta.values()) / len(delta)}
                if all("per_problem" in evals[m][t] for m in (start, rl) for t in shared):
                    pairs = [_paired(evals[start], evals[rl], t) for t in shared]
                    entry["mean_ci"] = list(stratified_bootstrap_ci([[e - s for s, e in zip(a, b, strict=True)]
                                                                     for a, b in pairs]))
                out[f"{rl}_vs_{start}"] = entry
    return out


def paired_lift(start: dict[str, Any], end: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Held-out pass@1 of a start and an end model (two `evaluate()` results) on the same problems of
    `tasks`, pooled over the tasks' problems: each mean with its interval, and the lift with the paired
    interval of the mean per-problem difference."""
    pairs = [_paired(start["tasks"], end["tasks"], t) for t in tasks]
    a = [x for s, _ in pairs for x in s]
    b = [x for _, e in pairs for x in e]
    return {"start": sum(a) / len(a), "end": sum(b) / len(b), "lift": (sum(b) - sum(a)) / len(a),
            "start_ci": list(bootstrap_ci(a)), "end_ci": list(bootstrap_ci(b)),
            "lift_ci": list(paired_bootstrap_ci(a, b)), "n_problems": len(a), "k": start["settings"]["k"]}


def rl_task_lifts(rl: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each RL stage's lift on the task and level it trained on, from the eval stage's paired measurement.
    `rl`: {stage: {"trained_on", "tasks", "start_model", "start": evaluate() result, "end": ...}}. The
    eval table averages over every task, most of which an RL stage never saw; this is the number RL is
    judged on."""
    return {name: {"trained_on": r["trained_on"], "start_model": r["start_model"],
                   **paired_lift(r["start"], r["end"], r["tasks"])} for name, r in rl.items()}


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "—"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v, digits) for v in x) + "]"
    if isinstance(x, dict):  # a stage's key metrics: "steps 20, loss 4.887"
        return ", ".join(f"{k} {_fmt(v, digits)}" for k, v in x.items())
    return str(x)


def _with_ci(value: Any, ci: Sequence[float] | None) -> str | None:
    """"0.412 [0.371, 0.455]": a value and its 95% interval (just the value when there is none)."""
    if not isinstance(value, (int, float)):
        return None
    return _fmt(float(value)) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def _points(lift: float, ci: Sequence[float] | None) -> str:
    """A lift in points with its interval: "+4.1 [+1.0, +7.2]"."""
    return f"{lift * 100:+.1f}" + (f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]" if ci else "")


def paper_rows(evals: dict[str, dict[str, dict[str, Any]]], speed: dict[str, dict[str, Any]],
               training: dict[str, dict[str, Any]], balance: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """What DeepSeek reported beside what this run measured. A row whose measurement the run did not make
    says so instead of being dropped, so the reader sees what is missing."""
    rows = []

    def row(topic: str, paper: str, source: str, measured: str | None) -> None:
        rows.append({"topic": topic, "paper": paper, "source": source, "measured": measured or "not measured"})

    row("Load balance: MaxVio with auxiliary-loss-free balancing",
        "MaxVio_global 0.04 (loss-free) vs 0.72 (auxiliary loss), with lower perplexity, 1B MoE",
        "Wang et al. 2024, arXiv 2408.15664",
        "; ".join(f"{s}: validation MaxVio {_fmt(b.get('val_max_vio_mean', b['max_vio_mean']))}"
                  for s, b in balance.items()))
    mtp = [f"{s}: MTP-head validation accuracy {_fmt(b['val_mtp_acc'])}" for s, b in balance.items()
           if "val_mtp_acc" in b]
    mtp += [f"{m}: speculative draft acceptance {_fmt(s['mtp_acceptance'])}" for m, s in speed.items()
            if s.get("mtp_acceptance") is not None]
    row("MTP: acceptance of the drafted second token", "85-90% acceptance, ~1.8x decoding tokens/s",
        "DeepSeek-V3 report §5.4.3", "; ".join(mtp))
    lift = lifts(evals)
    for (start, rl), (paper, source) in zip(LIFTS, (
            ("AIME 2024 pass@1 15.6% -> 71.0% (cons@64 86.7%) by RL from the base", "DeepSeek-R1, arXiv 2501.12948"),
            ("cold start + RL: AIME 2024 pass@1 79.8%", "DeepSeek-R1, arXiv 2501.12948")), strict=True):
        key = f"{rl}_vs_{start}"
        measured = None
        if key in lift:
            tasks = [t for t in lift[key] if t not in ("mean", "mean_ci")]
            before = _mean([evals[start][t]["pass@1"] for t in tasks])
            measured = (f"held-out pass@1 {_fmt(before)} -> {_fmt(before + lift[key]['mean'])} "
                        f"({_points(lift[key]['mean'], lift[key].get('mean_ci'))} points, mean over {len(tasks)} "
                        f"tasks)")
        row(f"{rl} pass@1 lift over {start}", paper, source, measured)
    if "base" in evals and "r1_zero" in evals:
        b, r = model_summary(evals["base"]), model_summary(evals["r1_zero"])
        parts = [f"{k} {_fmt(b[k])} -> {_fmt(r[k])}" for k in ("pass@1", "maj@k", "pass@k")
                 if b[k] is not None and r[k] is not None]
        measured = ", ".join(parts) or None
    else:
        measured = None
    row("RL sharpens the output distribution", "RL improves Maj@K but not Pass@K",
        "DeepSeekMath, arXiv 2402.03300 §5.2.2", measured)
    length = [f"{s}: {t['completion_length']['first']:.0f} -> {t['completion_length']['last']:.0f} tokens "
              f"over {t['completion_length']['steps']} steps" for s, t in training.items() if "completion_length" in t]
    row("Response length grows during RL", "average response length of R1-Zero grows steadily through RL "
        "(to thousands of tokens)", "DeepSeek-R1, arXiv 2501.12948, Fig. 3", "; ".join(length))
    roads = {"student": "student (distilled)", "student_rl": "student_rl (GRPO, same wall time)"}
    parts = [f"{name} pass@1 {_fmt(model_summary(evals[m])['pass@1'])}" for m, name in roads.items() if m in evals]
    if parts and "r1" in evals:
        parts.append(f"teacher r1 pass@1 {_fmt(model_summary(evals['r1'])['pass@1'])}")
    row("Distillation vs RL for small models", "Qwen-32B distilled from R1: AIME 72.6% vs RL on the same base: 47.0%",
        "DeepSeek-R1, arXiv 2501.12948 §4.1", "; ".join(parts))
    return rows


# --- plots ------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Atomic PNG write: a reader never sees half an image."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_curves(metrics: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for filename, (title, ylabel, key) in CURVES.items():
        # the GRPO surrogate "loss" is not a cross-entropy: keep RL stages out of the loss plot
        lines = [(stage, pts) for stage, records in metrics.items() if (pts := _series(records, key))
                 and not (key == "loss" and _series(records, "reward"))]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for stage, pts in lines:
            ax.plot(*zip(*pts, strict=True), label=stage, marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set(title=title, xlabel="step (of each stage)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        _save(fig, out_dir / filename)
        plt.close(fig)
        written.append(out_dir / filename)
    return written


def plot_expert_load(stage: str, records: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Heatmap of each MoE layer's expert loads relative to the mean (end of training), with its MaxVio,
    beside MaxVio over training."""
    loads = _final_loads(records)
    if loads is None:
        return None
    plt = _pyplot()
    rel = [[x / (sum(layer) / len(layer)) if sum(layer) else 0.0 for x in layer] for layer in loads]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rel) + 2.5),
                                  gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(rel, aspect="auto", cmap="coolwarm", vmin=0.0, vmax=2.0)
    ax.set(title=f"{stage}: expert load / mean load (last 10% of steps)", xlabel="routed expert",
           ylabel="MoE layer")
    ax.set_yticks(range(len(rel)), [f"{i} (MaxVio {max_violation(layer):.2f})" for i, layer in enumerate(loads)])
    n_experts = len(rel[0])
    ax.set_xticks(range(0, n_experts, max(1, n_experts // 16)))
    fig.colorbar(im, ax=ax, fraction=0.04)
    for key, label in (("max_vio_mean", "train"), ("val_max_vio_mean", "validation")):
        pts = _series(records, key)
        if pts:
            ax2.plot(*zip(*pts, strict=True), label=label, marker="o" if len(pts) < 30 else None, markersize=3)
    ax2.set(title="MaxVio (mean over MoE layers)", xlabel="step")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    path = out_dir / f"expert_load_{stage}.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_pass_at_1(evals: dict[str, dict[str, dict[str, Any]]], out_dir: Path) -> Path | None:
    """Grouped bars: pass@1 of each model on each task."""
    tasks = sorted({t for tasks in evals.values() for t, m in tasks.items() if "pass@1" in m})
    if not tasks:
        return None
    plt = _pyplot()
    models = list(evals)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) + 2), 3.8))
    for i, model in enumerate(models):
        values = [evals[model].get(t, {}).get("pass@1", float("nan")) for t in tasks]
        ax.bar([j + (i - (len(models) - 1) / 2) * width for j in range(len(tasks))], values, width, label=model)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set(title="held-out pass@1 by model", ylabel="pass@1", ylim=(0, 1))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(ncols=min(5, len(models)), fontsize=8)
    fig.tight_layout()
    path = out_dir / "pass_at_1.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_rl_lift(metrics: dict[str, list[dict[str, Any]]], rl_lift: dict[str, dict[str, Any]],
                 out_dir: Path) -> Path | None:
    """One panel per RL stage: held-out pass@1 over RL steps as the stage logged it (its own held-out split),
    and the eval stage's paired start and end measurements with their 95% intervals at the first and last step."""
    if not rl_lift:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rl_lift), figsize=(4.2 * len(rl_lift), 3.6), squeeze=False)
    for ax, (stage, lift) in zip(axes[0], rl_lift.items(), strict=True):
        records = metrics.get(stage, [])
        curve = _series(records, "eval/pass@1")
        if curve:
            ax.plot(*zip(*curve, strict=True), marker="o", markersize=3, label="during RL (stage's held-out set)")
        last = max([r["step"] for r in records if isinstance(r.get("step"), int)], default=1)
        for x, key, label in ((0, "start", lift["start_model"]), (last, "end", stage)):
            lo, hi = lift[f"{key}_ci"]
            ax.errorbar([x], [lift[key]], yerr=[[lift[key] - lo], [hi - lift[key]]], fmt="s", capsize=4,
                        label=f"{label}: {lift[key]:.3f} ({lift['n_problems']} problems)")
        ax.set(title=f"{stage}: {lift['trained_on']}, lift {_points(lift['lift'], lift['lift_ci'])}",
               xlabel="RL step", ylabel="held-out pass@1", ylim=(0, 1))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "rl_lift.png"
    _save(fig, path)
    plt.close(fig)
    return path


# --- markdown ---------------------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    evals, hw = report["eval"], report["hardware"]
    name = (report.get("config") or {}).get("name", Path(report["run_dir"]).name)
    total = report["total_wall_seconds"]
    md = [f"# nanoseek report card: `{name}`", "",
          f"Run directory `{report['run_dir']}`, written {report['created']}. Total wall time "
          f"**{total / 60:.1f} min** on {hw['cpu_count']} CPU cores ({hw['platform']}, torch {hw['torch']}"
          f"{', ' + hw['gpu'] if hw['gpu'] else ''}).", ""]
    md += [f"**Warning:** {w}" for w in report.get("warnings", [])] + ([""] if report.get("warnings") else [])
    extra = sorted({k for s in report["stages"] for k in s} - {"name", "wall_seconds", "dir"})
    md += ["## Stages", "", _table(["stage", "wall seconds"] + extra,
                                   [[s["name"], f"{s['wall_seconds']:.1f}"] + [s.get(k) for k in extra]
                                    for s in report["stages"]]), ""]
    tasks = sorted({t for m in evals.values() for t, v in m.items() if "pass@1" in v})
    if tasks:
        md += ["## Held-out pass@1 by model", "",
               "Each cell: pass@1 [95% interval, bootstrap over problems].", "",
               _table(["model"] + tasks + ["mean"],
                      [[m] + [_with_ci(evals[m].get(t, {}).get("pass@1"), evals[m].get(t, {}).get("pass@1_ci"))
                              for t in tasks]
                       + [_with_ci(model_summary(evals[m])["pass@1"], mean_pass1_ci(evals[m]))] for m in evals]), ""]
        if report["lift"]:
            md += ["pass@1 lift of RL over its starting model, mean over the tasks (points, paired 95% interval): "
                   + "; ".join(f"**{k.replace('_vs_', ' vs ')}** {_points(v['mean'], v.get('mean_ci'))}"
                               for k, v in report["lift"].items()), ""]
        if any(Path(p).name == "pass_at_1.png" for p in report["plots"]):
            md += [f"![pass@1]({PLOT_DIR}/pass_at_1.png)", ""]
    if report.get("rl_task_lift"):
        md += ["## RL lift on the trained task", "",
               "Held-out pass@1 of each RL stage's starting and final model on the task and level it trained "
               "on, the same problems for both (k samples each, T=0.6, top-p 0.95); 95% intervals bootstrap "
               "the problems, the lift's paired.", "",
               _table(["RL stage", "trained on", "problems × k", "start model", "start", "end", "lift (points)"],
                      [[k, v["trained_on"], f"{v['n_problems']} × {v['k']}", v["start_model"],
                        _with_ci(v["start"], v["start_ci"]), _with_ci(v["end"], v["end_ci"]),
                        _points(v["lift"], v["lift_ci"])] for k, v in report["rl_task_lift"].items()]), ""]
        if any(Path(p).name == "rl_lift.png" for p in report["plots"]):
            md += [f"![RL lift]({PLOT_DIR}/rl_lift.png)", ""]
    if tasks:
        summaries = {m: model_summary(evals[m]) for m in evals}
        keys = [k for k in SUMMARY if any(s[k] is not None for s in summaries.values())]
        md += ["## All metrics by model (mean over generative tasks)", "",
               "pass@1 is the mean over k samples (T=0.6, top-p 0.95); maj@k is the majority-vote answer "
               "(cons@k); hallucination is a wrong stated answer (one sample), hallucination_verified the same "
               "after the verification loop's vote, which abstains below the agreement threshold.", "",
               _table(["model"] + keys + ["bits/byte", "tokens/s", "latency b1 (s)"],
                      [[m] + [_with_ci(summaries[m][k], mean_pass1_ci(evals[m])) if k == "pass@1"
                              else summaries[m][k] for k in keys]
                       + [report["bpb"].get(m), _fmt(report["speed"].get(m, {}).get("tokens_per_s"), 0),
                          _fmt(report["speed"].get(m, {}).get("latency_b1_s"), 2)] for m in evals]), ""]
    games = sorted({t for m in evals.values() for t, v in m.items() if "win_vs_optimal" in v})
    if games:
        md += ["## Games (model vs optimal and random players)", "",
               "Rates over games [95% interval, bootstrap over games]; a forfeit (no or an illegal move) counts "
               "as a loss. optimal_move_rate: the share of the model's moves that keep the position's value.", "",
               _table(["model", "game"] + list(GAME_KEYS),
                      [[m, g] + [_with_ci(evals[m][g].get(k), evals[m][g].get(f"{k}_ci")) for k in GAME_KEYS]
                       for m in evals for g in games if g in evals[m]]), ""]
    md += ["## DeepSeek reported vs this run", "",
           _table(["topic", "DeepSeek reported", "this run measured", "source"],
                  [[r["topic"], r["paper"], r["measured"], r["source"]] for r in report["paper_comparison"]]), ""]
    curves = [p for p in report["plots"] if not Path(p).name.startswith(("expert_load", "pass_at_1", "rl_lift"))]
    if curves:
        md += ["## Training curves", ""] + [f"![{Path(p).stem}]({p})" for p in curves] + [""]
    if report["balance"]:
        md += ["## Expert load", ""]
        for stage, b in report["balance"].items():
            md += [f"{stage}: MaxVio per MoE layer at the end {_fmt(b['max_vio_per_layer'])}"
                   + (f", validation MaxVio {_fmt(b['val_max_vio_mean'])}" if "val_max_vio_mean" in b else ""), "",
                   f"![expert load {stage}]({PLOT_DIR}/expert_load_{stage}.png)", ""]
    md += ["## Configuration", "", "```json", json.dumps(report.get("config"), indent=2), "```", "",
           "## Hardware", "", "```json", json.dumps(hw, indent=2), "```", ""]
    return "\n".join(md)


# --- entry point ------------------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_report(run_dir: str | Path, stages: Sequence[dict[str, Any]], evals: dict[str, dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None, stage_dirs: dict[str, str | Path] | None = None,
                 plots: bool = True, rl: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write RUN/report.json, RUN/report.md and RUN/report_plots/*.png; returns the report.

    stages: [{"name", "wall_seconds", optional "dir" (where its metrics.jsonl is) and any other fields}], in run
    order; evals: {model name: `evaluate()` result} (None: read RUN/eval/<model>/results.json); config: the
    recipe; stage_dirs overrides where a stage's metrics.jsonl lives. `plots=False` skips matplotlib. rl: each
    RL stage's paired measurement, {stage: {"trained_on", "tasks", "start_model", "start": evaluate() result
    of the model it started from, "end": of the model it produced}} on the same problems (see rl_task_lifts)."""
    run_dir = Path(run_dir)
    for i, s in enumerate(stages):
        if not isinstance(s.get("name"), str) or not isinstance(s.get("wall_seconds"), (int, float)):
            raise ValueError(f"stages[{i}] needs a 'name' string and a 'wall_seconds' number, got {s!r:.100}")
    results = load_evals(run_dir) if evals is None else evals
    missing = [m for m, r in results.items() if "tasks" not in r]
    if missing:
        raise ValueError(f"evaluation results of {missing} have no 'tasks' (expected evaluate()'s return value)")
    order = [m for m in MODELS if m in results] + [m for m in results if m not in MODELS]  # pipeline order
    eval_tasks = {m: results[m]["tasks"] for m in order}
    rl_lift = rl_task_lifts(rl or {})
    speed = {m: r.get("speed", {}) for m, r in results.items()}
    metrics = stage_metrics(run_dir, stages, stage_dirs)
    training, balance = training_summary(metrics), balance_summary(metrics)
    report: dict[str, Any] = {
        "run_dir": str(run_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config": config, "hardware": hardware(),
        "total_wall_seconds": sum(float(s["wall_seconds"]) for s in stages),
        "stages": [dict(s) for s in stages],
        "eval": eval_tasks,
        "bpb": {m: r["bpb"] for m, r in results.items() if r.get("bpb") is not None},
        "speed": speed,
        "lift": lifts(eval_tasks),
        "rl_task_lift": rl_lift,
        "training": training, "balance": balance,
        "warnings": signal_warnings(metrics),
        "paper_comparison": paper_rows(eval_tasks, speed, training, balance),
        "plots": [],
    }
    if plots:
        out_dir = run_dir / PLOT_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [plot_pass_at_1(eval_tasks, out_dir), plot_rl_lift(metrics, rl_lift, out_dir)]
        paths += plot_curves(metrics, out_dir)
        paths += [plot_expert_load(stage, records, out_dir) for stage, records in metrics.items()]
        report["plots"] = [str(p.relative_to(run_dir)) for p in paths if p is not None]
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    _write_text(run_dir / "report.md", render_markdown(report))
    return report
