"""`nanoseek r1`: DeepSeek-R1's multi-stage recipe (§2.3) from a base model, one stage after another.

    nanoseek r1 --recipe r1 --init runs/base --out runs/r1

    1-cold-start     SFT of the base on a few readable long chain-of-thought conversations   [sft_cold]
    2-reasoning-rl   GRPO from it: accuracy + format + language consistency                   [grpo_reasoning]
    3-rejection      sample the RL model, keep correct & clean answers, mix in instruct data  [rejection]
    4-sft            SFT of the *base* on that data                                           [sft]
    5-final-rl       GRPO again: reasoning rules (+ a reward model, if the recipe names one)  [grpo_final]

Each stage writes its own directory under OUT; a rerun skips the stages already finished, so an interrupted
recipe continues where it stopped.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanoseek.config import load_recipe
from nanoseek.model.hf import resolve_checkpoint
from nanoseek.posttrain.grpo import grpo
from nanoseek.posttrain.rejection import rejection
from nanoseek.posttrain.sft import sft
from nanoseek.train.checkpoint import latest_checkpoint

STAGES = ("1-cold-start", "2-reasoning-rl", "3-rejection", "4-sft", "5-final-rl")


def result(stage_dir: Path) -> Path | None:
    """A finished stage's output (its data file or last checkpoint); None while unfinished. A marker file,
    present while a stage runs, tells a finished stage from an interrupted one."""
    if (stage_dir / ".running").exists():
        return None
    if stage_dir.name == "3-rejection":
        path = stage_dir / "sft.jsonl"
        return path if path.exists() else None
    return latest_checkpoint(stage_dir)


def run_stage(stage_dir: Path, run: Callable[[bool], Path]) -> Path:
    """Run a stage unless it finished before; an interrupted stage resumes."""
    done = result(stage_dir)
    if done is not None:
        print(f"r1: {stage_dir.name} already done: {done}")
        return done
    marker = stage_dir / ".running"
    resume = marker.exists()
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker.touch()
    output = run(resume)
    marker.unlink()
    return output


def r1(recipe: dict[str, Any], out_dir: str | Path, base: str | Path, progress: bool = True) -> Path:
    """The five R1 stages from `base`; returns the final RL checkpoint."""
    out, base = Path(out_dir), resolve_checkpoint(base)
    d = [out / s for s in STAGES]
    cold = run_stage(d[0], lambda resume: sft(
        recipe, d[0], init=base, resume=resume, progress=progress, section="sft_cold"))
    reasoning = run_stage(d[1], lambda resume: grpo(
        recipe, d[1], init=cold, resume=resume, progress=progress, section="grpo_reasoning"))
    data = run_stage(d[2], lambda resume: rejection(recipe, d[2], init=reasoning, progress=progress))
    tuned = run_stage(d[3], lambda resume: sft(
        recipe, d[3], init=base, data=[data], resume=resume, progress=progress, section="sft"))
    return run_stage(d[4], lambda resume: grpo(
        recipe, d[4], init=tuned, resume=resume, progress=progress, section="grpo_final"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="r1", help="built-in recipe name or TOML file (default r1)")
    parser.add_argument("--init", required=True, help="the base model: checkpoint or pretraining run directory")
    parser.add_argument("--out", required=True, type=Path, help="run directory (one subdirectory per stage)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    ckpt = r1(recipe, args.out, args.init, not args.no_progress)
    print(f"final checkpoint: {ckpt}")
    return 0
