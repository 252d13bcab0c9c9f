"""2-process torchrun on CPU (gloo): DDP, FSDP2 and FSDP2 + expert parallelism reproduce the single-process
losses of the same recipe; a DCP checkpoint written by 2 processes resumes on 1."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import load_recipe
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # each case starts two processes (~10-20 s)


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("loss") is not None}


def torchrun(out: Path, data_root: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanoseek",
           "pretrain", "--recipe", "debug", "--out", str(out), "--no-progress", "--set", f"data.root={data_root}",
           "--set", "pretrain.plots=false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The single-process run of the debug recipe (20 steps, checkpoints every 10): its losses and run dir."""
    out = tmp_path_factory.mktemp("single")
    pretrain(load_recipe("debug", [f"data.root={data_root}", "pretrain.plots=false"]), out, progress=False)
    return train_losses(out), out


def assert_close(got: dict[int, float], expected: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-4 * abs(expected[step]), (step, got[step], expected[step])


@pytest.mark.parametrize("args", [("--parallel", "ddp"), ("--parallel", "fsdp"),
                                  ("--parallel", "fsdp", "--expert-parallel", "2"),
                                  ("--parallel", "ddp", "--expert-parallel", "2")])
def test_two_processes_match_one(reference, data_root, tmp_path, args):
    losses, single_run = reference
    torchrun(tmp_path, data_root, *args)
    assert_close(train_losses(tmp_path), losses, range(1, 21))
    # val lines too: every process evaluated its share and the sums were combined
    val = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20]
    # the exported model.safetensors holds the gathered full model (FSDP shards, expert slices)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = nanoseek.load(tmp_path)(ids), nanoseek.load(single_run)(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)


def test_dcp_checkpoint_from_two_processes_resumes_on_one(reference, data_root, tmp_path):
    torchrun(tmp_path, data_root, "--parallel", "fsdp", "--expert-parallel", "2")
    step10, step20 = tmp_path / "checkpoints" / "step_0000010", tmp_path / "checkpoints" / "step_0000020"
    assert (step10 / "dcp" / ".metadata").exists() and (step10 / "model.safetensors").exists()
    shutil.rmtree(step20)  # continue from step 10 in one process
    recipe = load_recipe("debug", [f"data.root={data_root}", "pretrain.plots=false"])
    pretrain(recipe, tmp_path, resume=True, progress=False)
    assert_close(train_losses(tmp_path), reference[0], range(1, 21))
