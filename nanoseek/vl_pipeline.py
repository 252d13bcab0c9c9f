"""`nanoseek run --recipe vl`: the vision-language run, stage after stage, into one run directory.

    OUT/data, OUT/pretrain, OUT/sft  the text model, as the default run makes it (skipped with [vl] text_init)
    OUT/vl_data/     built-in image tasks: train/ (curated: curated/records.jsonl, manifest, data card), eval/
    OUT/vl_init/     the VL checkpoint: the text model + `<image>` + a SigLIP tower + a fresh projector
    OUT/vl_align/    projector alignment: vision and language frozen                                   [vl_align]
    OUT/vl_sft/      joint VL training on the built-in image conversations                             [vl_sft]
    OUT/vl_grpo/     GRPO on verifiable image questions (chart QA, counting)                           [vl_grpo]
    OUT/vl_eval/     held-out image tasks (95% intervals) and the text tasks' pass@1 before and after  [vl]
    OUT/vl_report.md the report card (vl_report.json, report_plots/vl_samples.png)

Stages are `nanoseek.posttrain.stage.Runner` stages (stage.json when finished; a re-run skips finished ones). A
VL stage interrupted midway starts again (VL checkpoints are not resumable).
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import write_json
from nanoseek.config import check_tables, from_dict
from nanoseek.data.curate.images import curate_images
from nanoseek.data.synth.images import SCENES, write_image_set
from nanoseek.model.vl import VL_PRESETS
from nanoseek.pipeline import Run, RunConfig, stage_data, stage_pretrain, stage_sft
from nanoseek.posttrain.vl import VLGRPOConfig, VLTrainConfig, build_vl, vl_grpo, vl_train

# the held-out targets of issue #18: task -> required accuracy
TARGETS = {"ocr": 0.9, "shapes_colour": 0.9, "shapes_count": 0.9, "chart_largest": 0.7, "chart_value": 0.7}


@dataclass
class VLRunConfig:
    """[vl] of a VL recipe: where the text model comes from, the tower, the built-in image sets, evaluation."""

    text_init: str = ""  # a text checkpoint or run directory; empty: this run's own data, pretrain and sft stages
    preset: str = "vl-tiny"
    vision_init: str = ""  # a transformers SigLIP vision directory; empty: a freshly initialised tower
    train_images: dict[str, int] = field(default_factory=lambda: {"ocr": 1500, "shapes": 1500, "chart": 1000,
                                                                   "diagram": 300})
    eval_images: dict[str, int] = field(default_factory=lambda: {"ocr": 100, "shapes": 300, "chart": 200,
                                                                  "diagram": 50})
    seed: int = 0
    text_replay: bool = True  # [vl_sft] also trains on the text stages' SFT conversations (with text_init: none)
    text_tasks: list[str] = field(default_factory=lambda: ["arithmetic"])  # pass@1 before and after VL training
    text_n: int = 50
    text_k: int = 4

    def validate(self) -> None:
        if self.preset not in VL_PRESETS:
            raise ValueError(f"[vl] preset={self.preset!r}: known presets {', '.join(VL_PRESETS)}")
        for name in ("train_images", "eval_images"):
            counts = getattr(self, name)
            bad = sorted(set(counts) - set(SCENES))
            if bad or any(not isinstance(n, int) or n < 1 for n in counts.values()) or not counts:
                raise ValueError(f"[vl] {name}={counts}: positive counts of {', '.join(SCENES)}")
        if self.text_n < 1 or self.text_k < 1:
            raise ValueError("[vl] text_n and text_k must be >= 1")


def check_vl_recipe(recipe: dict[str, Any]) -> VLRunConfig:
    check_tables(recipe)
    cfg = from_dict(VLRunConfig, recipe.get("vl"), "vl")
    cfg.validate()
    for section in ("vl_align", "vl_sft"):
        if section not in recipe:
            raise ValueError(f"recipe {recipe.get('name', '?')!r} has no [{section}] table (see recipes/vl.toml)")
        from_dict(VLTrainConfig, recipe[section], section).validate(section)
    if "vl_grpo" not in recipe:
        raise ValueError(f"recipe {recipe.get('name', '?')!r} has no [vl_grpo] table (see recipes/vl.toml)")
    from_dict(VLGRPOConfig, recipe["vl_grpo"], "vl_grpo").validate("vl_grpo")
    return cfg


def _fresh(run: Run, name: str) -> Path:
    """A VL stage's directory, emptied when an interrupted attempt left something in it."""
    out = run.stage_dir(name)
    if out.exists():
        shutil.rmtree(out)
    return out


def text_checkpoint(run: Run, cfg: VLRunConfig) -> Path:
    return Path(cfg.text_init) if cfg.text_init else run.checkpoint("sft")


def stage_vl_data(run: Run, cfg: VLRunConfig) -> dict[str, Any]:
    out = _fresh(run, "vl_data")
    train = write_image_set(out / "train", cfg.train_images, cfg.seed, "train")
    held = write_image_set(out / "eval", cfg.eval_images, cfg.seed, "eval")
    eval_paths = [out / "eval" / json.loads(line)["image"] for line in held.read_text().splitlines()]
    manifest = curate_images([train], out / "curated", eval_paths, command="nanoseek run --recipe vl (vl_data)")
    return {"dir": "vl_data", "train": run.rel(out / "curated" / "records.jsonl"), "eval": run.rel(held),
            "metrics": {"train_kept": manifest["totals"]["kept"], "train_removed": manifest["totals"]["removed"],
                        "eval_records": len(eval_paths)}}


def stage_vl_init(run: Run, cfg: VLRunConfig) -> dict[str, Any]:
    out = _fresh(run, "vl_init")
    build_vl(text_checkpoint(run, cfg), out, cfg.preset, cfg.vision_init or None, cfg.seed)
    return {"dir": "vl_init", "checkpoint": run.rel(out)}


def stage_vl_train(run: Run, name: str, init: str, text: bool = False) -> dict[str, Any]:
    out = _fresh(run, name)
    data = [run.out / run.done("vl_data")["train"]] + ([run.training_set("sft.jsonl")] if text else [])
    ckpt = vl_train(run.recipe, out, run.checkpoint(init), data, name, run.progress)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    metrics = {"steps": losses[-1]["step"], "loss": losses[-1]["loss"],
               "train_seconds": losses[-1]["time/train_total"]}
    if vals:
        metrics |= {"val_loss_start": vals[0], "val_loss_end": vals[-1]}
    return {"dir": name, "checkpoint": run.rel(ckpt), "metrics": metrics}


def stage_vl_grpo(run: Run) -> dict[str, Any]:
    out = _fresh(run, "vl_grpo")
    ckpt = vl_grpo(run.recipe, out, run.checkpoint("vl_sft"), [run.out / run.done("vl_data")["train"]],
                   progress=run.progress)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    k = max(1, len(steps) // 4)
    metrics = {"steps": len(steps), "reward_first_quarter": sum(r["reward"] for r in steps[:k]) / k,
               "reward_last_quarter": sum(r["reward"] for r in steps[-k:]) / k,
               "no_signal_steps": sum(r.get("no_signal", 0) for r in steps)}
    return {"dir": "vl_grpo", "checkpoint": run.rel(ckpt), "metrics": metrics}


def stage_vl_eval(run: Run, cfg: VLRunConfig) -> dict[str, Any]:
    import nanoseek
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.eval.evaluate import evaluate
    from nanoseek.eval.vl import evaluate_images

    out = _fresh(run, "vl_eval")
    final = run.checkpoint("vl_grpo")
    held = run.out / run.done("vl_data")["eval"]
    records = [json.loads(line) for line in held.read_text().splitlines()]
    images = evaluate_images(nanoseek.load(final), Tokenizer.load(final), records, root=held.parent)
    write_json(out / "images.json", images)
    text = {}
    for side, ckpt in (("before", text_checkpoint(run, cfg)), ("after", final)):
        r = evaluate(ckpt, cfg.text_tasks, k=cfg.text_k, n=cfg.text_n, seed=cfg.seed, consistency=False, bpb=False,
                     games=1, out=out / f"text_{side}", progress=run.progress)
        text[side] = {t: {"pass@1": m["pass@1"], "ci95": m["pass@1_ci"], "per_problem": m["per_problem"]}
                      for t, m in r["tasks"].items()}
    write_json(out / "text.json", text)
    metrics = {f"{t}_accuracy": m["accuracy"] for t, m in images["tasks"].items()}
    metrics |= {f"text_{t}_pass@1_{side}": text[side][t]["pass@1"] for side in text for t in text[side]}
    return {"dir": "vl_eval", "metrics": metrics}


def _samples_figure(records: list[dict[str, Any]], samples: list[dict[str, Any]], root: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    by_task: dict[str, list] = {}
    for r, s in zip(records, samples, strict=True):
        by_task.setdefault(s["task"], []).append((r, s))
    picks = [pair for rank in range(12) for pairs in by_task.values() if rank < len(pairs)
             for pair in [pairs[rank]]][:12]  # round robin over the tasks: every task shows
    fig, axes = plt.subplots(2, 6, figsize=(12, 4.8))
    for ax, (r, s) in zip(axes.flat, picks, strict=False):
        ax.imshow(Image.open(root / r["image"]))
        ax.set_title(f"{r['question'][:28]}\n{s['output'][:20]!r} ({'ok' if s['correct'] else 'gold ' + r['answer']})",
                     fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_vl_report(run: Run, cfg: VLRunConfig) -> dict[str, Any]:
    from nanoseek.eval.metrics import paired_bootstrap_ci

    images = json.loads((run.stage_dir("vl_eval") / "images.json").read_text())
    text = json.loads((run.stage_dir("vl_eval") / "text.json").read_text())
    stages = {}
    for name in ("data", "pretrain", "sft", "vl_data", "vl_init", "vl_align", "vl_sft", "vl_grpo", "vl_eval"):
        if (done := run.done(name)) is not None:
            stages[name] = done["wall_seconds"]
    held = run.out / run.done("vl_data")["eval"]
    records = [json.loads(line) for line in held.read_text().splitlines()]
    (run.out / "report_plots").mkdir(exist_ok=True)
    _samples_figure(records, images["samples"], held.parent, run.out / "report_plots" / "vl_samples.png")
    drops = {}  # after - before, paired by problem (the same seed draws the same problems)
    for t, before in text["before"].items():
        after = text["after"][t]
        if before["per_problem"]["ids"] == after["per_problem"]["ids"]:
            drops[t] = list(paired_bootstrap_ci(before["per_problem"]["pass@1"], after["per_problem"]["pass@1"]))
    text = {side: {t: {k: v for k, v in m.items() if k != "per_problem"} for t, m in tasks.items()}
            for side, tasks in text.items()}
    report = {"stages_seconds": stages, "total_seconds": sum(stages.values()), "image_tasks": images["tasks"],
              "targets": TARGETS, "text_pass@1": text, "text_change_ci95": drops}
    write_json(run.out / "vl_report.json", report)
    lines = ["# VL report card", "", f"Total {report['total_seconds'] / 60:.1f} min (stage wall times below; the "
             "machine's cores may be shared with other work).", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in stages.items()]
    lines += ["", "## Held-out image tasks", "", "| task | n | accuracy | 95% interval | target |",
              "|---|---:|---:|---|---:|"]
    for t, m in images["tasks"].items():
        target = f"{TARGETS[t]:.0%}" if t in TARGETS else "-"
        lines.append(f"| {t} | {m['n']} | {m['accuracy']:.3f} | [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] | "
                     f"{target} |")
    lines += ["", "## Text tasks (pass@1) before and after VL training", "",
              "| task | before | after | change, 95% interval |", "|---|---:|---:|---|"]
    for t in text["before"]:
        ci = drops.get(t)
        change = f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}] points" if ci else "-"
        lines.append(f"| {t} | {text['before'][t]['pass@1']:.3f} | {text['after'][t]['pass@1']:.3f} | {change} |")
    lines += ["", "![samples](report_plots/vl_samples.png)", ""]
    (run.out / "vl_report.md").write_text("\n".join(lines), encoding="utf-8")
    return {"report": "vl_report.md", "metrics": {"total_minutes": report["total_seconds"] / 60}}


def run_vl(recipe: dict[str, Any], out: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) every VL stage into `out`; returns the stages' records."""
    cfg = check_vl_recipe(recipe)
    run = Run(Path(out), recipe, progress)
    run.out.mkdir(parents=True, exist_ok=True)
    write_json(run.out / "recipe.json", recipe)
    threads = torch.get_num_threads()
    if (n := from_dict(RunConfig, recipe.get("run"), "run").threads):
        torch.set_num_threads(n)
    try:
        return _run_stages(run, cfg)
    finally:
        torch.set_num_threads(threads)


def _run_stages(run: Run, cfg: VLRunConfig) -> list[dict[str, Any]]:
    stages = [] if cfg.text_init else [("data", stage_data), ("pretrain", stage_pretrain), ("sft", stage_sft)]
    done = [run.run_stage(name, functools.partial(fn, run)) for name, fn in stages]
    vl_stages = [("vl_data", lambda _: stage_vl_data(run, cfg)), ("vl_init", lambda _: stage_vl_init(run, cfg)),
                 ("vl_align", lambda _: stage_vl_train(run, "vl_align", "vl_init")),
                 ("vl_sft", lambda _: stage_vl_train(run, "vl_sft", "vl_align",
                                                     text=cfg.text_replay and not cfg.text_init)),
                 ("vl_grpo", lambda _: stage_vl_grpo(run)),
                 ("vl_eval", lambda _: stage_vl_eval(run, cfg)), ("vl_report", lambda _: stage_vl_report(run, cfg))]
    return done + [run.run_stage(name, fn) for name, fn in vl_stages]


def main(recipe: dict[str, Any], out: Path, progress: bool = True) -> int:
    stages = run_vl(recipe, out, progress)
    total = sum(s["wall_seconds"] for s in stages)
    report = json.loads((out / "vl_report.json").read_text())
    print(f"\nall VL stages done in {total / 60:.1f} min -> {out}")
    for t, m in report["image_tasks"].items():
        print(f"  {t}: {m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
    print(f"report card: {out / 'vl_report.md'}")
    print(f"the VL model: {out / json.loads((out / 'vl_grpo' / 'stage.json').read_text())['checkpoint']}")
    return 0
