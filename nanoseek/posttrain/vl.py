"""VL training stages on the one post-training loop: assembling a VL model from a text checkpoint, projector
alignment and joint VL fine-tuning (SFT's `assistant_loss` with the batch's images), GRPO on image questions.

    build_vl(text_ckpt, out, preset)   text LM + tokenizer with `<image>` + a SigLIP tower + a fresh projector
    vl_train(recipe, out, section=...) e.g. [vl_align] train = ["projector"]: vision and language frozen
                                            [vl_sft]   train = ["projector", "vision"] (+ "language")
    vl_grpo(recipe, out)               [vl_grpo]: GRPO on verifiable image questions (chart QA, counting)

GRPO here is on-policy (μ = 1, no reference model): each step samples `num_generations` answers to each of
`prompts_per_step` image questions, rewards them with the rewards' `accuracy_reward` (a direct answer is its
whole text: it is read as `<answer>text</answer>`), normalises within each group (`group_advantages`) and takes one
step on `grpo_loss`. A step whose groups all have equal rewards has no signal and makes no optimizer step.

Data: JSONL of `{"image": path, "messages": [...]}` or `{"image": path, "text": ...}` (a caption: the user turn is
the image alone), paths relative to the file; each conversation holds one `<image>` (prepended to its first user
turn when it has none). A record without an image is a text conversation: mixing the text model's SFT set in
(text replay) keeps a language model that trains on images from forgetting its text tasks. Examples of a batch
are packed into rows like SFT's (`pack`), their images in the same reading order, which is the order the model's
embedding consumes them in. Resume is not supported: an interrupted
VL stage starts again (the checkpoint loader reads text checkpoints).
"""

from __future__ import annotations

import functools
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import pick_device, read_jsonl
from nanoseek.data.curate.images import open_image
from nanoseek.data.tokenizer import IMAGE_TOKEN, Tokenizer
from nanoseek.infer.vl import answer_images
from nanoseek.model.vision import load_vision, to_pixels
from nanoseek.model.vl import VLModel, vl_preset
from nanoseek.posttrain.loop import Stage, TrainConfig, prepare, run, start, threads
from nanoseek.posttrain.losses import group_advantages, grpo_loss
from nanoseek.posttrain.sft import Example, assistant_loss, pack, validate_messages
from nanoseek.posttrain.stage import load_policy, pad_right, sequence_logps, skipped_note, split_validation
from nanoseek.rewards import accuracy_reward
from nanoseek.train.optim import build_optimizer

PARTS = ("projector", "vision", "language")


@dataclass
class VLTrainConfig(TrainConfig):
    data: list[str] = field(default_factory=list)  # image–text JSONL files (the pipeline passes its curated set)
    train: list[str] = field(default_factory=lambda: ["projector"])  # parts trained; the others are frozen
    seq_len: int = 256  # tokens per packed row (image tokens included)
    batch_size: int = 16  # conversations per optimizer step
    epochs: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 10
    val_fraction: float = 0.05
    val_every: int = 50

    def validate(self, section: str = "vl") -> None:
        super().validate(section)
        unknown = sorted(set(self.train) - set(PARTS))
        if unknown or not self.train:
            raise ValueError(f"[{section}] train={self.train}: name one or more of {PARTS}")
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"[{section}] {name}={getattr(self, name)} must be >= 1")
        if self.epochs <= 0 or self.val_every < 0 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"[{section}] need epochs > 0, val_every >= 0 and 0 <= val_fraction < 1")


def build_vl(text_ckpt: str | Path, out: str | Path, preset: str = "vl-tiny", vision_init: str | Path | None = None,
             seed: int = 0) -> Path:
    """A VL checkpoint from a text checkpoint: its tokenizer gains `<image>` (the embedding and head grow by a row,
    the mean of the others, when the id is new to the model), its language model is kept as is, the tower is
    `vision_init` (a SigLIP directory) or freshly initialised, the projector fresh."""
    policy = load_policy(text_ckpt, train=False)
    lm, tok = policy.model, policy.tokenizer.add_image_token()
    if isinstance(lm, VLModel):
        raise ValueError(f"{text_ckpt}: already a VL checkpoint")
    state = lm.state_dict()
    language = lm.config
    if tok.image_id >= language.vocab_size:
        grow = tok.image_id + 1 - language.vocab_size
        language = language.replace(vocab_size=tok.image_id + 1)
        for name in ("embed.weight", "head.weight"):
            state[name] = torch.cat([state[name], state[name].mean(0, keepdim=True).expand(grow, -1)])
    torch.manual_seed(seed)
    cfg = vl_preset(preset, tok.image_id, language)
    vision = load_vision(vision_init) if vision_init else None
    if vision is not None:
        cfg.vision = vision.config
    model = VLModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("vision.", "projector.")) for k in missing):
        raise RuntimeError(f"language weights do not fit the VL model: {unexpected[:4]} {missing[:4]}")
    if vision is not None:
        model.vision = vision
    model.save_pretrained(out)
    tok.save(out)
    return Path(out)


@dataclass
class VLExample(Example):
    image: Any = None  # the decoded PIL image


def load_vl_examples(paths: Sequence[str | Path], tokenizer: Tokenizer, image_tokens: int, max_tokens: int
                     ) -> tuple[list[VLExample], dict[str, int]]:
    """Tokenised image conversations (one image each), and counts of what was skipped: a record without a
    readable image or with invalid messages, or one longer than max_tokens."""
    examples, skipped = [], {"invalid": 0, "too_long": 0}
    for path in map(Path, paths):
        for line, record in read_jsonl(path):
            where = f"{path}:{line}"
            messages = record.get("messages")
            if messages is None and isinstance(record.get("text"), str):
                messages = [{"role": "user", "content": IMAGE_TOKEN}, {"role": "assistant", "content": record["text"]}]
            try:
                validate_messages(messages, where)
                image = None
                if "image" in record:  # a record without one is a text conversation (text replay)
                    image_path = Path(record["image"])
                    image = open_image(image_path if image_path.is_absolute() else path.parent / image_path)
            except (ValueError, TypeError):
                skipped["invalid"] += 1
                continue
            text = "".join(m["content"] for m in messages if m["role"] != "assistant")
            if text.count(IMAGE_TOKEN) > (image is not None):
                skipped["invalid"] += 1  # at most one placeholder with an image, none in a text conversation
                continue
            if image is not None and IMAGE_TOKEN not in text:
                i = next(i for i, m in enumerate(messages) if m["role"] == "user")
                messages = [*messages[:i], {**messages[i], "content": f"{IMAGE_TOKEN}\n{messages[i]['content']}"},
                            *messages[i + 1:]]
            ids, mask = tokenizer.encode_chat(messages, image_tokens=image_tokens)
            if len(ids) > max_tokens:
                skipped["too_long"] += 1
                continue
            examples.append(VLExample(ids, mask, "instruct", image))
    return examples, skipped


def vl_loss(model: VLModel, examples: Sequence[VLExample], row_len: int, pad: int, device: torch.device
            ) -> tuple[torch.Tensor, int]:
    """SFT's assistant-token loss on `examples` packed into rows, each image over its own placeholders."""
    tokens, labels = pack(examples, row_len, pad)
    pil = [e.image for e in examples if e.image is not None]
    images = to_pixels(pil, model.vl_config.vision.image_size).to(device) if pil else None
    return assistant_loss(functools.partial(model, images=images), tokens.to(device), labels.to(device))


def set_trainable(model: VLModel, parts: Sequence[str]) -> None:
    """Freeze everything but `parts` (MTP stays frozen, as in every post-training stage)."""
    model.requires_grad_("language" in parts)
    model.vision.requires_grad_("vision" in parts)
    model.projector.requires_grad_("projector" in parts)
    model.mtp.requires_grad_(False)


class VLStage(Stage):
    def __init__(self, cfg: VLTrainConfig, model: VLModel, tokenizer: Tokenizer, train: list[VLExample],
                 val: list[VLExample], device: torch.device):
        self.cfg, self.model, self.tok, self.train, self.val, self.device = cfg, model, tokenizer, train, val, device
        self.order: list[VLExample] = []
        self.epoch = -1

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not self.order:
            self.epoch += 1
            self.order = list(self.train)
            random.Random(self.cfg.seed * 1000 + self.epoch).shuffle(self.order)
        batch, self.order = self.order[:self.cfg.batch_size], self.order[self.cfg.batch_size:]
        loss, n = vl_loss(self.model, batch, self.cfg.seq_len + 1, self.tok.pad_id, self.device)
        return loss, {"tokens": n, "epoch": self.epoch}

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        if not self.val:
            return {}
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.val), self.cfg.batch_size):
            loss, n = vl_loss(self.model, self.val[i:i + self.cfg.batch_size], self.cfg.seq_len + 1,
                              self.tok.pad_id, self.device)
            total, count = total + loss.item() * n, count + n
        self.model.train()
        return {"val_loss": total / max(1, count)}


def vl_train(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None,
             data: Sequence[str | Path] | None = None, section: str = "vl_sft", progress: bool = True) -> Path:
    """Train the recipe table `section`'s parts of the VL model `init` on image conversations; returns the final
    checkpoint (a VL directory, with the tokenizer)."""
    cfg, out, init = prepare(VLTrainConfig, recipe, section, out_dir, init, resume=False)
    paths = [Path(p) for p in (data or cfg.data)]
    if not paths:
        raise ValueError(f"[{section}] data: no image–text JSONL files")
    with threads(cfg.threads):
        policy = start(cfg, init)
        model = policy.model
        if not isinstance(model, VLModel):
            raise ValueError(f"[{section}] init={init}: not a VL checkpoint (build one with build_vl)")
        examples, skipped = load_vl_examples(paths, policy.tokenizer, model.vl_config.image_tokens, cfg.seq_len + 1)
        if "language" not in cfg.train:  # a text conversation gives a frozen language model no gradient
            examples = [e for e in examples if e.image is not None]
        if note := skipped_note(skipped, "image conversations", cfg.seq_len + 1):
            print(f"{section}: {note}", file=sys.stderr)
        train, val = split_validation(examples, cfg.val_fraction, cfg.seed)
        if not train:
            raise ValueError(f"no usable image conversations in {[str(p) for p in paths]}")
        set_trainable(model, cfg.train)
        stage = VLStage(cfg, model, policy.tokenizer, train, val, pick_device(cfg.device))
        total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        recipe = {**recipe, section: asdict(cfg) | {"init": init, "data": [str(p) for p in paths]}}
        data_event = {"train_conversations": len(train), "val_conversations": len(val), "skipped": skipped,
                      "trainable_params": trainable}
        return run(stage, cfg, out, section, recipe, policy, optimizer, total, cfg.val_every, False, progress,
                   data=data_event, validate_first=True)


@dataclass
class VLGRPOConfig(TrainConfig):
    data: list[str] = field(default_factory=list)  # image question JSONL ({image, question, answer, task})
    tasks: list[str] = field(default_factory=lambda: ["chart_largest", "chart_value", "shapes_count"])
    train: list[str] = field(default_factory=lambda: ["projector", "vision"])
    prompts_per_step: int = 8
    num_generations: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    scale_rewards: str = "group"
    lr: float = 1e-4
    max_steps: int = 20

    def validate(self, section: str = "vl_grpo") -> None:
        super().validate(section)
        if sorted(set(self.train) - set(PARTS)) or not self.train:
            raise ValueError(f"[{section}] train={self.train}: name one or more of {PARTS}")
        for name in ("prompts_per_step", "num_generations", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"[{section}] {name}={getattr(self, name)} must be >= 1")
        if self.num_generations < 2:
            raise ValueError(f"[{section}] num_generations={self.num_generations}: a group needs 2 or more")
        if self.temperature <= 0:
            raise ValueError(f"[{section}] temperature={self.temperature} must be > 0 (GRPO samples)")


class VLGRPOStage(Stage):
    def __init__(self, cfg: VLGRPOConfig, model: VLModel, tokenizer: Tokenizer, pool: list[dict[str, Any]],
                 device: torch.device):
        self.cfg, self.model, self.tok, self.pool, self.device = cfg, model, tokenizer, pool, device
        self.rng = random.Random(cfg.seed)

    def train_step(self, step: int, optimizer_step) -> dict[str, Any]:
        cfg, G = self.cfg, self.cfg.num_generations
        picks = self.rng.sample(self.pool, min(cfg.prompts_per_step, len(self.pool)))
        questions = [r["question"] for r in picks for _ in range(G)]
        images = [r["pil"] for r in picks for _ in range(G)]
        golds = [r["answer"] for r in picks for _ in range(G)]
        self.model.eval()
        outs = answer_images(self.model, self.tok, questions, images, cfg.max_new_tokens, cfg.temperature,
                             seed=cfg.seed * 100_003 + step)
        self.model.train()
        rewards = accuracy_reward([f"<answer>{text}</answer>" for _, _, text in outs], answer=golds)
        advantages, zero_std = group_advantages(torch.tensor(rewards), G, cfg.scale_rewards)
        metrics = {"reward": sum(rewards) / len(rewards), "frac_reward_zero_std": float(zero_std.float().mean()),
                   "completion_length": sum(len(c) for _, c, _ in outs) / len(outs)}
        if bool(zero_std.all()):
            return {**metrics, "loss": 0.0, "no_signal": 1}
        ids = pad_right([p + c for p, c, _ in outs], self.tok.pad_id).to(self.device)
        target = pad_right([[0] * len(p) + [1] * len(c) for p, c, _ in outs], 0).to(self.device)
        pixels = to_pixels(images, self.model.vl_config.vision.image_size).to(self.device)
        logps, mask = sequence_logps(functools.partial(self.model, images=pixels), ids, target)
        loss, stats = grpo_loss(logps, None, advantages.to(self.device), mask)
        loss.backward()
        return {**metrics, "loss": loss.item(), "no_signal": 0, "clip_frac": float(stats["clip_frac"]),
                "grad_norm": optimizer_step()}

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.3f}"}


def vl_grpo(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None,
            data: Sequence[str | Path] | None = None, section: str = "vl_grpo", progress: bool = True) -> Path:
    """GRPO of the VL model `init` on the recipe's image question tasks; returns the final checkpoint."""
    cfg, out, init = prepare(VLGRPOConfig, recipe, section, out_dir, init, resume=False)
    paths = [Path(p) for p in (data or cfg.data)]
    pool = []
    for path in paths:
        for _, r in read_jsonl(path):
            if r.get("task") in cfg.tasks and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str):
                image = Path(r["image"])
                pool.append({**r, "pil": open_image(image if image.is_absolute() else path.parent / image)})
    if not pool:
        raise ValueError(f"[{section}] no image questions of tasks {cfg.tasks} in {[str(p) for p in paths]}")
    with threads(cfg.threads):
        policy = start(cfg, init)
        if not isinstance(policy.model, VLModel):
            raise ValueError(f"[{section}] init={init}: not a VL checkpoint")
        set_trainable(policy.model, cfg.train)
        stage = VLGRPOStage(cfg, policy.model, policy.tokenizer, pool, pick_device(cfg.device))
        optimizer = build_optimizer(policy.model, cfg.lr, cfg.weight_decay)
        recipe = {**recipe, section: asdict(cfg) | {"init": init, "data": [str(p) for p in paths]}}
        return run(stage, cfg, out, section, recipe, policy, optimizer, cfg.max_steps, 0, False, progress,
                   data={"prompts": len(pool)})
