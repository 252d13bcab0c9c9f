"""`nanoseek dpo`: Direct Preference Optimization against a frozen reference (the starting model).

    nanoseek dpo --recipe dpo --init runs/sft --out runs/dpo [--data pairs.jsonl]

Pairs come from a JSONL file (`preferences.load_pairs`), or, with no file, are built from verified samples of
the starting model: k answers to built-in training problems, one correct paired with one incorrect per prompt
(written to OUT/pairs.jsonl). The reference log-probabilities are computed once before training, so only one
model is held in memory. Metrics: loss, implicit rewards of both sides, their margin and how often the chosen
side wins (train and validation).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.common import pick_device, write_jsonl
from nanoseek.config import load_recipe
from nanoseek.data.synth import make_problems
from nanoseek.infer.rollout import TEMPLATES, Sampler, problem_prompt
from nanoseek.posttrain.loop import Stage, TrainConfig, prepare, run, start, threads
from nanoseek.posttrain.losses import dpo_loss
from nanoseek.posttrain.preferences import Pair, pair_batch, pair_splits, verified_pairs
from nanoseek.posttrain.stage import add_stage_arguments, sequence_logps
from nanoseek.train.optim import build_optimizer


@dataclass
class DPOConfig(TrainConfig):
    data: str = ""  # preference JSONL; empty -> pairs from verified samples of the starting model
    beta: float = 0.1
    max_tokens: int = 512  # longer pairs are skipped and counted
    skip_invalid: bool = False
    # building pairs from verified samples (when data is empty)
    pair_tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    pair_difficulty: list[int] = field(default_factory=lambda: [1, 2])
    pair_prompts: int = 128
    pair_samples: int = 8
    pair_template: str = "chat"
    pair_max_new_tokens: int = 96
    # optimisation
    lr: float = 5e-6
    warmup_steps: int = 5
    batch_size: int = 8  # pairs per step
    epochs: float = 1.0
    val_fraction: float = 0.1
    val_every: int = 20

    def validate(self, section: str = "dpo") -> None:
        super().validate(section)
        for name in ("max_tokens", "pair_prompts", "pair_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"[{section}] {name}={getattr(self, name)} must be >= 1")
        if self.pair_samples < 2:
            raise ValueError(f"[{section}] pair_samples={self.pair_samples}: a pair needs at least 2 samples")
        if not self.pair_tasks:
            raise ValueError(f"[{section}] pair_tasks: at least one task")
        if self.pair_template not in TEMPLATES:
            raise ValueError(f"[{section}] pair_template={self.pair_template!r}: expected one of {TEMPLATES}")
        if self.beta <= 0 or self.epochs <= 0 or self.val_every < 0 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"[{section}] need beta > 0, epochs > 0, val_every >= 0 and 0 <= val_fraction < 1")


def build_pairs(cfg: DPOConfig, policy, out: Path, progress: bool = True) -> Path:
    """Pairs from verified samples of the policy (see the module docstring); written to OUT/pairs.jsonl."""
    tok = policy.tokenizer
    per_task = max(1, cfg.pair_prompts // len(cfg.pair_tasks))
    prompts = [problem_prompt(tok, p, cfg.pair_template) for t in cfg.pair_tasks
               for p in make_problems(t, per_task, seed=cfg.seed, difficulty=cfg.pair_difficulty, split="train")]
    sampler = Sampler(policy.model, tok, max_batch=max(cfg.pair_samples, 64), max_new_tokens=cfg.pair_max_new_tokens)
    records = []
    per_call = max(1, sampler.max_batch // cfg.pair_samples)
    for i in tqdm(range(0, len(prompts), per_call), desc="dpo pairs", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        records += verified_pairs(sampler, prompts[i:i + per_call], cfg.pair_samples, seed=cfg.seed + i)
    if not records:
        raise ValueError(f"no prompt of {cfg.pair_tasks} (levels {cfg.pair_difficulty}) had both a correct and an "
                         f"incorrect sample among {cfg.pair_samples}; pick levels the model sometimes solves")
    path = out / "pairs.jsonl"
    write_jsonl(path, records)
    return path


def pair_logps(model: torch.nn.Module, pairs: list[Pair], pad: int, device: torch.device) -> torch.Tensor:
    """Sequence log-probabilities [2B] of the replies: chosen rows, then rejected rows."""
    ids, mask = pair_batch(pairs, pad)
    logps, _ = sequence_logps(model, ids.to(device), mask.to(device))
    return logps.sum(-1)


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: list[Pair], pad: int, device: torch.device, batch: int
                    ) -> torch.Tensor:
    """[n, 2] (chosen, rejected) log-probabilities under the frozen starting model."""
    model.eval()
    out = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        out.append(pair_logps(model, chunk, pad, device).view(2, -1).T)
    model.train()
    return torch.cat(out)


class DPOStage(Stage):
    """Pairs in a fresh seeded order each epoch; the DPO loss against reference log-probabilities computed once."""

    def __init__(self, cfg: DPOConfig, model: torch.nn.Module, pad: int, train: list[Pair], val: list[Pair],
                 device: torch.device):
        self.cfg, self.model, self.pad, self.train, self.val, self.device = cfg, model, pad, train, val, device
        self.ref_train = reference_logps(model, train, pad, device, cfg.batch_size)
        self.ref_val = reference_logps(model, val, pad, device, cfg.batch_size) if val else None
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)

    def measure(self, pairs: list[Pair], ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logps = pair_logps(self.model, pairs, self.pad, self.device).view(2, -1)
        loss, chosen, rejected = dpo_loss(logps[0], logps[1], ref[:, 0], ref[:, 1], self.cfg.beta)
        return loss, {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                      "rewards/margin": (chosen - rejected).mean().item(),
                      "rewards/accuracy": (chosen > rejected).float().mean().item()}

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.train)))
        random.Random(self.cfg.seed * 1000 + epoch).shuffle(order)
        idx = order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        return self.measure([self.train[j] for j in idx], self.ref_train[idx])

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val:
            return {}
        self.model.eval()
        sums: dict[str, float] = {}
        size = self.cfg.batch_size
        for i in range(0, len(self.val), size):
            loss, m = self.measure(self.val[i:i + size], self.ref_val[i:i + size])
            share = len(self.val[i:i + size]) / len(self.val)
            for k, v in {"loss": loss.item(), **m}.items():
                sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + v * share
        self.model.train()
        return sums

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics['rewards/accuracy']:.2f}"}


def dpo(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None, data: str | Path | None = None,
        resume: bool = False, progress: bool = True) -> Path:
    """Preference-tune `init`; returns the final checkpoint directory."""
    cfg, out, init = prepare(DPOConfig, recipe, "dpo", out_dir, init, resume)
    out.mkdir(parents=True, exist_ok=True)
    with threads(cfg.threads):
        policy = start(cfg, init)
        tok = policy.tokenizer
        path = Path(data or cfg.data) if (data or cfg.data) else (out / "pairs.jsonl")
        if not (data or cfg.data) and not path.exists():
            path = build_pairs(cfg, policy, out, progress)
        train, val, skipped = pair_splits(path, tok, cfg.max_tokens, cfg.skip_invalid, cfg.val_fraction, cfg.seed,
                                          "dpo")
        stage = DPOStage(cfg, policy.model, tok.pad_id, train, val, pick_device(cfg.device))
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * stage.steps_per_epoch))
        optimizer = build_optimizer(policy.model, cfg.lr, cfg.weight_decay)
        recipe = {**recipe, "dpo": asdict(cfg) | {"init": init, "data": str(path)}}
        data_event = {"train_pairs": len(train), "val_pairs": len(val), "skipped": skipped, "pairs": str(path)}
        return run(stage, cfg, out, "dpo", recipe, policy, optimizer, total, cfg.val_every, resume, progress,
                   data=data_event)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "dpo")
    parser.add_argument("--data", help="preference JSONL (prompt, chosen, rejected); default: verified samples")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    ckpt = dpo(recipe, args.out, args.init, args.data, args.resume, not args.no_progress)
    print(f"final checkpoint: {ckpt}")
    return 0
