"""`nanoseek data <synth|curate|tokenizer|tokenize>`, and `ensure_builtin_data` for self-contained recipes.

    nanoseek data synth --output runs/data                       # built-in corpus, SFT, RL and eval sets
    nanoseek data curate --input runs/data/corpus --output runs/curated
    nanoseek data tokenizer --input runs/curated --output runs/tokenizer --vocab-size 4096
    nanoseek data tokenize --input runs/curated --tokenizer runs/tokenizer --output runs/tokens
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from nanoseek.data.shards import INDEX, corpus_files, read_texts, tokenize_corpus
from nanoseek.data.synth.corpus import GAME_SHARE, write_synth
from nanoseek.data.tokenizer import train_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("synth", help="generate the built-in corpus, SFT, RL and eval sets")
    p.add_argument("--output", type=Path, required=True, help="output directory")
    p.add_argument("--docs", type=int, default=5000, help="pretraining documents (default 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", default="1-3", help="task levels, e.g. '1-3' or '1,2,5' (default 1-3)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--sft", type=int, default=2000, help="SFT conversations (default 2000)")
    p.add_argument("--rl", type=int, default=2000, help="RL prompts (default 2000)")
    p.add_argument("--eval-per-level", type=int, default=100, help="eval problems per task and level (default 100)")
    p.add_argument("--game-share", type=float, default=GAME_SHARE,
                   help=f"share of math documents and SFT conversations that are Nim games (default {GAME_SHARE})")
    p.set_defaults(data_func=_synth)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a JSONL corpus")
    p.add_argument("--input", type=Path, required=True, help="corpus file or directory of JSONL")
    p.add_argument("--output", type=Path, required=True, help="tokenizer directory")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-chars", type=int, default=500_000_000, help="train on at most this many characters")
    p.add_argument("--text-field", default="text")
    p.set_defaults(data_func=_tokenizer)

    p = sub.add_parser("tokenize", help="tokenise a JSONL corpus into binary token shards")
    p.add_argument("--input", type=Path, required=True, help="corpus file or directory of JSONL")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer directory")
    p.add_argument("--output", type=Path, required=True, help="token shard directory")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    p.add_argument("--shard-tokens", type=int, default=2**25, help="tokens per shard file (default 2^25)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.set_defaults(data_func=_tokenize)

    try:
        from nanoseek.data.curate import add_arguments as add_curate_args
        from nanoseek.data.curate import main as curate_main
    except ModuleNotFoundError as e:
        if e.name != "nanoseek.data.curate":
            raise
    else:
        p = sub.add_parser("curate", help="curate raw corpora: dedup, filters, PII, decontamination, manifest")
        add_curate_args(p)
        p.set_defaults(data_func=curate_main)


def main(args: argparse.Namespace) -> int:
    try:
        return args.data_func(args) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _synth(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    m = write_synth(args.output, docs=args.docs, seed=args.seed, difficulty=args.difficulty, tasks=tasks,
                    sft=args.sft, rl=args.rl, eval_per_level=args.eval_per_level, game_share=args.game_share)
    c = m["counts"]
    print(f"wrote {sum(c['corpus'].values())} documents {c['corpus']}, {c['sft']} SFT, {c['rl']} RL, "
          f"eval {c['eval']} to {args.output}; decontamination: {m['decontamination']}")
    return 0


def corpus_texts(path: str | Path, text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """The texts of a JSONL corpus, in file order, up to `max_chars` characters."""
    texts, total = [], 0
    for f in corpus_files(path):
        for _, record in read_texts(f, text_field):
            texts.append(record[text_field])
            total += len(texts[-1])
            if max_chars is not None and total >= max_chars:
                return texts
    return texts


def _tokenizer(args: argparse.Namespace) -> int:
    texts = corpus_texts(args.input, args.text_field, args.max_chars)
    tok = train_tokenizer(texts, args.vocab_size, args.output)
    print(f"trained a {tok.vocab_size}-token BPE on {len(texts)} documents -> {args.output}")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    index = tokenize_corpus(args.input, args.tokenizer, args.output, workers=args.workers,
                            val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
                            text_field=args.text_field, id_field=args.id_field)
    for split, s in index["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['tokens']} tokens in {len(s['shards'])} shards, "
              f"{s['bytes'] / max(1, s['tokens']):.2f} bytes/token")
    return 0


def _build_once(target: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """Build `target` into a temporary sibling and rename it into place: an interrupted or concurrent build
    never leaves a half-written directory behind a finished-looking name."""
    if (target / marker).exists():
        return target
    if target.exists():  # left by a crash before the marker was written
        shutil.rmtree(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; its copy is identical
        if not (target / marker).exists():
            raise
        shutil.rmtree(tmp)
    return target


def builtin_synth_dir(root: str | Path, docs: int, seed: int) -> Path:
    """Where `ensure_builtin_data` puts the synth output (eval/, sft.jsonl, rl.jsonl, corpus/)."""
    return Path(root) / f"synth-n{docs}-s{seed}"


def ensure_builtin_data(root: str | Path, docs: int, vocab_size: int, seed: int = 0) -> tuple[Path, Path]:
    """Build the built-in corpus -> tokenizer -> token shards under `root` unless already there; returns
    (tokenizer_dir, tokens_dir). Directory names carry the parameters, so different recipes never collide."""
    root = Path(root)
    tag = f"v{vocab_size}-n{docs}-s{seed}"
    # SFT and RL sets scale with the corpus up to the synth defaults, so a debug-sized build stays quick
    extra = min(2000, max(200, docs))
    synth_dir = _build_once(builtin_synth_dir(root, docs, seed), "synth.json",
                            lambda d: write_synth(d, docs=docs, seed=seed, sft=extra, rl=extra))
    corpus = synth_dir / "corpus"
    tok_dir = _build_once(root / f"tokenizer-{tag}", "tokenizer.json",
                          lambda d: train_tokenizer(corpus_texts(corpus), vocab_size, d))
    # at least ~50 validation documents, at most 10% of a small corpus; one process is fastest at this size
    val_fraction = min(0.1, max(0.01, 50 / max(1, docs)))
    tokens_dir = _build_once(root / f"tokens-{tag}", INDEX, lambda d: tokenize_corpus(
        corpus, tok_dir, d, workers=1 if docs <= 20_000 else None, val_fraction=val_fraction, progress=False))
    return tok_dir, tokens_dir

