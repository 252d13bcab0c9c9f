"""`nanoseek sft`: supervised fine-tuning on conversations, the loss on assistant tokens only.

    nanoseek sft --recipe r1 --init runs/base --out runs/sft

Data: JSONL files of OpenAI-style records `{"messages": [{"role", "content"}, ...], "style": ...}`, rendered by
the tokenizer's chat template (so the ids are those chat and serving will use). Every assistant turn of a
multi-turn conversation is trained, including its closing EOS; prompts, system text and user turns are not.
`style` is "reasoning" (the answer starts with `<think>`) or "instruct" (a direct answer); when absent it is
read off the first assistant turn. Styles are mixed by the recipe's weights (R1 stage 3: reasoning samples
from rejection sampling plus instruct data).

Conversations are packed whole into rows of seq_len + 1 tokens (a conversation never straddles two rows; one
longer than a row is skipped and counted). Packed conversations can attend to earlier ones in their row, as
in pretraining; each starts with BOS, which the model has learned to read as a fresh start.

Malformed records (no messages, an unknown role, empty or non-text content, the template's control tokens in
the text, turns out of order) stop the run with the file and line, or with `skip_invalid = true` are counted,
skipped and reported.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nanoseek.common import pick_device, read_jsonl
from nanoseek.config import from_dict, load_recipe
from nanoseek.data.tokenizer import CONTROL_TOKENS, Tokenizer
from nanoseek.posttrain.loop import Stage, TrainConfig, prepare, run, start, threads
from nanoseek.posttrain.stage import add_stage_arguments, pad_right, skipped_note, split_validation
from nanoseek.train.optim import build_optimizer

STYLES = ("reasoning", "instruct")


@dataclass
class SFTConfig(TrainConfig):
    data: list[str] = field(default_factory=list)  # JSONL files; empty -> the built-in sft.jsonl
    mix: dict[str, float] = field(default_factory=lambda: {"reasoning": 0.7, "instruct": 0.3})
    seq_len: int = 512
    batch_size: int = 8  # rows per optimizer step
    epochs: float = 2.0  # R1 fine-tunes for 2 epochs; ignored when max_steps > 0
    lr: float = 3e-4
    warmup_steps: int = 10
    val_fraction: float = 0.05
    val_every: int = 50
    skip_invalid: bool = False
    # logit distillation (used by `nanoseek distill`): loss = (1-α)·CE + α·τ²·KL(teacher_τ || student_τ)
    kd_alpha: float = 0.0
    kd_temperature: float = 1.0

    def validate(self, section: str = "sft") -> None:
        super().validate(section)
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"[{section}] {name}={getattr(self, name)} must be >= 1")
        if self.epochs <= 0 or self.val_every < 0 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"[{section}] need epochs > 0, val_every >= 0 and 0 <= val_fraction < 1")
        if not 0 <= self.kd_alpha <= 1 or self.kd_temperature <= 0:
            raise ValueError(f"[{section}] need 0 <= kd_alpha <= 1 and kd_temperature > 0")
        unknown = sorted(set(self.mix) - set(STYLES))
        if unknown or not any(w > 0 for w in self.mix.values()) or any(w < 0 for w in self.mix.values()):
            raise ValueError(f"[{section}] mix={self.mix}: weights >= 0 over {STYLES}, at least one positive")


# --- records ------------------------------------------------------------------------------------------------

def validate_messages(messages: Any, where: str) -> None:
    """An optional system turn, then user and assistant turns alternating, ending with the assistant.

    Content is non-empty text without the template's control tokens (`<|bos|>`, `<|eos|>`, `<|user|>`, ...):
    the chat template would encode them as real control ids, so a reply quoting `<|user|>` would fake a turn
    boundary and the model would be trained to emit one."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: message {i} has unknown role {m['role']!r} (system, user, assistant)")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"{where}: message {i} ({m['role']}) content must be a string, got "
                             f"{type(content).__name__}")
        if not content or not content.strip():
            raise ValueError(f"{where}: message {i} ({m['role']}) has empty or missing content")
        control = next((t for t in CONTROL_TOKENS if t in content), None)
        if control:
            raise ValueError(f"{where}: message {i} ({m['role']}) contains the control token {control!r}, which "
                             f"the chat template would read as a turn boundary")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(turns)
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] == "system":
            raise ValueError(f"{where}: message {i + offset} is 'system'; a system message may only come first")
        if m["role"] != want:
            raise ValueError(f"{where}: message {i + offset} is {m['role']!r}, expected {want!r} "
                             f"(turns alternate user/assistant after an optional first system message)")
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation must end with an assistant message")


def record_style(record: dict[str, Any]) -> str:
    style = record.get("style")
    if style is None:
        first = next(m["content"] for m in record["messages"] if m["role"] == "assistant")
        return "reasoning" if first.startswith("<think>") else "instruct"
    return style


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 on assistant tokens (the trained positions)
    style: str


def load_examples(paths: Sequence[str | Path], tokenizer: Tokenizer, max_tokens: int, skip_invalid: bool
                  ) -> tuple[list[Example], dict[str, int]]:
    """Tokenised conversations from JSONL files, and counts of what was skipped and why."""
    examples: list[Example] = []
    skipped = {"invalid": 0, "too_long": 0}
    for path in paths:
        for line, record in read_jsonl(path):
            where = f"{path}:{line}"
            try:
                validate_messages(record.get("messages"), where)
                style = record_style(record)
                if style not in STYLES:
                    raise ValueError(f"{where}: style {style!r} is not one of {STYLES}")
            except ValueError:
                if not skip_invalid:
                    raise
                skipped["invalid"] += 1
                continue
            ids, mask = tokenizer.encode_chat(record["messages"])
            if len(ids) > max_tokens:
                skipped["too_long"] += 1
                continue
            examples.append(Example(ids, mask, style))
    return examples, skipped


def mixed_order(examples: list[Example], mix: dict[str, float], n: int, rng: random.Random) -> list[Example]:
    """n examples drawn style by style with probability ∝ mix weight, each style cycling through its own
    shuffled pool (so a small style is repeated rather than starved)."""
    pools = {s: [e for e in examples if e.style == s] for s in STYLES}
    styles = [s for s in STYLES if pools[s] and mix.get(s, 0) > 0]
    if not styles:
        raise ValueError(f"no training examples of the styles the mix asks for ({mix})")
    for s in styles:
        rng.shuffle(pools[s])
    cursor = dict.fromkeys(styles, 0)
    out = []
    for s in rng.choices(styles, weights=[mix[s] for s in styles], k=n):
        out.append(pools[s][cursor[s] % len(pools[s])])
        cursor[s] += 1
    return out


def pack(examples: Sequence[Example], row_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy packing of whole examples into rows of row_len tokens -> (ids [R, row_len], labels [R, row_len-1])
    where labels hold the next token on assistant positions and -100 elsewhere (prompts, padding)."""
    rows_ids: list[list[int]] = []
    rows_mask: list[list[int]] = []
    ids: list[int] = []
    mask: list[int] = []
    for e in examples:
        if len(ids) + len(e.ids) > row_len:
            rows_ids.append(ids)
            rows_mask.append(mask)
            ids, mask = [], []
        ids = ids + e.ids
        mask = mask + e.mask
    if ids:
        rows_ids.append(ids)
        rows_mask.append(mask)
    tokens = pad_right(rows_ids, pad)
    keep = pad_right(rows_mask, 0).bool()
    tokens = F.pad(tokens, (0, row_len - tokens.shape[1]), value=pad)
    keep = F.pad(keep, (0, row_len - keep.shape[1]), value=False)
    labels = tokens[:, 1:].masked_fill(~keep[:, 1:], -100)
    return tokens, labels


def assistant_loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor,
                   teacher: torch.nn.Module | None = None, kd_alpha: float = 0.0, kd_temperature: float = 1.0
                   ) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over labelled (assistant) tokens, and their count.

    With a teacher (logit distillation, Hinton et al.): (1-α)·CE + α·τ²·KL(p_teacher,τ || p_student,τ) on the
    same positions, where p_τ = softmax(logits / τ); τ² keeps the gradient scale independent of τ."""
    logits = model(tokens[:, :-1])
    n = int((labels != -100).sum())
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    loss = loss / max(1, n)
    if teacher is None or kd_alpha == 0:
        return loss, n
    with torch.no_grad():
        target = (teacher(tokens[:, :-1]).float() / kd_temperature).log_softmax(-1)
    student = (logits.float() / kd_temperature).log_softmax(-1)
    kl = F.kl_div(student, target, log_target=True, reduction="none").sum(-1)  # [B, T]
    kd = (kl * (labels != -100)).sum() / max(1, n) * kd_temperature**2
    return (1 - kd_alpha) * loss + kd_alpha * kd, n


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        loss, n = assistant_loss(model, tokens[i:i + batch], labels[i:i + batch])
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(1, count)


# --- the stage ----------------------------------------------------------------------------------------------

def default_data(recipe: dict[str, Any], name: str) -> Path:
    """The built-in data set's curated training set `name` (sft.jsonl, rl.jsonl), building the data set if
    needed."""
    from nanoseek.data.builtin import DataConfig, cached, training_set

    cfg = from_dict(DataConfig, recipe.get("data"), "data")
    cfg.validate()
    return training_set(cached(cfg), name)


class SFTStage(Stage):
    """Packed conversations in the recipe's style mix, a fresh seeded order each epoch; loss on assistant tokens."""

    def __init__(self, cfg: SFTConfig, model: torch.nn.Module, tokenizer: Tokenizer, train: list[Example],
                 val: list[Example], device: torch.device, teacher: torch.nn.Module | None):
        self.cfg, self.model, self.tok, self.train, self.device, self.teacher = cfg, model, tokenizer, train, device, \
            teacher
        self.val = pack(val, cfg.seq_len + 1, tokenizer.pad_id) if val else None
        self.epoch, self.cursor = 0, 0  # cursor: the next row of this epoch's packed rows
        self.tokens, self.labels = self.epoch_rows(0)

    def epoch_rows(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        order = mixed_order(self.train, self.cfg.mix, len(self.train), random.Random(self.cfg.seed * 1000 + epoch))
        return pack(order, self.cfg.seq_len + 1, self.tok.pad_id)

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.cursor >= len(self.tokens):
            self.epoch, self.cursor = self.epoch + 1, 0
            self.tokens, self.labels = self.epoch_rows(self.epoch)
        rows = slice(self.cursor, self.cursor + self.cfg.batch_size)
        self.cursor += self.cfg.batch_size
        loss, n = assistant_loss(self.model, self.tokens[rows].to(self.device), self.labels[rows].to(self.device),
                                 self.teacher, self.cfg.kd_alpha, self.cfg.kd_temperature)
        return loss, {"tokens": n, "epoch": self.epoch}

    def validate(self) -> dict[str, Any]:
        if self.val is None:
            return {}
        tokens, labels = self.val
        return {"val_loss": validation_loss(self.model, tokens.to(self.device), labels.to(self.device),
                                            self.cfg.batch_size)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any], checkpoint: Path) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.tokens, self.labels = self.epoch_rows(self.epoch)


def sft(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None,
        data: Sequence[str | Path] | None = None, resume: bool = False, progress: bool = True,
        section: str = "sft", teacher: torch.nn.Module | None = None) -> Path:
    """Fine-tune `init` (default: recipe [sft].init) on conversations; returns the final checkpoint directory.
    `section` names the recipe table, so a recipe can hold several SFT stages (R1: cold start, then SFT on
    rejection samples); `teacher` (same tokenizer) enables logit distillation with the table's kd_alpha."""
    cfg, out, init = prepare(SFTConfig, recipe, section, out_dir, init, resume)
    paths = [Path(p) for p in (data or cfg.data)] or [default_data(recipe, "sft.jsonl")]
    with threads(cfg.threads):
        policy = start(cfg, init)
        examples, skipped = load_examples(paths, policy.tokenizer, cfg.seq_len + 1, cfg.skip_invalid)
        if note := skipped_note(skipped, "conversations", cfg.seq_len + 1):
            print(f"{section}: {note}", file=sys.stderr)
        train, val = split_validation(examples, cfg.val_fraction, cfg.seed)
        if not train:
            raise ValueError(f"no usable training conversations in {[str(p) for p in paths]}"
                             + (note and f" ({note})"))
        stage = SFTStage(cfg, policy.model, policy.tokenizer, train, val, pick_device(cfg.device), teacher)
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(stage.tokens) / cfg.batch_size))
        optimizer = build_optimizer(policy.model, cfg.lr, cfg.weight_decay)
        recipe = {**recipe, section: asdict(cfg) | {"init": init, "data": [str(p) for p in paths]}}
        data_event = {"train_conversations": len(train), "val_conversations": len(val),
                      "rows_per_epoch": len(stage.tokens), "skipped": skipped}
        return run(stage, cfg, out, section, recipe, policy, optimizer, total, cfg.val_every, resume, progress,
                   data=data_event)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "sft")
    parser.add_argument("--data", action="append", help="conversation JSONL file (repeatable; default: built-in)")
    parser.add_argument("--section", default="sft", help="recipe table to read (default sft)")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    ckpt = sft(recipe, args.out, args.init, args.data, args.resume, not args.no_progress, args.section)
    print(f"final checkpoint: {ckpt}")
    return 0
