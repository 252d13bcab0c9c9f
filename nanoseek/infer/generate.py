"""`nanoseek generate --model PATH --prompt TEXT`: one completion, streamed to stdout.

Plain completion by default (the prompt is text continued from BOS, as in pretraining); `--chat` wraps it as a
user turn of the chat template instead, with `--think` for the reasoning mode.
"""

from __future__ import annotations

import argparse
import sys

from nanoseek.infer.sampling import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint, run directory (latest checkpoint) or HF dir")
    parser.add_argument("--prompt", required=True, help="text to continue (or the user message with --chat)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    parser.add_argument("--think", action="store_true", help="with --chat: open the reasoning block")
    parser.add_argument("--speculative", action="store_true", help="MTP speculative decoding")


def main(args: argparse.Namespace) -> int:
    from nanoseek.infer.engine import load_engine

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=args.stop)
    except ValueError as e:
        print(f"nanoseek generate: error: {e}", file=sys.stderr)
        return 2
    engine = load_engine(args.model, max_batch=1, speculative=args.speculative)
    tok = engine.tokenizer
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                         thinking=True if args.think else None)
    else:
        prompt = tok.encode(args.prompt, bos=True)
    if len(prompt) >= engine.max_len:
        print(f"nanoseek generate: error: the prompt has {len(prompt)} tokens; the model's context is "
              f"{engine.max_len}", file=sys.stderr)
        return 2
    if not args.chat:
        sys.stdout.write(args.prompt)
    engine.generate([prompt], params, stream=lambda ev: (sys.stdout.write(ev.text), sys.stdout.flush()))
    sys.stdout.write("\n")
    return 0
