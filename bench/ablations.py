"""Ablations of DeepSeek-V3's pretraining choices on one recipe (default: tiny), printed as markdown tables.

(a) load balancing: auxiliary-loss-free bias (γ from the recipe, α = 0) vs an auxiliary loss (α = 0.001, no
    bias) vs no balancing, plus V3's own combination (bias + α = 1e-4): validation MaxVio and loss. The V3
    paper reports MaxVio 0.04 (aux-loss-free) vs 0.72 (aux loss) at lower perplexity.
(b) FP8 (E4M3, 1×128 / 128×128 block scaling) vs fp32: final relative loss difference; V3 reports < 0.25%.
(c) MTP on vs off: main-head validation loss, and the MTP head's next-next-token accuracy.
(d) optimizer at equal wall time: AdamW vs Muon (per routed-expert matrix too, at AdamW's lr through
    match_rms_adamw), Muon on the non-expert matrices only, and Muon at Keller Jordan's lr 0.02 without the
    AdamW-matching scale: validation bits per byte after the same `--seconds` of training steps. Each variant's
    schedule is sized to what fits: a 15-step probe measures its step time, max_steps = seconds / step time,
    and pretrain.time_budget_s = seconds stops it should the machine slow down.

Every run starts from the same seed and sees the same batches; only the ablated setting differs.

    python bench/ablations.py --out runs/ablations                 # tiny recipe, ~7 runs of a few minutes
    python bench/ablations.py --out runs/ablations --studies d --seconds 100 --repeats 2
    python bench/ablations.py --recipe debug --max-steps 6 --out /tmp/abl   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from nanoseek.config import load_recipe, merge
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import pretrain

# name -> recipe overrides
RUNS: dict[str, dict[str, Any]] = {
    "v3": {},  # the recipe as it is: bias + α = 1e-4, MTP, fp32
    "aux_free": {"pretrain": {"balance_alpha": 0.0}},
    "aux_loss": {"pretrain": {"balance_alpha": 1e-3, "bias_update_rate": 0.0}},
    "no_balance": {"pretrain": {"balance_alpha": 0.0, "bias_update_rate": 0.0}},
    "fp8": {"pretrain": {"fp8": "blockwise"}},
    "mtp_off": {"model": {"num_nextn_predict_layers": 0}},
    "muon": {"pretrain": {"optimizer": "muon"}},
    "muon_hidden": {"pretrain": {"optimizer": "muon", "muon_experts": False}},
    "muon_lr02": {"pretrain": {"optimizer": "muon", "muon_lr": 0.02, "muon_adjust_lr": "original"}},
}
STUDIES = {"a": ["aux_free", "aux_loss", "no_balance", "v3"], "b": ["v3", "fp8"], "c": ["v3", "mtp_off"],
           "d": ["v3", "muon", "muon_hidden", "muon_lr02"]}
PROBE_STEPS = 15


def steps_in(recipe: dict[str, Any], seconds: float) -> int:
    """Optimiser steps of `recipe` that fit in `seconds`: its median step time over steps 6-15 of a probe run
    (the first steps pay one-off allocation costs)."""
    with tempfile.TemporaryDirectory() as tmp:
        pretrain(recipe, tmp, max_steps=PROBE_STEPS, progress=False)
        times = [r["step_time"] for r in read_metrics(Path(tmp) / "metrics.jsonl") if "step_time" in r][5:]
    return max(1, int(seconds / statistics.median(times)))


def run(name: str, base: dict[str, Any], out: Path, max_steps: int | None, seconds: float = 0.0,
        repeat: int = 0) -> dict[str, Any]:
    """Train one variant (or reuse a finished run in `out/name`) and summarise its metrics. seconds > 0: the
    variant gets the steps that fit in that many seconds of training (see (d)), in `out/name_<seconds>s_<repeat>`."""
    run_dir = out / (f"{name}_{seconds:g}s_{repeat}" if seconds else name)
    recipe = merge(base, RUNS[name])
    recipe["pretrain"] = {**recipe["pretrain"], "val_every": 0, "save_every": 0}
    if seconds:
        recipe["pretrain"]["time_budget_s"] = seconds
    if not (run_dir / "summary.json").exists():
        if run_dir.exists():
            raise FileExistsError(f"{run_dir} holds an unfinished run; delete it to start over")
        print(f"--- {run_dir.name}", file=sys.stderr)
        if seconds:
            max_steps = steps_in(recipe, seconds)
        pretrain(recipe, run_dir, max_steps=max_steps)
        records = read_metrics(run_dir / "metrics.jsonl")
        train = [r for r in records if r.get("loss") is not None]
        val = [r for r in records if "val_loss" in r][-1]
        tail = train[-max(1, len(train) // 10):]  # the last 10% of steps smooth out batch noise
        summary = {"final_train_loss": sum(r["loss"] for r in tail) / len(tail), **val,
                   "train_max_vio": sum(r.get("max_vio_mean", 0.0) for r in tail) / len(tail),
                   "seconds": sum(r["step_time"] for r in train), "steps": len(train),
                   "planned_steps": max_steps or recipe["pretrain"]["max_steps"]}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--out", type=Path, required=True, help="directory for the runs (finished runs are reused)")
    ap.add_argument("--max-steps", type=int, help="override pretrain.max_steps (smoke tests)")
    ap.add_argument("--studies", default="abc", help="which of a, b, c, d to run")
    ap.add_argument("--seconds", type=float, default=100.0, help="(d): seconds of training steps per variant")
    ap.add_argument("--repeats", type=int, default=1, help="(d): runs of each variant, alternating variants")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    args = ap.parse_args()
    base = load_recipe(args.recipe, args.set)
    names = list(dict.fromkeys(n for s in args.studies.replace("d", "") for n in STUDIES[s]))
    results = {n: run(n, base, args.out, args.max_steps) for n in names}
    timed = [(i, n, run(n, base, args.out, None, args.seconds, i))
             for i in range(args.repeats) for n in STUDIES["d"]] if "d" in args.studies else []
    steps = args.max_steps or base["pretrain"]["max_steps"]
    print(f"\nrecipe {args.recipe}, {steps if names else 'timed'} steps, validation on "
          f"{base['pretrain'].get('val_batches', 8)} micro-batches\n")
    if "a" in args.studies:
        labels = {"aux_free": "aux-loss-free (bias, α = 0)", "aux_loss": "aux loss (α = 0.001, no bias)",
                  "no_balance": "no balancing", "v3": "V3: bias + α = 1e-4"}
        print("(a) load balancing\n\n| balancing | val MaxVio | val loss | train MaxVio (last 10%) |\n"
              "|---|---|---|---|")
        for n in STUDIES["a"]:
            r = results[n]
            print(f"| {labels[n]} | {r['val_max_vio_mean']:.3f} | {r['val_loss']:.4f} | {r['train_max_vio']:.3f} |")
    if "b" in args.studies:
        ref, fp8 = results["v3"], results["fp8"]
        rel_val = (fp8["val_loss"] - ref["val_loss"]) / ref["val_loss"]
        rel_train = (fp8["final_train_loss"] - ref["final_train_loss"]) / ref["final_train_loss"]
        print("\n(b) FP8 vs fp32\n\n| precision | final train loss | val loss | step time (s) |\n|---|---|---|---|")
        for label, r in (("fp32", ref), ("FP8 block-wise (emulated on CPU)", fp8)):
            print(f"| {label} | {r['final_train_loss']:.4f} | {r['val_loss']:.4f} | {r['seconds'] / steps:.2f} |")
        print(f"\nrelative difference FP8 vs fp32: train {rel_train:+.3%}, val {rel_val:+.3%} (goal |Δ| <= 0.25%)")
    if "c" in args.studies:
        on, off = results["v3"], results["mtp_off"]
        print("\n(c) multi-token prediction\n\n| MTP | main-head val loss | val bits/byte | MTP-head accuracy |\n"
              "|---|---|---|---|")
        print(f"| on (D = 1) | {on['val_loss']:.4f} | {on['val_bpb']:.4f} | {on['val_mtp_acc'][0]:.3f} |")
        print(f"| off | {off['val_loss']:.4f} | {off['val_bpb']:.4f} | - |")
    if timed:
        labels = {"v3": "AdamW (lr from the recipe)",
                  "muon": "Muon, experts per matrix (match_rms_adamw, lr = AdamW's)",
                  "muon_hidden": "Muon, experts on AdamW (match_rms_adamw)",
                  "muon_lr02": "Muon, experts per matrix (original scale, lr 0.02)"}
        print(f"\n(d) optimizer at equal wall time ({args.seconds:g} s of training steps each)\n\n"
              "| optimizer | run | steps done / planned | train s | s/step | val loss | val bits/byte |\n"
              "|---|---|---|---|---|---|---|")
        for i, n, r in timed:
            print(f"| {labels[n]} | {i + 1} | {r['steps']} / {r['planned_steps']} | {r['seconds']:.0f} | "
                  f"{r['seconds'] / r['steps']:.3f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
