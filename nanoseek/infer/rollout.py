"""Rollouts: prompts from problems, n sampled completions per prompt through the inference engine, grading.

Everything that samples a model on questions does it here: GRPO, rejection sampling, distillation, DPO
pair-building and `nanoseek eval` (whose held-out pass@1 is thus measured exactly as GRPO's curves are).

Prompt templates (the same ids `nanoseek eval` uses):
    r1_zero  DeepSeek-R1-Zero's plain-text template from BOS; the completion opens with `<think>` itself.
    chat     the chat template with the reasoning generation prompt (`<|assistant|><think>\\n`); the opening
             `<think>\\n` is part of the prompt, so it is prepended to the completion text (`prefill`) before
             the format reward reads it.

Generation stops at `</answer>` (the last token of the R1 format) or at EOS; the stop token is kept as the
completion's last token, so the policy learns to close its answer (and its turn).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.data.synth import Problem, iter_problems, r1_zero_prompt
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.rewards import check_answer, extract_answer, format_reward

TEMPLATES = ("r1_zero", "chat")


@dataclass
class Prompt:
    """One question ready for sampling: its ids, the text its template pre-opens, and the reward columns."""

    ids: list[int]
    prefill: str
    columns: dict[str, Any]  # answer, task, passage, numbers, target, question ... (what rewards read)
    problem: Problem | None = None  # built-in problems grade with their task's own checker


@dataclass
class Sample:
    prompt: Prompt
    ids: list[int]  # the completion's tokens, ending with the stop token or EOS when it stopped
    text: str  # prefill + decoded completion: what rewards and graders read
    truncated: bool  # ran out of tokens before stopping
    latency: float = 0.0  # seconds from the start of its sample() call until it finished


def render(tokenizer: Tokenizer, question: str, template: str) -> tuple[list[int], str]:
    """(prompt ids, prefill) of a question under a template (see the module docstring)."""
    if template == "r1_zero":
        return tokenizer.encode(r1_zero_prompt(question), bos=True), ""
    if template == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            thinking=True)
        return ids, "<think>\n"
    raise ValueError(f"unknown prompt template {template!r}; expected one of {TEMPLATES}")


def question_prompt(tokenizer: Tokenizer, question: str, template: str) -> Prompt:
    """A bare question (graded by the caller)."""
    ids, prefill = render(tokenizer, question, template)
    return Prompt(ids, prefill, {"question": question})


def problem_prompt(tokenizer: Tokenizer, problem: Problem, template: str) -> Prompt:
    ids, prefill = render(tokenizer, problem.question, template)
    columns = {k: v for k, v in problem.to_dict().items() if k not in ("paraphrases", "id")}
    return Prompt(ids, prefill, columns, problem)


def record_prompt(tokenizer: Tokenizer, record: dict[str, Any], template: str, where: str) -> Prompt:
    """A prompt from a JSONL record with `question` (or `prompt`) and `answer`; other fields become columns.
    A GSM8K line works as is: its worked `answer` ends in `#### value`, which the accuracy reward reads."""
    question = record.get("question", record.get("prompt"))
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: needs a non-empty 'question' (or 'prompt') string")
    if not isinstance(record.get("answer"), str) or not record["answer"].strip():
        raise ValueError(f"{where}: needs a non-empty 'answer' string (the gold value or a '#### value' solution)")
    if "question" not in record and template == "r1_zero" and question.startswith("A conversation"):
        ids, prefill = tokenizer.encode(question, bos=True), ""  # an rl.jsonl 'prompt' is already rendered
    else:
        ids, prefill = render(tokenizer, question, template)
    columns = {k: v for k, v in record.items() if k not in ("paraphrases", "id")}
    columns["question"] = record.get("question", question)
    return Prompt(ids, prefill, columns)


def builtin_prompts(tokenizer: Tokenizer, tasks: dict[str, float], difficulty: Sequence[int], template: str,
                    seed: int) -> Iterator[Prompt]:
    """An endless stream of training-split prompts, tasks drawn by weight (the eval split is never touched)."""
    rng = random.Random(seed)
    names = [t for t, w in tasks.items() if w > 0]
    streams = {t: iter_problems(t, seed=seed, difficulty=list(difficulty), split="train") for t in names}
    while True:
        task = rng.choices(names, weights=[tasks[t] for t in names])[0]
        yield problem_prompt(tokenizer, next(streams[task]), template)


@dataclass
class Sampler:
    """Samples completions with one inference engine, reused across calls (the policy's weights are shared,
    so updates made between calls are seen by the next one). `speculative` drafts with the first MTP module
    (same output, fewer steps); `tokens` and `seconds` add up what every call generated and took."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    max_batch: int
    max_new_tokens: int
    max_prompt_tokens: int = 256
    speculative: bool = False
    engine: Engine = field(init=False)
    tokens: int = field(init=False, default=0)
    seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        # no tokenizer for the engine: completions are decoded once at the end, not token by token
        self.engine = Engine(self.model, None, max_batch=self.max_batch, speculative=self.speculative,
                             max_len=self.max_prompt_tokens + self.max_new_tokens + 1)

    def sample(self, prompts: Sequence[Prompt], n: int, temperature: float = 1.0, top_p: float = 1.0,
               seed: int | None = None, desc: str | None = None) -> list[list[Sample]]:
        """n completions for each prompt -> [prompt][sample]; prompt i samples with seed + i, so a prompt's
        samples do not depend on what it is batched with. `desc` shows a progress bar. The model is left in eval
        mode."""
        long = [len(p.ids) for p in prompts if len(p.ids) > self.max_prompt_tokens]
        if long:
            raise ValueError(f"a prompt has {long[0]} tokens; the limit is max_prompt_tokens="
                             f"{self.max_prompt_tokens}")
        eos = self.tokenizer.eos_id
        params = [SamplingParams(max_tokens=self.max_new_tokens, temperature=temperature, top_p=top_p, n=n,
                                 stop_token_ids=[self.tokenizer.end_answer_id],  # and EOS
                                 seed=None if seed is None else seed + i) for i in range(len(prompts))]
        self.model.eval()
        bar = tqdm(total=len(prompts) * n, desc=desc, unit="sample", disable=desc is None, dynamic_ncols=True,
                   leave=False)
        finished: dict[tuple[str, int], float] = {}
        start = time.perf_counter()

        def stream(event) -> None:
            if event.finish_reason is not None:
                finished[(event.request_id, event.index)] = time.perf_counter() - start
                bar.update(1)

        done = self.engine.generate([p.ids for p in prompts], params, stream=stream)
        bar.close()
        self.seconds += time.perf_counter() - start
        out: list[list[Sample]] = [[] for _ in prompts]
        for k, c in enumerate(done):  # prompt order, then sample order
            prompt = prompts[k // n]
            ids = list(c.tokens) + ([c.stop_token] if c.stop_token is not None else [])
            self.tokens += len(ids)
            text = prompt.prefill + self.tokenizer.decode([t for t in ids if t != eos])
            out[k // n].append(Sample(prompt, ids, text, c.finish_reason != "stop",
                                      finished[(c.request_id, c.index)]))
        return out


def is_correct(sample: Sample) -> bool:
    """Grade one sample on its extracted answer (`rewards.check_answer`, as `nanoseek eval` grades)."""
    return check_answer(extract_answer(sample.text), sample.prompt.columns.get("answer", ""), sample.prompt.problem)


@torch.no_grad()
def evaluate(sampler: Sampler, prompts: Sequence[Prompt], k: int = 4, temperature: float = 0.6,
             top_p: float = 0.95, seed: int = 1234, batch_prompts: int | None = None) -> dict[str, float]:
    """DeepSeek-R1's protocol: k samples per prompt at temperature 0.6, top-p 0.95; pass@1 = mean correctness
    over all samples, pass@k = share of prompts with at least one correct sample. Also format compliance and
    completion length (tokens)."""
    batch_prompts = batch_prompts or max(1, sampler.max_batch // k)
    correct, formats, lengths, solved = [], [], [], []
    for i in range(0, len(prompts), batch_prompts):
        for group in sampler.sample(prompts[i:i + batch_prompts], k, temperature, top_p, seed + i):
            right = [is_correct(s) for s in group]
            correct += right
            solved.append(any(right))
            formats += format_reward([s.text for s in group])
            lengths += [len(s.ids) for s in group]
    n = max(1, len(correct))
    return {"pass@1": sum(correct) / n, f"pass@{k}": sum(solved) / max(1, len(solved)),
            "format": sum(formats) / n, "length": sum(lengths) / n}
