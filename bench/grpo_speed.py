"""GRPO step time: nanoseek's GRPOTrainer vs TRL's GRPOTrainer (transformers generation, no vLLM).

Same model (nanoseek's weights exported with save_pretrained; TRL loads them as transformers'
DeepseekV3ForCausalLM), same prompts, group size, completion limit, sampling temperature, reward function,
loss (DAPO token-level, β = 0, μ = 1) and one forward/backward over the whole generation batch per step, fp32 on
CPU with the same thread count. A step is generation + rewards + advantages + the policy update. The first step
of each is a warm-up; the median of the rest is reported, with the completion tokens per second.

Completions stop at a model-chosen token (ours at `</answer>`, TRL's at EOS); with a freshly initialised model
both are rare, so nearly all completions run to the limit in both. Mean completion lengths are printed.

    python bench/grpo_speed.py                                     # tiny preset, 8 prompts × 8, 64 tokens
    python bench/grpo_speed.py --preset debug --steps 2 --max-new-tokens 16   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(tmp: Path, preset_name: str, vocab: int) -> Path:
    """A fresh model of `preset_name` with a BPE tokenizer trained on built-in problems, saved for both."""
    from nanoseek.data.synth import make_problems, r1_zero_prompt
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.model import Transformer, preset

    problems = [p for t in ("arithmetic", "word_problems", "logic") for p in make_problems(t, 300, difficulty=[1, 2])]
    tok = train_tokenizer([r1_zero_prompt(p.question) + p.reasoning() for p in problems], vocab, tmp)
    torch.manual_seed(0)
    Transformer(preset(preset_name, vocab_size=tok.vocab_size)).save_pretrained(tmp)
    return tmp


def run_nanoseek(model_dir: Path, args: argparse.Namespace) -> tuple[list[float], float]:
    from nanoseek.posttrain.grpo import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(template="r1_zero", tasks={"arithmetic": 1.0}, difficulty=[1], rewards={"language": 1.0},
                     prompts_per_step=args.prompts, num_generations=args.group, max_new_tokens=args.max_new_tokens,
                     temperature=1.0, dynamic_sampling=False, mask_truncated=False, loss_type="dapo", beta=0.0,
                     mu=1, lr=1e-6, micro_batch=args.prompts * args.group, eval_problems=0, device="cpu")
    trainer = GRPOTrainer(cfg, {}, Path(tempfile.mkdtemp()), str(model_dir), progress=False)
    times, lengths = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        groups, rewards, stats = trainer.rollout()
        trainer.update(trainer.make_batch(groups, rewards), cfg.lr)
        times.append(time.perf_counter() - t0)
        lengths.append(stats["completion_length"])
    return times[1:], statistics.mean(lengths[1:])


def run_trl(model_dir: Path, args: argparse.Namespace) -> tuple[list[float], float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.data.synth import make_problems, r1_zero_prompt
    from nanoseek.rewards import language_consistency_reward

    tok = AutoTokenizer.from_pretrained(model_dir)
    n = args.prompts * (args.steps + 1)
    prompts = ["<|bos|>" + r1_zero_prompt(p.question) for p in make_problems("arithmetic", n, difficulty=[1])]
    times, lengths, start = [], [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            start[0] = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - start[0])

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.group,
                        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
                        beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=1e-6, max_steps=args.steps + 1,
                        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                        shuffle_dataset=False, seed=0)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[language_consistency_reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    return times[1:], statistics.mean(lengths[1:]) if len(lengths) > 1 else float("nan")


def main() -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers skips the MTP layers it does not model: not an error
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a nanoseek checkpoint with tokenizer files (default: a fresh one)")
    ap.add_argument("--preset", default="tiny", help="preset of the fresh model")
    ap.add_argument("--vocab", type=int, default=1024, help="tokenizer size of the fresh model")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps each (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(Path(tmp), args.preset, args.vocab)
        ours, our_len = run_nanoseek(model_dir, args)
        theirs, their_len = run_trl(model_dir, args)
    a, b = statistics.median(ours), statistics.median(theirs)
    tokens = args.prompts * args.group
    print(f"GRPO step, {args.prompts} prompts x {args.group} samples, <= {args.max_new_tokens} new tokens, "
          f"{args.threads} threads")
    print(f"  nanoseek: {a:7.2f} s/step  (mean completion {our_len:.1f} tokens, {tokens * our_len / a:8.1f} tok/s)")
    print(f"  TRL:      {b:7.2f} s/step  (mean completion {their_len:.1f} tokens, {tokens * their_len / b:8.1f} tok/s)")
    print(f"  speed-up: {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
