"""`nanoseek data <synth|curate|tokenizer|tokenize>`: the built-in data set's steps one at a time (`builtin.build` runs
them all for recipes).

    nanoseek data synth --output runs/data                       # built-in corpus, SFT, RL and eval sets
    nanoseek data curate --input runs/data/corpus --output runs/curated
    nanoseek data tokenizer --input runs/curated --output runs/tokenizer --vocab-size 4096
    nanoseek data tokenize --input runs/curated --tokenizer runs/tokenizer --output runs/tokens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.data.builtin import corpus_texts
from nanoseek.data.shards import tokenize_corpus
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
