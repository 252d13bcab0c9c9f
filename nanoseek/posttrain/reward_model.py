"""`nanoseek reward-model`: a scalar reward head on the policy's backbone, trained on preference pairs with the
pairwise Bradley-Terry loss; usable as a reward function (R1's "general" reward in its final RL stage).

    nanoseek reward-model --recipe r1 --init runs/sft --out runs/rm --data pairs.jsonl

The score of a conversation is a linear head on the backbone's final normed hidden state at its last token
(the EOS closing the reply). Saved as a checkpoint directory: the backbone in the usual format plus
`reward_head.safetensors`; `RewardModel.load(dir)` reads it back and `reward_function(dir)` turns it into a
`f(completions, question, **columns)` reward.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from nanoseek.config import from_dict, load_recipe
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model.hf import write_json
from nanoseek.model.transformer import Transformer
from nanoseek.posttrain.losses import bradley_terry_loss
from nanoseek.posttrain.preferences import Pair, load_pairs, pair_batch
from nanoseek.posttrain.sft import pick_device
from nanoseek.posttrain.stage import (
    TOKENIZER_FILES,
    add_stage_arguments,
    check_fresh_run,
    load_policy,
    pad_right,
    skipped_note,
    split_validation,
)
from nanoseek.rewards import completion_text
from nanoseek.train.metrics import MetricsWriter
from nanoseek.train.optim import build_optimizer, lr_multiplier, set_lr

HEAD_FILE = "reward_head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, backbone: Transformer):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(backbone.config.hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, T] right-padded, lengths [B] -> scores [B] read at each sequence's last token."""
        hidden = self.backbone(ids, extras=True).hidden  # [B, T, D] final normed hidden state
        last = hidden[torch.arange(len(ids), device=ids.device), lengths - 1]
        return self.head(last).squeeze(-1).float()

    def save(self, path: Path, tokenizer_dir: Path, meta: dict[str, Any]) -> Path:
        """A checkpoint directory, written under a temporary name and renamed when complete."""
        tmp = path.with_name(f".tmp_{path.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.backbone.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(tmp / HEAD_FILE))
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).exists():
                shutil.copy2(tokenizer_dir / f, tmp / f)
        write_json(tmp / "nanoseek.json", meta)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer]:
        path = Path(path)
        if not (path / HEAD_FILE).exists():
            raise FileNotFoundError(f"{path}: no {HEAD_FILE}; not a reward model checkpoint")
        policy = load_policy(path, device, train=False)
        model = cls(policy.model)
        model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        return model.to(device).eval(), policy.tokenizer


def _lengths(mask_or_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.tensor([len(x) for x in mask_or_ids])


def pair_scores(model: RewardModel, pairs: Sequence[Pair], pad: int, device: torch.device) -> torch.Tensor:
    """Scores [2, B]: chosen row, rejected row."""
    ids, _ = pair_batch(pairs, pad)
    lengths = _lengths([p.chosen[0] for p in pairs] + [p.rejected[0] for p in pairs])
    return model(ids.to(device), lengths.to(device)).view(2, -1)


def reward_function(path: str | Path, device: str | torch.device = "cpu", batch: int = 16):
    """A reward `f(completions, question, **columns) -> list[float]` scoring (question, completion) as a chat
    with the trained reward model; register it with `build_rewards(..., extra={"reward_model": f})`."""
    model, tok = RewardModel.load(path, device)

    @torch.no_grad()
    def reward_model(completions: Sequence[Any], question: Sequence[str], **_: Any) -> list[float]:
        rows = [tok.apply_chat_template([{"role": "user", "content": q},
                                         {"role": "assistant", "content": completion_text(c)}])
                for c, q in zip(completions, question, strict=True)]
        out: list[float] = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            out += model(pad_right(chunk, tok.pad_id).to(device), _lengths(chunk).to(device)).tolist()
        return out

    return reward_model


@dataclass
class RewardModelConfig:
    init: str = ""
    data: str = ""  # preference JSONL (prompt, chosen, rejected)
    max_tokens: int = 512
    skip_invalid: bool = False
    lr: float = 1e-4
    warmup_steps: int = 5
    batch_size: int = 8
    epochs: float = 2.0
    max_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    center_coef: float = 0.01  # keeps scores centred near 0 (TRL's center_rewards_coefficient)
    val_fraction: float = 0.1
    val_every: int = 20
    seed: int = 0
    device: str = "auto"


def train_reward_model(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None,
                       data: str | Path | None = None, progress: bool = True) -> Path:
    """Train a reward model from `init`'s backbone on preference pairs; returns the checkpoint directory
    (OUT/model). Short enough not to need resuming: a rerun into a fresh directory starts over."""
    cfg = from_dict(RewardModelConfig, recipe.get("reward_model"), "reward_model")
    init, data = str(init or cfg.init), str(data or cfg.data)
    if not init or not data:
        raise ValueError("[reward_model] needs init (a checkpoint) and data (preference JSONL)")
    out = Path(out_dir)
    check_fresh_run(out, resume=False)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    policy = load_policy(init, device)
    model = RewardModel(policy.model).to(device).train()
    tok = policy.tokenizer
    pairs, skipped = load_pairs(data, tok, cfg.max_tokens, cfg.skip_invalid)
    if note := skipped_note(skipped, "pairs", cfg.max_tokens):
        print(f"reward-model: {note}", file=sys.stderr)
    train, val = split_validation(pairs, cfg.val_fraction, cfg.seed)
    if not train:
        raise ValueError(f"{data}: no usable preference pairs" + (note and f" ({note})"))
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    writer = MetricsWriter(out / "metrics.jsonl")
    writer.write({"event": "data", "step": 0, "train_pairs": len(train), "val_pairs": len(val), "skipped": skipped})

    @torch.no_grad()
    def validate() -> dict[str, float]:
        model.eval()
        scores = torch.cat([pair_scores(model, val[i:i + cfg.batch_size], tok.pad_id, device)
                            for i in range(0, len(val), cfg.batch_size)], dim=1)
        model.train()
        return {"val_loss": bradley_terry_loss(scores[0], scores[1]).item(),
                "val_accuracy": (scores[0] > scores[1]).float().mean().item()}

    last: dict[str, Any] = {}
    with tqdm(total=total, desc="reward-model", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(1, total + 1):
            epoch, i = divmod(step - 1, steps_per_epoch)
            idx = list(range(len(train)))
            random.Random(cfg.seed * 1000 + epoch).shuffle(idx)
            batch = [train[j] for j in idx[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
            lr = cfg.lr * lr_multiplier(step - 1, total, cfg.warmup_steps, "cosine", 0.0, 0.1)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            scores = pair_scores(model, batch, tok.pad_id, device)
            loss = bradley_terry_loss(scores[0], scores[1], center_coef=cfg.center_coef)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = {"step": step, "loss": loss.item(), "accuracy": (scores[0] > scores[1]).float().mean().item(),
                    "margin": (scores[0] - scores[1]).mean().item(), "lr": lr, "grad_norm": float(grad_norm),
                    "step_time": time.perf_counter() - t0}
            if val and (step == total or (cfg.val_every and step % cfg.val_every == 0)):
                last.update(validate())
            writer.write(last)
            bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.2f}")
            bar.update(1)
    writer.close()
    meta = {"stage": "reward_model", "step": total, "recipe": {**recipe, "reward_model": asdict(cfg)},
            "metrics": last}
    return model.save(out / "model", policy.checkpoint, meta)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "reward_model", out_help="run directory (the model goes to OUT/model)",
                        init_help="backbone checkpoint or run directory (overrides [reward_model].init)",
                        resume=False)
    parser.add_argument("--data", help="preference JSONL: prompt, chosen, rejected (overrides [reward_model].data)")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    path = train_reward_model(recipe, args.out, args.init, args.data, not args.no_progress)
    print(f"reward model: {path}")
    return 0
