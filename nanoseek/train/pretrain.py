"""`nanoseek pretrain`: one trainer from a laptop to torchrun clusters.

    nanoseek pretrain --recipe tiny --out runs/tiny
    torchrun --nproc_per_node=8 -m nanoseek pretrain --recipe r.toml --out runs/big --parallel fsdp --expert-parallel 8
    torchrun --nproc_per_node=4 -m nanoseek pretrain --recipe r.toml --out runs/pp --pipeline-parallel 2 \
        --pp-schedule dualpipev --expert-parallel 2          (stages: train/pipeline.py)

Each optimiser step sees `global_batch_tokens` tokens whatever the process count: every process runs
global_batch / (micro_batch · seq_len · processes) micro-batches and gradients are averaged, so the loss curve
does not depend on how many processes share the work. The loader deals rows of one global stream round-robin to
the processes, so W processes see exactly the rows one process would in each step, and the data position in a
checkpoint is the same for any W.

A step: forward with MTP and routing statistics -> L = CE + λ·MTP + α·balance -> backward (accumulated) ->
global grad norm, clip -> AdamW (or Muon + AdamW) -> aux-loss-free bias update from expert loads summed over all
processes.
A non-finite loss or gradient norm skips the update; `max_bad_steps` in a row stop the run with the last good
checkpoint left in place. SIGTERM/SIGINT finish the current step, save, and exit; so does `time_budget_s`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nanoseek.config import from_dict, load_recipe
from nanoseek.data.builtin import DataConfig, cached
from nanoseek.data.shards import TokenLoader
from nanoseek.data.tokenizer import CONTROL_TOKENS, Tokenizer
from nanoseek.model import ModelConfig, Transformer, preset
from nanoseek.model.balance import max_violation, update_bias
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, remove_leftovers, save_checkpoint
from nanoseek.train.fp8 import convert_to_float8
from nanoseek.train.metrics import MetricsWriter, matmul_peak_flops, mfu, plot_metrics
from nanoseek.train.objectives import bias_rate_at, mtp_accuracy, mtp_lambda_at, pretrain_loss
from nanoseek.train.optim import OPTIMIZERS, build_muon, build_optimizer, lr_multiplier, set_lr
from nanoseek.train.parallelize import (
    Parallel,
    clip_grad_norm,
    init_parallel,
    parallelize,
    reduce_expert_grads,
    shutdown,
)
from nanoseek.train.pipeline import SCHEDULES, Pipeline


@dataclass
class PretrainConfig:
    # batch: tokens per optimiser step, split into micro-batches of micro_batch sequences of seq_len tokens
    seq_len: int = 256
    micro_batch: int = 8
    global_batch_tokens: int = 16384
    max_steps: int = 1000
    # AdamW + schedule (DeepSeek-V3: warmup -> constant -> cosine decay)
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd
    warmup_steps: int = 50
    decay_start: float = 0.8  # fraction of max_steps where the decay begins
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # optimizer: "adamw", or "muon" (Muon on the hidden matrices, AdamW at `lr` on the rest; see train/optim.py)
    optimizer: str = "adamw"
    muon_lr: float = 0.0  # Muon's peak lr, on the same schedule (0: `lr`, which match_rms_adamw carries over)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_adjust_lr: str = "match_rms_adamw"  # match_rms_adamw (AdamW's lr scale) | original (Keller Jordan's)
    muon_experts: bool = True  # Muon per routed-expert matrix too (False: the experts stay on AdamW)
    # objective: MTP weight λ (start until mtp_lambda_switch × max_steps, then final), balance loss α
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch: float = 0.7
    balance_alpha: float = 1e-4
    # auxiliary-loss-free balancing: bias rate γ, 0 from bias_update_stop × max_steps on
    bias_update_rate: float = 1e-3
    bias_update_stop: float = 0.95
    # precision: fp32 | bf16 (autocast; FSDP gathers parameters in bf16); fp8: "" | blockwise | rowwise
    precision: str = "fp32"
    fp8: str = ""
    # bookkeeping
    seed: int = 0
    val_every: int = 100  # steps between validations (0: only at the end)
    val_batches: int = 8  # micro-batches per validation, over all processes
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    # DeepSeek Sparse Attention (model.attention = "dsa", V3.2): the first dsa_warmup_steps attend densely and train
    # only the indexers (their KL to the main attention); then attention is sparse and the indexers keep learning
    # by their KL on the keys they select
    dsa_warmup_steps: int = 0
    time_budget_s: float = 0.0  # stop (validate, save) once training steps took this many seconds; 0: no limit
    # what the schedules (lr, MTP λ, bias rate γ) run on: "steps" (max_steps), or "time": whichever of steps
    # and seconds (time_budget_s) is further along, so a slower machine still ends its decay inside the budget
    schedule_clock: str = "steps"
    compile: bool = False  # torch.compile the model (~1.2x on CPU after a compile of a minute or more)
    # --pipeline-parallel: micro-batches per step through the pipeline (0: the accumulation count, so each is a
    # micro_batch; more shrink the bubble and must divide the step's sequences on each data-parallel rank)
    pipeline_microbatches: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads per process (0: torch's default)
    plots: bool = True

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"[pretrain] {name}={getattr(self, name)!r}: {why}")

        for name in ("seq_len", "micro_batch", "global_batch_tokens", "max_steps", "keep_checkpoints",
                     "max_bad_steps", "val_batches"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.schedule not in ("cosine", "wsd"):
            raise bad("schedule", "expected 'cosine' or 'wsd'")
        if self.precision not in ("fp32", "bf16"):
            raise bad("precision", "expected 'fp32' or 'bf16'")
        if self.fp8 not in ("", "blockwise", "rowwise"):
            raise bad("fp8", "expected '', 'blockwise' or 'rowwise'")
        if not 0 <= self.decay_start <= 1:
            raise bad("decay_start", "must be a fraction in [0, 1]")
        if self.schedule_clock not in ("steps", "time"):
            raise bad("schedule_clock", "expected 'steps' or 'time'")
        if self.schedule_clock == "time" and not self.time_budget_s:
            raise bad("schedule_clock", "'time' needs a time_budget_s")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"expected one of {OPTIMIZERS}")
        if self.muon_adjust_lr not in ("match_rms_adamw", "original"):
            raise bad("muon_adjust_lr", "expected 'match_rms_adamw' or 'original'")
        if self.dsa_warmup_steps < 0:
            raise bad("dsa_warmup_steps", "must be >= 0")
        if self.muon_lr < 0 or self.time_budget_s < 0:
            raise bad("muon_lr" if self.muon_lr < 0 else "time_budget_s", "must be >= 0")
        if self.pipeline_microbatches < 0:
            raise bad("pipeline_microbatches", "must be >= 0")

    def accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch * self.seq_len * world_size
        if self.global_batch_tokens % per_step:
            raise ValueError(f"[pretrain] global_batch_tokens={self.global_batch_tokens} is not a multiple of "
                             f"micro_batch × seq_len × processes = {self.micro_batch} × {self.seq_len} × "
                             f"{world_size} = {per_step}")
        return self.global_batch_tokens // per_step


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGTERM/SIGINT stop has saved its checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved at {checkpoint} "
                         f"(continue with --resume)")


# --- recipe -> parts ----------------------------------------------------------------------------------------
def model_config(recipe: dict[str, Any], vocab_size: int) -> ModelConfig:
    """[model]: `preset = "tiny"` plus any ModelConfig field as an override; the vocabulary follows the tokenizer."""
    section = dict(recipe.get("model") or {})
    name = section.pop("preset", "tiny")
    section.setdefault("vocab_size", vocab_size)
    if section["vocab_size"] < vocab_size:
        raise ValueError(f"[model] vocab_size={section['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    try:
        return preset(name, **section)
    except TypeError as e:
        raise ValueError(f"[model]: {e}") from e


def prepare_data(recipe: dict[str, Any], par: Parallel) -> tuple[Path, Path]:
    """(tokenizer_dir, tokens_dir): [data]'s own, or the built-in data set of its settings, built by rank 0 while
    the others wait."""
    cfg = from_dict(DataConfig, recipe.get("data"), "data")
    cfg.validate()
    if cfg.tokenizer_dir:
        return Path(cfg.tokenizer_dir), Path(cfg.tokens_dir)
    if par.is_main:
        cached(cfg)
    par.barrier()
    data = cached(cfg)
    return data / "tokenizer", data / "tokens"


def data_mix(recipe: dict[str, Any]) -> dict[str, float]:
    """[data] mix: the domains' shares of the training tokens ({}: as the corpus has them)."""
    return dict(from_dict(DataConfig, recipe.get("data"), "data").mix)


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """[V] UTF-8 bytes of text each token id stands for: turns nats per token into bits per byte.

    Byte-level BPE spells every token in a 256-character alphabet, one character per byte, so a token's
    length is its byte count; the control tokens (BOS, EOS, PAD, roles) stand for no text at all.
    """
    control = {tokenizer.token_to_id(t) for t in CONTROL_TOKENS}
    return torch.tensor([0 if i in control else len(tokenizer.id_to_token(i) or "")
                         for i in range(tokenizer.vocab_size)], dtype=torch.long)


# --- the trainer --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, recipe: dict[str, Any], cfg: PretrainConfig, out_dir: Path, par: Parallel,
                 progress: bool = True, pp_schedule: str = "1f1b"):
        self.recipe, self.cfg, self.out, self.par, self.progress = recipe, cfg, out_dir, par, progress
        self.device = par.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tokenizer_dir, self.tokens_dir = prepare_data(recipe, par)
        self.tokenizer = Tokenizer.load(self.tokenizer_dir)
        self.token_bytes = token_byte_lengths(self.tokenizer).to(self.device)
        self.accum = cfg.accumulation(par.dp_size)

        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        self.model = Transformer(model_config(recipe, self.tokenizer.vocab_size)).to(self.device)
        self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        self.dsa = self.model.config.attention == "dsa"
        if cfg.dsa_warmup_steps and not self.dsa:
            raise ValueError(f"[pretrain] dsa_warmup_steps={cfg.dsa_warmup_steps}: needs model.attention='dsa'")
        if self.dsa and (par.pp > 1 or (cfg.dsa_warmup_steps and par.world_size > 1)):
            raise ValueError("[pretrain] model.attention='dsa' trains on one process (with dsa_warmup_steps) and "
                             "without --pipeline-parallel (stages do not carry the indexers' KL)")
        if cfg.fp8:
            convert_to_float8(self.model, cfg.fp8)
        bf16 = cfg.precision == "bf16"
        self.pipeline = None  # pipeline parallelism: this rank's stages and their schedule
        if par.pp > 1:
            if cfg.compile:
                raise ValueError("[pretrain] compile=true does not run under --pipeline-parallel")
            self.pipeline = Pipeline(self.model, par, pp_schedule, cfg.pipeline_microbatches or self.accum,
                                     torch.bfloat16 if bf16 else None)
            self.forward_model = self.pipeline
        else:
            self.forward_model = parallelize(self.model, par, torch.bfloat16 if bf16 else None)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 \
            else contextlib.nullcontext
        self.foreach = not (par.mode == "fsdp" and par.ep > 1)
        self.optimizers = self.build_optimizers()
        self.peak_lrs = [cfg.lr, cfg.muon_lr or cfg.lr][:len(self.optimizers)]  # AdamW's, then Muon's if any
        # one global stream of rows, its domains drawn in [data] mix's token shares (validation: as they come);
        # this rank takes every dp_size-th row (see the loader's module docstring); a pipeline's ranks read alike
        self.loader = TokenLoader(self.tokens_dir, "train", cfg.seq_len, cfg.micro_batch, par.dp_rank,
                                  par.dp_size, seed=cfg.seed, mix=data_mix(recipe))
        # MFU's denominator: the peak of the GEMMs that run (FP8 ones only on GPUs; CPU FP8 is emulated in fp32)
        gemm_dtype = torch.bfloat16 if bf16 else torch.float32
        if cfg.fp8 and self.device.type == "cuda":
            gemm_dtype = torch.float8_e4m3fn
        self.peak = matmul_peak_flops(self.device, gemm_dtype)
        self.step, self.bad_steps, self.tokens_seen, self.train_seconds = 0, 0, 0, 0.0
        self.last_val: dict[str, Any] = {}
        self.stop_signal: int | None = None

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        """[AdamW] or [AdamW, Muon]: every step sets their lrs, steps and saves them together."""
        cfg = self.cfg
        betas = (cfg.beta1, cfg.beta2)
        if cfg.optimizer == "adamw":
            return [build_optimizer(self.model, cfg.lr, cfg.weight_decay, betas, foreach=self.foreach)]
        if self.par.mode == "fsdp":
            raise ValueError("[pretrain] optimizer='muon' does not run under --parallel fsdp: Muon orthogonalises "
                             "whole matrices and FSDP shards them across processes; use --parallel ddp")
        return build_muon(self.model, cfg.lr, cfg.muon_lr or cfg.lr, cfg.weight_decay, betas, cfg.muon_momentum,
                          cfg.muon_nesterov, cfg.muon_adjust_lr, cfg.muon_experts, self.foreach)

    # --- one optimiser step ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, par = self.cfg, self.par
        step = self.schedule_step()
        multiplier = lr_multiplier(step, cfg.max_steps, cfg.warmup_steps, cfg.schedule, cfg.decay_start,
                                   cfg.final_lr_ratio)
        lr = cfg.lr * multiplier
        lam = mtp_lambda_at(step, cfg.max_steps, cfg.mtp_lambda, cfg.mtp_lambda_final, cfg.mtp_lambda_switch)
        gamma = bias_rate_at(step, cfg.max_steps, cfg.bias_update_rate, cfg.bias_update_stop)
        for opt, peak in zip(self.optimizers, self.peak_lrs, strict=True):
            set_lr(opt, peak * multiplier)
        t0 = time.perf_counter()
        parts = torch.zeros(4, dtype=torch.float64, device=self.device)  # ce, mtp, balance, indexer KL
        counts = None
        warm = self.dsa and self.step < cfg.dsa_warmup_steps  # DSA's dense warm-up: only the indexers learn
        if self.dsa:
            self.model.sparse_attention(not warm)
        if self.pipeline:  # the schedule runs all micro-batches of the step
            rows = torch.cat([next(self.loader) for _ in range(self.accum)]).to(self.device)  # [accum·B, T+1]
            with self.autocast():
                parts, counts = self.pipeline.step(rows[:, :-1], rows[:, 1:], lam, cfg.balance_alpha)
        for micro in range(0 if self.pipeline else self.accum):
            batch = next(self.loader).to(self.device)  # [B, T+1]
            inputs, labels = batch[:, :-1], batch[:, 1:]
            with self.gradient_sync(micro == self.accum - 1):
                with self.autocast():
                    out = self.forward_model(inputs, extras=True)
                    loss, p = pretrain_loss(out, labels, lam, cfg.balance_alpha, indexer_only=warm)
                (loss / self.accum).backward()
            parts += torch.stack([p["ce"], p["mtp"], p["balance"], p["indexer_kl"]]).double() / self.accum
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        reduce_expert_grads(par)
        parts = par.all_reduce(parts) / par.dp_size
        if counts is not None:
            counts = par.all_reduce(counts)
        grad_norm = clip_grad_norm(self.model, cfg.grad_clip, par)
        finite = bool(torch.isfinite(parts).all()) and bool(torch.isfinite(grad_norm))
        if finite:
            for opt in self.optimizers:
                opt.step()
            if counts is not None and gamma > 0 and not warm:
                # under pipeline parallelism each stage updates the layers it holds
                update_bias(self.model, counts[self.pipeline.moe_rows] if self.pipeline else counts, gamma)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        self.train_seconds += elapsed
        self.step += 1
        self.tokens_seen += cfg.global_batch_tokens
        tps = cfg.global_batch_tokens / elapsed
        record: dict[str, Any] = {"step": self.step}
        if finite:
            ce, mtp, bal = parts[:3].tolist()
            record.update(loss=ce, mtp_loss=mtp, balance_loss=bal,
                          total_loss=ce + lam * mtp + cfg.balance_alpha * bal)
            if self.dsa:
                record.update(indexer_kl=parts[3].item(), dsa_phase="warmup" if warm else "sparse")
        else:
            what = "loss" if not torch.isfinite(parts).all() else "gradient norm"
            record.update(loss=None, event="skipped", reason=f"non-finite {what}")
        record.update(lr=lr, mtp_lambda=lam, bias_rate=gamma, grad_norm=float(grad_norm) if finite else None,
                      tokens=self.tokens_seen, tokens_per_s=tps,
                      mfu=mfu(tps / par.world_size, self.flops_per_token, self.peak), step_time=elapsed)
        if counts is not None:
            vio = max_violation(counts)
            record.update(max_vio=vio.tolist(), max_vio_mean=float(vio.mean()), expert_loads=counts.tolist())
        return record

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced across processes only after the last micro-batch of a step."""
        if self.par.mode == "ddp" and not sync:
            return getattr(self.forward_model, "_orig_mod", self.forward_model).no_sync()
        if self.par.mode == "fsdp":
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # --- validation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Main-head loss and bits per byte, MTP-head loss/accuracy and MaxVio on the first val_batches
        micro-batches of the validation split (the same ones every time)."""
        cfg, par = self.cfg, self.par
        self.model.eval()
        loader = TokenLoader(self.tokens_dir, "val", cfg.seq_len, cfg.micro_batch, par.dp_rank, par.dp_size,
                             seed=cfg.seed)
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)  # nats, tokens, bytes, mtp nats·n, n, KL
        counts, mtp_hits = None, None
        for _ in range(max(1, cfg.val_batches // par.dp_size)):
            batch = next(loader).to(self.device)
            inputs, labels = batch[:, :-1], batch[:, 1:]
            with self.autocast():
                out = self.forward_model(inputs, extras=True)
            nll = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(),
                                                    reduction="sum")
            sums[0] += nll.double()
            sums[1] += labels.numel()
            sums[2] += self.token_bytes[labels].sum().double()
            for k, logits in enumerate(out.mtp_logits, start=1):
                target = labels[:, k:]
                sums[3] += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                                             reduction="sum").double()
                sums[4] += target.numel()
            if out.indexer_loss is not None:
                sums[5] += out.indexer_loss.double()
            hits = torch.tensor(mtp_accuracy(out, labels), dtype=torch.float64, device=self.device).reshape(-1, 2)
            mtp_hits = hits if mtp_hits is None else mtp_hits + hits
            if out.expert_counts is not None:
                counts = out.expert_counts if counts is None else counts + out.expert_counts
        par.all_reduce(sums)
        self.model.train()
        nats, tokens, nbytes, mtp_nats, mtp_n, kl = sums.tolist()
        result: dict[str, Any] = {"step": self.step, "val_loss": nats / tokens,
                                  "val_bpb": nats / (math.log(2) * nbytes) if nbytes else None}
        if self.dsa:
            result["val_indexer_kl"] = kl / (par.dp_size * max(1, cfg.val_batches // par.dp_size))
        if mtp_n:
            mtp_hits = par.all_reduce(mtp_hits)
            result.update(val_mtp_loss=mtp_nats / mtp_n, val_mtp_acc=(mtp_hits[:, 0] / mtp_hits[:, 1]).tolist())
        if counts is not None:
            vio = max_violation(par.all_reduce(counts))
            result.update(val_max_vio=vio.tolist(), val_max_vio_mean=float(vio.mean()))
        return result

    # --- checkpoints -----------------------------------------------------------------------------------------
    def save(self) -> Path:
        rank_state = {"rng_torch": torch.get_rng_state(), "rng_python": random.getstate(),
                      "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        state = {"loader": self.loader.state_dict(), "bad_steps": self.bad_steps, "tokens_seen": self.tokens_seen,
                 "train_seconds": self.train_seconds, "optimizer": self.cfg.optimizer}
        summary = {"stage": "pretrain", "step": self.step, "recipe": self.recipe,
                   "metrics": {"tokens_seen": self.tokens_seen, **self.last_val}}
        copy = [p for p in sorted(self.tokenizer_dir.iterdir()) if p.is_file()]
        return save_checkpoint(self.out, self.step, self.model, self.optimizers, state, rank_state, self.par,
                               keep=self.cfg.keep_checkpoints, json_files={"nanoseek.json": summary},
                               copy_files=copy)

    def resume(self) -> Path | None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            return None
        state, mine = load_checkpoint(ckpt, self.model, self.optimizers, self.par,
                                      expect={"optimizer": self.cfg.optimizer})
        for group in self.optimizers[0].param_groups:  # AdamW's saved flag reflects the saving run's layout
            group["foreach"] = self.foreach
        self.step, self.bad_steps, self.tokens_seen = state["step"], state["bad_steps"], state["tokens_seen"]
        self.train_seconds = state.get("train_seconds", 0.0)  # absent from checkpoints before time_budget_s
        self.loader.load_state_dict(state["loader"])
        if mine is not None:  # same process count: continue every random stream exactly
            torch.set_rng_state(mine["rng_torch"])
            random.setstate(mine["rng_python"])
            if mine["rng_cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["rng_cuda"], self.device)
        return ckpt

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> Path:
        cfg, par = self.cfg, self.par
        metrics_path = self.out / "metrics.jsonl"
        existing = latest_checkpoint(self.out) is not None or metrics_path.exists()
        par.barrier()  # every process has looked before the first one writes
        if existing and not resume:
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or choose "
                                  f"another --out")
        if par.is_main:
            remove_leftovers(self.out)  # what a killed save left must neither linger nor fill the disk
        par.barrier()
        resumed = self.resume() if resume else None
        writer = MetricsWriter(metrics_path, resume_step=self.step) if par.is_main else None
        if par.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.json").write_text(json.dumps(self.recipe, indent=2) + "\n")
            if resumed:
                print(f"resumed from {resumed} (step {self.step})", file=sys.stderr)
            elif resume:
                print(f"--resume: no checkpoint in {self.out}, starting from scratch", file=sys.stderr)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (par.is_main and self.progress),
                   desc="pretrain", unit="step", dynamic_ncols=True)
        last_ckpt = resumed
        out_of_time = self._out_of_time()
        with _stop_on_signals(self):
            try:
                while self.step < cfg.max_steps and not out_of_time:
                    record = self.train_step()
                    if writer:
                        writer.write(record)
                    if record.get("event") == "skipped":
                        if par.is_main:
                            tqdm.write(f"step {self.step}: {record['reason']}; update skipped "
                                       f"({self.bad_steps} in a row)", file=sys.stderr)
                        if self.bad_steps >= cfg.max_bad_steps:
                            raise RuntimeError(
                                f"{self.bad_steps} non-finite steps in a row (last at step {self.step}); "
                                f"stopping. Last good checkpoint: {last_ckpt or 'none'}. Lower pretrain.lr or "
                                f"check the data, then resume with --resume.")
                    else:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    bar.update(1)
                    out_of_time = self._out_of_time()
                    done = self.step == cfg.max_steps or out_of_time
                    if out_of_time and par.is_main:
                        tqdm.write(f"pretrain: time budget of {cfg.time_budget_s:g}s reached at step {self.step}",
                                   file=sys.stderr)
                    if done or (cfg.val_every and self.step % cfg.val_every == 0):
                        self.last_val = self.evaluate()
                        if writer:
                            writer.write(self.last_val)
                    periodic = cfg.save_every and self.step % cfg.save_every == 0 and not self.bad_steps
                    if done or periodic or self._stopping():
                        last_ckpt = self.save()
                    if self._stopping() and not done:
                        raise TrainingInterrupted(self.stop_signal, last_ckpt)
            finally:
                bar.close()
                if writer:
                    writer.close()
        if last_ckpt is None:  # resumed at max_steps or out of time: nothing left to do
            last_ckpt = latest_checkpoint(self.out)
        if par.is_main and cfg.plots:
            plot_metrics(metrics_path, self.out / "plots")
        return last_ckpt

    def schedule_step(self) -> float:
        """The step the schedules read: the optimiser step, or (schedule_clock "time", after warm-up) the step
        that the training seconds spent so far stand for, time_budget_s ↔ max_steps, when that is further."""
        cfg = self.cfg
        if cfg.schedule_clock == "steps" or self.step < cfg.warmup_steps:
            return self.step
        return max(self.step, cfg.max_steps * min(1.0, self.spent_seconds() / cfg.time_budget_s))

    def spent_seconds(self) -> float:
        """Training seconds so far, the slowest process's (so that all processes agree)."""
        spent = torch.tensor([self.train_seconds], dtype=torch.float64, device=self.device)
        self.par.all_reduce(spent, torch.distributed.ReduceOp.MAX)
        return spent.item()

    def _out_of_time(self) -> bool:
        """Whether training steps have used `time_budget_s` (the slowest process's clock, so all agree)."""
        return bool(self.cfg.time_budget_s) and self.spent_seconds() >= self.cfg.time_budget_s

    def _stopping(self) -> bool:
        """Whether any process received SIGTERM/SIGINT (all processes must agree to save together)."""
        flag = torch.tensor([self.stop_signal or 0], device=self.device)
        self.par.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        if flag.item():
            self.stop_signal = int(flag.item())
        return bool(flag.item())


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGTERM/SIGINT set a flag that the loop checks after each step (the main thread only handles signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        trainer.stop_signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- entry points -------------------------------------------------------------------------------------------
def pretrain(recipe: dict[str, Any], out_dir: str | Path, *, max_steps: int | None = None,
             save_every: int | None = None, resume: bool = False, parallel: str | None = None,
             expert_parallel: int = 1, progress: bool = True, pipeline_parallel: int = 1,
             pp_schedule: str = "1f1b") -> Path:
    """Pretrain the model a recipe describes into `out_dir`; returns the final checkpoint directory.

    Raises TrainingInterrupted after a SIGTERM/SIGINT (a checkpoint has been saved) and RuntimeError after
    `max_bad_steps` non-finite steps in a row.
    """
    section = dict(recipe.get("pretrain") or {})
    if max_steps is not None:
        section["max_steps"] = max_steps
    if save_every is not None:
        section["save_every"] = save_every
    cfg = from_dict(PretrainConfig, section, "pretrain")
    cfg.validate()
    recipe = {**recipe, "pretrain": asdict(cfg)}
    started = not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    par = init_parallel(parallel, expert_parallel, cfg.device, pipeline_parallel)
    try:
        return Trainer(recipe, cfg, Path(out_dir), par, progress, pp_schedule).run(resume)
    finally:
        torch.set_num_threads(threads)
        if started:
            shutdown(par)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="built-in recipe name (debug, tiny, ...) or a TOML file")
    parser.add_argument("--out", required=True, type=Path, help="run directory (metrics, checkpoints, plots)")
    parser.add_argument("--max-steps", type=int, help="override pretrain.max_steps (the schedule follows)")
    parser.add_argument("--save-every", type=int, help="override pretrain.save_every")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), help="data parallelism under torchrun (default ddp)")
    parser.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                        help="spread routed experts over N processes (N divides the processes per stage)")
    parser.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                        help="split the decoder into pipeline stages over N processes (N divides the process count)")
    parser.add_argument("--pp-schedule", choices=list(SCHEDULES), default="1f1b",
                        help="pipeline schedule (interleaved1f1b, zbv, dualpipev: two stages per process)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set pretrain.lr=1e-3 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.set)
    try:
        ckpt = pretrain(recipe, args.out, max_steps=args.max_steps, save_every=args.save_every, resume=args.resume,
                        parallel=args.parallel, expert_parallel=args.expert_parallel,
                        progress=not args.no_progress, pipeline_parallel=args.pipeline_parallel,
                        pp_schedule=args.pp_schedule)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final checkpoint: {ckpt}")
    return 0

