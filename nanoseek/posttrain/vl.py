"""VL training stages on the one post-training loop: assembling a VL model from a text checkpoint, projector
alignment and joint VL fine-tuning (a `Stage` whose loss is SFT's `assistant_loss` with the batch's images).

    build_vl(text_ckpt, out, preset)   text LM + tokenizer with `<image>` + a SigLIP tower + a fresh projector
    vl_train(recipe, out, section=...) e.g. [vl_align] train = ["projector"]: vision and language frozen
                                            [vl_sft]   train = ["projector", "vision"] (+ "language")

Data: JSONL of `{"image": path, "messages": [...]}` or `{"image": path, "text": ...}` (a caption: the user turn is
the image alone), paths relative to the file; each conversation holds one `<image>` (prepended to its first user
turn when it has none). Examples of a batch are packed into rows like SFT's (`pack`), their images in the same
reading order, which is the order the model's embedding consumes them in. Resume is not supported: an interrupted
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
from nanoseek.model.vision import load_vision, to_pixels
from nanoseek.model.vl import VLModel, vl_preset
from nanoseek.posttrain.loop import Stage, TrainConfig, prepare, run, start, threads
from nanoseek.posttrain.sft import Example, assistant_loss, pack, validate_messages
from nanoseek.posttrain.stage import load_policy, skipped_note, split_validation
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
                image_path = Path(record.get("image", ""))
                image = open_image(image_path if image_path.is_absolute() else path.parent / image_path)
            except (ValueError, TypeError):
                skipped["invalid"] += 1
                continue
            text = "".join(m["content"] for m in messages if m["role"] != "assistant")
            if text.count(IMAGE_TOKEN) > 1:
                skipped["invalid"] += 1
                continue
            if IMAGE_TOKEN not in text:
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
    images = to_pixels([e.image for e in examples], model.vl_config.vision.image_size).to(device)
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
