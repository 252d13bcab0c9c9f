"""`nanoseek grpo`: Group Relative Policy Optimization, the RL of DeepSeekMath, R1-Zero and R1.

    nanoseek grpo --recipe r1-zero --init runs/base --out runs/r1-zero

One step:
  1. generation  P prompts × G samples from the inference engine (temperature 1);
  2. rewards     every recipe reward on every completion, a weighted sum (optionally gated by format);
                 dynamic sampling (DAPO) drops groups whose rewards are all equal and samples more prompts;
  3. advantages  r - mean(group), divided by the group std or not (Dr. GRPO drops the division);
  4. reference   log-probs under the frozen reference (β > 0) and under the sampling policy (μ > 1);
  5. update      μ optimizer steps on the clipped surrogate (`losses.grpo_loss`), micro-batched.
Completions that hit the length limit can be masked out of the loss (DAPO's overlong filtering) and/or
punished by the `soft_overlong` reward. The reference can be reset to the policy every N steps (R1-Zero
refreshed it every 400 steps).

Metrics per step (metrics.jsonl): reward mean/std overall and per function, accuracy, format rate, completion
length mean/max, truncated share, clipped fraction, KL, entropy, frac_reward_zero_std, and the time split
generation / reference / update; held-out pass@1, pass@k and format every `eval_every` steps.

A run that cannot learn says so. A step has no learning signal when no completion that takes gradient has a
nonzero advantage: every group's rewards were equal, or every completion was masked (`masked_all`: all hit the
length limit under mask_truncated, as with a base that never writes EOS or `</answer>`). Such a step makes no
optimizer step (Adam's momentum would otherwise keep moving the weights with no reward behind it); metrics log
`no_signal`, `masked_all` and `no_signal_streak` (consecutive steps without signal), and stderr warns at the first
all-masked step and when the streak reaches `no_signal_warn_steps`.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanoseek.common import read_jsonl, write_json
from nanoseek.config import load_recipe
from nanoseek.data.synth import make_problems
from nanoseek.infer.rollout import (
    TEMPLATES,
    Prompt,
    Sample,
    Sampler,
    builtin_prompts,
    evaluate,
    is_correct,
    problem_prompt,
    record_prompt,
)
from nanoseek.posttrain.loop import Stage, TrainConfig, prepare, run, start, threads
from nanoseek.posttrain.losses import (
    LOSS_TYPES,
    REWARD_SCALES,
    group_advantages,
    grpo_loss,
    token_entropy,
)
from nanoseek.posttrain.stage import Policy, add_stage_arguments, pad_right
from nanoseek.rewards import build_rewards, format_reward, score
from nanoseek.train.optim import build_optimizer

REFERENCE_FILE = "reference.safetensors"


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO's fields; the loop's (lr, max_steps, time_budget_s, seed, ...) come from TrainConfig. The learning rate
    is constant after warmup (decay_start = 1). `init` is the base model for R1-Zero, the SFT model for R1."""

    template: str = "r1_zero"  # r1_zero | chat (see rollout.py)
    # prompts: built-in tasks (weights) at these difficulty levels, or a JSONL file (question, answer, ...)
    tasks: dict[str, float] = field(default_factory=lambda: {"arithmetic": 1.0})
    difficulty: list[int] = field(default_factory=lambda: [1])
    data: str = ""
    # curriculum: "fixed" trains on tasks × difficulty as given. "auto" first measures the starting model on
    # training problems of each task at each level and trains on the (task, level) with the most headroom,
    # among those whose pass@1 lies in curriculum_band (pick_candidate): pass@k well above pass@1 on a task whose
    # answers cannot be guessed (`headroom`). RL sharpens what a model can already sometimes do, so that is where
    # it has something to sharpen; a yes/no task's pass@k is reached by guessing, so it shows none.
    curriculum: str = "fixed"
    curriculum_prompts: int = 16
    curriculum_samples: int = 8
    curriculum_band: list[float] = field(default_factory=lambda: [0.05, 0.9])
    # rewards: registry name -> weight; parameters per reward; rewards that must be > 0 to earn anything
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    reward_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: list[str] = field(default_factory=list)
    reward_model: str = ""  # a `nanoseek reward-model` checkpoint, used as the reward named "reward_model"
    # sampling
    prompts_per_step: int = 16
    num_generations: int = 8  # G
    max_new_tokens: int = 64
    max_prompt_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 3  # generation rounds per step when dynamic sampling refills dropped groups
    mask_truncated: bool = True  # overlong filtering: truncated completions get no gradient
    no_signal_warn_steps: int = 10  # warn after this many consecutive steps without learning signal (0: never)
    # objective
    loss_type: str = "dapo"
    scale_rewards: str = "none"  # group | batch | none
    beta: float = 0.0  # KL weight; 0 loads no reference model
    kl_bias_correction: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.28
    mu: int = 1  # optimizer steps per generation batch
    ref_refresh_every: int = 0  # reset the reference to the policy every N steps (0: never)
    # optimisation (the rest is TrainConfig's; time_budget_s counts generation + update, evaluation excluded)
    lr: float = 1e-5
    decay_start: float = 1.0
    final_lr_ratio: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    micro_batch: int = 32  # sequences per forward/backward
    # the update runs each group's prompt once for its G completions (same result, fewer tokens; see
    # `shared_prompt_logps`); micro-batches are then whole groups
    share_prompt: bool = False
    max_steps: int = 100
    # held-out evaluation
    eval_every: int = 0  # steps between evaluations (0: only before and after training)
    eval_problems: int = 100
    eval_samples: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95

    def validate(self, section: str = "grpo") -> None:
        super().validate(section)

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"[{section}] {name}={getattr(self, name)!r}: {why}")

        if self.curriculum not in ("fixed", "auto"):
            raise bad("curriculum", "expected 'fixed' or 'auto'")
        if self.curriculum == "auto" and self.data:
            raise bad("curriculum", "'auto' chooses among built-in tasks; it does not apply to a data file")
        if self.template not in TEMPLATES:
            raise bad("template", f"expected one of {TEMPLATES}")
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"expected one of {LOSS_TYPES}")
        if self.scale_rewards not in REWARD_SCALES:
            raise bad("scale_rewards", f"expected one of {REWARD_SCALES}")
        if self.num_generations < 2:
            raise bad("num_generations", "group-relative advantages need at least 2 samples per prompt")
        for name in ("prompts_per_step", "max_new_tokens", "mu", "micro_batch", "max_sampling_rounds", "max_steps",
                     "max_prompt_tokens", "curriculum_prompts", "curriculum_samples"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        for name in ("no_signal_warn_steps", "eval_every", "eval_problems", "ref_refresh_every", "beta"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.eval_problems and self.eval_samples < 1:
            raise bad("eval_samples", "must be >= 1")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise bad("eps_low", "need 0 <= eps_low < 1 and eps_high >= 0")
        if not self.rewards:
            raise bad("rewards", "at least one reward is needed")


@dataclass
class Batch:
    """A generation batch ready for the update: N = groups × G sequences, right-padded."""

    ids: torch.Tensor  # [N, L] prompt + completion, rows longest first
    mask: torch.Tensor  # [N, L-1] 1 where ids[:, 1:] is a completion token that takes gradient
    advantages: torch.Tensor  # [N]
    lengths: list[int] = field(default_factory=list)  # real length of each row
    prompt_lens: list[int] = field(default_factory=list)  # prompt tokens of each row
    group: int = 0  # G when rows come in whole groups sharing one prompt (share_prompt), else 0
    signal: bool = True  # some row takes gradient and its group's rewards differ (else the reward loss is 0)
    old_logps: torch.Tensor | None = None  # [N, L-1] under the sampling policy (μ > 1)
    ref_logps: torch.Tensor | None = None  # [N, L-1] under the reference (β > 0)

    def chunks(self, size: int) -> list[tuple[slice, int]]:
        """Micro-batches of `size` rows (whole groups when rows share prompts) and the width each needs. Rows that
        stand alone are sorted longest first, so a chunk of short completions is not padded to the longest one in
        the batch (less compute for the same result)."""
        if self.group:
            size = max(1, size // self.group) * self.group
        return [(slice(i, i + size), max(self.lengths[i:i + size])) for i in range(0, len(self.lengths), size)]


def prompt_stream(cfg: GRPOConfig, tokenizer, recipe_seed: int) -> Iterator[Prompt]:
    if cfg.data:
        records = []
        for i, r in read_jsonl(cfg.data):
            records.append(p := record_prompt(tokenizer, r, cfg.template, f"{cfg.data}:{i}"))
            if len(p.ids) > cfg.max_prompt_tokens:  # found now, not when the prompt's turn comes mid-run
                raise ValueError(f"{cfg.data}:{i}: the prompt has {len(p.ids)} tokens; the limit is "
                                 f"max_prompt_tokens={cfg.max_prompt_tokens}")
        if not records:
            raise ValueError(f"{cfg.data}: no prompts")
        rng = random.Random(recipe_seed)
        while True:
            rng.shuffle(records)
            yield from records
    yield from builtin_prompts(tokenizer, cfg.tasks, cfg.difficulty, cfg.template, recipe_seed)


def eval_prompts(cfg: GRPOConfig, tokenizer) -> list[Prompt]:
    """Held-out problems of the recipe's tasks and levels (the synth eval split), split evenly over tasks."""
    tasks = [t for t, w in cfg.tasks.items() if w > 0]
    per_task = max(1, cfg.eval_problems // len(tasks))
    return [problem_prompt(tokenizer, p, cfg.template) for t in tasks
            for p in make_problems(t, per_task, seed=cfg.seed, difficulty=cfg.difficulty, split="eval")]


CURRICULUM_FILE = "curriculum.json"
CHANCE_PROBLEMS = 256  # training problems per (task, level) whose answers measure what blind guessing reaches


def guess_rates(task: str, level: int, k: int, seed: int) -> tuple[float, float]:
    """What answering without reading the question reaches on a task at a level: (chance, chance@k), the share of
    CHANCE_PROBLEMS training problems whose answer is the most common answer, or one of the k most common (the
    best one blind guess, or k, can do). A yes/no task gives about 0.5 and 1.0: two guesses cover both answers."""
    problems = make_problems(task, CHANCE_PROBLEMS, seed=seed, difficulty=level, split="train")
    counts = sorted(Counter(p.answer.strip().casefold() for p in problems).values(), reverse=True)
    return counts[0] / len(problems), sum(counts[:k]) / len(problems)


GUESSABLE = 0.25  # a task whose most common answer is this often right can be guessed: its pass@k shows no skill


def headroom(row: dict[str, Any]) -> float:
    """What RL can turn into pass@1 on a (task, level), as measured on training problems: the gap pass@k − pass@1
    (what sharpening converts), weighted by pass@1 (how often a group holds a success to learn from). 0 for a
    task whose answers can be guessed (one blind guess right GUESSABLE of the time or more: a yes/no task at 50%
    shows pass@8 ≈ 1 by guessing, not by skill). Comparing pass@k with chance@k instead was tried and misfired:
    eight samples of one model are not eight distinct guesses, so a real skill's pass@k can sit below chance@k."""
    if row["chance"] >= GUESSABLE:
        return 0.0
    return (row["pass@k"] - row["pass@1"]) * row["pass@1"]


def measure_candidates(cfg: GRPOConfig, sampler: Sampler, tokenizer) -> list[dict[str, Any]]:
    """pass@1 and pass@k (k = curriculum_samples, at the training temperature) of the starting model on
    `curriculum_prompts` training problems of every task at every level, beside the chance rates of guessing
    and the headroom score."""
    k = cfg.curriculum_samples
    table = []
    for task in (t for t, w in cfg.tasks.items() if w > 0):
        for level in cfg.difficulty:
            problems = make_problems(task, cfg.curriculum_prompts, seed=cfg.seed + 1, difficulty=level,
                                     split="train")
            groups = sampler.sample([problem_prompt(tokenizer, p, cfg.template) for p in problems], k,
                                    cfg.temperature, cfg.top_p, seed=cfg.seed + 2)
            right = [[is_correct(s) for s in g] for g in groups]
            chance, chance_k = guess_rates(task, level, k, cfg.seed + 3)
            row = {"task": task, "level": level, "pass@1": sum(map(sum, right)) / (k * len(right)),
                   "pass@k": sum(map(any, right)) / len(right), "k": k,
                   "mixed": sum(0 < sum(r) < k for r in right) / len(right), "chance": chance, "chance@k": chance_k}
            table.append({**row, "score": headroom(row)})
    return table


def pick_candidate(table: list[dict[str, Any]], band: list[float], tolerance: float = 0.02) -> dict[str, Any]:
    """Among rows whose pass@1 lies in the band (all rows if none does), the one with the most headroom above
    chance (`headroom`). Scores within `tolerance` of the best (sampling noise) go to the easier level, then to
    the higher score."""
    lo, hi = band
    pool = [r for r in table if lo <= r["pass@1"] <= hi] or table
    best = max(map(headroom, pool))
    return min((r for r in pool if headroom(r) >= best - tolerance), key=lambda r: (r["level"], -headroom(r)))


def build_sampler(cfg: GRPOConfig, policy: Policy) -> Sampler:
    """The inference engine over the policy's weights: one generation batch (P × G) or one evaluation group."""
    return Sampler(policy.model, policy.tokenizer, max(cfg.prompts_per_step * cfg.num_generations, cfg.eval_samples),
                   cfg.max_new_tokens, cfg.max_prompt_tokens)


def choose_curriculum(cfg: GRPOConfig, sampler: Sampler, tokenizer, out: Path) -> GRPOConfig:
    """With curriculum = "auto", the config narrowed to the (task, level) to train on: measured once and kept in
    OUT/curriculum.json, so a resumed run trains on the same one. Unchanged with curriculum = "fixed"."""
    if cfg.curriculum != "auto":
        return cfg
    path = out / CURRICULUM_FILE
    if path.exists():
        choice = json.loads(path.read_text())
    else:
        table = measure_candidates(cfg, sampler, tokenizer)
        best = pick_candidate(table, cfg.curriculum_band)
        choice = {"task": best["task"], "level": best["level"], "band": cfg.curriculum_band, "table": table}
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, choice)
        rows = ", ".join(f"{r['task']}/{r['level']} {r['pass@1']:.2f}/{r['pass@k']:.2f} chance {r['chance']:.2f}/"
                         f"{r['chance@k']:.2f} score {r['score']:+.2f}" for r in table)
        print(f"grpo curriculum: {choice['task']} level {choice['level']} (pass@1/pass@{cfg.curriculum_samples}: "
              f"{rows})", file=sys.stderr)
    return replace(cfg, tasks={choice["task"]: 1.0}, difficulty=[choice["level"]])


def completion_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [B, T-1] of ids[:, 1:] where mask [B, T-1] is set (0 elsewhere), and the logits [K, V]
    at those K positions. The head and the softmax run only there: the prompt is about half of every row, and
    at this model size the head is a third of the forward pass."""
    keep = mask.bool()
    logits = model.head(model(ids[:, :-1], hidden=True)[keep])
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
    logps[keep] = -F.cross_entropy(logits.float(), ids[:, 1:][keep], reduction="none")
    return logps, logits


def shared_prompt_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, prompt_lens: Sequence[int],
                        group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` of rows that come in groups of `group` completions of one prompt, with each prompt run
    once instead of once per completion (the prompt is about half of every row; its keys do not depend on what
    follows it). Same maths as the plain forward: every completion token sees the prompt's tokens and the
    completion's own earlier ones, at the same positions; gradients from all G completions meet in the prompt's
    one forward.

    ids [n, W] rows prompt + completion, right-padded, in groups; mask [n, W-1]; prompt_lens [n]. The prompts are
    re-laid left-padded ([g, Lp], positions counted from each first real token) and the completions right-padded
    ([n, Lc], positions continuing their prompt's); layer by layer, the prompts attend to themselves and the
    completions to their group's prompt keys followed by their own."""
    n, W = ids.shape
    device = ids.device
    lens = torch.tensor(list(prompt_lens), device=device)  # [n]
    Lp = int(lens.max())
    cols = torch.arange(Lp, device=device)
    first = lens[::group]  # [g] each group's prompt length
    pad = Lp - first  # left padding of each prompt
    take = (cols[None] - pad[:, None]).clamp(min=0)  # [g, Lp] source column in the group's first row
    prompts = ids[::group].gather(1, take)
    prompt_mask = cols[None] >= pad[:, None]  # [g, Lp] real prompt tokens
    Lc = W - int(lens.min())
    comp_cols = lens[:, None] + torch.arange(Lc, device=device)[None]  # [n, Lc] source columns (may run past W)
    completions = ids.gather(1, comp_cols.clamp(max=W - 1))  # past the row's end: padding causality never reads
    cos_p, sin_p = model.rotary((cols[None] - pad[:, None]).clamp(min=0))
    cos_c, sin_c = model.rotary(comp_cols)
    keys_mask = torch.cat([prompt_mask.repeat_interleave(group, 0), torch.ones(n, Lc, dtype=torch.bool,
                                                                                 device=device)], dim=1)
    xp, xc = model.embed(prompts), model.embed(completions)
    for block in model.blocks:
        attn = block.attn
        hp, hc = block.attn_norm(xp), block.attn_norm(xc)
        q_p, q_pe_p = attn.project_q(hp, cos_p, sin_p)
        c_p, pe_p = attn.project_kv(hp, cos_p, sin_p)
        q_c, q_pe_c = attn.project_q(hc, cos_c, sin_c)
        c_c, pe_c = attn.project_kv(hc, cos_c, sin_c)
        xp = xp + attn.attend(q_p, q_pe_p, c_p, pe_p, 0, prompt_mask)
        xc = xc + attn.attend(q_c, q_pe_c, torch.cat([c_p.repeat_interleave(group, 0), c_c], dim=1),
                              torch.cat([pe_p.repeat_interleave(group, 0), pe_c], dim=1), Lp, keys_mask)
        xp, xc = xp + block.feed_forward(xp)[0], xc + block.feed_forward(xc)[0]
    hp, hc = model.norm(xp), model.norm(xc)
    # a masked position t of row i predicts ids[i, t+1]: from the prompt's last token (t = len - 1) or from
    # completion token t - len
    row, col = mask.bool().nonzero(as_tuple=True)
    j = col - lens[row]
    hidden = torch.where((j < 0)[:, None], hp[row // group, -1], hc[row, j.clamp(min=0)])
    logits = model.head(hidden)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    logps[row, col] = -F.cross_entropy(logits.float(), ids[row, col + 1], reduction="none")
    return logps, logits


class GRPOStage(Stage):
    """GRPO's step for the post-training loop: a generation batch, its rewards and advantages, and μ optimizer
    steps on the clipped surrogate (none when the batch has no learning signal)."""

    def __init__(self, cfg: GRPOConfig, policy: Policy, sampler: Sampler, out: Path, section: str = "grpo"):
        self.cfg, self.policy, self.out, self.sampler = cfg, policy, out, sampler
        self.section = section  # the recipe table: checkpoints record it as their stage
        self.model, self.tok = policy.model, policy.tokenizer
        if cfg.share_prompt and self.model.config.attention == "dsa":  # shared_prompt_logps attends densely
            raise ValueError(f"[{section}] share_prompt = true is for MLA models; this model uses sparse "
                             f"attention (attention = \"dsa\"): set share_prompt = false")
        self.device = next(self.model.parameters()).device
        # β = 0: no reference model at all (memory and a forward pass saved)
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.beta else None
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        params = dict(cfg.reward_params)
        if "soft_overlong" in cfg.rewards:  # its length limit is the generation limit unless set
            params["soft_overlong"] = {"max_completion_len": cfg.max_new_tokens, **params.get("soft_overlong", {})}
        extra = {}
        if cfg.reward_model:  # R1's final stage: a learned "general" reward beside the rules
            from nanoseek.posttrain.reward_model import reward_function

            extra["reward_model"] = reward_function(cfg.reward_model, self.device)
        # gate rewards are scored even when they carry no weight of their own
        self.rewards = build_rewards({**dict.fromkeys(cfg.gate, 0.0), **cfg.rewards}, params, extra)
        self.prompts = prompt_stream(cfg, self.tok, cfg.seed)
        self.prompts_used = 0
        self.rng = random.Random(cfg.seed)  # sampling seeds: a resumed run continues the same sequence
        self.held_out = eval_prompts(cfg, self.tok) if cfg.eval_problems and not cfg.data else []
        self.step = 0
        self.no_signal_streak = 0  # consecutive steps without learning signal
        self.warned_masked = False

    @classmethod
    def load(cls, cfg: GRPOConfig, init: str | Path, out: Path, section: str = "grpo") -> GRPOStage:
        """The stage on a starting checkpoint, seeded, its curriculum chosen: what `grpo` trains."""
        policy = start(cfg, str(init))
        sampler = build_sampler(cfg, policy)
        return cls(choose_curriculum(cfg, sampler, policy.tokenizer, out), policy, sampler, out, section)

    def train(self, recipe: dict[str, Any] | None = None, resume: bool = False, progress: bool = False) -> Path:
        """Run the post-training loop to max_steps or the time budget; held-out evaluation before the first step
        and every eval_every steps. Returns the last checkpoint."""
        return run(self, self.cfg, self.out, self.section, recipe or {}, self.policy, self.optimizer,
                   self.cfg.max_steps, self.cfg.eval_every, resume, progress, validate_first=True)

    # --- 1-2. generation, rewards, dynamic sampling ----------------------------------------------------------
    def rollout(self) -> tuple[list[list[Sample]], list[list[float]], dict[str, Any]]:
        """P groups of G scored samples; with dynamic sampling, groups of equal rewards are replaced by fresh
        prompts for up to max_sampling_rounds generation rounds (if still short, the step uses fewer groups)."""
        cfg = self.cfg
        kept: list[tuple[list[Sample], list[float]]] = []
        per_fn_all: dict[str, list[float]] = {r.name: [] for r in self.rewards}
        totals_all: list[float] = []
        formats: list[float] = []
        truncated = 0  # over every completion sampled this step, kept or dropped
        first_zero_std = None
        rounds = 0
        while len(kept) < cfg.prompts_per_step and rounds < cfg.max_sampling_rounds:
            rounds += 1
            need = cfg.prompts_per_step - len(kept)
            prompts = [next(self.prompts) for _ in range(need)]
            self.prompts_used += need
            groups = self.sampler.sample(prompts, cfg.num_generations, cfg.temperature, cfg.top_p,
                                         seed=self.rng.getrandbits(31))
            flat = [s for g in groups for s in g]
            truncated += sum(s.truncated for s in flat)
            names = dict.fromkeys(k for s in flat for k in s.prompt.columns)  # tasks differ in their columns
            columns = {k: [s.prompt.columns.get(k) for s in flat] for k in names}
            columns["completion_ids"] = [s.ids for s in flat]
            totals, per_fn = score(self.rewards, [s.text for s in flat], columns, cfg.gate)
            totals_all += totals
            formats += per_fn["format"] if "format" in per_fn else format_reward([s.text for s in flat])
            for name, values in per_fn.items():
                per_fn_all[name] += values
            G = cfg.num_generations
            zero_std = 0
            for j, group in enumerate(groups):
                r = totals[j * G:(j + 1) * G]
                equal = max(r) - min(r) < 1e-9
                zero_std += equal
                if not (cfg.dynamic_sampling and equal):
                    kept.append((group, r))
            if first_zero_std is None:
                first_zero_std = zero_std / len(groups)
            if not cfg.dynamic_sampling:
                break
        samples = [s for g, _ in kept for s in g]
        n = max(1, len(totals_all))
        stats: dict[str, Any] = {
            "reward": sum(totals_all) / n,
            "reward_std": float(torch.tensor(totals_all).std()) if len(totals_all) > 1 else 0.0,
            "format": sum(formats) / n,
            "frac_reward_zero_std": first_zero_std,
            "sampling_rounds": rounds,
            "groups": len(kept),
            "completion_length": sum(len(s.ids) for s in samples) / max(1, len(samples)),
            "completion_length_max": max((len(s.ids) for s in samples), default=0),
            "truncated": sum(s.truncated for s in samples) / max(1, len(samples)),
            # every completion hit the length limit and overlong filtering masks it: nothing to learn from
            "masked_all": int(cfg.mask_truncated and truncated == len(totals_all) > 0),
        }
        for name, values in per_fn_all.items():
            t = torch.tensor(values)
            stats[f"rewards/{name}"] = float(t.mean())
            stats[f"rewards/{name}_std"] = float(t.std()) if len(values) > 1 else 0.0
        accuracy = next((k for k in ("accuracy", "countdown") if k in per_fn_all), None)
        if accuracy:
            stats["accuracy"] = sum(v >= 1.0 for v in per_fn_all[accuracy]) / n
        return [g for g, _ in kept], [r for _, r in kept], stats

    def make_batch(self, groups: list[list[Sample]], rewards: list[list[float]]) -> Batch:
        cfg = self.cfg
        flat = [s for g in groups for s in g]
        advantages, zero_std = group_advantages(torch.tensor([x for r in rewards for x in r]),
                                                cfg.num_generations, cfg.scale_rewards)
        # advantages are per group; unless groups share their prompt's forward, each row stands alone from here
        # on, so rows go longest first (see chunks)
        rows = [s.prompt.ids + s.ids for s in flat]
        order = list(range(len(flat))) if cfg.share_prompt else sorted(range(len(flat)), key=lambda i: -len(rows[i]))
        flat, rows, advantages, zero_std = [flat[i] for i in order], [rows[i] for i in order], advantages[order], \
            zero_std[order]
        ids = pad_right(rows, self.tok.pad_id)
        mask = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        for i, s in enumerate(flat):
            if cfg.mask_truncated and s.truncated:
                continue
            p = len(s.prompt.ids)
            mask[i, p - 1:p - 1 + len(s.ids)] = 1.0  # position t predicts token t+1
        signal = bool((mask.any(1) & ~zero_std).any())
        return Batch(ids.to(self.device), mask.to(self.device), advantages.to(self.device), [len(r) for r in rows],
                     [len(s.prompt.ids) for s in flat], cfg.num_generations if cfg.share_prompt else 0, signal)

    # --- 4. reference and old log-probs ----------------------------------------------------------------------
    @torch.no_grad()
    def logps(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """[N, L-1] log-probabilities of the batch's completion tokens under `model` (0 elsewhere)."""
        out = torch.zeros_like(batch.mask)
        for c, width in batch.chunks(self.cfg.micro_batch):
            out[c, :width - 1] = self.score(model, batch, c, width)[0]
        return out

    @staticmethod
    def score(model: torch.nn.Module, batch: Batch, rows: slice, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`completion_logps` of a micro-batch, its groups' prompts run once when the batch shares them."""
        ids, mask = batch.ids[rows, :width], batch.mask[rows, :width - 1]
        if batch.group:
            return shared_prompt_logps(model, ids, mask, batch.prompt_lens[rows], batch.group)
        return completion_logps(model, ids, mask)

    # --- 5. update -------------------------------------------------------------------------------------------
    def update(self, batch: Batch, optimizer_step: Callable[[], float]) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        chunks = batch.chunks(cfg.micro_batch)
        tokens = batch.mask.sum()
        sums = {"loss": 0.0, "clip_frac": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "entropy": 0.0}
        grad_norm = 0.0
        for _ in range(cfg.mu):
            for c, width in chunks:
                mask = batch.mask[c, :width - 1]
                logps, logits = self.score(self.model, batch, c, width)
                old = None if batch.old_logps is None else batch.old_logps[c, :width - 1]
                ref = None if batch.ref_logps is None else batch.ref_logps[c, :width - 1]
                loss, stats = grpo_loss(logps, old, batch.advantages[c], mask, loss_type=cfg.loss_type,
                                        eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, ref_logps=ref,
                                        max_completion_length=cfg.max_new_tokens, num_items_in_batch=tokens,
                                        num_micro_batches=len(chunks), kl_bias_correction=cfg.kl_bias_correction)
                loss.backward()
                share = float(mask.sum() / tokens.clamp(min=1)) / cfg.mu  # token-weighted means over the step
                sums["loss"] += loss.item() / cfg.mu
                for k in ("clip_frac", "clip_low", "clip_high", "kl"):
                    if k in stats:
                        sums[k] += float(stats[k]) * share
                if mask.any():
                    sums["entropy"] += float(token_entropy(logits.detach()).mean()) * share
            grad_norm = optimizer_step()
        if cfg.beta == 0:
            del sums["kl"]
        return {**sums, "grad_norm": grad_norm}

    def check_signal(self, stats: dict[str, Any], signal: bool) -> dict[str, int]:
        """Count consecutive steps without learning signal and warn (once per cause) when a run cannot learn."""
        cfg = self.cfg
        self.no_signal_streak = 0 if signal else self.no_signal_streak + 1
        if stats["masked_all"] and not self.warned_masked:
            self.warned_masked = True
            print(f"grpo warning: step {self.step}: every completion ran to max_new_tokens={cfg.max_new_tokens} "
                  f"without EOS or </answer> and mask_truncated masks them all, so nothing is learned; the model "
                  f"does not stop: raise max_new_tokens or set mask_truncated = false", file=sys.stderr)
        if cfg.no_signal_warn_steps and self.no_signal_streak == cfg.no_signal_warn_steps:
            why = ("every completion was truncated and masked" if stats["masked_all"] else
                   f"every group's completions earned equal rewards (mean {stats['reward']:.2f})")
            print(f"grpo warning: {self.no_signal_streak} steps in a row without learning signal (to step "
                  f"{self.step}): {why}, so every advantage is 0 and the policy does not change; give the model "
                  f"a task it sometimes solves (an easier level, curriculum = \"auto\"), a partial-credit reward, "
                  f"or more samples per prompt", file=sys.stderr)
        return {"no_signal": int(not signal), "no_signal_streak": self.no_signal_streak}

    # --- the step, evaluation, checkpoints ------------------------------------------------------------------
    def train_step(self, step: int, optimizer_step: Callable[[], float]) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.ref_refresh_every and self.ref is not None and step % cfg.ref_refresh_every == 0 and step > 0:
            self.ref.load_state_dict(self.model.state_dict())
        t0 = time.perf_counter()
        groups, rewards, stats = self.rollout()
        t1 = time.perf_counter()
        update: dict[str, float] = {}
        t2 = t3 = t1
        batch = self.make_batch(groups, rewards) if groups else None
        # no signal, no step: zero gradients would still move the weights by Adam's momentum (with β > 0 the KL
        # term alone still pulls toward the reference)
        if batch is not None and (batch.signal or (cfg.beta and batch.mask.any())):
            if cfg.mu > 1:
                batch.old_logps = self.logps(self.model.eval(), batch)
            if self.ref is not None:
                batch.ref_logps = self.logps(self.ref, batch)
            t2 = time.perf_counter()
            update = self.update(batch, optimizer_step)
            t3 = time.perf_counter()
        self.step = step + 1
        health = self.check_signal(stats, batch is not None and batch.signal)
        return {**stats, **health, **update, "time/generation": t1 - t0, "time/reference": t2 - t1,
                "time/update": t3 - t2}

    def validate(self) -> dict[str, float]:
        """Held-out pass@1, pass@k and format on the recipe's tasks and levels ({} with a data file)."""
        if not self.held_out:
            return {}
        cfg = self.cfg
        result = evaluate(self.sampler, self.held_out, cfg.eval_samples, cfg.eval_temperature, cfg.eval_top_p,
                          seed=cfg.seed + 10_000)
        return {f"eval/{k}": v for k, v in result.items()}

    def extra_files(self) -> list[Path]:
        files = []
        if self.ref is not None:  # the reference may have been refreshed: keep it so a resume continues exactly
            path = self.out / REFERENCE_FILE
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({k: v.contiguous() for k, v in self.ref.state_dict().items()}, str(tmp))
            tmp.replace(path)
            files.append(path)
        if (self.out / CURRICULUM_FILE).exists():  # the checkpoint says which task and level it was trained on
            files.append(self.out / CURRICULUM_FILE)
        return files

    def state_dict(self) -> dict[str, Any]:
        return {"prompts_used": self.prompts_used, "rng": self.rng.getstate(),
                "no_signal_streak": self.no_signal_streak}

    def load_state_dict(self, state: dict[str, Any], checkpoint: Path) -> None:
        self.step = state["step"]
        if self.ref is not None:
            self.ref.load_state_dict(load_file(str(checkpoint / REFERENCE_FILE)))
        for _ in range(state["prompts_used"] - self.prompts_used):  # continue the prompt stream where it stopped
            next(self.prompts)
        self.prompts_used = state["prompts_used"]
        self.rng.setstate(state["rng"])
        self.no_signal_streak = state["no_signal_streak"]

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.3f}", "acc": f"{metrics.get('accuracy', 0):.2f}"}


def grpo(recipe: dict[str, Any], out_dir: str | Path, init: str | Path | None = None, resume: bool = False,
         progress: bool = True, section: str = "grpo") -> Path:
    """Run GRPO from `init` (default: recipe [grpo].init); returns the final checkpoint directory.
    `section` names the recipe table (R1 has two RL stages)."""
    cfg, out, init = prepare(GRPOConfig, recipe, section, out_dir, init, resume)
    recipe = {**recipe, section: asdict(cfg) | {"init": init}}
    with threads(cfg.threads):
        return GRPOStage.load(cfg, init, out, section).train(recipe, resume, progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_arguments(parser, "grpo")
    parser.add_argument("--section", default="grpo", help="recipe table to read (default grpo)")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    ckpt = grpo(recipe, args.out, args.init, args.resume, not args.no_progress, args.section)
    print(f"final checkpoint: {ckpt}")
    return 0
