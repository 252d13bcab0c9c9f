"""GRPO step time: nanoseek's GRPO stage vs TRL's GRPOTrainer (transformers generation, no vLLM).

What is held equal, so the ratio measures the implementations and nothing else:
  - the model: nanoseek's weights exported with save_pretrained; TRL gets them loaded by transformers as
    DeepseekV3ForCausalLM in fp32 (the MTP layer, which neither trains, is skipped by transformers);
  - the prompts: the ids of the same R1-Zero prompts in the same order (TRL's are the decoded text of ours,
    checked to re-tokenise to the same ids), P prompts × G samples per step, the same completion limit,
    temperature 1, top-p 1;
  - where a completion ends: at the first EOS or `</answer>` on both sides (ours stops generating at
    `</answer>` and cuts at EOS; transformers is given both as its stop ids, and TRL masks after either);
  - the objective: DAPO token-level loss, β = 0 (no reference model), μ = 1 (no old-log-prob pass), no
    truncation masking, the same reward function, one forward/backward over all P×G sequences, AdamW, and no
    activation checkpointing (TRL's GRPOConfig turns it on by default; nanoseek's GRPO does not use it);
  - fp32 on CPU, one process, the same thread count.
A step is generation + rewards + advantages + the policy update. The first step of each is a warm-up; the
median of the others is reported, split into generation (the engine / `model.generate`), the rest of the
rollout (decoding, rewards, advantages, batching) and the update (forward, backward, optimizer step).

Run it on an otherwise idle machine: the load average before and after is printed. With the default OpenMP
wait policy (threads spin between operations) another busy process on one of the cores slows both sides, and
nanoseek's engine (tens of thousands of small operations per rollout) by one to two orders of magnitude;
such figures say nothing.

    python bench/grpo_speed.py                                     # tiny preset, 8 prompts × 8, 64 tokens
    python bench/grpo_speed.py --preset debug --steps 2 --max-new-tokens 16   # smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from itertools import islice
from pathlib import Path

import torch
from roofline import decode_limit, fraction, machine

import nanoseek

PHASES = ("generation", "rollout_rest", "update")


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


def nanoseek_config(args: argparse.Namespace):
    from nanoseek.posttrain.grpo import GRPOConfig

    return GRPOConfig(template="r1_zero", tasks={"arithmetic": 1.0}, difficulty=[1], rewards={"language": 1.0},
                      prompts_per_step=args.prompts, num_generations=args.group, max_new_tokens=args.max_new_tokens,
                      temperature=1.0, dynamic_sampling=False, mask_truncated=False, loss_type="dapo", beta=0.0,
                      mu=1, lr=1e-6, micro_batch=args.prompts * args.group, eval_problems=0, device="cpu", seed=0,
                      share_prompt=args.share_prompt)


def run_nanoseek(model_dir: Path, args: argparse.Namespace) -> tuple[list[dict[str, float]], float]:
    """Per-step phase times (warm-up dropped) and the mean completion length."""
    from nanoseek.infer.rollout import Sampler
    from nanoseek.posttrain.grpo import GRPOStage
    from nanoseek.posttrain.loop import optimizer_step
    from nanoseek.train.optim import set_lr

    class TimedSampler(Sampler):
        """The trainer's sampler, timing each generation call."""

        seconds = 0.0

        def sample(self, *a, **kw):
            t0 = time.perf_counter()
            out = super().sample(*a, **kw)
            TimedSampler.seconds += time.perf_counter() - t0
            return out

    cfg = nanoseek_config(args)
    trainer = GRPOStage.load(cfg, str(model_dir), Path(tempfile.mkdtemp()))
    set_lr(trainer.optimizer, cfg.lr)
    s = trainer.sampler
    trainer.sampler = TimedSampler(s.model, s.tokenizer, s.max_batch, s.max_new_tokens, s.max_prompt_tokens)
    steps, lengths = [], []
    for _ in range(args.steps + 1):
        TimedSampler.seconds = 0.0
        t0 = time.perf_counter()
        groups, rewards, stats = trainer.rollout()
        batch = trainer.make_batch(groups, rewards)
        t1 = time.perf_counter()
        trainer.update(batch, lambda: optimizer_step(trainer.model, trainer.optimizer, cfg.grad_clip))
        t2 = time.perf_counter()
        steps.append({"generation": TimedSampler.seconds, "rollout_rest": t1 - t0 - TimedSampler.seconds,
                      "update": t2 - t1, "step": t2 - t0})
        lengths.append(stats["completion_length"])
    return steps[1:], statistics.mean(lengths[1:])


def prompts_of(model_dir: Path, args: argparse.Namespace) -> list:
    """The prompts (ids) nanoseek's trainer draws, in order."""
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.posttrain.grpo import prompt_stream

    cfg = nanoseek_config(args)
    return list(islice(prompt_stream(cfg, Tokenizer.load(model_dir), cfg.seed), args.prompts * (args.steps + 1)))


def same_prompts(model_dir: Path, args: argparse.Namespace) -> list[str]:
    """The text of the prompts nanoseek's trainer draws (its prompt stream, same seed), in order; each is
    checked to tokenise with transformers' tokenizer to exactly the ids nanoseek samples from."""
    from transformers import AutoTokenizer

    from nanoseek.data.tokenizer import Tokenizer

    ours, theirs = Tokenizer.load(model_dir), AutoTokenizer.from_pretrained(model_dir)
    prompts = prompts_of(model_dir, args)
    texts = [ours.decode(p.ids) for p in prompts]
    for p, text in zip(prompts, texts, strict=True):
        if theirs(text)["input_ids"] != p.ids:  # the call TRL tokenises text prompts with
            raise RuntimeError(f"transformers tokenises this prompt differently from nanoseek: {text!r}")
    return texts


def run_trl(model_dir: Path, args: argparse.Namespace, prompts: list[str]) -> tuple[list[dict[str, float]], float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.rewards import language_consistency_reward

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # stop ids: EOS and </answer>, as nanoseek's completions end (TRL reads these from the generation config)
    model.generation_config.eos_token_id = [tok.eos_token_id, Tokenizer.load(model_dir).end_answer_id]
    current: dict[str, float] = defaultdict(float)
    steps: list[dict[str, float]] = []
    lengths: list[float] = []

    class TimedGRPOTrainer(GRPOTrainer):
        """TRL's trainer, timing generation (`model.generate`) and the whole rollout."""

        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            current["generation"] += time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*a, **kw)
            current["rollout"] += time.perf_counter() - t0
            return out

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - current["start"]
            steps.append({"generation": current["generation"],
                          "rollout_rest": current["rollout"] - current["generation"],
                          "update": total - current["rollout"], "step": total})

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.group,
                        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
                        top_p=1.0, beta=0.0, loss_type="dapo", num_iterations=1, learning_rate=1e-6,
                        max_steps=args.steps + 1, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                        bf16=False, gradient_checkpointing=False, shuffle_dataset=False, seed=0, disable_tqdm=True)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[language_consistency_reward], args=config,
                               train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                               callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would bury the table
    trainer.train()
    print(f"transformers: attention {model.config._attn_implementation}, experts "
          f"{model.config._experts_implementation}")
    return steps[1:], statistics.mean(lengths[1:]) if len(lengths) > 1 else float("nan")


def median_phases(steps: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in steps) for k in (*PHASES, "step")}


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
    ap.add_argument("--share-prompt", action="store_true", help="nanoseek runs each group's prompt once in the update")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(Path(tmp), args.preset, args.vocab)
        prompts = same_prompts(model_dir, args)
        ours, our_len = run_nanoseek(model_dir, args)
        theirs, their_len = run_trl(model_dir, args, prompts)
        model = nanoseek.load(model_dir)
        prompt_len = statistics.mean(len(p.ids) for p in prompts_of(model_dir, args))
    limits = machine()
    a, b = median_phases(ours), median_phases(theirs)
    n = args.prompts * args.group
    print(f"GRPO step, {args.prompts} prompts x {args.group} samples, <= {args.max_new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.steps} steps after a warm-up (seconds)")
    print(f"  {'':9} {'step':>7} {'generate':>9} {'rollout rest':>13} {'update':>7}  {'completion':>10}  {'tok/s':>7}")
    for name, t, length in (("nanoseek", a, our_len), ("TRL", b, their_len)):
        print(f"  {name:9} {t['step']:7.2f} {t['generation']:9.2f} {t['rollout_rest']:13.2f} {t['update']:7.2f}"
              f"  {length:10.1f}  {n * length / t['step']:7.1f}")
    print(f"  speed-up: {b['step'] / a['step']:.2f}x per step (generation {b['generation'] / a['generation']:.2f}x, "
          f"update {b['update'] / a['update']:.2f}x)")
    peak, bw = limits["gemm_flop_s"], limits["bandwidth_bytes_s"]
    tokens = n * (prompt_len + our_len)  # one update: forward + backward over every row
    flops = model.flops_per_token(int(prompt_len + our_len)) * tokens / a["update"]
    gen_limit = decode_limit(model, int(prompt_len + our_len / 2), n, bw)
    gen_rate = n * our_len / a["generation"]
    print(f"  roofline ({peak / 1e9:.1f} GFLOP/s fp32 GEMM, {bw / 1e9:.1f} GB/s, measured now): nanoseek's update "
          f"{flops / 1e9:.2f} GFLOP/s = {fraction(flops, peak)}; generation {gen_rate:.0f} tok/s = "
          f"{fraction(gen_rate, gen_limit)} (bandwidth bound at batch {n}: {gen_limit:.0f} tok/s)")
    print(f"  1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} "
          f"CPUs (this run itself adds about {args.threads})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
