"""`nanoseek <command>`: one entry point, one module per stage.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args)`. Modules are imported
only when their command runs, so `nanoseek --help` stays fast and one stage's dependencies never burden another.

A user's mistake (a bad argument, recipe, config or checkpoint: ValueError; a missing or unreadable path, a full
disk: OSError) ends a command with one line, `nanoseek <command>: error: ...`, and exit status 2. Any other
exception is a bug and keeps its traceback; NANOSEEK_DEBUG=1 shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nanoseek.config import check_tables, load_recipe

USER_ERRORS = (ValueError, OSError)

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("nanoseek.pipeline", "the whole recipe on built-in data: data -> pretrain -> SFT -> R1-Zero, R1 -> "
            "rejection -> distillation -> eval -> report card"),
    "model-info": ("nanoseek.model.info", "parameters, FLOPs and KV-cache bytes of a model preset"),
    "data": ("nanoseek.data.cli", "data tools: synth, curate, tokenizer, tokenize"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain a model from a recipe"),
    "sft": ("nanoseek.posttrain.sft", "supervised fine-tuning on conversations (instruct and <think> reasoning)"),
    "dpo": ("nanoseek.posttrain.dpo", "direct preference optimisation against a frozen reference"),
    "reward-model": ("nanoseek.posttrain.reward_model", "train a scalar reward model on preference pairs"),
    "grpo": ("nanoseek.posttrain.grpo", "GRPO reinforcement learning with rule-based rewards (R1-Zero, R1)"),
    "rejection": ("nanoseek.posttrain.rejection", "rejection sampling: clean, correct RL samples as SFT data"),
    "distill": ("nanoseek.posttrain.distill", "distil a teacher's verified reasoning into a smaller student"),
    "r1": ("nanoseek.posttrain.r1", "DeepSeek-R1's multi-stage recipe from a base model"),
    "generate": ("nanoseek.infer.generate", "complete a prompt with a trained model"),
    "chat": ("nanoseek.infer.chat", "streaming terminal chat with a trained model"),
    "serve": ("nanoseek.infer.serve.app", "OpenAI-compatible server with a web chat page"),
    "feedback": ("nanoseek.infer.serve.feedback", "export server feedback as SFT and preference JSONL"),
    "refine": ("nanoseek.refine", "one round of the feedback loop: export, curate, DPO/SFT, evaluate before and "
               "after, reload the server"),
    "eval": ("nanoseek.eval.evaluate", "score a checkpoint: pass@1/pass@k/maj@k, consistency, hallucination, games, "
             "bits per byte, speed"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek training recipe, end to end.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        # a stage command refuses a typo'd table before it starts (checked here, not in load_recipe, which also
        # reads curation's settings files, whose tables are not stages)
        if getattr(args, "recipe", None) is not None:
            section = getattr(args, "section", None)
            check_tables(load_recipe(args.recipe, args.set), extra=(section,) if section else ())
        return args.func(args) or 0
    except BrokenPipeError:  # output piped into `head` or a pager that quit: not an error, as for any Unix tool
        # the interpreter's final flush would fail again: point stdout at /dev/null (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except USER_ERRORS as e:
        if os.environ.get("NANOSEEK_DEBUG"):
            raise
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
