"""`nanoseek r1`: DeepSeek-R1's multi-stage recipe (§2.3) from a base model, one stage after another.

    nanoseek r1 --recipe r1 --init runs/base --out runs/r1

    1-cold-start     SFT of the base on a few readable long chain-of-thought conversations   [sft_cold]
    2-reasoning-rl   GRPO from it: accuracy + format + language consistency                   [grpo_reasoning]
    3-rejection      sample the RL model, keep correct & clean answers, mix in instruct data  [rejection]
    4-sft            SFT of the *base* on that data                                           [sft]
    5-final-rl       GRPO again: reasoning rules (+ a reward model, if the recipe names one)  [grpo_final]

Each stage writes its own directory under OUT and, when it finishes, OUT/<stage>/stage.json (the runner that
`nanoseek run` uses); a rerun skips the stages already finished, so an interrupted recipe continues where it
stopped.
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
from nanoseek.posttrain.stage import Runner

STAGES = ("1-cold-start", "2-reasoning-rl", "3-rejection", "4-sft", "5-final-rl")


def r1(recipe: dict[str, Any], out_dir: str | Path, base: str | Path, progress: bool = True) -> Path:
    """The five R1 stages from `base`; returns the final RL checkpoint."""
    runner, base = Runner(Path(out_dir)), resolve_checkpoint(base)

    def stage(name: str, train: Callable[[Path, bool], Path]) -> Path:
        """Run one stage (train(stage_dir, resume) -> its output) unless it finished before; its output."""
        info = runner.run_stage(name, lambda resume: {"output": runner.rel(train(runner.stage_dir(name), resume))})
        return runner.out / info["output"]

    cold = stage(STAGES[0], lambda d, resume: sft(
        recipe, d, init=base, resume=resume, progress=progress, section="sft_cold"))
    reasoning = stage(STAGES[1], lambda d, resume: grpo(
        recipe, d, init=cold, resume=resume, progress=progress, section="grpo_reasoning"))
    data = stage(STAGES[2], lambda d, resume: rejection(recipe, d, init=reasoning, progress=progress))
    tuned = stage(STAGES[3], lambda d, resume: sft(
        recipe, d, init=base, data=[data], resume=resume, progress=progress, section="sft"))
    return stage(STAGES[4], lambda d, resume: grpo(
        recipe, d, init=tuned, resume=resume, progress=progress, section="grpo_final"))


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
