"""`nanoseek distill`: a teacher's verified reasoning becomes SFT data for a smaller student (DeepSeek-R1 §2.4:
distillation beats RL on the small model itself).

    nanoseek distill --recipe distill --teacher runs/r1 --student runs/student-base --out runs/student

1. The teacher (a nanoseek checkpoint, or any Hugging Face causal-LM directory) samples k answers per training
   prompt; the correct, clean ones are kept (the same filters as rejection sampling) -> OUT/data.jsonl.
2. The student (a checkpoint, or a fresh model of `student_preset` with the teacher's tokenizer) is fine-tuned
   on them with the [distill_sft] table (an [sft]-style table). With `logit_alpha > 0` and a nanoseek teacher
   that shares the student's tokenizer, the loss also pulls the student's next-token distribution toward the
   teacher's on the same tokens (logit distillation).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import pick_device, write_json, write_jsonl
from nanoseek.config import from_dict, load_recipe
from nanoseek.data.synth import r1_zero_prompt
from nanoseek.infer.rollout import Prompt, Sample, Sampler
from nanoseek.model import Transformer, preset
from nanoseek.model.hf import resolve_checkpoint
from nanoseek.posttrain.rejection import SamplingConfig, sample_and_select, sft_record, training_prompts
from nanoseek.posttrain.sft import sft
from nanoseek.posttrain.stage import add_stage_arguments, load_policy


@dataclass
class DistillConfig(SamplingConfig):
    teacher: str = ""  # nanoseek checkpoint / run dir, or a Hugging Face causal-LM directory
    student: str = ""  # the student's starting checkpoint (a pretrained smaller model) ...
    student_preset: str = ""  # ... or a fresh model of this preset (vocabulary of the teacher's tokenizer)
    prompts: int = 512  # the teacher is prompted in `template` (an HF teacher always gets the r1_zero text)
    keep_per_prompt: int = 2
    logit_alpha: float = 0.0  # weight of the KL to the teacher's distribution (nanoseek teacher only)
    logit_temperature: float = 1.0

    def validate(self, section: str = "distill") -> None:
        super().validate(section)
        if not 0 <= self.logit_alpha <= 1 or self.logit_temperature <= 0:
            raise ValueError(f"[{section}] need 0 <= logit_alpha <= 1 and logit_temperature > 0")


def is_nanoseek_checkpoint(path: str | Path) -> bool:
    try:
        ckpt = resolve_checkpoint(path)
    except FileNotFoundError:
        return False
    return json.loads((ckpt / "config.json").read_text()).get("model_type") == "deepseek_v3"


class HFSampler:
    """The `Sampler` interface over a transformers causal LM (`generate` with sampling), for teachers that are
    not nanoseek checkpoints. Prompts are rendered as R1-Zero text with the teacher's own tokenizer."""

    def __init__(self, path: str | Path, max_new_tokens: int, device: torch.device, max_batch: int = 32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.max_new_tokens, self.device, self.max_batch = max_new_tokens, device, max_batch

    @torch.no_grad()
    def sample(self, prompts: Sequence[Prompt], n: int, temperature: float = 1.0, top_p: float = 1.0,
               seed: int | None = None) -> list[list[Sample]]:
        if seed is not None:
            torch.manual_seed(seed)
        texts = [r1_zero_prompt(p.columns["question"]) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        out = self.model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p,
                                  num_return_sequences=n, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        groups: list[list[Sample]] = [[] for _ in prompts]
        eos = self.tokenizer.eos_token_id
        for row, ids in enumerate(new.tolist()):
            stopped = eos in ids
            ids = ids[:ids.index(eos) + 1] if stopped else ids
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if "</answer>" in text:  # the R1 format's end: what follows is not part of the answer
                text, stopped = text[:text.index("</answer>") + len("</answer>")], True
            groups[row // n].append(Sample(prompts[row // n], ids, text, truncated=not stopped))
        return groups


def fresh_student(preset_name: str, tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A randomly initialised student of `preset_name` sized to the teacher's vocabulary, saved with it."""
    from nanoseek.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(seed)
    model = Transformer(preset(preset_name, vocab_size=tok.vocab_size))
    model.save_pretrained(out)
    tok.save(out)
    return out


def distill(recipe: dict[str, Any], out_dir: str | Path, teacher: str | Path | None = None,
            student: str | Path | None = None, progress: bool = True, data: str | Path | None = None,
            resume: bool = False) -> Path:
    """Teacher samples -> verified SFT data -> fine-tuned student; returns the student's final checkpoint.
    `data`: conversations already curated from this teacher (rejection sampling's sft.jsonl, as R1 distilled
    its 800k curated samples) to train on instead of sampling it again; `resume` continues an interrupted
    student fine-tune."""
    cfg = from_dict(DistillConfig, recipe.get("distill"), "distill")
    cfg.validate()
    teacher, student = str(teacher or cfg.teacher), str(student or cfg.student)
    if not teacher:
        raise ValueError("[distill] teacher: no teacher checkpoint (set it or pass --teacher)")
    if not student and not cfg.student_preset:
        raise ValueError("[distill] needs a student checkpoint (student) or a preset for a fresh one")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    given = Path(data) if data else None
    data = given or out / "data.jsonl"
    teacher_model = None
    if is_nanoseek_checkpoint(teacher):
        policy = load_policy(teacher, device, train=False)
        teacher_model, tokenizer_dir = policy.model, policy.checkpoint
        sampler: Sampler | HFSampler = Sampler(policy.model, policy.tokenizer, max_batch=max(cfg.samples, 128),
                                               max_new_tokens=cfg.max_new_tokens)
        prompt_tok, template = policy.tokenizer, cfg.template
    else:
        sampler = HFSampler(teacher, cfg.max_new_tokens, device)
        tokenizer_dir, prompt_tok, template = None, None, "r1_zero"
    if student:
        student_dir = resolve_checkpoint(student)
    elif tokenizer_dir is not None:
        student_dir = fresh_student(cfg.student_preset, tokenizer_dir, out / "student_init", cfg.seed)
    else:
        raise ValueError("[distill] an HF teacher's tokenizer cannot seed a fresh student: give a student checkpoint")
    if prompt_tok is None:  # HF teacher: prompts only need the question and answer columns
        from nanoseek.data.tokenizer import Tokenizer

        prompt_tok = Tokenizer.load(student_dir)
    if given is None and not data.exists():
        prompts = training_prompts(prompt_tok, template, cfg.tasks, cfg.difficulty, cfg.data, cfg.prompts, cfg.seed)
        kept, counts = sample_and_select(sampler, prompts, cfg.samples, cfg.temperature, cfg.top_p, cfg.filters,
                                         cfg.keep_per_prompt, cfg.seed, progress)
        if not kept:
            raise ValueError(f"the teacher produced no verified samples for {len(prompts)} prompts ({dict(counts)})")
        write_jsonl(data, [sft_record(s) for s in kept])
        write_json(out / "distill.json", {"teacher": teacher, "student": str(student_dir), "prompts": len(prompts),
                                          "kept": len(kept), "counts": dict(counts)})
        print(f"distill: {len(kept)} verified teacher samples from {len(prompts)} prompts -> {data}")
    kd_teacher = None
    if cfg.logit_alpha > 0:
        if teacher_model is None:
            raise ValueError("[distill] logit_alpha > 0 needs a nanoseek teacher (its logits over our vocabulary)")
        from nanoseek.data.tokenizer import Tokenizer

        if Tokenizer.load(tokenizer_dir).hash != Tokenizer.load(student_dir).hash:
            raise ValueError("[distill] logit distillation needs the teacher and student to share a tokenizer")
        kd_teacher = teacher_model
    table = dict(recipe.get("distill_sft") or {})
    table.setdefault("kd_alpha", cfg.logit_alpha)
    table.setdefault("kd_temperature", cfg.logit_temperature)
    table.setdefault("mix", {"reasoning": 1.0})
    return sft({**recipe, "distill_sft": table}, out / "student", init=student_dir, data=[data],
               resume=resume, progress=progress, section="distill_sft", teacher=kd_teacher)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "distill", out_help="run directory (data.jsonl, student/)", init=False, resume=False)
    parser.add_argument("--teacher", help="teacher: nanoseek checkpoint/run dir or HF causal-LM dir")
    parser.add_argument("--student", help="student starting checkpoint (default: [distill].student or preset)")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    ckpt = distill(recipe, args.out, args.teacher, args.student, not args.no_progress)
    print(f"student checkpoint: {ckpt}")
    return 0
