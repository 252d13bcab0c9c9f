"""The report card of a run: `report.json` (every number) and `report.md` with PNG plots.

    write_report(run_dir, stages=[{"name": "pretrain", "wall_seconds": 312.0}, ...],
                 evals={"base": evaluate(...), "r1_zero": evaluate(...), ...}, config=recipe)

Everything in the report is read from the run: evaluation results (`evaluate`'s return value, or the
`results.json` it wrote under RUN/eval/<model>/), each stage's metrics.jsonl (training and validation loss,
reward, accuracy, completion length, KL, expert loads and MaxVio), and the stage timings. The only constants
are the paper rows' *reported* figures, each with its source, printed beside what this run measured.

report.json:
    run_dir, created, config, hardware, total_wall_seconds,
    stages: [{name, wall_seconds, ...}],
    eval:   {model: {task: {"pass@1", "pass@k", "maj@k", "format", ...}}},
            models base, sft, r1_zero, r1, student (distilled), student_rl (GRPO on the student base),
    bpb, speed, lift: {"r1_zero_vs_base": {task: Δpass@1, "mean": ...}, "r1_vs_sft": ...},
    rl_task_lift: {rl stage: {trained_on, start, end, lift}}  (held-out pass@1 on the stage's own task),
    training: {stage: {key: {"first", "last", "steps"}}}, balance: {stage: {...}},
    paper_comparison: [{"topic", "paper", "source", "measured"}], plots: [paths relative to run_dir]
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

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
             "optimal_move_rate")


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


def lifts(evals: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """pass@1 gained by each RL model over the model it started from, per shared task and on average."""
    out = {}
    for start, rl in LIFTS:
        if start in evals and rl in evals:
            shared = [t for t in evals[rl] if "pass@1" in evals[rl][t] and "pass@1" in evals[start].get(t, {})]
            if shared:
                delta = {t: evals[rl][t]["pass@1"] - evals[start][t]["pass@1"] for t in shared}
                out[f"{rl}_vs_{start}"] = {**delta, "mean": sum(delta.values()) / len(delta)}
    return out


def rl_task_lifts(stages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Held-out pass@1 before and after each RL stage on the task it trained on, as the stage measured it
    (its own eval split of that task and level, every `eval_every` steps). The eval stage's table averages
    over every task, most of which an RL stage never saw; this is the number RL is judged on."""
    out = {}
    for s in stages:
        m = s.get("metrics") or {}
        if "heldout_pass@1_start" in m and "heldout_pass@1_end" in m:
            out[s["name"]] = {"trained_on": m.get("trained_on", ""), "start": m["heldout_pass@1_start"],
                              "end": m["heldout_pass@1_end"],
                              "lift": m["heldout_pass@1_end"] - m["heldout_pass@1_start"]}
    return out


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
            before = _mean([evals[start][t]["pass@1"] for t in lift[key] if t != "mean"])
            measured = (f"held-out pass@1 {_fmt(before)} -> {_fmt(before + lift[key]['mean'])} "
                        f"({lift[key]['mean'] * 100:+.1f} points, mean over {len(lift[key]) - 1} tasks)")
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


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
    extra = sorted({k for s in report["stages"] for k in s} - {"name", "wall_seconds", "dir"})
    md += ["## Stages", "", _table(["stage", "wall seconds"] + extra,
                                   [[s["name"], f"{s['wall_seconds']:.1f}"] + [s.get(k) for k in extra]
                                    for s in report["stages"]]), ""]
    tasks = sorted({t for m in evals.values() for t, v in m.items() if "pass@1" in v})
    if tasks:
        md += ["## Held-out pass@1 by model", "",
               _table(["model"] + tasks + ["mean"],
                      [[m] + [evals[m].get(t, {}).get("pass@1") for t in tasks]
                       + [model_summary(evals[m])["pass@1"]] for m in evals]), ""]
        if report["lift"]:
            md += ["pass@1 lift of RL over its starting model (points): " + "; ".join(
                f"**{k.replace('_vs_', ' vs ')}** {v['mean'] * 100:+.1f}" for k, v in report["lift"].items()), ""]
        if report.get("rl_task_lift"):
            md += ["On the task each RL stage trained on (its held-out split, measured by the stage): " + "; ".join(
                f"**{k}** ({v['trained_on'] or 'recipe tasks'}) {_fmt(v['start'])} -> {_fmt(v['end'])} "
                f"({v['lift'] * 100:+.1f} points)" for k, v in report["rl_task_lift"].items()), ""]
        if any(Path(p).name == "pass_at_1.png" for p in report["plots"]):
            md += [f"![pass@1]({PLOT_DIR}/pass_at_1.png)", ""]
        summaries = {m: model_summary(evals[m]) for m in evals}
        keys = [k for k in SUMMARY if any(s[k] is not None for s in summaries.values())]
        md += ["## All metrics by model (mean over generative tasks)", "",
               "pass@1 is the mean over k samples (T=0.6, top-p 0.95); maj@k is the majority-vote answer "
               "(cons@k); hallucination is a wrong stated answer (one sample), hallucination_verified the same "
               "after the verification loop's vote, which abstains below the agreement threshold.", "",
               _table(["model"] + keys + ["bits/byte", "tokens/s", "latency b1 (s)"],
                      [[m] + [summaries[m][k] for k in keys]
                       + [report["bpb"].get(m), _fmt(report["speed"].get(m, {}).get("tokens_per_s"), 0),
                          _fmt(report["speed"].get(m, {}).get("latency_b1_s"), 2)] for m in evals]), ""]
    games = sorted({t for m in evals.values() for t, v in m.items() if "win_vs_optimal" in v})
    if games:
        md += ["## Games (model vs optimal and random players)", "",
               _table(["model", "game"] + list(GAME_KEYS),
                      [[m, g] + [evals[m][g].get(k) for k in GAME_KEYS] for m in evals for g in games
                       if g in evals[m]]), ""]
    md += ["## DeepSeek reported vs this run", "",
           _table(["topic", "DeepSeek reported", "this run measured", "source"],
                  [[r["topic"], r["paper"], r["measured"], r["source"]] for r in report["paper_comparison"]]), ""]
    curves = [p for p in report["plots"] if not Path(p).name.startswith(("expert_load", "pass_at_1"))]
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(run_dir: str | Path, stages: Sequence[dict[str, Any]], evals: dict[str, dict[str, Any]] | None = None,
                 config: dict[str, Any] | None = None, stage_dirs: dict[str, str | Path] | None = None,
                 plots: bool = True) -> dict[str, Any]:
    """Write RUN/report.json, RUN/report.md and RUN/report_plots/*.png; returns the report.

    stages: [{"name", "wall_seconds", optional "dir" (where its metrics.jsonl is) and any other fields}], in run
    order; evals: {model name: `evaluate()` result} (None: read RUN/eval/<model>/results.json); config: the
    recipe; stage_dirs overrides where a stage's metrics.jsonl lives. `plots=False` skips matplotlib."""
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
        "rl_task_lift": rl_task_lifts(stages),
        "training": training, "balance": balance,
        "paper_comparison": paper_rows(eval_tasks, speed, training, balance),
        "plots": [],
    }
    if plots:
        out_dir = run_dir / PLOT_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [plot_pass_at_1(eval_tasks, out_dir)] + plot_curves(metrics, out_dir)
        paths += [plot_expert_load(stage, records, out_dir) for stage, records in metrics.items()]
        report["plots"] = [str(p.relative_to(run_dir)) for p in paths if p is not None]
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    _write_text(run_dir / "report.md", render_markdown(report))
    return report
