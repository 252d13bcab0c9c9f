"""Preference pairs for DPO and the reward model: reading them, tokenising them, and building them from
verified samples (a correct and an incorrect answer to the same prompt).

A record is `{"prompt": ..., "chosen": ..., "rejected": ...}` where the prompt is a string (one user turn) or
a list of chat messages ending with a user turn, and each side is the assistant's reply as a string. Both sides
are rendered with the chat template, so a pair is two conversations that differ only in the last reply; the
reply's tokens (with its EOS) are the scored positions.

A record missing a field, with an empty side, a prompt that does not end with a user turn, malformed turns (as
`sft.validate_messages` defines them) or the same reply on both sides is an error naming the file and line, or
with skip_invalid a counted skip; a pair longer than the token limit is skipped and counted.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import read_jsonl
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.rollout import Prompt, Sample, Sampler, is_correct
from nanoseek.posttrain.sft import validate_messages
from nanoseek.posttrain.stage import pad_right, skipped_note, split_validation


@dataclass
class Pair:
    chosen: tuple[list[int], list[int]]  # (ids, mask of the reply's tokens)
    rejected: tuple[list[int], list[int]]


def _messages(prompt: Any, reply: Any, where: str, side: str) -> list[dict[str, str]]:
    """The conversation of one side: the prompt's turns, then `reply`: the assistant's reply as a string, or its
    turns as a list of messages (TRL's conversational preference format, which `nanoseek feedback export`
    writes)."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of messages, got {prompt!r:.80}")
    if isinstance(prompt[-1], dict) and prompt[-1].get("role") in ("system", "assistant"):
        raise ValueError(f"{where}: 'prompt' must end with a user message (the reply answers it)")
    if isinstance(reply, list) and reply:
        messages = [*prompt, *reply]
    elif isinstance(reply, str) and reply.strip():
        messages = [*prompt, {"role": "assistant", "content": reply}]
    else:
        raise ValueError(f"{where}: '{side}' must be a non-empty string or a list of messages "
                         f"(the assistant's reply)")
    validate_messages(messages, where)
    return messages


def load_pairs(path: str | Path, tokenizer: Tokenizer, max_tokens: int, skip_invalid: bool = False
               ) -> tuple[list[Pair], dict[str, int]]:
    """Tokenised pairs, and counts of records skipped (invalid, or longer than max_tokens)."""
    pairs: list[Pair] = []
    skipped = {"invalid": 0, "too_long": 0}
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        try:
            missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
            if missing:
                raise ValueError(f"{where}: missing {missing} (a pair needs prompt, chosen and rejected)")
            chosen = _messages(record["prompt"], record["chosen"], where, "chosen")
            rejected = _messages(record["prompt"], record["rejected"], where, "rejected")
            if record["chosen"] == record["rejected"]:  # no preference to learn, the loss has no gradient
                raise ValueError(f"{where}: 'chosen' and 'rejected' are the same reply")
        except ValueError:
            if not skip_invalid:
                raise
            skipped["invalid"] += 1
            continue
        c, r = tokenizer.encode_chat(chosen), tokenizer.encode_chat(rejected)
        if max(len(c[0]), len(r[0])) > max_tokens:
            skipped["too_long"] += 1
            continue
        pairs.append(Pair(c, r))
    return pairs, skipped


def pair_batch(pairs: Sequence[Pair], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [2B, T] (chosen rows, then rejected rows) and the reply mask [2B, T]."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return pad_right([ids for ids, _ in rows], pad), pad_right([m for _, m in rows], 0)


def pair_samples(groups: Sequence[Sequence[Sample]], rng: random.Random) -> list[dict[str, Any]]:
    """One (correct, incorrect) pair per group of samples of the same prompt that has both; truncated samples
    are never the rejected side (their fault is length, not the answer). Records in `load_pairs`'s format,
    with the question as the user turn."""
    records = []
    for group in groups:
        right = [s for s in group if is_correct(s)]
        wrong = [s for s in group if not s.truncated and not is_correct(s)]
        if right and wrong:
            columns = group[0].prompt.columns
            records.append({"prompt": columns["question"], "chosen": rng.choice(right).text,
                            "rejected": rng.choice(wrong).text, "answer": columns["answer"]})
    return records


def verified_pairs(sampler: Sampler, prompts: Sequence[Prompt], k: int, temperature: float = 1.0,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Sample k completions per prompt, grade them, and pair a correct with an incorrect one per prompt
    (prompts the model always or never solves give no pair)."""
    return pair_samples(sampler.sample(prompts, k, temperature, seed=seed), random.Random(seed))


def pair_splits(path: str | Path, tokenizer: Tokenizer, max_tokens: int, skip_invalid: bool, val_fraction: float,
                seed: int, stage: str) -> tuple[list[Pair], list[Pair], dict[str, int]]:
    """(train, validation, skipped counts) of a preference file for `stage` (DPO, the reward model): what was
    skipped is reported on stderr, and a file with nothing left to train on is an error naming it."""
    pairs, skipped = load_pairs(path, tokenizer, max_tokens, skip_invalid)
    if note := skipped_note(skipped, "pairs", max_tokens):
        print(f"{stage}: {note}", file=sys.stderr)
    train, val = split_validation(pairs, val_fraction, seed)
    if not train:
        raise ValueError(f"{path}: no usable preference pairs" + (note and f" ({note})"))
    return train, val, skipped
