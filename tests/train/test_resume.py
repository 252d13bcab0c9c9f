"""Crash safety through the command line: kill -9 then --resume reproduces every loss bit for bit; SIGTERM saves
a checkpoint and exits."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("loss") is not None}


def run_cli(out: Path, data_root: Path, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--recipe", "debug", "--out", str(out), "--no-progress",
           "--set", f"data.root={data_root}", "--set", "pretrain.plots=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count in every run: identical float sums
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and any(r.get("step", 0) >= step for r in read_metrics(metrics)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_resume_after_kill_9_gives_bit_identical_losses(debug_recipe, data_root, tmp_path):
    args = ("--max-steps", "16", "--save-every", "3")
    # the uninterrupted reference runs in this process (one thread, like the command line runs)
    pretrain(debug_recipe, tmp_path / "ref", max_steps=16, save_every=3, progress=False)
    kill_at = random.Random().randint(4, 13)  # an arbitrary step, not a checkpoint boundary in general
    run = tmp_path / "killed"
    victim = run_cli(run, data_root, *args)
    wait_for_step(victim, run / "metrics.jsonl", kill_at)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(train_losses(run))
    assert killed_at < 16, "the run finished before it was killed"
    resumed = run_cli(run, data_root, *args, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert "resumed from" in resumed.stderr.read()
    expected, got = train_losses(tmp_path / "ref"), train_losses(run)
    assert sorted(got) == list(range(1, 17))
    assert got == expected  # every loss, bit for bit (floats compared exactly)


def test_sigterm_saves_a_checkpoint_and_exits(data_root, tmp_path):
    proc = run_cli(tmp_path, data_root, "--max-steps", "2000", "--save-every", "1000")
    wait_for_step(proc, tmp_path / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert "SIGTERM" in proc.stderr.read()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and int(ckpt.name.split("_")[1]) == max(train_losses(tmp_path))


