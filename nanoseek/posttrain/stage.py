"""What every post-training stage shares: the starting model and its tokenizer, padded batches and sequence
log-probabilities, validation splits, checkpoints, and the runner that runs stages one after another.

A stage writes what pretraining writes (`nanoseek.train.checkpoint`): OUT/checkpoints/step_N/ with config.json,
model.safetensors, the tokenizer files and nanoseek.json naming the stage, plus OUT/metrics.jsonl. The next
stage loads OUT like any checkpoint (`nanoseek.load(OUT)`), and `--resume` continues an interrupted stage.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import write_json
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model.hf import load, resolve_checkpoint
from nanoseek.model.transformer import Transformer
from nanoseek.posttrain.losses import token_logps
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanoseek.train.parallelize import Parallel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Policy:
    model: Transformer
    tokenizer: Tokenizer
    checkpoint: Path  # the directory it came from (tokenizer files are copied from here)


def load_policy(path: str | Path, device: str | torch.device = "cpu", train: bool = True) -> Policy:
    """A model and its tokenizer from a checkpoint or run directory (the tokenizer files travel with every
    nanoseek checkpoint). The model is returned in train mode unless train=False.

    The MTP modules are frozen: post-training objectives use the main head only, so they would get no
    gradient (and no optimizer state to resume); they keep their pretrained weights."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / "tokenizer.json").exists():
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json beside the weights; copy the tokenizer used to "
                                f"train it into this directory")
    model = load(ckpt, device=device)
    model.mtp.requires_grad_(False)
    return Policy(model.train(train), Tokenizer.load(ckpt), ckpt)


def skipped_note(skipped: dict[str, int], unit: str, max_tokens: int) -> str:
    """'skipped 2 invalid and 1 over-long (> 512 tokens) pairs' for the counts a loader returns ({"invalid",
    "too_long"}), or '' when nothing was skipped: what a stage prints, and adds to its error when nothing is
    left to train on."""
    if not any(skipped.values()):
        return ""
    return (f"skipped {skipped['invalid']} invalid and {skipped['too_long']} over-long (> {max_tokens} tokens) "
            f"{unit}")


def pad_right(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Lists of ids -> LongTensor [B, max_len], padded at the end (causal attention never looks right, so
    right-padding needs no attention mask)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, target_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of ids[:, 1:] under `model`, and the mask shifted to match.

    ids [B, T]; target_mask [B, T] marks the tokens to score (completion tokens). Returns logps [B, T-1]
    (0 where not scored) and mask [B, T-1] float."""
    logits = model(ids[:, :-1])
    mask = target_mask[:, 1:].float()
    return token_logps(logits, ids[:, 1:]) * mask, mask


def split_validation(records: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded (train, validation) split; at least one validation record when fraction > 0 and there are 2+."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(len(records) - 1, max(1, round(fraction * len(records))))
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


def save_stage(out: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, stage: str,
               recipe: dict[str, Any], tokenizer_dir: Path, state: dict[str, Any], keep: int = 2,
               summary: dict[str, Any] | None = None, extra_files: Sequence[Path] = ()) -> Path:
    """Checkpoint a single-process stage (nanoseek.train.checkpoint's format: resumable, atomic)."""
    copy = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).exists()] + list(extra_files)
    meta = {"stage": stage, "step": step, "recipe": recipe, "metrics": summary or {}}
    rank_state = {"rng_torch": torch.get_rng_state(), "rng_python": random.getstate()}
    return save_checkpoint(out, step, model, optimizer, state, rank_state, Parallel(), keep=keep,
                           json_files={"nanoseek.json": meta}, copy_files=copy)


def resume_stage(out: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore the latest checkpoint of `out` into model and optimizer; its trainer state, or None if none."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return None
    state, mine = load_checkpoint(ckpt, model, optimizer, Parallel())
    if mine is not None:
        torch.set_rng_state(mine["rng_torch"])
        random.setstate(mine["rng_python"])
    return state


def check_fresh_run(out: Path, resume: bool) -> None:
    """Refuse to mix two runs in one directory."""
    if not resume and (latest_checkpoint(out) is not None or (out / "metrics.jsonl").exists()):
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


def add_stage_arguments(parser: argparse.ArgumentParser, table: str, out_help: str = "run directory",
                        init_help: str | None = None, resume: bool = True, init: bool = True) -> None:
    """The arguments every post-training command shares: --recipe (its [table]), --out, --init, --resume,
    --set and --no-progress. Commands add their own (--data, --teacher, ...) after these."""
    parser.add_argument("--recipe", required=True, help=f"built-in recipe name or TOML file ([{table}] table)")
    parser.add_argument("--out", required=True, type=Path, help=out_help)
    if init:
        parser.add_argument("--init", help=init_help or f"starting checkpoint or run directory (overrides "
                                                         f"[{table}].init)")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class Runner:
    """Runs named stages into one directory, each once (`nanoseek run`, `nanoseek r1`). A stage is finished when
    OUT/<name>/stage.json exists: written last and atomically, it holds the stage's wall time and what its function
    returned (outputs as paths relative to OUT, metrics). A stage directory without it was interrupted: its
    function is called again with resume=True and continues from its last checkpoint."""

    out: Path

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> dict[str, Any] | None:
        """A finished stage's record (its stage.json), None if it has not finished."""
        marker = self.stage_dir(name) / "stage.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def rel(self, path: str | Path) -> str:
        return str(Path(path).relative_to(self.out))

    def run_stage(self, name: str, fn: Callable[[bool], dict[str, Any]]) -> dict[str, Any]:
        """Run stage `name` unless it finished before: fn(resume) returns the stage's record."""
        finished = self.done(name)
        if finished is not None:
            print(f"[{name}] already done ({finished['wall_seconds']:.0f}s) - skipping")
            return finished
        resume = self.stage_dir(name).exists()
        print(f"[{name}] {'resuming' if resume else 'starting'}")
        start = time.perf_counter()
        info = {"name": name, "wall_seconds": 0.0, **fn(resume)}
        info["wall_seconds"] = time.perf_counter() - start
        self.stage_dir(name).mkdir(parents=True, exist_ok=True)
        write_json(self.stage_dir(name) / "stage.json", info)
        brief = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in info.get("metrics", {}).items())
        print(f"[{name}] done in {info['wall_seconds']:.0f}s" + (f": {brief}" if brief else ""))
        return info
