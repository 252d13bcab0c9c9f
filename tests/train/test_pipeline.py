"""Pipeline parallelism. Fast: the stage split composed on one process is the model, and stages sit on the ranks
torch's schedules expect. Slow (torchrun on CPU, gloo): every schedule reproduces the single-process losses; a
DCP checkpoint written under PP resumes on 1 process; kill -9 + --resume under PP is bit-exact; PP x EP on 4."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.pipelining.schedules import generate_rank_to_stage_mapping

import nanoseek
from nanoseek.config import load_recipe
from nanoseek.model import Transformer, preset
from nanoseek.model.transformer import ModelOutput
from nanoseek.train.metrics import read_metrics
from nanoseek.train.objectives import pretrain_loss
from nanoseek.train.pipeline import SCHEDULES, Stage, split_layers, stage_owner
from nanoseek.train.pretrain import pretrain
from tests.train import test_distributed
from tests.train.test_distributed import REPO, assert_close, torchrun, train_losses

reference = test_distributed.reference  # the single-process debug run, shared fixture

SLOW_ARGS = ("--pipeline-parallel", "2", "--parallel", "ddp")


def test_split_layers_is_contiguous_and_even():
    assert split_layers(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_layers(2, 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]


@pytest.mark.parametrize("pp", [2, 4])
def test_stages_sit_where_torch_schedules_expect_them(pp):
    for style in ("loop", "v"):
        ours = {r: [s for s in range(2 * pp) if stage_owner(s, pp, style) == r] for r in range(pp)}
        assert ours == {r: list(s) for r, s in generate_rank_to_stage_mapping(pp, 2 * pp, style).items()}
    assert stage_owner(0, pp, "v") == stage_owner(2 * pp - 1, pp, "v") == 0  # embedding and head together


@pytest.mark.parametrize("n_stages", [2, 3])
def test_stages_composed_in_order_are_the_model(n_stages):
    """Loss and gradients of the stages run one after the other equal the whole model's (MTP, MoE, balance)."""
    torch.manual_seed(0)
    model = Transformer(preset("debug", num_hidden_layers=3))
    ids = torch.randint(0, 512, (2, 17))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    ref_loss, ref_parts = pretrain_loss(model(inputs, extras=True), labels, 0.3, 1e-2)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    stages = [Stage(model, s, n_stages, r) for s, r in enumerate(split_layers(3, n_stages))]
    carry = (inputs,)
    for stage in stages:
        carry = stage(*carry)
    logits, *mtp_logits, balance = carry
    loss, parts = pretrain_loss(ModelOutput(logits, mtp_logits, balance), labels, 0.3, 1e-2)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    assert parts["balance"] > 0 and torch.allclose(parts["balance"], ref_parts["balance"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)
    # each stage's expert loads fill its own rows of the model's expert_counts
    rows = [r for stage in stages for r in stage.rows]
    counts = torch.cat([torch.stack(stage.counts).sum(0) for stage in stages if stage.counts])
    assert rows == list(range(len(model.moe_layers())))
    torch.testing.assert_close(counts, model(inputs, extras=True).expert_counts)


# --- torchrun -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_matches_one_process(reference, data_root, tmp_path, schedule):
    torchrun(tmp_path, data_root, *SLOW_ARGS, "--pp-schedule", schedule)
    assert_close(train_losses(tmp_path), reference[0], range(1, 21))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r] == [10, 20]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zbv", "dualpipev"])
def test_fsdp_with_v_schedules_matches_one_process(reference, data_root, tmp_path, schedule):
    """Two stages per rank and a split backward (input gradients, later weight gradients) under FSDP2: the blocks
    must stay gathered from forward to weight-gradient pass, or the weight pass misses micro-batches."""
    torchrun(tmp_path, data_root, "--pipeline-parallel", "2", "--parallel", "fsdp", "--pp-schedule", schedule)
    assert_close(train_losses(tmp_path), reference[0], range(1, 21))


@pytest.mark.slow
def test_fsdp_pipeline_checkpoint_resumes_on_one_process(reference, data_root, tmp_path):
    torchrun(tmp_path, data_root, "--pipeline-parallel", "2", "--parallel", "fsdp", "--pp-schedule", "1f1b")
    assert_close(train_losses(tmp_path), reference[0], range(1, 21))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # model.safetensors holds every stage's weights
        torch.testing.assert_close(nanoseek.load(tmp_path)(ids), nanoseek.load(reference[1])(ids), rtol=0, atol=2e-3)
    step10, step20 = tmp_path / "checkpoints" / "step_0000010", tmp_path / "checkpoints" / "step_0000020"
    assert (step10 / "dcp" / ".metadata").exists()
    step11 = train_losses(tmp_path)[11]
    shutil.rmtree(step20)  # continue from step 10 in one process: the same next loss
    pretrain(load_recipe("debug", [f"data.root={data_root}", "pretrain.plots=false"]), tmp_path, resume=True,
             progress=False)
    resumed = train_losses(tmp_path)
    assert abs(resumed[11] - step11) <= 1e-4 * step11
    assert_close(resumed, reference[0], range(1, 21))


def _popen_torchrun(out, data_root, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanoseek",
           "pretrain", "--recipe", "debug", "--out", str(out), "--no-progress", "--set", f"data.root={data_root}",
           "--set", "pretrain.plots=false", *SLOW_ARGS, "--pp-schedule", "1f1b", "--max-steps", "12",
           "--save-every", "3", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_kill_9_and_resume_under_pipeline_is_bit_exact(data_root, tmp_path):
    ref = _popen_torchrun(tmp_path / "ref", data_root)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    run = tmp_path / "killed"
    victim = _popen_torchrun(run, data_root)
    kill_at, deadline = random.Random().randint(4, 10), time.time() + 300
    while not (run / "metrics.jsonl").exists() or max(train_losses(run), default=0) < kill_at:
        assert victim.poll() is None and time.time() < deadline, victim.stderr.read()[-3000:]
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks at once
    victim.wait()
    assert max(train_losses(run)) < 12, "the run finished before it was killed"
    resumed = _popen_torchrun(run, data_root, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    got, expected = train_losses(run), train_losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 13))
    assert got == expected  # bit for bit


@pytest.mark.slow
def test_pipeline_with_expert_parallel_on_four_processes(reference, data_root, tmp_path):
    """pp=2 x ep=2: each stage's experts split over its 2 ranks, DualPipeV overlapping their exchanges."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "nanoseek",
           "pretrain", "--recipe", "debug", "--out", str(tmp_path), "--no-progress", "--set",
           f"data.root={data_root}", "--set", "pretrain.plots=false", "--pipeline-parallel", "2",
           "--pp-schedule", "dualpipev", "--expert-parallel", "2", "--max-steps", "20",
           "--set", "pretrain.pipeline_microbatches=4"]  # 2 sequences each: DualPipeV needs >= 4 (stages)
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_close(train_losses(tmp_path), reference[0], range(1, 21))
