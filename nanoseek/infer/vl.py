"""Answers of a VL model to image questions: the prompt (the chat template with `<image>` expanded, then the
direct-answer generation prompt) and batched generation, greedy for evaluation or sampled for GRPO.

Prompts of equal length share a batch: `VLModel.generate` decodes a batch through the latent cache without a
padding mask, so rows are grouped by length instead of padded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from nanoseek.data.tokenizer import IMAGE_TOKEN, Tokenizer
from nanoseek.model.vision import to_pixels
from nanoseek.model.vl import VLModel


def image_prompt(tokenizer: Tokenizer, question: str, image_tokens: int) -> list[int]:
    """`<|bos|><|user|><image>×n\\nquestion<|assistant|></think>\\n`: the turn the VL conversations train."""
    return tokenizer.encode_chat([{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}], True, False,
                                 image_tokens=image_tokens)[0]


@torch.no_grad()
def answer_images(model: VLModel, tokenizer: Tokenizer, questions: Sequence[str], images: Sequence[Any],
                  max_new_tokens: int = 24, temperature: float = 0.0, seed: int | None = None, batch: int = 64
                  ) -> list[tuple[list[int], list[int], str]]:
    """(prompt ids, completion ids up to and with EOS, answer text) per (question, PIL image)."""
    n = model.vl_config.image_tokens
    prompts = [image_prompt(tokenizer, q, n) for q in questions]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_length[len(p)].append(i)
    out: list[tuple[list[int], list[int], str]] = [([], [], "")] * len(prompts)
    size = model.vl_config.vision.image_size
    device = next(model.parameters()).device
    for g, idx in enumerate(by_length.values()):
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            pixels = to_pixels([images[i] for i in chunk], size).to(device)
            seqs = model.generate(ids, max_new_tokens, temperature, eos_token_id=tokenizer.eos_id, images=pixels,
                                  seed=None if seed is None else seed + 1000 * g + s)
            for i, row in zip(chunk, seqs[:, ids.shape[1]:].tolist(), strict=True):
                row = row[:row.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in row else row
                out[i] = (prompts[i], row, tokenizer.decode(row, skip_special=True).strip())
    return out
