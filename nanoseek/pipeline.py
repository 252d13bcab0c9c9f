"""`nanoseek run`: the whole recipe, stage after stage, into one run directory.

    OUT/data/       synth (built-in corpora) -> curated -> tokenizer -> tokens
    OUT/pretrain/   the base model (MTP, aux-loss-free balancing)
    OUT/sample.txt  what the base model says

Each stage writes `OUT/<stage>/stage.json` when it finishes (wall time and what it produced); a re-run skips
finished stages, so an interrupted run resumes where it stopped. Stages only read earlier stages' directories.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.config import from_dict, load_recipe
from nanoseek.model.hf import write_json


@dataclass
class RunData:
    """[data] of a run recipe: the built-in corpus and tokenizer size."""

    docs: int = 2000
    vocab_size: int = 4096
    seed: int = 0
    difficulty: str = "1-3"
    curate: dict[str, Any] = field(default_factory=dict)  # CurateConfig overrides, e.g. {quality = {min_words = 20}}
    root: str = ""  # unused by `run` (its data lives under OUT/data); kept so pretrain recipes load unchanged
    tokenizer_dir: str = ""
    tokens_dir: str = ""


@dataclass
class Run:
    recipe: dict[str, Any]
    out: Path
    progress: bool = True

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def done(self, name: str) -> dict[str, Any] | None:
        marker = self.stage_dir(name) / "stage.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def run_stage(self, name: str, fn: Callable[[Run], dict[str, Any]]) -> dict[str, Any]:
        finished = self.done(name)
        if finished is not None:
            print(f"[{name}] already done ({finished['wall_seconds']:.0f}s) - skipping")
            return finished
        print(f"[{name}] ...")
        start = time.perf_counter()
        info = fn(self)
        info = {"name": name, "wall_seconds": time.perf_counter() - start, **info}
        self.stage_dir(name).mkdir(parents=True, exist_ok=True)
        write_json(self.stage_dir(name) / "stage.json", info)
        print(f"[{name}] done in {info['wall_seconds']:.0f}s")
        return info


def stage_data(run: Run) -> dict[str, Any]:
    """Built-in corpora -> curation -> tokenizer -> token shards."""
    from nanoseek.data.cli import corpus_texts
    from nanoseek.data.curate import curate as run_curation
    from nanoseek.data.curate import load_config
    from nanoseek.data.shards import tokenize_corpus
    from nanoseek.data.synth import write_synth
    from nanoseek.data.tokenizer import train_tokenizer

    cfg = from_dict(RunData, run.recipe.get("data"), "data")
    root = run.stage_dir("data")
    extra = min(2000, max(200, cfg.docs))
    synth = write_synth(root / "synth", docs=cfg.docs, seed=cfg.seed, difficulty=cfg.difficulty, sft=extra, rl=extra)
    curate_cfg = load_config(overrides=[f"{k}={json.dumps(v)}" for k, v in _flatten(cfg.curate).items()])
    manifest = run_curation([root / "synth" / "corpus"], root / "curated", curate_cfg)
    documents = root / "curated" / "documents"
    tokenizer = train_tokenizer(corpus_texts(documents), cfg.vocab_size, root / "tokenizer")
    val_fraction = min(0.1, max(0.01, 50 / max(1, cfg.docs)))
    index = tokenize_corpus(documents, root / "tokenizer", root / "tokens", val_fraction=val_fraction,
                            progress=run.progress)
    return {"synth": synth, "curation": manifest["totals"],
            "vocab_size": tokenizer.vocab_size,
            "tokens": {split: s["tokens"] for split, s in index["splits"].items()}}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stage_pretrain(run: Run) -> dict[str, Any]:
    from nanoseek.train.pretrain import pretrain

    data = run.stage_dir("data")
    recipe = {**run.recipe, "data": {**run.recipe.get("data", {}), "tokenizer_dir": str(data / "tokenizer"),
                                     "tokens_dir": str(data / "tokens")}}
    recipe["data"].pop("difficulty", None)
    recipe["data"].pop("curate", None)
    ckpt = pretrain(recipe, run.stage_dir("pretrain"), resume=True, progress=run.progress)
    return {"checkpoint": str(ckpt.relative_to(run.out)), "dir": "pretrain"}


def stage_sample(run: Run) -> dict[str, Any]:
    """Greedy answer of the base model to one held-out problem, in the R1-Zero template it was pretrained on."""
    import nanoseek
    from nanoseek.data.synth import make_problems, r1_zero_prompt
    from nanoseek.data.tokenizer import Tokenizer

    ckpt = run.out / run.done("pretrain")["checkpoint"]
    model, tok = nanoseek.load(ckpt), Tokenizer.load(ckpt)
    problem = make_problems("arithmetic", 1, seed=1, difficulty=1, split="eval")[0]
    prompt = r1_zero_prompt(problem.question)
    import torch

    ids = torch.tensor([tok.encode(prompt, bos=True)])
    out = model.generate(ids, max_new_tokens=64, eos_token_id=tok.end_answer_id)
    text = prompt + tok.decode(out[0, ids.shape[1]:].tolist())
    (run.stage_dir("sample")).mkdir(parents=True, exist_ok=True)
    (run.stage_dir("sample") / "sample.txt").write_text(text + "\n")
    print(text)
    return {"question": problem.question, "answer": problem.answer, "completion": text[len(prompt):]}


STAGES: list[tuple[str, Callable[[Run], dict[str, Any]]]] = [
    ("data", stage_data),
    ("pretrain", stage_pretrain),
    ("sample", stage_sample),
]


def run_pipeline(recipe: dict[str, Any], out: str | Path, progress: bool = True) -> list[dict[str, Any]]:
    run = Run(recipe, Path(out), progress)
    run.out.mkdir(parents=True, exist_ok=True)
    write_json(run.out / "recipe.json", recipe)
    return [run.run_stage(name, fn) for name, fn in STAGES]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="tiny", help="built-in recipe name or TOML file (default: tiny)")
    parser.add_argument("--out", default="runs/nanoseek", type=Path, help="run directory (default: runs/nanoseek)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    stages = run_pipeline(recipe, args.out, progress=not args.no_progress)
    total = sum(s["wall_seconds"] for s in stages)
    print(f"\nall stages done in {total:.0f}s -> {args.out}")
    print(f"chat with the model:  nanoseek generate --model {args.out / 'pretrain'} --prompt 'What is 3 + 5?'")
    return 0
