"""`nanoseek refine --model M --feedback DB --out DIR`: the refinement loop in one command.

    served answers -> feedback store -> export -> curation -> held-out split -> DPO (and/or SFT) -> evaluation
    before and after -> a checkpoint the server can reload (`--reload URL`, or POST /admin/reload)

    DIR/feedback/   sft.jsonl, preference.jsonl, review.jsonl   `nanoseek feedback export` (verified ratings only,
                                                                unless [refine] include_unverified)
    DIR/curated/    manifest.json, data_card.md, documents/     `nanoseek data curate` over both files: PII
                                                                redacted in every turn, toxic answers and
                                                                duplicates removed, eval leaks removed
    DIR/data/       pairs_train.jsonl, pairs_heldout.jsonl,     the curated pairs split by prompt (a held-out
                    sft.jsonl                                   prompt is never trained on), the corrections
    DIR/dpo/, DIR/sft/                                          the training stages (recipe tables [dpo], [sft])
    DIR/refine.json, DIR/refine.md                              the report: counts, and before -> after

What is measured before and after: on the feedback's held-out pairs, the log-probability margin of the preferred
answer over the other (log p(chosen) - log p(rejected), summed over the reply's tokens) and the share of pairs
where it is positive, each with a 95% bootstrap interval over pairs; and pass@1 on the built-in held-out tasks
(`[refine] eval_tasks`), so that a round of refinement is seen not to cost the model what it could do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import pick_device, write_json, write_jsonl
from nanoseek.config import from_dict, load_recipe
from nanoseek.data.curate import kept_records, set_config
from nanoseek.data.curate.pipeline import curate
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.eval.evaluate import evaluate
from nanoseek.eval.metrics import bootstrap_ci
from nanoseek.infer.serve.feedback import export
from nanoseek.model.hf import load, resolve_checkpoint
from nanoseek.posttrain.dpo import dpo, pair_logps
from nanoseek.posttrain.preferences import load_pairs
from nanoseek.posttrain.sft import sft

TRAIN_MODES = ("dpo", "sft", "both")


@dataclass
class RefineConfig:
    train: str = "dpo"  # dpo: preference pairs; sft: liked / corrected answers; both: DPO, then SFT on top
    heldout_fraction: float = 0.2  # of the prompts: their pairs are only measured, never trained on
    include_unverified: bool = False  # also ratings of conversations clients sent (not answers the server gave)
    curate_workers: int = 1
    curate_langid: bool = False  # language identification of the conversations (unreliable on short turns)
    eval_tasks: list[str] = field(default_factory=lambda: ["arithmetic", "logic"])
    eval_n: int = 32
    eval_k: int = 4
    eval_difficulty: list[int] = field(default_factory=lambda: [1])
    eval_max_new_tokens: int = 64
    eval_template: str = "auto"  # the prompt template of the evaluation (auto: the one the model was trained with)
    max_tokens: int = 512  # longer pairs are left out of the margin (as DPO leaves them out of training)
    seed: int = 0

    def validate(self) -> None:
        if self.train not in TRAIN_MODES:
            raise ValueError(f"[refine] train={self.train!r}: expected one of {', '.join(TRAIN_MODES)}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"[refine] heldout_fraction={self.heldout_fraction}: expected a fraction in [0, 1)")
        if self.eval_n < 1 or self.eval_k < 1:
            raise ValueError("[refine] eval_n and eval_k must be >= 1")


def heldout(prompt: Any, fraction: float, seed: int) -> bool:
    """Whether a prompt belongs to the held-out part: a hash of the prompt, so every pair of one prompt lands
    on the same side and the split does not depend on the order of the feedback."""
    key = json.dumps(prompt, sort_keys=True) + f"|{seed}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


@torch.no_grad()
def preference_margin(model_path: str | Path, pairs_path: Path, max_tokens: int, batch: int = 16) -> dict[str, Any]:
    """Mean log-probability margin of the chosen over the rejected reply, and the share of pairs where it is
    positive, with 95% bootstrap intervals over pairs."""
    ckpt = resolve_checkpoint(model_path)
    tokenizer = Tokenizer.load(ckpt)
    pairs, skipped = load_pairs(pairs_path, tokenizer, max_tokens, skip_invalid=True)  # counted, as DPO does
    if not pairs:
        return {"pairs": 0, "skipped": skipped}
    device = pick_device("auto")
    model = load(ckpt, device=device).eval()
    margins: list[float] = []
    for i in range(0, len(pairs), batch):
        logps = pair_logps(model, pairs[i:i + batch], tokenizer.pad_id, device).view(2, -1)
        margins += (logps[0] - logps[1]).tolist()
    wins = [float(m > 0) for m in margins]
    return {"pairs": len(pairs), "skipped": skipped, "margin": sum(margins) / len(margins),
            "margin_ci": list(bootstrap_ci(margins)), "accuracy": sum(wins) / len(wins),
            "accuracy_ci": list(bootstrap_ci(wins))}


def task_scores(model_path: str | Path, cfg: RefineConfig) -> dict[str, Any]:
    result = evaluate(model_path, cfg.eval_tasks, k=cfg.eval_k, n=cfg.eval_n, difficulty=cfg.eval_difficulty,
                      template=cfg.eval_template,
                      max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed, consistency=False, bpb=False,
                      progress=False)
    return {task: {k: v for k, v in m.items() if k in ("n", "pass@1", "pass@1_ci")}
            for task, m in result["tasks"].items()}


def measure(model_path: str | Path, heldout_pairs: Path, cfg: RefineConfig) -> dict[str, Any]:
    return {"feedback_heldout": preference_margin(model_path, heldout_pairs, cfg.max_tokens),
            "tasks": task_scores(model_path, cfg)}


def refine(recipe: dict[str, Any], model: str | Path, feedback: str | Path, out: str | Path,
           progress: bool = True) -> dict[str, Any]:
    """One round of the loop (see the module docstring); returns the report (also DIR/refine.json)."""
    cfg = from_dict(RefineConfig, recipe.get("refine"), "refine")
    cfg.validate()
    out = Path(out)
    start = resolve_checkpoint(model)
    report: dict[str, Any] = {"model": str(start), "feedback": str(feedback), "config": asdict(cfg)}

    counts = export(feedback, out / "feedback", cfg.include_unverified)
    report["export"] = counts
    curate_cfg = set_config(cfg.curate_workers)
    curate_cfg.langid.enabled = cfg.curate_langid
    manifest = curate([out / "feedback" / "sft.jsonl", out / "feedback" / "preference.jsonl"], out / "curated",
                      curate_cfg, command="nanoseek refine")
    report["curation"] = {k: manifest["totals"][k] for k in ("records", "kept", "removed", "rejected")}
    records = kept_records(out / "curated")
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records if "prompt" in r]
    chats = [{"messages": r["messages"]} for r in records if "messages" in r]
    test = [p for p in pairs if heldout(p["prompt"], cfg.heldout_fraction, cfg.seed)]
    train = [p for p in pairs if not heldout(p["prompt"], cfg.heldout_fraction, cfg.seed)]
    data = out / "data"
    write_jsonl(data / "pairs_train.jsonl", train)
    write_jsonl(data / "pairs_heldout.jsonl", test)
    write_jsonl(data / "sft.jsonl", chats)
    report["data"] = {"pairs_train": len(train), "pairs_heldout": len(test), "sft": len(chats)}
    print(f"refine: {counts['preference']} pairs and {counts['sft']} liked answers exported; after curation "
          f"{len(train)} pairs to train on, {len(test)} held out, {len(chats)} conversations", file=sys.stderr)

    report["before"] = measure(start, data / "pairs_heldout.jsonl", cfg)
    current: Path = start
    if cfg.train in ("dpo", "both"):
        if not train:
            raise ValueError(f"{feedback}: no preference pairs left to train on after export and curation "
                             f"({report['data']}); collect more ratings or use [refine] train = \"sft\"")
        current = dpo(recipe, out / "dpo", init=current, data=data / "pairs_train.jsonl", progress=progress)
    if cfg.train in ("sft", "both"):
        if not chats:
            raise ValueError(f"{feedback}: no liked or corrected answers left to train on after curation")
        current = sft(recipe, out / "sft", init=current, data=[data / "sft.jsonl"], progress=progress)
    report["checkpoint"] = str(current)
    report["after"] = measure(current, data / "pairs_heldout.jsonl", cfg)
    write_json(out / "refine.json", report)
    (out / "refine.md").write_text(render(report), encoding="utf-8")
    return report


def _ci(m: dict[str, Any], key: str, fmt: str) -> str:
    if key not in m:
        return "—"
    lo, hi = m.get(f"{key}_ci", (m[key], m[key]))
    return f"{m[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def render(report: dict[str, Any]) -> str:
    """The report as markdown."""
    b, a = report["before"], report["after"]
    lines = [f"# Refinement round: {report['model']} -> {report['checkpoint']}", "",
             f"Feedback `{report['feedback']}`: exported {report['export']}; curation {report['curation']}; "
             f"data {report['data']}.", "",
             "| measure | before | after |", "|---|---|---|"]
    fb, fa = b["feedback_heldout"], a["feedback_heldout"]
    lines.append(f"| held-out feedback: log-prob margin chosen - rejected ({fb['pairs']} pairs) | "
                 f"{_ci(fb, 'margin', '.3f')} | {_ci(fa, 'margin', '.3f')} |")
    lines.append(f"| held-out feedback: share of pairs preferred | {_ci(fb, 'accuracy', '.3f')} | "
                 f"{_ci(fa, 'accuracy', '.3f')} |")
    for task in b["tasks"]:
        lines.append(f"| {task} pass@1 | {_ci(b['tasks'][task], 'pass@1', '.3f')} | "
                     f"{_ci(a['tasks'][task], 'pass@1', '.3f')} |")
    return "\n".join(lines) + "\n"


def reload_server(url: str, checkpoint: str, api_key: str | None) -> None:
    """Ask a running `nanoseek serve` to serve the new checkpoint (POST /admin/reload)."""
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(url.rstrip("/") + "/admin/reload", json={"model": checkpoint}, headers=headers, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"{url}: reload refused ({r.status_code}): {r.text[:300]}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the served checkpoint or run directory to refine")
    parser.add_argument("--feedback", required=True, help="the server's feedback database (serve --feedback-db)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--recipe", default="refine", help="recipe with [refine], [dpo] and [sft] tables")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set refine.train=both (repeatable)")
    parser.add_argument("--reload", metavar="URL", help="then POST URL/admin/reload with the new checkpoint")
    parser.add_argument("--api-key", help="the server's API key for --reload (default: $NANOSEEK_API_KEY)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    report = refine(recipe, args.model, args.feedback, args.out, progress=not args.no_progress)
    print(render(report))
    if args.reload:
        reload_server(args.reload, report["checkpoint"], args.api_key or os.environ.get("NANOSEEK_API_KEY"))
        print(f"{args.reload} now serves {report['checkpoint']}")
    return 0
