"""The learning study of a `nanoseek run`: held-out pass@1 on the RL task against RL minutes and against
pretraining minutes, each with its 95% interval, and on arithmetic what the wrong samples got wrong (a fact, or
which part of the question they copied wrong) (README, "Where the lift comes from").

    python bench/learning_study.py --run runs/nanoseek --out runs/study
    python bench/learning_study.py --run runs/nanoseek --out runs/study --parts rl --rl-minutes 1,2,5,10
    python bench/learning_study.py --run runs/nanoseek --out runs/study --parts rl --stages r1_zero \
        --rl-steps 100,200 --set beta=0.04 --tag kl            # a lever: the recipe's RL table with a field changed
    python bench/learning_study.py --run runs/nanoseek --out runs/study --parts facts   # seconds

(rl)       RL minutes. Each RL stage of the run (r1_zero from the run's base, r1 from its SFT model) is trained
           again from the same start, on the task and level the run's stage trained on, for the largest of
           --rl-minutes of RL time (generation + update; held-out curves off), saving a checkpoint as its RL
           time passes each mark (GRPOConfig.save_at_s). One run gives every row: its schedule is the recipe's,
           nearly constant over these minutes, so a mark stands for a run stopped there. --rl-steps marks
           steps instead (levers that change the time per step are then compared per step; each row gives
           its RL seconds); --set FIELD=VALUE changes a field of the stage's recipe table (VALUE in TOML or a
           bare string), --tag names the variant's directory (OUT/rl_<stage>_<tag>).
(pretrain) Pretraining minutes. The recipe's model is pretrained on the run's tokens for each of
           --pretrain-steps (the recipe's own count is the run's base, not trained again), then given the
           run's R1-Zero stage ([grpo_zero], fixed to the run's task and level, the recipe's RL budget).
(facts)    Which number facts the run's base and SFT model know (`fact_probe`): every fact arithmetic level 2
           uses, asked greedily in its worked-solution place, error rates by kind (single digit or teen, + or -).

On arithmetic, each row also classifies the wrong samples by the two worked steps the model wrote
(`arithmetic_errors`): a fact wrong, or both facts right and an operand copied wrong from the question; and
gives the error rate of the facts those steps state, by kind (`fact_errors`), and how often each part of the
question (a op1 b op2 c) was copied wrong into them (`operand_errors`).

Every model is scored by the evaluator the run uses, on the run's rl_n held-out problems of that task and level
(k samples at T 0.6 / top-p 0.95, the run's eval seed), and each lift is paired with its start model.
Results go to OUT/study.json and print as markdown tables. The machine should be otherwise idle: RL minutes
are wall-clock minutes of RL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from nanoseek.common import write_json
from nanoseek.config import from_dict, set_path
from nanoseek.eval.evaluate import evaluate
from nanoseek.eval.report import paired_lift
from nanoseek.pipeline import EvalConfig, Run, _pretrain, describe_target, rl_target
from nanoseek.posttrain.grpo import GRPOConfig, grpo
from nanoseek.train.checkpoint import latest_checkpoint

# RL stage -> (its recipe table, the stage it starts from)
RL_STAGES = {"r1_zero": ("grpo_zero", "pretrain"), "r1": ("grpo_r1", "sft")}


def score(ckpt: Path, target: tuple[list[str], list[int]], template: str, cfg: EvalConfig, out: Path
          ) -> dict[str, Any]:
    """The run's RL measurement of one checkpoint (cached in out/results.json)."""
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    tasks, levels = target
    return evaluate(ckpt, tasks, cfg.k, cfg.rl_n, template=template, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, difficulty=levels, seed=cfg.seed, games=1,
                    consistency=False, bpb=False, batch=cfg.batch, out=out, progress=False)


def fixed_table(recipe: dict[str, Any], table: str, target: tuple[list[str], list[int]], **fields: Any
                ) -> dict[str, Any]:
    """The recipe with an RL table pinned to the run's task and level (no curriculum to measure again)."""
    tasks, levels = target
    return {**recipe, table: {**recipe[table], "curriculum": "fixed", "tasks": dict.fromkeys(tasks, 1.0),
                              "difficulty": levels, **fields}}


def checkpoints_by_rl_time(stage_dir: Path) -> list[tuple[float, Path]]:
    """(RL seconds, checkpoint) of every checkpoint a GRPO run kept."""
    out = []
    for ckpt in sorted((stage_dir / "checkpoints").glob("step_*")):
        meta = json.loads((ckpt / "nanoseek.json").read_text())
        out.append((meta["metrics"].get("time/train_total", 0.0), ckpt))
    return out


STEP_LEFT = re.compile(r"\s*(-?\d+) ([+-]) (-?\d+)")  # a step's "a op b", at the start of a side of "="
STEP_RIGHT = re.compile(r"\s*(-?\d+)")  # its result, at the start of the next side


def _holds(a: int, op: str, b: int, result: int) -> bool:
    return result == (a + b if op == "+" else a - b)


def _stated_steps(text: str) -> list[tuple[int, str, int, int]]:
    """The (a, op, b, result) steps a completion writes, in order: "a op b" at the start of one side of an "="
    and the number starting the next, so the chained "9 - 6 + 3 = 3 + 3 = 6" is (9, -, 6, 3), (3, +, 3, 6) and
    the lines "9 - 6 = 3", "3 + 3 = 6" say the same."""
    out = []
    for line in text.splitlines():
        sides = line.split("=")
        for left, right in zip(sides, sides[1:], strict=False):
            m, r = STEP_LEFT.match(left), STEP_RIGHT.match(right)
            if m and r:
                out.append((int(m[1]), m[2], int(m[3]), int(r[1])))
    return out


def worked_steps(samples: Path) -> list[tuple[dict[str, Any], list[tuple[int, str, int, int]]]]:
    """Each arithmetic sample of an evaluation's samples.jsonl: its record, and the first two worked steps it
    wrote as (a, op, b, result)."""
    out = []
    for line in samples.read_text().splitlines():
        r = json.loads(line)
        if r["task"] == "arithmetic":
            out.append((r, _stated_steps(r["completion"])[:2]))
    return out


def arithmetic_errors(samples: Path) -> dict[str, float]:
    """Shares of an arithmetic evaluation's samples (its samples.jsonl): correct; `copy` (both worked steps are
    true facts and the second starts from the first's result, yet the answer is wrong: an operand or operator
    copied wrong from the question, "8 - 8 + 6 = 0 + 6 = 6" for 8 - 5 + 6); `fact1` / `fact2` (that step's fact
    is wrong); `carry` (the second step does not start from the first's result); `other` (not two worked steps)."""
    counts = dict.fromkeys(("correct", "copy", "fact1", "fact2", "carry", "other"), 0)
    for r, steps in worked_steps(samples):
        if r["correct"]:
            kind = "correct"
        elif len(steps) < 2:
            kind = "other"
        else:
            (a, op1, b, x), (x2, op2, c, y) = steps
            kind = ("fact1" if not _holds(a, op1, b, x) else "carry" if x2 != x else
                    "fact2" if not _holds(x2, op2, c, y) else "copy")
        counts[kind] += 1
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


FACT_KINDS = ("digit +", "digit -", "teen +", "teen -")


QUESTION = re.compile(r"(\d+) ([+-]) (\d+) ([+-]) (\d+)")
OPERANDS = ("a", "op1", "b", "op2", "c")


def operand_errors(samples: Path) -> dict[str, float] | None:
    """For a level-2 arithmetic evaluation: the share of samples with two worked steps that copied each part of
    the question's "a op1 b op2 c" wrong (in the steps "a op1 b = x" and "x op2 c = y" it computed). Session 18's
    R1-Zero plateau was the copying of b and c (README, "Where the lift comes from"). None when the samples carry
    no questions."""
    wrong, n = dict.fromkeys(OPERANDS, 0), 0
    for r, steps in worked_steps(samples):
        question = QUESTION.search(r.get("question") or "")
        if question is None or len(steps) < 2:
            continue
        n += 1
        (a, op1, b, _), (_, op2, c, _) = steps
        asked = [int(x) if x.isdigit() else x for x in question.groups()]
        for name, said, want in zip(OPERANDS, (a, op1, b, op2, c), asked, strict=True):
            wrong[name] += said != want
    return {k: v / n for k, v in wrong.items()} if n else None


def fact_errors(samples: Path) -> dict[str, float | None]:
    """Error rate of each kind of number fact in an arithmetic evaluation's worked steps (the first two of each
    sample): "digit" facts start from a single digit (a level-2 chain's first step), "teen" facts from 10-18 (its
    second step after a sum past 9), each with + or - (None for a kind no sample wrote). Shows which facts a base
    lacks, whatever the answers."""
    return fact_rates([step for _, steps in worked_steps(samples) for step in steps])


def fact_rates(stated: list[tuple[int, str, int, int | None]]) -> dict[str, float | None]:
    """Share of (a, op, b, result) facts stated wrong, by kind (FACT_KINDS; result None: no number said); None
    for a kind with no fact."""
    wrong, seen = dict.fromkeys(FACT_KINDS, 0), dict.fromkeys(FACT_KINDS, 0)
    for a, op, b, result in stated:
        kind = f"{'teen' if a > 9 else 'digit'} {op}"
        seen[kind] += 1
        wrong[kind] += result is None or not _holds(a, op, b, result)
    return {k: wrong[k] / seen[k] if seen[k] else None for k in FACT_KINDS}


def level2_facts() -> list[tuple[int, str, int]]:
    """Every fact a level-2 chain can use: a + b and a - b (b <= a) for a first number up to 18, b a digit."""
    return [(a, op, b) for a in range(19) for b in range(10) for op in "+-" if op == "+" or b <= a]


def fact_probe(ckpt: Path, template: str) -> dict[str, float | None]:
    """Greedy error rate of every level-2 fact (`level2_facts`) by kind (FACT_KINDS), asked the way a worked
    solution states it under the model's template: the question "What is a op b + 3?" and the opened
    reasoning "a op b =" (a teen fact comes second, after "9 + k = a", the only way a chain reaches it).
    Unlike `fact_errors`, every fact is asked equally often, whatever the model writes."""
    from nanoseek.data.synth import r1_zero_prompt
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.posttrain.stage import load_policy

    policy = load_policy(ckpt, train=False)
    tok = policy.tokenizer
    facts, prompts = level2_facts(), []
    for a, op, b in facts:
        question = f"What is 9 + {a - 9} {op} {b}?" if a > 9 else f"What is {a} {op} {b} + 3?"
        worked = (f"9 + {a - 9} = {a}\n" if a > 9 else "") + f"{a} {op} {b} ="
        if template == "r1_zero":
            prompts.append(tok.encode(r1_zero_prompt(question) + "<think>\n" + worked, bos=True))
        else:
            prompts.append(tok.apply_chat_template([{"role": "user", "content": question}],
                                                   add_generation_prompt=True, thinking=True) + tok.encode(worked))
    done = Engine(policy.model, None, max_batch=256, max_len=256).generate(
        prompts, SamplingParams(max_tokens=3, temperature=0.0))
    said = [tok.decode(list(c.tokens)).split() for c in done]
    return fact_rates([(a, op, b, int(w[0]) if w and w[0].isdigit() else None)
                       for (a, op, b), w in zip(facts, said, strict=True)])


def rl_curve(run: Run, stage: str, marks: list[float], out: Path, cfg: EvalConfig, by_steps: bool = False,
             fields: dict[str, Any] | None = None, tag: str = "") -> list[dict[str, Any]]:
    """The stage retrained from its start with a checkpoint at each mark (RL seconds, or steps with by_steps),
    every checkpoint scored on the run's held-out problems of the stage's task."""
    table, start_stage = RL_STAGES[stage]
    target = rl_target(run.recipe, table, run.stage_dir(stage))
    fields = fields or {}
    template = from_dict(GRPOConfig, {**run.recipe[table], **fields}, table).template
    if by_steps:
        every = math.gcd(*(int(m) for m in marks))  # a checkpoint at every mark (and between, when they're uneven)
        marks_at = dict(time_budget_s=0, max_steps=int(max(marks)), save_every=every,
                        keep_checkpoints=int(max(marks)) // every + 1)
    else:
        marks_at = dict(time_budget_s=max(marks), max_steps=1_000_000, save_at_s=marks,
                        keep_checkpoints=len(marks) + 1)
    recipe = fixed_table(run.recipe, table, target, eval_problems=0, **marks_at, **fields)
    stage_out = out / (f"rl_{stage}_{tag}" if tag else f"rl_{stage}")
    done = checkpoints_by_rl_time(stage_out) if (stage_out / "checkpoints").exists() else []
    if len(done) < len(marks):
        grpo(recipe, stage_out, init=run.checkpoint(start_stage), resume=stage_out.exists(), progress=False,
             section=table)
    start = score(run.checkpoint(start_stage), target, template, cfg, stage_out / "eval" / "start")
    rows = [{"stage": stage, "trained_on": describe_target(target), "rl_seconds": 0.0, "steps": 0, "set": fields,
             **paired_lift(start, start, target[0])}]
    evals = [stage_out / "eval" / "start"]
    for seconds, ckpt in checkpoints_by_rl_time(stage_out):
        end = score(ckpt, target, template, cfg, stage_out / "eval" / ckpt.name)
        step = json.loads((ckpt / "nanoseek.json").read_text())["step"]
        rows.append({"stage": stage, "trained_on": describe_target(target), "rl_seconds": seconds, "steps": step,
                     "set": fields, **paired_lift(start, end, target[0])})
        evals.append(stage_out / "eval" / ckpt.name)
        print(f"  {stage} after {seconds / 60:.1f} RL min (step {step}): pass@1 {rows[-1]['end']:.3f}", flush=True)
    if "arithmetic" in target[0]:
        for row, where in zip(rows, evals, strict=True):
            row["errors"] = arithmetic_errors(where / "samples.jsonl")
            row["fact_errors"] = fact_errors(where / "samples.jsonl")
            row["operand_errors"] = operand_errors(where / "samples.jsonl")
    return rows


def pretrain_minutes(run: Run, steps_list: list[int], out: Path, cfg: EvalConfig) -> list[dict[str, Any]]:
    table, _ = RL_STAGES["r1_zero"]
    target = rl_target(run.recipe, table, run.stage_dir("r1_zero"))
    template = from_dict(GRPOConfig, run.recipe[table], table).template
    own = run.recipe["pretrain"]["max_steps"]
    study = Run(out, fixed_table(run.recipe, table, target), progress=False)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():
        os.symlink((run.out / "data").resolve(), out / "data")  # the run's data: the same tokens, not rebuilt
    rows = []
    for steps in steps_list:
        if steps == own:  # the run's own base and R1-Zero stage, as the run made them
            base, rl_ckpt = run.checkpoint("pretrain"), run.checkpoint("r1_zero")
            pretrain_s = run.done("pretrain")["wall_seconds"]
        else:
            name = f"pretrain_{steps}"
            if (study.stage_dir(name) / "stage.json").exists():
                info = json.loads((study.stage_dir(name) / "stage.json").read_text())
            else:
                overrides = {"max_steps": steps, "val_every": steps, "save_every": steps}
                t0 = time.perf_counter()
                info = _pretrain(study, name, study.stage_dir(name).exists(), overrides=overrides)
                info["wall_seconds"] = time.perf_counter() - t0
                write_json(study.stage_dir(name) / "stage.json", info)
            base, pretrain_s = out / info["checkpoint"], info["wall_seconds"]
            rl_dir = out / f"r1_zero_{steps}"
            if not (rl_dir / "checkpoints").exists() or not any((rl_dir / "checkpoints").glob("step_*")):
                grpo(study.recipe, rl_dir, init=base, resume=rl_dir.exists(), progress=False, section=table)
            rl_ckpt = latest_checkpoint(rl_dir)
        start = score(base, target, template, cfg, out / f"eval_{steps}" / "base")
        end = score(rl_ckpt, target, template, cfg, out / f"eval_{steps}" / "r1_zero")
        rows.append({"pretrain_steps": steps, "pretrain_seconds": pretrain_s,
                     "trained_on": describe_target(target), **paired_lift(start, end, target[0])})
        print(f"  pretraining {steps} steps ({pretrain_s / 60:.1f} min): base {rows[-1]['start']:.3f} -> R1-Zero "
              f"{rows[-1]['end']:.3f}", flush=True)
    return rows


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f}"


def ci(pair: list[float], signed: bool = False) -> str:
    f = (lambda v: f"{v * 100:+.1f}") if signed else pct
    return f"[{f(pair[0])}, {f(pair[1])}]"


def print_tables(result: dict[str, Any]) -> None:
    for stage, rows in result.get("rl", {}).items():
        print(f"\n{stage} ({rows[0]['trained_on']}, {rows[0]['n_problems']} held-out problems × {rows[0]['k']}): "
              "pass@1 (%) against RL minutes\n")
        errors = "errors" in rows[0]
        print("| RL minutes | steps | pass@1 | 95% CI | lift | lift 95% CI |" + (
            " copy errors | fact 1 wrong | fact 2 wrong |" if errors else "") + "\n|---|---|---|---|---|---|" + (
            "---|---|---|" if errors else ""))
        for r in rows:
            print(f"| {r['rl_seconds'] / 60:.1f} | {r['steps']} | {pct(r['end'])} | {ci(r['end_ci'])} | "
                  f"{r['lift'] * 100:+.1f} | {ci(r['lift_ci'], True)} |" + (
                      f" {pct(r['errors']['copy'])} | {pct(r['errors']['fact1'])} | {pct(r['errors']['fact2'])} |"
                      if errors else ""))
        if "fact_errors" in rows[0]:
            print("\nworked steps that state a false fact (%), by the fact's first number and operator\n")
            print("| RL minutes | " + " | ".join(FACT_KINDS) + " |\n|---|" + "---|" * len(FACT_KINDS))
            for r in rows:
                print(f"| {r['rl_seconds'] / 60:.1f} | " + " | ".join(pct(r["fact_errors"][k]) for k in FACT_KINDS)
                      + " |")
        if rows[0].get("operand_errors"):
            print("\nparts of the question \"a op1 b op2 c\" copied wrong into the worked steps (%)\n")
            print("| RL minutes | " + " | ".join(OPERANDS) + " |\n|---|" + "---|" * len(OPERANDS))
            for r in rows:
                print(f"| {r['rl_seconds'] / 60:.1f} | " + " | ".join(pct(r["operand_errors"][k]) for k in OPERANDS)
                      + " |")
    if "facts" in result:
        print("\nlevel-2 facts stated wrong, greedy, each fact asked once in its worked-solution place (%)\n")
        print("| model | " + " | ".join(FACT_KINDS) + " |\n|---|" + "---|" * len(FACT_KINDS))
        for stage, rates in result["facts"].items():
            print(f"| {stage} | " + " | ".join(pct(rates[k]) for k in FACT_KINDS) + " |")
    rows = result.get("pretrain")
    if rows:
        print(f"\nR1-Zero ({rows[0]['trained_on']}) against pretraining minutes: pass@1 (%)\n")
        print("| pretraining steps | minutes | base | R1-Zero | lift | lift 95% CI |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['pretrain_steps']} | {r['pretrain_seconds'] / 60:.1f} | "
                  f"{pct(r['start'])} {ci(r['start_ci'])} | "
                  f"{pct(r['end'])} {ci(r['end_ci'])} | {r['lift'] * 100:+.1f} | {ci(r['lift_ci'], True)} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a finished `nanoseek run` directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", default="rl,pretrain", help="comma-separated: rl, pretrain (default: both), facts")
    p.add_argument("--stages", default="r1_zero,r1", help="RL stages for the RL-minutes part")
    p.add_argument("--rl-minutes", default="1,2,5,10")
    p.add_argument("--rl-steps", default="", help="marks in RL steps instead of minutes, e.g. 100,200")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a field of the RL stage's recipe table (VALUE in TOML, or a bare string)")
    p.add_argument("--tag", default="", help="the variant's name: its directory is OUT/rl_<stage>_<tag>")
    p.add_argument("--pretrain-steps", default="450,1350,2700")
    args = p.parse_args()
    if not (args.run / "eval" / "stage.json").exists():
        print(f"learning_study: {args.run} is not a finished `nanoseek run` directory (no eval/stage.json)",
              file=sys.stderr)
        return 2
    run = Run(args.run, json.loads((args.run / "recipe.json").read_text()), progress=False)
    cfg = from_dict(EvalConfig, run.recipe["eval"], "eval")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "study.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    parts = args.parts.split(",")
    fields: dict[str, Any] = {}
    try:
        for item in args.set:
            set_path(fields, item)  # the CLI's own --set: TOML values, bare strings unquoted
        for stage in args.stages.split(","):  # an unknown stage or field fails here, not after minutes of RL
            table = RL_STAGES[stage][0] if stage in RL_STAGES else None
            if table is None:
                raise ValueError(f"--stages: unknown stage {stage!r}; known: {', '.join(RL_STAGES)}")
            from_dict(GRPOConfig, {**run.recipe[table], **fields}, table)
    except ValueError as e:
        print(f"learning_study: {e}", file=sys.stderr)
        return 2
    if fields and not args.tag:
        print("learning_study: --set needs --tag (the variant's own directory)", file=sys.stderr)
        return 2
    if "rl" in parts:
        by_steps = bool(args.rl_steps)
        marks = [float(m) for m in (args.rl_steps or args.rl_minutes).split(",")]
        marks = marks if by_steps else [m * 60 for m in marks]
        for stage in args.stages.split(","):
            key = f"{stage}_{args.tag}" if args.tag else stage
            result.setdefault("rl", {})[key] = rl_curve(run, stage, marks, args.out, cfg, by_steps, fields, args.tag)
        write_json(path, result)
    if "facts" in parts:
        result["facts"] = {stage: fact_probe(run.checkpoint(stage), template) for stage, template in
                           (("pretrain", "r1_zero"), ("sft", "chat"))}
        write_json(path, result)
    if "pretrain" in parts:
        result["pretrain"] = pretrain_minutes(run, [int(s) for s in args.pretrain_steps.split(",")],
                                              args.out / "pretrain", cfg)
        write_json(path, result)
    print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
