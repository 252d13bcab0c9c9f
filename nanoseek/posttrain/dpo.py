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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.config import from_dict, load_recipe
from nanoseek.data.synth import make_problems
from nanoseek.posttrain.losses import dpo_loss
from nanoseek.posttrain.preferences import Pair, load_pairs, pair_batch, verified_pairs, write_jsonl
from nanoseek.posttrain.rollout import Sampler, problem_prompt
from nanoseek.posttrain.sft import pick_device
from nanoseek.posttrain.stage import (
    add_stage_arguments,
    check_fresh_run,
    load_policy,
    resume_stage,
    save_stage,
    sequence_logps,
    skipped_note,
    split_validation,
)
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import MetricsWriter
from nanoseek.train.optim import build_optimizer, lr_multiplier, set_lr


@dataclass
class DPOConfig:
    init: str = ""
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
    max_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    val_every: int = 20
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    device: str = "auto"


def build_pairs(cfg: DPOConfig, policy, out: Path) -> Path:
    """Pairs from verified samples of the policy (see the module docstring); written to OUT/pairs.jsonl."""
    tok = policy.tokenizer
    per_task = max(1, cfg.pair_prompts // len(cfg.pair_tasks))
    prompts = [problem_prompt(tok, p, cfg.pair_template) for t in cfg.pair_tasks
               for p in make_problems(t, per_task, seed=cfg.seed, difficulty=cfg.pair_difficulty, split="train")]
    sampler = Sampler(policy.model, tok, max_batch=max(cfg.pair_samples, 64), max_new_tokens=cfg.pair_max_new_tokens)
    records = []
    per_call = max(1, sampler.max_batch // cfg.pair_samples)
    for i in tqdm(range(0, len(prompts), per_call), desc="dpo pairs", unit="batch", dynamic_ncols=True):
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


def dpo(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None, data: str | Path | None = None,
        resume: bool = False, progress: bool = True) -> Path:
    """Preference-tune `init`; returns the final checkpoint directory."""
    cfg = from_dict(DPOConfig, recipe.get("dpo"), "dpo")
    init = str(init or cfg.init)
    if not init:
        raise ValueError("[dpo] init: no starting checkpoint (set it or pass --init)")
    out = Path(out_dir)
    check_fresh_run(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    policy = load_policy(init, device)
    model, tok = policy.model, policy.tokenizer
    path = Path(data or cfg.data) if (data or cfg.data) else (out / "pairs.jsonl")
    if not (data or cfg.data) and not path.exists():
        path = build_pairs(cfg, policy, out)
    pairs, skipped = load_pairs(path, tok, cfg.max_tokens, cfg.skip_invalid)
    if note := skipped_note(skipped, "pairs", cfg.max_tokens):
        print(f"dpo: {note}", file=sys.stderr)
    train, val = split_validation(pairs, cfg.val_fraction, cfg.seed)
    if not train:
        raise ValueError(f"{path}: no usable preference pairs" + (note and f" ({note})"))
    ref_train = reference_logps(model, train, tok.pad_id, device, cfg.batch_size)
    ref_val = reference_logps(model, val, tok.pad_id, device, cfg.batch_size) if val else None

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    recipe = {**recipe, "dpo": asdict(cfg) | {"init": init, "data": str(path)}}
    step = 0
    if resume and (state := resume_stage(out, model, optimizer)) is not None:
        step = state["step"]
    writer = MetricsWriter(out / "metrics.jsonl", resume_step=step)
    writer.write({"event": "data", "step": step, "train_pairs": len(train), "val_pairs": len(val),
                  "skipped": skipped, "pairs": str(path)})

    def order(epoch: int) -> list[int]:
        idx = list(range(len(train)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(idx)
        return idx

    def measure(batch_pairs: list[Pair], ref: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logps = pair_logps(model, batch_pairs, tok.pad_id, device).view(2, -1)
        loss, chosen, rejected = dpo_loss(logps[0], logps[1], ref[:, 0], ref[:, 1], cfg.beta)
        return loss, {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                      "rewards/margin": (chosen - rejected).mean().item(),
                      "rewards/accuracy": (chosen > rejected).float().mean().item()}

    @torch.no_grad()
    def validate() -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = {}
        for i in range(0, len(val), cfg.batch_size):
            loss, m = measure(val[i:i + cfg.batch_size], ref_val[i:i + cfg.batch_size])
            share = len(val[i:i + cfg.batch_size]) / len(val)
            for k, v in {"loss": loss.item(), **m}.items():
                sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + v * share
        model.train()
        return sums

    bar = tqdm(total=total, initial=step, desc="dpo", unit="step", disable=not progress, dynamic_ncols=True)
    ckpt = None
    last: dict[str, Any] = {}
    try:
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            idx = order(epoch)[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            lr = cfg.lr * lr_multiplier(step, total, cfg.warmup_steps, "cosine", 0.0, 0.1)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            loss, m = measure([train[j] for j in idx], ref_train[idx])
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = {"step": step, "loss": loss.item(), **m, "lr": lr, "grad_norm": float(grad_norm),
                    "step_time": time.perf_counter() - t0}
            if val and (step == total or (cfg.val_every and step % cfg.val_every == 0)):
                last.update(validate())
            writer.write(last)
            bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{m['rewards/accuracy']:.2f}")
            bar.update(1)
            if step == total or (cfg.save_every and step % cfg.save_every == 0):
                ckpt = save_stage(out, step, model, optimizer, "dpo", recipe, policy.checkpoint, {},
                                  cfg.keep_checkpoints, last)
    finally:
        bar.close()
        writer.close()
    return ckpt or latest_checkpoint(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "dpo")
    parser.add_argument("--data", help="preference JSONL (prompt, chosen, rejected); default: verified samples")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    ckpt = dpo(recipe, args.out, args.init, args.data, args.resume, not args.no_progress)
    print(f"final checkpoint: {ckpt}")
    return 0
