"""Held-out image tasks: greedy answers of a VL model to image questions, scored by the rewards' answer check,
per task with 95% bootstrap intervals (the evaluator's `bootstrap_ci`).

Records are the built-in image sets' (`{"image", "question", "answer", "task"}`); a task's score is the share of
its questions answered exactly (numbers compare as numbers, words case-folded: `rewards.answers_equal`).
Answers come from `nanoseek.infer.vl.answer_images` (greedy).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanoseek.data.curate.images import open_image
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.metrics import bootstrap_ci
from nanoseek.infer.vl import answer_images
from nanoseek.model.vl import VLModel
from nanoseek.rewards import answers_equal


def evaluate_images(model: VLModel, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], root: str | Path = ".",
                    batch: int = 64) -> dict[str, Any]:
    """{"tasks": {task: {"n", "accuracy", "ci95"}}, "samples": [...]} over the records (image paths under root)."""
    was_training = model.training
    model.eval()
    images = [open_image(Path(root) / r["image"]) for r in records]
    answers = [text for _, _, text in answer_images(model, tokenizer, [r["question"] for r in records], images,
                                                    batch=batch)]
    model.train(was_training)
    scores: dict[str, list[float]] = defaultdict(list)
    samples = []
    for r, a in zip(records, answers, strict=True):
        ok = answers_equal(a.rstrip("."), r["answer"].rstrip("."))
        scores[r["task"]].append(float(ok))
        samples.append({"task": r["task"], "question": r["question"], "answer": r["answer"], "output": a,
                        "correct": ok})
    tasks = {t: {"n": len(s), "accuracy": sum(s) / len(s), "ci95": list(bootstrap_ci(s))}
             for t, s in sorted(scores.items())}
    return {"tasks": tasks, "samples": samples}
