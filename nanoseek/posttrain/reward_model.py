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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.common import pick_device, write_json
from nanoseek.config import load_recipe
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model.transformer import Transformer
from nanoseek.posttrain.loop import Stage, TrainConfig, prepare, run, start, threads
from nanoseek.posttrain.losses import bradley_terry_loss
from nanoseek.posttrain.preferences import Pair, pair_batch, pair_splits
from nanoseek.posttrain.stage import (
    TOKENIZER_FILES,
    Policy,
    add_stage_arguments,
    load_policy,
    pad_right,
)
from nanoseek.rewards import completion_text
from nanoseek.train.optim import build_optimizer

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
class RewardModelConfig(TrainConfig):
    data: str = ""  # preference JSONL (prompt, chosen, rejected)
    max_tokens: int = 512
    skip_invalid: bool = False
    lr: float = 1e-4
    warmup_steps: int = 5
    batch_size: int = 8
    epochs: float = 2.0
    center_coef: float = 0.01  # keeps scores centred near 0 (TRL's center_rewards_coefficient)
    val_fraction: float = 0.1
    val_every: int = 20

    def validate(self, section: str = "reward_model") -> None:
        super().validate(section)
        if self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"[{section}] max_tokens and batch_size must be >= 1")
        if self.epochs <= 0 or self.center_coef < 0 or self.val_every < 0 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"[{section}] need epochs > 0, center_coef >= 0, val_every >= 0 and "
                             f"0 <= val_fraction < 1")


class RewardModelStage(Stage):
    """The pairwise Bradley-Terry loss on chosen / rejected scores, pairs in a fresh seeded order each epoch."""

    def __init__(self, cfg: RewardModelConfig, model: RewardModel, pad: int, train: list[Pair], val: list[Pair],
                 device: torch.device):
        self.cfg, self.model, self.pad, self.train, self.val, self.device = cfg, model, pad, train, val, device
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        order = list(range(len(self.train)))
        random.Random(self.cfg.seed * 1000 + epoch).shuffle(order)
        batch = [self.train[j] for j in order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]]
        scores = pair_scores(self.model, batch, self.pad, self.device)
        loss = bradley_terry_loss(scores[0], scores[1], center_coef=self.cfg.center_coef)
        return loss, {"accuracy": (scores[0] > scores[1]).float().mean().item(),
                      "margin": (scores[0] - scores[1]).mean().item()}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val:
            return {}
        self.model.eval()
        size = self.cfg.batch_size
        scores = torch.cat([pair_scores(self.model, self.val[i:i + size], self.pad, self.device)
                            for i in range(0, len(self.val), size)], dim=1)
        self.model.train()
        return {"val_loss": bradley_terry_loss(scores[0], scores[1]).item(),
                "val_accuracy": (scores[0] > scores[1]).float().mean().item()}

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics['accuracy']:.2f}"}


def train_reward_model(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None,
                       data: str | Path | None = None, progress: bool = True) -> Path:
    """Train a reward model from `init`'s backbone on preference pairs; returns the checkpoint directory
    (OUT/model), written when training ends (and every save_every steps). Short enough not to need resuming: a
    rerun into a fresh directory starts over."""
    cfg, out, init = prepare(RewardModelConfig, recipe, "reward_model", out_dir, init, resume=False)
    data = str(data or cfg.data)
    if not data:
        raise ValueError("[reward_model] data: no preference JSONL (set it or pass --data)")
    out.mkdir(parents=True, exist_ok=True)
    with threads(cfg.threads):
        policy = start(cfg, init)
        device = pick_device(cfg.device)
        model = RewardModel(policy.model).to(device).train()
        tok = policy.tokenizer
        train, val, skipped = pair_splits(data, tok, cfg.max_tokens, cfg.skip_invalid, cfg.val_fraction, cfg.seed,
                                          "reward-model")
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        stage = RewardModelStage(cfg, model, tok.pad_id, train, val, device)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * stage.steps_per_epoch))
        recipe = {**recipe, "reward_model": asdict(cfg) | {"init": init, "data": data}}

        def save(step: int, last: dict[str, Any]) -> Path:  # the reward model's own format, replaced whole
            meta = {"stage": "reward_model", "step": step, "recipe": recipe, "metrics": last}
            return model.save(out / "model", policy.checkpoint, meta)

        # the loop's model is the whole reward model (backbone and head): both are trained and clipped together
        trained = Policy(model, tok, policy.checkpoint)
        return run(stage, cfg, out, "reward_model", recipe, trained, optimizer, total, cfg.val_every,
                   progress=progress, data={"train_pairs": len(train), "val_pairs": len(val), "skipped": skipped},
                   save=save)


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
