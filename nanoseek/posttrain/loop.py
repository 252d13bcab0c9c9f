"""The one post-training loop. SFT, DPO, the reward model and GRPO supply their maths as a `Stage`; the loop owns
everything around it: setup (device, threads, seeding, the starting model), the learning-rate schedule, gradient
clipping and the optimizer step, the validation cadence, the time budget, checkpoints and resume, metrics, the
progress bar and teardown.

    cfg, out, init = prepare(SFTConfig, recipe, "sft", out_dir, init, resume)
    with threads(cfg.threads):
        policy = start(cfg, init)
        stage = MyStage(...)                     # loss(step) -> (loss, metrics); validate() -> metrics
        return run(stage, cfg, out, "sft", recipe, policy, total=..., val_every=cfg.val_every, ...)

The time budget counts training time only: the stage's `train_step` (for GRPO: generation, reference and update),
never validation, held-out evaluation or checkpointing, so a stage given N seconds trains for N seconds however
often it is measured.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from nanoseek.common import pick_device
from nanoseek.config import from_dict
from nanoseek.posttrain.stage import Policy, check_fresh_run, load_policy, resume_stage, save_stage
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import MetricsWriter
from nanoseek.train.optim import lr_multiplier, set_lr

C = TypeVar("C", bound="TrainConfig")


@dataclass
class TrainConfig:
    """The fields every post-training stage shares; a stage's config adds its own (and may change a default)."""

    init: str = ""  # starting checkpoint or run directory (the pipeline passes the previous stage)
    lr: float = 1e-4
    warmup_steps: int = 0
    decay_start: float = 0.0  # share of the steps before the cosine decay starts (1.0: constant after warmup)
    final_lr_ratio: float = 0.1  # lr at the last step / peak lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 0  # 0: the stage's own default (epochs for SFT, DPO, the reward model)
    time_budget_s: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    # also save when training time first passes each of these many seconds: a learning curve against minutes from
    # one run (bench/learning_study.py evaluates each). Set keep_checkpoints high enough to keep them.
    save_at_s: list[float] = field(default_factory=list)
    seed: int = 0
    threads: int = 0  # torch CPU threads while the stage runs (0: leave as is)
    save_every: int = 0
    keep_checkpoints: int = 2
    device: str = "auto"

    def validate(self, section: str) -> None:
        """Refuse values the loop cannot run with, naming the field."""
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"[{section}] {name}={getattr(self, name)!r}: {why}")

        for name in ("warmup_steps", "max_steps", "time_budget_s", "seed", "threads", "save_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.lr <= 0:
            raise bad("lr", "must be > 0")
        if self.grad_clip <= 0:
            raise bad("grad_clip", "must be > 0")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", "must be >= 1")
        if not 0 <= self.decay_start <= 1 or not 0 <= self.final_lr_ratio <= 1:
            raise bad("decay_start", "decay_start and final_lr_ratio must lie in [0, 1]")
        if any(s <= 0 for s in self.save_at_s):
            raise bad("save_at_s", "times must be > 0")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise bad("device", "expected auto, cpu, cuda, cuda:N or mps") from e


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to n (0: unchanged) while a stage runs; later stages of the process get the
    machine back."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare(cls: type[C], recipe: dict[str, Any], section: str, out_dir: str | Path, init: str | Path | None,
            resume: bool) -> tuple[C, Path, str]:
    """The stage's config from its recipe table (validated), its run directory (refused if it already holds
    another run) and its starting checkpoint (`init` overrides the table's)."""
    cfg = from_dict(cls, recipe.get(section), section)
    cfg.validate(section)
    init = str(init or cfg.init)
    if not init:
        raise ValueError(f"[{section}] init: no starting checkpoint (set it or pass --init)")
    out = Path(out_dir)
    check_fresh_run(out, resume)
    return cfg, out, init


def start(cfg: TrainConfig, init: str) -> Policy:
    """Seed, then load the starting model on the configured device (seeding first: a stage that adds weights,
    such as the reward head, draws them from the same stream every time)."""
    torch.manual_seed(cfg.seed)
    return load_policy(init, pick_device(cfg.device))


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the gradients to norm `grad_clip`, step, zero them; the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


class Stage:
    """What a stage supplies to the loop. The usual stage implements `loss`; GRPO, whose step is a generation
    batch with μ optimizer steps and none when it has no learning signal, implements `train_step` itself."""

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of optimizer step `step` (0-based) and metrics to log beside it."""
        raise NotImplementedError

    def train_step(self, step: int, optimizer_step: Callable[[], float]) -> dict[str, Any]:
        """One training step: gradients, then `optimizer_step()` (clip, step, zero; returns the grad norm) as
        many times as the stage steps. Returns the step's metrics."""
        loss, metrics = self.loss(step)
        loss.backward()
        return {"loss": loss.item(), **metrics, "grad_norm": optimizer_step()}

    def validate(self) -> dict[str, Any]:
        """Metrics on held-out data ({} when there is none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume this stage exactly (data position, RNG streams)."""
        return {}

    def load_state_dict(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Restore `state_dict()` from the checkpoint being resumed."""

    def extra_files(self) -> Sequence[Path]:
        """Files to copy into each checkpoint beside the weights."""
        return ()

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows after each step."""
        return {"loss": f"{metrics['loss']:.3f}"}


def run(stage: Stage, cfg: TrainConfig, out: Path, section: str, recipe: dict[str, Any], policy: Policy,
        optimizer: torch.optim.Optimizer, total: int, val_every: int, resume: bool = False, progress: bool = True,
        data: dict[str, Any] | None = None, validate_first: bool = False,
        save: Callable[[int, dict[str, Any]], Path] | None = None) -> Path:
    """Train `stage` for `total` steps (or until the time budget runs out); returns the last checkpoint.

    `data` is logged once as the run's {"event": "data"} line; `validate_first` measures before the first step
    (not again on resume); `save(step, metrics)` replaces the usual resumable checkpoint (the reward model writes
    its own format)."""
    model = policy.model
    step, seconds = 0, 0.0
    if resume and (state := resume_stage(out, model, optimizer)) is not None:
        step, seconds = state["step"], state["train_seconds"]
        stage.load_state_dict(state, latest_checkpoint(out))
        validate_first = False
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(out / "metrics.jsonl", resume_step=step)

    def checkpoint(last: dict[str, Any]) -> Path:
        if save is not None:
            return save(step, last)
        return save_stage(out, step, model, optimizer, section, recipe, policy.checkpoint,
                          {**stage.state_dict(), "train_seconds": seconds}, cfg.keep_checkpoints, last,
                          stage.extra_files())

    ckpt = None
    bar = tqdm(total=total, initial=step, desc=section, unit="step", disable=not progress, dynamic_ncols=True)
    try:
        if data is not None:
            writer.write({"event": "data", "step": step, **data})
        if validate_first and (before := stage.validate()):
            writer.write({"step": 0, **before})
        while step < total:
            lr = cfg.lr * lr_multiplier(step, total, cfg.warmup_steps, "cosine", cfg.decay_start, cfg.final_lr_ratio)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            metrics = stage.train_step(step, functools.partial(optimizer_step, model, optimizer, cfg.grad_clip))
            elapsed = time.perf_counter() - t0
            passed = [s for s in cfg.save_at_s if seconds < s <= seconds + elapsed]
            step, seconds = step + 1, seconds + elapsed
            last = {"step": step, **metrics, "lr": lr, "step_time": elapsed, "time/train_total": seconds}
            out_of_time = 0 < cfg.time_budget_s <= seconds
            done = step == total or out_of_time
            if done or (val_every and step % val_every == 0):
                last.update(stage.validate())
            writer.write(last)
            bar.set_postfix(stage.postfix(last))
            bar.update(1)
            if done or passed or (cfg.save_every and step % cfg.save_every == 0):
                ckpt = checkpoint(last)
            if out_of_time:
                print(f"{section}: time budget of {cfg.time_budget_s:.0f}s of training reached at step {step}",
                      file=sys.stderr)
                break
    finally:
        bar.close()
        writer.close()
    return ckpt or latest_checkpoint(out)
