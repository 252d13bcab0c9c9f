"""`nanoseek eval --model PATH --tasks ...`: score a checkpoint on reasoning tasks, games and held-out text.

    nanoseek eval --model runs/default/r1 --tasks arithmetic,logic,countdown --k 8 --n 100
    nanoseek eval --model runs/default/sft --tasks gsm8k:/data/gsm8k/test.jsonl,arithmetic_mc,nim --out eval/sft

Generative tasks follow DeepSeek-R1's protocol: k samples per problem at temperature 0.6 / top-p 0.95, giving
pass@1 (mean correctness over the samples), pass@k and maj@k (cons@k). pass@1 carries its 95% bootstrap
interval over problems (`pass@1_ci`) and every problem's own pass@1 under its id (`per_problem`), so two models
scored on the same problems can be compared problem by problem. The same samples also give format compliance,
the hallucination rate of a single answer and of the verification loop's vote (which abstains below an
agreement threshold), and the share of unsupported claims on tasks with a source passage. A greedy pass over
each problem and its paraphrases (reworded, premises reordered) measures logical consistency. Multiple choice
is scored by the log-likelihood of the answer letters; games are played against an optimal and a random
player, with intervals over games. Bits per byte are measured on held-out worked solutions. Generation goes
through the inference engine, which also gives tokens/s and latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import write_json, write_jsonl
from nanoseek.eval.games import GAMES, optimal_player, play_match, random_player, text_player
from nanoseek.eval.metrics import (
    bits_per_byte,
    bootstrap_ci,
    consistency,
    format_rate,
    hallucination,
    majority_vote,
    mean_pass_at_k,
)
from nanoseek.eval.tasks import LETTERS, EvalTask, Example, choice_prompt, load_task
from nanoseek.infer.rollout import TEMPLATES, Sample, Sampler, question_prompt
from nanoseek.infer.verify import judge
from nanoseek.rewards import extract_answer, grounding_reward

DEFAULT_TASKS = ("arithmetic", "word_problems", "logic", "multihop", "countdown")


def resolve_template(checkpoint: Path, template: str) -> str:
    """"auto": the template the checkpoint was trained with, as its nanoseek.json records it (a `template`
    field), else r1_zero for a pretrained base model and chat for anything post-trained."""
    if template != "auto":
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected auto or one of {TEMPLATES}")
        return template
    meta_path = checkpoint / "nanoseek.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    stage = meta.get("stage", "pretrain")
    recorded = meta.get("template") or ((meta.get("recipe") or {}).get(stage) or {}).get("template")
    if recorded is not None:
        if recorded not in TEMPLATES:
            raise ValueError(f"{meta_path}: template {recorded!r} is not one of {TEMPLATES}")
        return recorded
    return "r1_zero" if stage == "pretrain" else "chat"


class Asker:
    """Questions asked in the model's template through the one sampler every stage uses (`infer.rollout.Sampler`);
    greedy passes may draft with MTP (same output, and it measures acceptance). Question i of a call samples with
    seed · 1,000,003 + i, so a problem's samples do not depend on what it is asked with or on the batch size.
    The samplers' caches are sized to the longest prompt asked so far (a power of two, at least 128 columns),
    not to the whole context: a few MB per batch instead of hundreds."""

    def __init__(self, model, tokenizer, template: str, batch: int, max_new_tokens: int, progress: bool):
        self.room = model.config.max_position_embeddings - max_new_tokens - 1  # the most a prompt may take
        if self.room < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                             f"of {model.config.max_position_embeddings}")
        self.model, self.tokenizer, self.template, self.progress = model, tokenizer, template, progress
        self.batch, self.max_new_tokens = batch, max_new_tokens
        self.samplers: dict[bool, Sampler] = {}  # speculative -> the sampler in use
        self.used: list[Sampler] = []  # every sampler made, for the totals

    def sampler(self, speculative: bool, longest: int) -> Sampler:
        speculative = speculative and len(self.model.mtp) > 0
        current = self.samplers.get(speculative)
        if current is None or current.max_prompt_tokens < longest:
            room = min(self.room, max(128, 1 << (longest - 1).bit_length()))
            current = self.samplers[speculative] = Sampler(self.model, self.tokenizer, self.batch, self.max_new_tokens,
                                                           room, speculative=speculative)
            self.used.append(current)
        return current

    def __call__(self, questions: Sequence[str], samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, desc: str = "", speculative: bool = False) -> list[list[Sample]]:
        """`samples` completions per question -> per question, a list of samples whose `text` is the answer as the
        model wrote it, including what the prompt opened (`<think>\\n` for chat)."""
        prompts = [question_prompt(self.tokenizer, q, self.template) for q in questions]
        sampler = self.sampler(speculative, max(len(p.ids) for p in prompts))
        return sampler.sample(prompts, samples, temperature, top_p, seed * 1_000_003,
                              f"{desc or 'task'}" if self.progress else None)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.used)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.used)

    def mtp_acceptance(self) -> float | None:
        drafters = [s.engine.drafter for s in self.used if s.engine.drafter is not None]
        proposed = sum(d.proposed for d in drafters)
        return sum(d.accepted for d in drafters) / proposed if proposed else None


def _per_problem(examples: Sequence[Example], scores: list[float]) -> dict[str, Any]:
    """pass@1 with its interval, and each problem's score under its id (for paired comparisons)."""
    return {"pass@1_ci": list(bootstrap_ci(scores)),
            "per_problem": {"ids": [ex.id for ex in examples], "pass@1": scores}}


def _generate_task(gen: Asker, task: EvalTask, k: int, temperature: float, top_p: float, seed: int,
                   threshold: float, greedy: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of a generative task, and one record per sample for inspection. `greedy`: also the greedy pass
    over each problem and its paraphrases (greedy accuracy, consistency)."""
    same = task.same()
    examples = task.examples
    seconds, tokens = gen.seconds, gen.tokens
    sampled = gen([ex.question for ex in examples], k, temperature, top_p, seed, f"{task.name} ×{k}")
    sample_seconds, sample_tokens = gen.seconds - seconds, gen.tokens - tokens
    records, rows, first, first_ok, vote_ok, verdicts, verdict_ok, texts = [], [], [], [], [], [], [], []
    for ex, outs in zip(examples, sampled, strict=True):
        answers = [extract_answer(o.text) for o in outs]
        correct = [task.check(ex, a) for a in answers]
        rows.append(correct)
        first.append(answers[0])
        first_ok.append(correct[0])
        vote_ok.append(task.check(ex, majority_vote(answers, same).answer))
        # the verification loop's own decision over the same k chains: its vote, or "not sure" below threshold
        verdict = judge([o.text for o in outs], threshold)
        verdicts.append(verdict)
        verdict_ok.append(task.check(ex, verdict.answer))
        texts += [o.text for o in outs]
        records += [{"task": task.name, "id": ex.id, "sample": i, "question": ex.question, "completion": o.text,
                     "answer": a, "gold": ex.answer, "correct": ok}
                    for i, (o, a, ok) in enumerate(zip(outs, answers, correct, strict=True))]
    lat = [o.latency for outs in sampled for o in outs]
    metrics: dict[str, Any] = {
        "n": len(examples), "k": k,
        "pass@1": mean_pass_at_k(rows, 1),
        "pass@k": mean_pass_at_k(rows, k),
        "maj@k": sum(vote_ok) / len(examples),
        "format": format_rate(texts),
        "completion_tokens": sample_tokens / len(texts),
        "tokens_per_s": sample_tokens / sample_seconds if sample_seconds > 0 else None,
        "latency_s": sum(lat) / len(lat),
    }
    single = hallucination(first, first_ok)  # one sample, stated as the answer
    verified = hallucination([v.answer for v in verdicts], verdict_ok, [not v.sure for v in verdicts])
    metrics.update(hallucination=single["hallucination_rate"],
                   hallucination_verified=verified["hallucination_rate"],
                   abstention=verified["abstention_rate"], answered_accuracy_verified=verified["answered_accuracy"])
    with_passage = [(ex, outs) for ex, outs in zip(examples, sampled, strict=True) if ex.passage]
    if with_passage:  # factual reliability: claims not backed by the passage
        scores = [s for ex, outs in with_passage
                  for s in grounding_reward([o.text for o in outs], [ex.passage] * len(outs),
                                            [ex.question] * len(outs))]
        metrics["unsupported_claims"] = -sum(scores) / len(scores)
    if greedy:
        metrics.update(_consistency(gen, task, seed))
    metrics.update(_per_problem(examples, [sum(row) / k for row in rows]))
    return metrics, records


def _consistency(gen: Asker, task: EvalTask, seed: int) -> dict[str, Any]:
    """Greedy answers to each problem and its paraphrases: greedy accuracy and logical consistency."""
    variants: list[tuple[Example, list[str]]] = [(ex, [ex.question] + ex.paraphrases) for ex in task.examples]
    flat = [q for _, qs in variants for q in qs]
    outs = gen(flat, 1, 0.0, 1.0, seed, f"{task.name} greedy", speculative=True)
    answers = [extract_answer(o[0].text) for o in outs]
    groups, greedy_ok, at = [], [], 0
    for ex, qs in variants:
        group = answers[at:at + len(qs)]
        at += len(qs)
        greedy_ok.append(task.check(ex, group[0]))
        if len(group) > 1:
            groups.append(group)
    out: dict[str, Any] = {"greedy": sum(greedy_ok) / len(greedy_ok)}
    if groups:
        out["consistency"] = consistency(groups, task.same())
    return out


@torch.no_grad()
def _choice_task(model, tokenizer, task: EvalTask, batch: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Multiple choice by log-likelihood: log p(" A" | question and options) for each letter; the most likely
    letter is the model's answer. Letters are single words, so no length normalisation is needed."""
    rows: list[tuple[int, int, list[int]]] = []  # (example, option, prompt + letter ids) ; prompt length below
    prompt_len: list[int] = []
    for e, ex in enumerate(task.examples):
        prompt = tokenizer.encode(choice_prompt(ex.question, ex.choices), bos=True)
        prompt_len.append(len(prompt))
        for o in range(len(ex.choices)):
            rows.append((e, o, prompt + tokenizer.encode(" " + LETTERS[o])))
    scores = torch.empty(len(rows), dtype=torch.float64)
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        width = max(len(r[2]) for r in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
        for j, (_, _, seq) in enumerate(chunk):
            ids[j, :len(seq)] = torch.tensor(seq)
        logp = model(ids[:, :-1].to(device)).float().log_softmax(-1).cpu()  # [B, T-1, V]
        for j, (e, _, seq) in enumerate(chunk):
            start = prompt_len[e]  # the letter's tokens are seq[start:], predicted at positions start-1...
            targets = torch.tensor(seq[start:])
            scores[i + j] = logp[j, start - 1:len(seq) - 1].gather(1, targets[:, None]).sum()
    records, hits, at = [], [], 0
    for ex in task.examples:
        s = scores[at:at + len(ex.choices)]
        at += len(ex.choices)
        picked = LETTERS[int(s.argmax())]
        hits.append(float(picked == ex.answer))
        records.append({"task": task.name, "id": ex.id, "answer": picked, "gold": ex.answer,
                        "correct": picked == ex.answer, "logprobs": s.tolist()})
    return {"n": len(task.examples), "pass@1": sum(hits) / len(hits), **_per_problem(task.examples, hits)}, records


def _game(gen: Asker, name: str, n: int, seed: int) -> dict[str, Any]:
    """The model (greedy) against the optimal and the random player, n games each, alternating first move.

    Win and forfeit rates carry 95% intervals bootstrapped over games. `optimal_move_rate` is the share of
    all the model's moves (both matches) that keep the position's value; its interval resamples games, not
    moves, since the moves of one game depend on each other (a ratio over games weighted by their moves)."""
    game = GAMES[name]()
    player = text_player(game, lambda qs: [o[0].text for o in gen(qs, 1, 0.0, 1.0, seed, name)])
    out: dict[str, Any] = {"games": n}
    kept: list[int] = []
    moved: list[int] = []
    for opponent, who in (("optimal", optimal_player(game)), ("random", random_player(game, seed))):
        r = play_match(game, player, who, n, seed)
        out.update({f"{key}_vs_{opponent}": r[key] for key in ("win", "draw", "loss", "forfeit")})
        for key in ("win", "forfeit"):
            out[f"{key}_vs_{opponent}_ci"] = list(bootstrap_ci([float(o == key) for o in r["outcomes"]]))
        kept += r["optimal_moves"]
        moved += r["moves"]
    played = [(k, m) for k, m in zip(kept, moved, strict=True) if m]  # games the model made a move in
    out["moves"] = sum(moved)
    out["optimal_move_rate"] = sum(kept) / sum(moved) if played else 0.0
    if played:
        out["optimal_move_rate_ci"] = list(bootstrap_ci([k / m for k, m in played], weights=[m for _, m in played]))
    return out


def heldout_texts(tasks: Sequence[EvalTask]) -> list[str]:
    """Held-out documents for bits per byte: the built-in problems' worked solutions, in the worksheet shape
    pretraining documents use ("Question: ...\\nAnswer: steps ... #### value")."""
    return [f"Question: {ex.question}\nAnswer: {ex.problem.solution}"
            for t in tasks for ex in t.examples if ex.problem is not None]


def _speed(gen: Asker, questions: Sequence[str], seed: int) -> dict[str, Any]:
    """Single-request latency and tokens/s (batch 1, greedy): what one user waiting for one answer sees."""
    tokens, seconds = 0, 0.0
    for q in questions:
        before_t, before_s = gen.tokens, gen.seconds
        gen([q], 1, 0.0, 1.0, seed, "latency")
        tokens += gen.tokens - before_t
        seconds += gen.seconds - before_s
    return {"latency_b1_s": seconds / len(questions), "tokens_per_s_b1": tokens / seconds if seconds else None}


def evaluate(model_path: str | Path, tasks: Sequence[str] = DEFAULT_TASKS, k: int = 8, n: int = 50, *,
             template: str = "auto", temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 128,
             difficulty: int | list[int] = 1, seed: int = 0, threshold: float = 0.5, games: int = 20,
             consistency: bool = True, bpb: bool = True, bpb_texts: Sequence[str] | None = None, batch: int = 256,
             out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run directory's latest checkpoint) on `tasks`.

    k: samples per problem; n: problems per built-in task (and the cap for file tasks); games: games per
    opponent for game tasks ("nim", "tictactoe"). `threshold` is the verification loop's agreement below which
    it abstains. `consistency=False` skips the greedy pass over problems and paraphrases (greedy accuracy,
    consistency) when only the sampled metrics are needed. Returns {"model", "checkpoint", "template",
    "settings", "tasks": {task: metrics}, "bpb", "speed", "wall_seconds"}; with `out`, also writes
    OUT/results.json and every sample (task, id, question, completion, answer, gold, correct) to
    OUT/samples.jsonl."""
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.model.hf import load, resolve_checkpoint

    if k < 1 or n < 1 or games < 1 or batch < 1 or max_new_tokens < 1:
        raise ValueError(f"k, n, games, batch and max_new_tokens must be >= 1, got {k}, {n}, {games}, {batch}, "
                         f"{max_new_tokens}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if isinstance(tasks, str):  # "arithmetic,logic" as on the command line
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("no tasks given")
    t_start = time.perf_counter()
    loaded = [load_task(spec, n, seed, difficulty) for spec in tasks if spec not in GAMES]  # bad specs fail first
    ckpt = resolve_checkpoint(model_path)
    if not (ckpt / "tokenizer.json").exists():
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json beside the weights")
    tokenizer = Tokenizer.load(ckpt)
    model = load(ckpt)
    template = resolve_template(ckpt, template)
    gen = Asker(model, tokenizer, template, batch, max_new_tokens, progress)

    results: dict[str, dict[str, Any]] = {}
    samples: list[dict[str, Any]] = []
    for task in loaded:
        if task.name in results:
            raise ValueError(f"task {task.name!r} given twice")
        if task.kind == "choice":
            results[task.name], records = _choice_task(model, tokenizer, task, batch)
        else:
            results[task.name], records = _generate_task(gen, task, k, temperature, top_p, seed, threshold,
                                                         consistency)
        samples += records
    for name in (s for s in tasks if s in GAMES):
        results[name] = _game(gen, name, games, seed)

    texts = list(bpb_texts) if bpb_texts is not None else heldout_texts(loaded)
    generative = [ex.question for t in loaded if t.kind == "generate" for ex in t.examples]
    speed: dict[str, Any] = {"tokens_per_s": gen.tokens / gen.seconds if gen.seconds else None}
    if generative:
        speed.update(_speed(gen, generative[:3], seed))
    if (acceptance := gen.mtp_acceptance()) is not None:
        speed["mtp_acceptance"] = acceptance
    result = {
        "model": str(model_path), "checkpoint": str(ckpt), "template": template,
        "settings": {"tasks": list(tasks), "k": k, "n": n, "temperature": temperature, "top_p": top_p,
                     "max_new_tokens": max_new_tokens, "difficulty": difficulty, "seed": seed,
                     "threshold": threshold, "games": games, "consistency": consistency},
        "tasks": results,
        "bpb": bits_per_byte(model, tokenizer, texts) if bpb and texts else None,
        "speed": speed,
        "params": model.num_params(), "active_params": model.num_params(active=True),
        "wall_seconds": time.perf_counter() - t_start,
    }
    if out is not None:
        out = Path(out)
        write_json(out / "results.json", result)
        write_jsonl(out / "samples.jsonl", samples)
    return result


# --- command line -----------------------------------------------------------------------------------------

def format_table(result: dict[str, Any]) -> str:
    """The results as a small aligned text table, one row per task; a metric with a 95% interval shows it
    beside the value, e.g. "0.412 [0.371, 0.455]"."""
    cols = ["pass@1", "pass@k", "maj@k", "greedy", "format", "consistency", "hallucination",
            "hallucination_verified", "abstention", "win_vs_optimal", "win_vs_random", "forfeit_vs_random",
            "optimal_move_rate"]
    present = [c for c in cols if any(c in m for m in result["tasks"].values())]

    def cell(m: dict[str, Any], c: str) -> str:
        if not isinstance(m.get(c), float):
            return "-"
        ci = m.get(f"{c}_ci")
        return f"{m[c]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    rows = [[name] + [cell(m, c) for c in present] for name, m in result["tasks"].items()]
    header = ["task"] + present
    widths = [max(len(r[i]) for r in rows + [header]) + 2 for i in range(len(header))]
    lines = ["".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header] + rows]
    if result["bpb"] is not None:
        lines.append(f"bits per byte (held-out solutions): {result['bpb']:.4f}")
    speed = result["speed"]
    if speed.get("tokens_per_s"):
        lines.append(f"generation: {speed['tokens_per_s']:.0f} tokens/s batched"
                     + (f", {speed['latency_b1_s']:.2f} s per answer at batch 1" if "latency_b1_s" in speed else "")
                     + (f", MTP draft acceptance {speed['mtp_acceptance']:.2f}" if "mtp_acceptance" in speed else ""))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint, run directory (latest checkpoint) or HF dir")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated: built-in tasks (arithmetic, word_problems, logic, multihop, countdown, "
                             "arithmetic_mc), games (nim, tictactoe), gsm8k:PATH, math:PATH, mc:PATH")
    parser.add_argument("--k", type=int, default=8, help="samples per problem (pass@k, maj@k)")
    parser.add_argument("--n", type=int, default=50, help="problems per built-in task; cap for task files")
    parser.add_argument("--template", default="auto", choices=("auto",) + TEMPLATES,
                        help="prompt template (auto: what the checkpoint was trained with)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--difficulty", type=int, nargs="+", default=[1], help="built-in difficulty level(s) 1-5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="verification loop: abstain when fewer than this share of samples agree")
    parser.add_argument("--games", type=int, default=20, help="games per opponent for game tasks")
    parser.add_argument("--no-bpb", action="store_true", help="skip bits per byte")
    parser.add_argument("--bpb-file", type=Path, help="JSONL with a `text` field to measure bits per byte on")
    parser.add_argument("--batch", type=int, default=256, help="concurrent sequences in the engine (default 256)")
    parser.add_argument("--out", type=Path, help="write results.json and samples.jsonl here")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from nanoseek.eval.tasks import read_jsonl

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    difficulty = args.difficulty[0] if len(args.difficulty) == 1 else args.difficulty
    texts = None  # bad input (a task too small for --n, a missing file) raises: the command line prints one line
    if args.bpb_file is not None:
        texts = []
        for line, r in read_jsonl(args.bpb_file):
            if not isinstance(r.get("text"), str):
                raise ValueError(f"{args.bpb_file}:{line}: field 'text' must be a string")
            texts.append(r["text"])
    result = evaluate(args.model, tasks, args.k, args.n, template=args.template, temperature=args.temperature,
                      top_p=args.top_p, max_new_tokens=args.max_new_tokens, difficulty=difficulty, seed=args.seed,
                      threshold=args.threshold, games=args.games, bpb=not args.no_bpb, bpb_texts=texts,
                      batch=args.batch, out=args.out, progress=not args.no_progress)
    print(f"{result['checkpoint']} ({result['template']} template, k={args.k})")
    print(format_table(result))
    if args.out is not None:
        print(f"results: {args.out / 'results.json'}", file=sys.stderr)
    return 0
