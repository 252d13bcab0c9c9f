"""`nanoseek rejection`: rejection sampling, stage 3 of DeepSeek-R1: turn an RL checkpoint into clean SFT data.

    nanoseek rejection --recipe r1 --init runs/r1-rl --out runs/rejection

k samples per training prompt; a sample is kept only if it is correct AND readable: well formatted, not
truncated or overlong, written in the target language, without repeated n-grams, code blocks or run-on
paragraphs (R1 dropped "mixed languages, long paragraphs, and code blocks"). At most `keep_per_prompt`
distinct kept answers per prompt. Instruct (non-reasoning) conversations are then mixed in so the next SFT
keeps its direct-answer skills (R1: ~600k reasoning + ~200k non-reasoning samples), and so are game transcripts
(the optimal player's moves with their reasoning, checked by the game's rules like the built-in data's) so a
student distilled from the output still plays legal moves: the teacher is sampled on the RL tasks only.

Writes OUT/samples.jsonl (what was selected and mixed in), OUT/curated/ (its curation: manifest, data card, what
was removed and why), OUT/sft.jsonl (the curated records, for `nanoseek sft`) and OUT/rejection.json (why every
sample was dropped, and the curation's counts).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nanoseek.common import pick_device, read_jsonl, write_json, write_jsonl
from nanoseek.config import from_dict, load_recipe
from nanoseek.data.curate import curate_set
from nanoseek.data.synth import make_problems
from nanoseek.data.synth.games import GAMES
from nanoseek.data.tokenizer import CONTROL_TOKENS
from nanoseek.infer.rollout import TEMPLATES, Prompt, Sample, Sampler, is_correct, problem_prompt, record_prompt
from nanoseek.posttrain.sft import record_style
from nanoseek.posttrain.stage import add_stage_arguments, load_policy
from nanoseek.rewards import format_reward, language_consistency_reward, repetition_penalty


@dataclass
class FilterConfig:
    """What a kept sample must satisfy (besides being correct)."""

    max_tokens: int = 0  # overlong above this many completion tokens (0: only truncation counts)
    language: str = "en"
    min_language: float = 0.95  # share of the reasoning's words in the target language
    max_repetition: float = 0.1  # share of repeated word 3-grams allowed
    max_paragraph_chars: int = 600  # a longer run of text without a line break is a run-on paragraph
    require_format: bool = True


@dataclass
class SamplingConfig:
    """Sampling a model on prompts and keeping its verified, clean answers: what rejection sampling and
    distillation share."""

    template: str = "chat"
    tasks: dict[str, float] = field(default_factory=lambda: {"arithmetic": 1.0})
    difficulty: list[int] = field(default_factory=lambda: [1, 2])
    data: str = ""  # JSONL prompts (question, answer, ...) instead of built-in tasks
    prompts: int = 256
    samples: int = 4  # k per prompt
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 128
    keep_per_prompt: int = 1
    filters: FilterConfig = field(default_factory=FilterConfig)
    seed: int = 0
    device: str = "auto"

    def validate(self, section: str) -> None:
        """Refuse values sampling cannot run with, naming the field."""
        for name in ("prompts", "samples", "max_new_tokens", "keep_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"[{section}] {name}={getattr(self, name)!r}: must be >= 1")
        if self.template not in TEMPLATES:
            raise ValueError(f"[{section}] template={self.template!r}: expected one of {TEMPLATES}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"[{section}] need temperature >= 0 and 0 < top_p <= 1")
        if not self.data and (not self.tasks or any(w < 0 for w in self.tasks.values())):
            raise ValueError(f"[{section}] tasks={self.tasks!r}: weights >= 0 over at least one task")
        if self.filters.max_tokens < 0 or not 0 <= self.filters.min_language <= 1:
            raise ValueError(f"[{section}] filters: need max_tokens >= 0 and 0 <= min_language <= 1")


@dataclass
class RejectionConfig(SamplingConfig):
    init: str = ""
    instruct_data: str = ""  # conversations to mix in; "" -> the built-in sft.jsonl
    instruct_fraction: float = 0.25  # share of its instruct conversations in the output
    game_fraction: float = 0.1  # share of its game transcripts (records whose task is a game) in the output

    def validate(self, section: str = "rejection") -> None:
        super().validate(section)
        if min(self.instruct_fraction, self.game_fraction) < 0 or self.instruct_fraction + self.game_fraction >= 1:
            raise ValueError(f"[{section}] instruct_fraction + game_fraction must be in [0, 1) with neither "
                             f"negative, got {self.instruct_fraction} + {self.game_fraction}")


def reject_reason(sample: Sample, f: FilterConfig) -> str | None:
    """Why a sample is dropped, or None to keep it. Checked in this order, first failure wins."""
    text = sample.text
    if sample.truncated or (f.max_tokens and len(sample.ids) > f.max_tokens):
        return "overlong"
    if not is_correct(sample):
        return "incorrect"
    if f.require_format and format_reward([text])[0] < 1:
        return "format"
    if language_consistency_reward([text], language=f.language)[0] < f.min_language:
        return "mixed_language"
    if -repetition_penalty([text], ngram_size=3, max_penalty=-1.0)[0] > f.max_repetition:
        return "repetition"
    if any(t in text for t in CONTROL_TOKENS):  # would fake a turn boundary in the next SFT stage's template
        return "control_token"
    if "```" in text:
        return "code_block"
    if any(len(line) > f.max_paragraph_chars for line in text.split("\n")):
        return "long_paragraph"
    return None


def select(groups: Sequence[Sequence[Sample]], f: FilterConfig, keep_per_prompt: int) -> tuple[list[Sample], Counter]:
    """Kept samples (distinct texts, at most keep_per_prompt per prompt) and a count per drop reason."""
    kept: list[Sample] = []
    counts: Counter = Counter()
    for group in groups:
        seen: set[str] = set()
        for s in group:
            reason = reject_reason(s, f)
            if reason is None and (s.text in seen or len(seen) >= keep_per_prompt):
                reason = "duplicate_or_surplus"
            counts[reason or "kept"] += 1
            if reason is None:
                seen.add(s.text)
                kept.append(s)
    return kept, counts


def sft_record(sample: Sample) -> dict[str, Any]:
    columns = sample.prompt.columns
    return {"messages": [{"role": "user", "content": columns["question"]},
                         {"role": "assistant", "content": sample.text}],
            "style": "reasoning", "task": columns.get("task", ""), "answer": columns["answer"], "origin": "rejection"}


def training_prompts(tokenizer, template: str, tasks: dict[str, float], difficulty: list[int], data: str, n: int,
                     seed: int) -> list[Prompt]:
    """n prompts from a JSONL file or from the built-in tasks' training split (shares by task weight)."""
    if data:
        prompts = [record_prompt(tokenizer, r, template, f"{data}:{i}") for i, r in read_jsonl(data)]
        random.Random(seed).shuffle(prompts)
        return prompts[:n]
    names = [t for t, w in tasks.items() if w > 0]
    total = sum(tasks[t] for t in names)
    out: list[Prompt] = []
    for t in names:
        count = max(1, round(n * tasks[t] / total))
        out += [problem_prompt(tokenizer, p, template)
                for p in make_problems(t, count, seed=seed + 7, difficulty=difficulty, split="train")]
    return out


def sample_and_select(sampler, prompts: Sequence[Prompt], k: int, temperature: float, top_p: float,
                      f: FilterConfig, keep_per_prompt: int, seed: int, progress: bool = True
                      ) -> tuple[list[Sample], Counter]:
    per_call = max(1, sampler.max_batch // k)
    kept: list[Sample] = []
    counts: Counter = Counter()
    for i in tqdm(range(0, len(prompts), per_call), desc="sampling", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        groups = sampler.sample(prompts[i:i + per_call], k, temperature, top_p, seed=seed + i)
        more, c = select(groups, f, keep_per_prompt)
        kept += more
        counts += c
    return kept, counts


def mixed_in_records(path: str | Path, kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    """n conversations of `kind` from a conversations file: "instruct" (direct answers) or "game" (records
    whose task is a game of nanoseek.data.synth.games), tagged with their kind as `origin`."""
    def wanted(r: dict[str, Any]) -> bool:
        return r.get("task") in GAMES if kind == "game" else record_style(r) == "instruct"

    records = [r for _, r in read_jsonl(path) if "messages" in r and wanted(r)]
    random.Random(seed).shuffle(records)
    return [{**r, "origin": kind} for r in records[:n]]


def rejection(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None,
              progress: bool = True) -> Path:
    """Sample from `init`, keep the clean correct samples, mix in instruct conversations and game transcripts;
    returns OUT/sft.jsonl."""
    cfg = from_dict(RejectionConfig, recipe.get("rejection"), "rejection")
    cfg.validate()
    init = str(init or cfg.init)
    if not init:
        raise ValueError("[rejection] init: no checkpoint to sample from (set it or pass --init)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = load_policy(init, pick_device(cfg.device), train=False)
    prompts = training_prompts(policy.tokenizer, cfg.template, cfg.tasks, cfg.difficulty, cfg.data, cfg.prompts,
                               cfg.seed)
    sampler = Sampler(policy.model, policy.tokenizer, max_batch=max(cfg.samples, 128),
                      max_new_tokens=cfg.max_new_tokens)
    kept, counts = sample_and_select(sampler, prompts, cfg.samples, cfg.temperature, cfg.top_p, cfg.filters,
                                     cfg.keep_per_prompt, cfg.seed, progress)
    records = [sft_record(s) for s in kept]
    added = {"instruct": 0, "game": 0}
    shares = {"instruct": cfg.instruct_fraction, "game": cfg.game_fraction}
    if any(shares.values()) and records:
        if cfg.instruct_data:
            source = Path(cfg.instruct_data)
        else:
            from nanoseek.posttrain.sft import default_data

            source = default_data(recipe, "sft.jsonl")
        rest = 1 - sum(shares.values())  # the kept samples' share of the output
        for kind, share in shares.items():
            extra = mixed_in_records(source, kind, round(len(kept) * share / rest), cfg.seed) if share > 0 else []
            added[kind] = len(extra)
            records += extra
    random.Random(cfg.seed).shuffle(records)
    write_jsonl(out / "samples.jsonl", records)
    # what distillation learns from passes curation like every training set: PII, toxicity, duplicate answers,
    # eval leaks (OUT/curated: manifest.json, data_card.md, what was removed and why)
    path = out / "sft.jsonl"
    curation = curate_set([out / "samples.jsonl"], out / "curated", path, command="nanoseek rejection")["totals"]
    report = {"stage": "rejection", "init": init, "prompts": len(prompts), "samples": sum(counts.values()),
              "reasoning_kept": len(kept), "instruct_added": added["instruct"], "game_added": added["game"],
              "counts": dict(counts), "written": curation["kept"],
              "curation": {k: curation[k] for k in ("records", "kept", "removed", "rejected")},
              "config": asdict(cfg)}
    write_json(out / "rejection.json", report)
    print(f"rejection: kept {len(kept)} of {sum(counts.values())} samples from {len(prompts)} prompts, "
          f"added {added['instruct']} instruct conversations and {added['game']} game transcripts; drops: "
          f"{json.dumps({k: v for k, v in counts.items() if k != 'kept'})}; curation kept {curation['kept']} of "
          f"{curation['records']} records")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "rejection", out_help="output directory (sft.jsonl, rejection.json)",
                        init_help="checkpoint to sample from (overrides [rejection].init)", resume=False)


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    path = rejection(recipe, args.out, args.init, not args.no_progress)
    print(f"SFT data: {path}")
    return 0
