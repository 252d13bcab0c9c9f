"""Held-out image tasks: greedy answers of a VL model to image questions, scored by the rewards' answer check,
per task with 95% bootstrap intervals (the evaluator's `bootstrap_ci`).

Records are the built-in image sets' (`{"image", "question", "answer", "task"}`); a task's score is the share of
its questions answered exactly (numbers compare as numbers, words case-folded: `rewards.answers_equal`).
Prompts of equal length are generated together; the direct-answer generation prompt (`thinking=False`) is the
one the VL conversations were trained with.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.curate.images import open_image
from nanoseek.data.tokenizer import IMAGE_TOKEN, Tokenizer
from nanoseek.eval.metrics import bootstrap_ci
from nanoseek.model.vision import to_pixels
from nanoseek.model.vl import VLModel
from nanoseek.rewards import answers_equal


def answer_prompt(tokenizer: Tokenizer, question: str, image_tokens: int) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}], True, False,
                                 image_tokens=image_tokens)[0]


@torch.no_grad()
def answer_images(model: VLModel, tokenizer: Tokenizer, questions: Sequence[str], images: Sequence[Any],
                  max_new_tokens: int = 24, batch: int = 64) -> list[str]:
    """Greedy answers, one per (question, PIL image)."""
    n = model.vl_config.image_tokens
    prompts = [answer_prompt(tokenizer, q, n) for q in questions]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out = [""] * len(prompts)
    size = model.vl_config.vision.image_size
    device = next(model.parameters()).device
    for idx in by_length.values():
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            pixels = to_pixels([images[i] for i in chunk], size).to(device)
            seqs = model.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_id, images=pixels)
            for i, row in zip(chunk, seqs[:, ids.shape[1]:].tolist()):
                row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                out[i] = tokenizer.decode(row, skip_special=True).strip()
    return out


def evaluate_images(model: VLModel, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], root: str | Path = ".",
                    batch: int = 64) -> dict[str, Any]:
    """{"tasks": {task: {"n", "accuracy", "ci95"}}, "samples": [...]} over the records (image paths under root)."""
    was_training = model.training
    model.eval()
    images = [open_image(Path(root) / r["image"]) for r in records]
    answers = answer_images(model, tokenizer, [r["question"] for r in records], images, batch=batch)
    model.train(was_training)
    scores: dict[str, list[float]] = defaultdict(list)
    samples = []
    for r, a in zip(records, answers):
        ok = answers_equal(a.rstrip("."), r["answer"].rstrip("."))
        scores[r["task"]].append(float(ok))
        samples.append({"task": r["task"], "question": r["question"], "answer": r["answer"], "output": a,
                        "correct": ok})
    tasks = {t: {"n": len(s), "accuracy": sum(s) / len(s), "ci95": list(bootstrap_ci(s))}
             for t, s in sorted(scores.items())}
    return {"tasks": tasks, "samples": samples}
