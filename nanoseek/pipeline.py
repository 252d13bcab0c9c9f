"""`nanoseek run`: the whole recipe, stage after stage, into one run directory.

    nanoseek run [--recipe tiny] [--out runs/nanoseek] [--set grpo_zero.max_steps=50]

    OUT/data/       synth (built-in corpora, SFT conversations, RL prompts, eval sets) -> curated (the corpus;
                    sets/: the SFT and RL sets) -> tokenizer -> tokens
    OUT/pretrain/   the base model (MTP, aux-loss-free balancing)                           [pretrain]
    OUT/sft/        cold start: SFT of the base on readable reasoning conversations          [sft_cold]
    OUT/r1_zero/    R1-Zero: GRPO straight from the base, R1-Zero template                   [grpo_zero]
    OUT/r1/         R1: GRPO from the cold-start model, chat template                        [grpo_r1]
    OUT/rejection/  the R1 model's verified, clean answers + instruct conversations          [rejection]
    OUT/student_base/ a smaller model ([distill] student_preset) pretrained on the same tokens [student_pretrain]
    OUT/distill/    the student base fine-tuned on the R1 model's data                       [distill] [distill_sft]
    OUT/student_rl/ the student base trained by GRPO instead, for rejection + distill time   [grpo_student]
    OUT/eval/       base, sft, r1_zero, r1, student and student_rl on the held-out tasks      [eval]
    OUT/eval/rl/    each RL stage's start and end model on the task and level it trained on   [eval] rl_n
    OUT/report.md   the report card (report.json, report_plots/*.png)

Each stage writes `OUT/<stage>/stage.json` when it finishes: its wall time, what it produced (paths relative
to OUT) and its key metrics. A re-run skips finished stages; a stage whose directory exists without
stage.json was interrupted and resumes from its last checkpoint. Stages only read earlier stages' output, and
every data file comes from OUT/data, so a run directory is self-contained. `[run] threads` sets torch's CPU
threads for every stage.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import write_json
from nanoseek.config import check_tables, from_dict, load_recipe
from nanoseek.data.builtin import DataConfig, training_set
from nanoseek.eval.evaluate import DEFAULT_TASKS
from nanoseek.eval.games import GAMES
from nanoseek.eval.tasks import load_task
from nanoseek.posttrain.stage import Runner


@dataclass
class RunConfig:
    """[run] of a run recipe: settings of the `nanoseek run` process itself."""

    threads: int = 0  # torch CPU threads for every stage (0: torch's default); small models run best on 1
    seed: int | None = None  # one seed for the whole run: set into every stage table's `seed` (see with_seed)


# the tables whose `seed` field a run seed sets: data, weights' initialisation, batch order, rollouts, held-out draws
SEEDED_TABLES = ("data", "pretrain", "sft_cold", "grpo_zero", "grpo_r1", "rejection", "distill", "distill_sft",
                 "grpo_student", "eval")


def with_seed(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe with `[run] seed` (when set) copied into every seeded table, so one number makes a new,
    independent run of the whole recipe: other data, initial weights, rollouts and held-out problems."""
    seed = from_dict(RunConfig, recipe.get("run"), "run").seed
    if seed is None:
        return recipe
    return {**recipe, **{t: {**recipe.get(t, {}), "seed": seed} for t in SEEDED_TABLES}}


@dataclass
class EvalConfig:
    """[eval] of a run recipe: how every model of the run is scored (`nanoseek.eval.evaluate`). The same
    settings for all models, so the report's rows compare like with like."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # task specs, games included ("nim")
    k: int = 8  # samples per problem: pass@1 is their mean, pass@k and maj@k use all k
    n: int = 50  # problems per built-in task
    difficulty: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.6  # DeepSeek-R1's evaluation protocol
    top_p: float = 0.95
    max_new_tokens: int = 128
    games: int = 20  # games per opponent (optimal, random) for game tasks
    rl_n: int = 256  # problems on which each RL stage's start and end model are compared (its trained task and level)
    threshold: float = 0.5  # the verification loop abstains below this agreement
    bpb: bool = True  # bits per byte on held-out worked solutions
    batch: int = 256  # concurrent samples: per-prompt seeds make results independent of it, bigger is faster
    seed: int = 0


# the models the report compares, the stage that produced each, and the prompt template it was trained with:
# the base model was pretrained on R1-Zero-template documents; SFT (and so the student) renders the chat
# template; each RL stage uses its recipe table's `template`
EVAL_MODELS = {"base": "pretrain", "sft": "sft", "r1_zero": "r1_zero", "r1": "r1", "student": "distill",
               "student_rl": "student_rl"}
FINAL_MODEL = "r1"  # what the user is told to chat with: the chat-template reasoning model
# each RL stage: its recipe table and the stage whose checkpoint it started from; the eval stage measures its
# lift on what it trained on, start model against end model on the same problems
RL_STAGES = {"r1_zero": ("grpo_zero", "pretrain"), "r1": ("grpo_r1", "sft"),
             "student_rl": ("grpo_student", "student_base")}


def check_recipe(recipe: dict[str, Any]) -> None:
    """Parse every table up front, so a typo fails in the first second, not after pretraining."""
    from nanoseek.posttrain.distill import DistillConfig
    from nanoseek.posttrain.grpo import GRPOConfig
    from nanoseek.posttrain.rejection import RejectionConfig
    from nanoseek.posttrain.sft import SFTConfig
    from nanoseek.train.pretrain import PretrainConfig

    check_tables(recipe)
    from_dict(RunConfig, recipe.get("run"), "run")
    tables = {"sft_cold": SFTConfig, "grpo_zero": GRPOConfig, "grpo_r1": GRPOConfig, "rejection": RejectionConfig,
              "distill": DistillConfig, "distill_sft": SFTConfig, "grpo_student": GRPOConfig, "eval": EvalConfig}
    missing = [name for name in tables if name not in recipe]
    if missing:
        raise ValueError(f"recipe {recipe.get('name', '?')!r} has no {missing} table(s); `nanoseek run` needs "
                         f"{list(tables)} (see recipes/tiny.toml)")
    for name, cls in tables.items():
        cfg = from_dict(cls, recipe[name], name)
        try:
            if hasattr(cfg, "validate"):
                cfg.validate()
        except ValueError as e:  # validate() names its config class's usual table, not this one
            raise ValueError(f"[{name}] {e}") from e
    distill = from_dict(DistillConfig, recipe["distill"], "distill")
    if not distill.student_preset:
        raise ValueError("[distill] student_preset: `nanoseek run` pretrains the student as this preset")
    from_dict(PretrainConfig, {**recipe.get("pretrain", {}), **recipe.get("student_pretrain", {})}, "student_pretrain")
    cfg = from_dict(EvalConfig, recipe["eval"], "eval")
    if not cfg.tasks:
        raise ValueError("[eval] tasks: no tasks to evaluate")
    for spec in cfg.tasks:  # an unknown task or a missing file is named now
        if spec not in GAMES:
            load_task(spec, 1, cfg.seed, cfg.difficulty)
    if cfg.rl_n < 1:
        raise ValueError(f"[eval] rl_n must be >= 1, got {cfg.rl_n}")
    choices = {(t, tuple(levels)) for table, _ in RL_STAGES.values() for t, levels in _rl_choices(recipe, table)}
    for task, levels in sorted(choices):
        try:  # every task and level an RL stage may train on holds rl_n held-out problems to measure its lift on
            load_task(task, cfg.rl_n, cfg.seed, list(levels))
        except ValueError as e:
            raise ValueError(f"[eval] rl_n = {cfg.rl_n}: {e}") from e


def model_templates(recipe: dict[str, Any]) -> dict[str, str]:
    """The template each evaluated model was trained with (passed to `evaluate` explicitly: a GRPO checkpoint
    records its stage as "grpo" whatever its recipe table, so `template="auto"` cannot find the table)."""
    from nanoseek.posttrain.grpo import GRPOConfig

    return {"base": "r1_zero", "sft": "chat", "student": "chat",
            **{model: from_dict(GRPOConfig, recipe[table], table).template
               for model, table in (("r1_zero", "grpo_zero"), ("r1", "grpo_r1"), ("student_rl", "grpo_student"))}}


def _rl_choices(recipe: dict[str, Any], table: str) -> list[tuple[str, list[int]]]:
    """The (built-in task, levels) pairs an RL table may train on: each task and level an auto curriculum
    can pick, else each task at the table's levels; none for a data file."""
    from nanoseek.posttrain.grpo import GRPOConfig

    cfg = from_dict(GRPOConfig, recipe[table], table)
    if cfg.data:
        return []
    tasks = [t for t, w in cfg.tasks.items() if w > 0]
    if cfg.curriculum == "auto":
        return [(t, [level]) for t in tasks for level in cfg.difficulty]
    return [(t, list(cfg.difficulty)) for t in tasks]


def rl_target(recipe: dict[str, Any], table: str, stage_dir: Path) -> tuple[list[str], list[int]] | None:
    """The built-in tasks and levels an RL stage trained on: what its auto curriculum chose (it keeps the
    choice in stage_dir/curriculum.json), else its recipe table's tasks and difficulty; None for a data file."""
    from nanoseek.posttrain.grpo import CURRICULUM_FILE, GRPOConfig

    path = stage_dir / CURRICULUM_FILE
    if path.exists():
        chosen = json.loads(path.read_text())
        return [chosen["task"]], [chosen["level"]]
    cfg = from_dict(GRPOConfig, recipe[table], table)
    return None if cfg.data else ([t for t, w in cfg.tasks.items() if w > 0], list(cfg.difficulty))


def describe_target(target: tuple[list[str], list[int]]) -> str:
    """"arithmetic level 1", "logic+multihop level 1+2"."""
    tasks, levels = target
    return f"{'+'.join(tasks)} level {'+'.join(map(str, levels))}"


@dataclass
class Run(Runner):
    """The default run's stages: the post-training runner plus the recipe they all read."""

    recipe: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def checkpoint(self, name: str) -> Path:
        """The checkpoint a finished stage produced."""
        return self.out / self.done(name)["checkpoint"]

    def training_set(self, name: str) -> Path:
        """A curated training set of this run's data stage (sft.jsonl, rl.jsonl)."""
        return training_set(self.stage_dir("data"), name)


def _metrics(stage_dir: Path) -> list[dict[str, Any]]:
    from nanoseek.train.metrics import read_metrics

    path = stage_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def _last(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(records) if key in r), None)


def _first(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in records if key in r), None)


# --- stages -------------------------------------------------------------------------------------------------

def stage_data(run: Run, resume: bool) -> dict[str, Any]:
    """The built-in data set into OUT/data (`data.builtin.build`; deterministic: an interrupted stage redoes it)."""
    from nanoseek.data.builtin import build

    cfg = from_dict(DataConfig, run.recipe.get("data"), "data")
    cfg.validate()
    if resume:
        shutil.rmtree(run.stage_dir("data"))
    made = build(run.stage_dir("data"), cfg, run.progress)
    tokens = {f"{split}_tokens": n for split, n in made["tokens"].items()}
    sets = {f"{Path(name).stem}_kept": c["kept"] for name, c in made["sets"].items()}
    return {**made, "metrics": {"vocab_size": made["vocab_size"], **tokens, **sets}}


def _pretrain(run: Run, name: str, resume: bool, model: dict[str, Any] | None = None,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pretrain on this run's token shards into OUT/<name>: the recipe's [model] and [pretrain], or a
    different [model] table and [pretrain] fields merged over the recipe's."""
    from nanoseek.train.pretrain import pretrain

    data = run.stage_dir("data")
    recipe = {**run.recipe, "data": {**run.recipe.get("data", {}), "tokenizer_dir": str(data / "tokenizer"),
                                     "tokens_dir": str(data / "tokens")}}
    # [data] fields of the data stage, not of pretraining. The run's corpus is written in the mix's proportions
    # (documents per domain) and drawn as it is: the loader applying the mix again, by tokens, moved the RL lifts
    # within their seed-to-seed noise (README, "Where the lift comes from")
    for key in ("difficulty", "curate", "mix", "task_mix", "fact_share"):
        recipe["data"].pop(key, None)
    if model is not None:
        recipe["model"] = model
    recipe["pretrain"] = {**run.recipe.get("pretrain", {}), **(overrides or {})}
    ckpt = pretrain(recipe, run.stage_dir(name), resume=resume, progress=run.progress)
    records = _metrics(run.stage_dir(name))
    metrics = {"steps": _last(records, "step"), "loss": _last(records, "loss"), "val_loss": _last(records, "val_loss"),
               "val_bpb": _last(records, "val_bpb")}
    return {"dir": name, "checkpoint": run.rel(ckpt), "metrics": {k: v for k, v in metrics.items() if v is not None}}


def stage_pretrain(run: Run, resume: bool) -> dict[str, Any]:
    return _pretrain(run, "pretrain", resume)


def stage_student_base(run: Run, resume: bool) -> dict[str, Any]:
    """The student's own base model: R1 distilled into smaller *pretrained* models (Qwen, Llama), so the
    student is first pretrained on the same tokens, as a smaller preset ([distill] student_preset), with
    [student_pretrain] fields over [pretrain]."""
    from nanoseek.posttrain.distill import DistillConfig

    cfg = from_dict(DistillConfig, run.recipe["distill"], "distill")
    return _pretrain(run, "student_base", resume, model={"preset": cfg.student_preset},
                     overrides=run.recipe.get("student_pretrain"))


def _sft_metrics(stage_dir: Path) -> dict[str, Any]:
    records = _metrics(stage_dir)
    data = _first(records, "train_conversations")
    metrics = {"conversations": data, "steps": _last(records, "step"), "loss": _last(records, "loss"),
               "val_loss": _last(records, "val_loss")}
    return {k: v for k, v in metrics.items() if v is not None}


def stage_sft(run: Run, resume: bool) -> dict[str, Any]:
    """Cold start (R1 §2.3.1): SFT of the base on the built-in readable reasoning conversations."""
    from nanoseek.posttrain.sft import sft

    out = run.stage_dir("sft")
    ckpt = sft(run.recipe, out, init=run.checkpoint("pretrain"), data=[run.training_set("sft.jsonl")], resume=resume,
               progress=run.progress, section="sft_cold")
    return {"dir": "sft", "checkpoint": run.rel(ckpt), "metrics": _sft_metrics(out)}


def _grpo_stage(run: Run, name: str, section: str, init: Path, resume: bool) -> dict[str, Any]:
    from nanoseek.posttrain.grpo import GRPOConfig, grpo

    out = run.stage_dir(name)
    ckpt = grpo(run.recipe, out, init=init, resume=resume, progress=run.progress, section=section)
    records = _metrics(out)
    metrics = {"steps": _last(records, "step"), "rl_seconds": _last(records, "time/train_total"),
               "heldout_pass@1_start": _first(records, "eval/pass@1"),
               "heldout_pass@1_end": _last(records, "eval/pass@1"), "reward_end": _last(records, "reward"),
               # steps that could not learn (GRPO warned): no reward spread, or every completion masked as truncated
               "steps_without_signal": sum(r.get("no_signal", 0) for r in records),
               "steps_masked_all": sum(r.get("masked_all", 0) for r in records)}
    info: dict[str, Any] = {"dir": name, "checkpoint": run.rel(ckpt),
                            "metrics": {k: v for k, v in metrics.items() if v is not None}}
    target = rl_target(run.recipe, section, out)  # what the auto curriculum chose, else the recipe's tasks
    info["metrics"]["trained_on"] = (describe_target(target) if target
                                     else from_dict(GRPOConfig, run.recipe[section], section).data)
    return info


def stage_r1_zero(run: Run, resume: bool) -> dict[str, Any]:
    """R1-Zero (R1 §2.2): RL straight from the base model, rule rewards only."""
    return _grpo_stage(run, "r1_zero", "grpo_zero", run.checkpoint("pretrain"), resume)


def stage_r1(run: Run, resume: bool) -> dict[str, Any]:
    """R1's reasoning RL (§2.3.2), from the cold-start model."""
    return _grpo_stage(run, "r1", "grpo_r1", run.checkpoint("sft"), resume)


def stage_rejection(run: Run, resume: bool) -> dict[str, Any]:
    """Rejection sampling (R1 §2.3.3): the R1 model's correct, clean answers, plus instruct conversations from
    this run's built-in SFT data (unless the recipe names its own)."""
    from nanoseek.posttrain.rejection import rejection

    out = run.stage_dir("rejection")
    table = dict(run.recipe["rejection"])
    table.setdefault("instruct_data", str(run.training_set("sft.jsonl")))
    path = rejection({**run.recipe, "rejection": table}, out, init=run.checkpoint("r1"), progress=run.progress)
    summary = json.loads((out / "rejection.json").read_text())
    if summary["reasoning_kept"] == 0:
        raise RuntimeError(f"rejection sampling kept none of the R1 model's {summary['samples']} samples "
                           f"(drops: {summary['counts']}); distillation would have nothing to learn from. Train "
                           f"the R1 model longer or widen [rejection] (prompts, samples, tasks, filters)")
    return {"data": run.rel(path), "metrics": {k: summary[k] for k in ("prompts", "samples", "reasoning_kept",
                                                                       "instruct_added", "written")}}


def stage_distill(run: Run, resume: bool) -> dict[str, Any]:
    """Distillation (R1 §2.4): the pretrained student fine-tuned on the R1 model's curated samples."""
    from nanoseek.posttrain.distill import distill

    out = run.stage_dir("distill")
    ckpt = distill(run.recipe, out, teacher=run.checkpoint("r1"), student=run.checkpoint("student_base"),
                   data=run.out / run.done("rejection")["data"], resume=resume, progress=run.progress)
    return {"dir": "distill/student", "checkpoint": run.rel(ckpt), "metrics": _sft_metrics(out / "student")}


def stage_student_rl(run: Run, resume: bool) -> dict[str, Any]:
    """The other road for the small model (R1 §4.1): GRPO on the student base itself ([grpo_student]) for
    the wall time distillation cost, the teacher's sampling (rejection) included, so the report compares the
    two at equal cost."""
    budget = run.done("rejection")["wall_seconds"] + run.done("distill")["wall_seconds"]
    recipe = {**run.recipe, "grpo_student": {**run.recipe["grpo_student"], "time_budget_s": budget}}
    info = _grpo_stage(Run(run.out, recipe, run.progress), "student_rl", "grpo_student",
                       run.checkpoint("student_base"), resume)
    info["metrics"]["time_budget_s"] = budget
    return info


def _levels(difficulty: int | list[int]) -> list[int]:
    return [difficulty] if isinstance(difficulty, int) else list(difficulty)


def _rl_eval(run: Run, cfg: EvalConfig, known: dict[str, list[tuple[str, dict[str, Any]]]], stage: str,
             target: tuple[list[str], list[int]], template: str, out: Path) -> str:
    """Results (a path relative to OUT) of `stage`'s model on [eval] rl_n problems of the target tasks and
    levels: results already made that hold exactly those problems and samples (same template, tasks, levels,
    n, k, sampling and seed: per-question seeds make them identical), else a fresh evaluation into `out`.
    `known` holds each stage's results so far and receives the new ones."""
    from nanoseek.eval.evaluate import evaluate

    tasks, levels = target
    want = {"k": cfg.k, "n": cfg.rl_n, "difficulty": levels, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    path = out / "results.json"
    if path.exists():  # an interrupted eval stage got this far
        known.setdefault(stage, []).append((run.rel(path), json.loads(path.read_text())))
    for where, r in known.get(stage, []):
        got = {**r["settings"], "difficulty": _levels(r["settings"]["difficulty"])}
        if (r["template"] == template and all(k in r["tasks"] and "per_problem" in r["tasks"][k] for k in tasks)
                and all(got.get(key) == value for key, value in want.items())):
            return where
    print(f"[eval] {stage} on {describe_target(target)}: {cfg.rl_n} problems × {cfg.k} samples ({template} template)")
    result = evaluate(run.checkpoint(stage), tasks, cfg.k, cfg.rl_n, template=template, temperature=cfg.temperature,
                      top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, difficulty=levels, seed=cfg.seed,
                      threshold=cfg.threshold, consistency=False, bpb=False, batch=cfg.batch, out=out,
                      progress=run.progress)
    known.setdefault(stage, []).append((run.rel(path), result))
    return run.rel(path)


def rl_evals(run: Run, cfg: EvalConfig, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each finished RL stage's start and end model on the task and level it trained on, the same rl_n
    problems for both, in the stage's template: {stage: {trained_on, tasks, difficulty, start_model,
    start, end}} with start/end the paths of their results (OUT/eval/rl/<stage>/{start,end}/results.json,
    or a main evaluation that already covers those problems)."""
    from nanoseek.posttrain.grpo import GRPOConfig

    known = {EVAL_MODELS[m]: [(f"eval/{m}/results.json", r)] for m, r in results.items()}
    names = {stage: model for model, stage in EVAL_MODELS.items()}
    out = {}
    for name, (table, start) in RL_STAGES.items():
        target = rl_target(run.recipe, table, run.stage_dir(name))
        if target is None:
            continue  # trained on a data file: no held-out split of it to draw problems from
        template = from_dict(GRPOConfig, run.recipe[table], table).template
        entry: dict[str, Any] = {"trained_on": describe_target(target), "tasks": target[0], "difficulty": target[1],
                                 "start_model": names.get(start, start)}
        for role, stage in (("start", start), ("end", name)):
            entry[role] = _rl_eval(run, cfg, known, stage, target, template, run.stage_dir("eval") / "rl" / name / role)
        out[name] = entry
    return out


def _rl_results(run: Run, entry: dict[str, Any]) -> dict[str, Any]:
    """An rl_evals entry with its start and end results read back."""
    return {**entry, **{role: json.loads((run.out / entry[role]).read_text()) for role in ("start", "end")}}


def stage_eval(run: Run, resume: bool) -> dict[str, Any]:
    """Every model on the same held-out tasks, each in the template it was trained with; then each RL stage's
    start and end model paired on what the stage trained on (rl_evals). Results that exist are not made
    again: an interrupted stage resumes per model and per RL measurement."""
    from nanoseek.eval.evaluate import evaluate
    from nanoseek.eval.report import model_summary, paired_lift

    cfg = from_dict(EvalConfig, run.recipe["eval"], "eval")
    templates = model_templates(run.recipe)
    results = {}
    for model, stage in EVAL_MODELS.items():
        out = run.stage_dir("eval") / model
        if (out / "results.json").exists():
            results[model] = json.loads((out / "results.json").read_text())
            continue
        print(f"[eval] {model} ({templates[model]} template)")
        results[model] = evaluate(run.checkpoint(stage), cfg.tasks, cfg.k, cfg.n, template=templates[model],
                                  temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                  difficulty=cfg.difficulty, seed=cfg.seed, threshold=cfg.threshold,
                                  games=cfg.games, bpb=cfg.bpb, batch=cfg.batch, out=out, progress=run.progress)
    rl = rl_evals(run, cfg, results)
    pass1 = {m: model_summary(r["tasks"])["pass@1"] for m, r in results.items()}
    metrics = {f"{m}_pass@1": p for m, p in pass1.items() if p is not None}
    for name, entry in rl.items():
        r = _rl_results(run, entry)
        metrics[f"{name}_lift"] = paired_lift(r["start"], r["end"], r["tasks"])["lift"]
    return {"results": {m: f"eval/{m}/results.json" for m in results}, "rl": rl, "metrics": metrics}


def stage_report(run: Run, resume: bool) -> dict[str, Any]:
    """OUT/report.md and report.json from the stages' records, metrics.jsonl files and evaluation results."""
    from nanoseek.eval.report import write_report

    keep = ("name", "wall_seconds", "dir", "checkpoint", "metrics")
    stages = [{k: s[k] for k in keep if k in s} for s in (run.done(name) for name, _ in STAGES if name != "report")]
    evals = {m: json.loads((run.out / path).read_text()) for m, path in run.done("eval")["results"].items()}
    rl = {name: _rl_results(run, e) for name, e in run.done("eval").get("rl", {}).items()}
    report = write_report(run.out, stages, evals, config=run.recipe, rl=rl)
    lift = {k: v["mean"] for k, v in report["lift"].items()}
    return {"report": "report.md", "plots": report["plots"], "metrics": {f"lift_{k}": v for k, v in lift.items()}}


STAGES: list[tuple[str, Callable[[Run, bool], dict[str, Any]]]] = [
    ("data", stage_data),
    ("pretrain", stage_pretrain),
    ("sft", stage_sft),
    ("r1_zero", stage_r1_zero),
    ("r1", stage_r1),
    ("rejection", stage_rejection),
    ("student_base", stage_student_base),
    ("distill", stage_distill),
    ("student_rl", stage_student_rl),
    ("eval", stage_eval),
    ("report", stage_report),
]


def run_pipeline(recipe: dict[str, Any], out: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run (or resume) every stage into `out`; returns the stages' records (their stage.json contents)."""
    recipe = with_seed(recipe)
    check_recipe(recipe)
    cfg = from_dict(RunConfig, recipe.get("run"), "run")
    run = Run(Path(out), recipe, progress)
    run.out.mkdir(parents=True, exist_ok=True)
    write_json(run.out / "recipe.json", recipe)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return [run.run_stage(name, functools.partial(fn, run)) for name, fn in STAGES]
    finally:
        torch.set_num_threads(threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="tiny", help="built-in recipe name or TOML file (default: tiny)")
    parser.add_argument("--out", default="runs/nanoseek", type=Path, help="run directory (default: runs/nanoseek)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--seed", type=int, help="one seed for every stage (= --set run.seed=N): an independent "
                                                      "repeat of the run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set + ([f"run.seed={args.seed}"] if args.seed is not None else []))
    if "vl" in recipe:  # a vision-language recipe (vl, vl-debug): its own stages
        from nanoseek.vl_pipeline import main as vl_main

        return vl_main(recipe, args.out, progress=not args.no_progress)
    stages = run_pipeline(recipe, args.out, progress=not args.no_progress)
    total = sum(s["wall_seconds"] for s in stages)
    print(f"\nall stages done in {total / 60:.1f} min -> {args.out}")
    report = json.loads((args.out / "report.json").read_text())
    for name, lift in report["lift"].items():
        print(f"  {name.replace('_vs_', ' vs ')}: held-out pass@1 {lift['mean'] * 100:+.1f} points (mean over tasks)")
    for name, lift in report["rl_task_lift"].items():
        lo, hi = lift["lift_ci"]
        print(f"  {name} on its RL task ({lift['trained_on']}, {lift['n_problems']} held-out problems × {lift['k']} "
              f"samples): pass@1 {lift['start']:.3f} -> {lift['end']:.3f} ({lift['lift'] * 100:+.1f} points, 95% "
              f"interval [{lo * 100:+.1f}, {hi * 100:+.1f}])")
    print(f"report card: {args.out / 'report.md'}")
    print(f"chat with the model:  nanoseek chat --model {args.out / FINAL_MODEL}")
    return 0
