"""The pretraining loop end to end on the debug recipe (in process): metrics, checkpoints, balancing,
non-finite steps, precision modes, Muon, the time budget and recipe errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import load_recipe
from nanoseek.train.checkpoint import latest_checkpoint, list_checkpoints
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import PretrainConfig, pretrain


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r.get("loss") is not None}


def test_debug_run_writes_metrics_checkpoints_and_a_loadable_model(debug_recipe, tmp_path):
    recipe = {**debug_recipe, "pretrain": {**debug_recipe["pretrain"], "plots": True}}
    final = pretrain(recipe, tmp_path, progress=False)
    assert final == tmp_path / "checkpoints" / "step_0000020"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000010", "step_0000020"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    for r in train:
        assert isinstance(r["loss"], float) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert len(r["max_vio"]) == 2 and len(r["expert_loads"]) == 2 and len(r["expert_loads"][0]) == 8
        # every token picks K=2 experts in each MoE layer: loads sum to tokens × K (MTP layer: T-1 positions)
        assert sum(r["expert_loads"][0]) == 1024 * 2 and sum(r["expert_loads"][1]) == 16 * 63 * 2
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20]
    assert 0 < val[-1]["val_bpb"] < val[-1]["val_loss"] / 0.69  # ≥1 byte per token: bpb ≤ nats / ln 2
    assert 0 <= val[-1]["val_mtp_acc"][0] <= 1
    assert {p.name for p in (tmp_path / "plots").iterdir()} >= {"loss.png", "lr.png", "max_vio.png"}
    # the checkpoint stands alone: HF config + weights + tokenizer + summary
    names = {p.name for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "nanoseek.json"} <= names
    summary = json.loads((final / "nanoseek.json").read_text())
    assert summary["stage"] == "pretrain" and summary["step"] == 20 and summary["metrics"]["val_loss"] > 0
    model = nanoseek.load(tmp_path)
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # aux-loss-free balancing moved the biases
    # γ is 0 for the last 10% of steps
    assert [r["bias_rate"] for r in train][-2:] == [0.0, 0.0] and train[0]["bias_rate"] == 1e-2


def test_bias_update_balances_expert_loads(debug_recipe, tmp_path):
    """The aux-loss-free bias alone (α = 0) should cut MaxVio well below an unbalanced run's."""
    def final_vio(rate: float, out: Path) -> float:
        section = {**debug_recipe["pretrain"], "max_steps": 30, "balance_alpha": 0.0, "bias_update_rate": rate,
                   "bias_update_stop": 1.0, "val_every": 0, "save_every": 0, "lr": 1e-2}
        pretrain({**debug_recipe, "pretrain": section}, out, progress=False)
        train = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        return sum(r["max_vio_mean"] for r in train[-10:]) / 10

    assert final_vio(0.02, tmp_path / "bias") < 0.7 * final_vio(0.0, tmp_path / "none")


def test_non_finite_steps_are_skipped_and_then_stop_the_run(debug_recipe, tmp_path, monkeypatch):
    """A fault from step 3 on (NaN logits) skips every update; after max_bad_steps the run stops and the last
    good checkpoint (step 2) holds the weights the skipped steps left untouched."""
    from nanoseek.train import pretrain as pretrain_module

    original = pretrain_module.Trainer.train_step

    def faulty_step(self):
        if self.step >= 2 and not getattr(self, "_hooked", False):
            self._hooked = True
            self.model.head.register_forward_hook(lambda m, i, out: out * float("nan"))
        return original(self)

    monkeypatch.setattr(pretrain_module.Trainer, "train_step", faulty_step)
    section = {**debug_recipe["pretrain"], "save_every": 2, "max_bad_steps": 3, "val_every": 0}
    with pytest.raises(RuntimeError, match=r"3 non-finite steps in a row .*step_0000002"):
        pretrain({**debug_recipe, "pretrain": section}, tmp_path, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("event") for r in records] == [None, None, "skipped", "skipped", "skipped"]
    assert all(r["loss"] is None and r["reason"] == "non-finite loss" for r in records[2:])
    assert latest_checkpoint(tmp_path).name == "step_0000002"


@pytest.mark.parametrize("overrides", [{"precision": "bf16"}, {"fp8": "blockwise"}, {"fp8": "rowwise"}])
def test_precision_modes_train(debug_recipe, tmp_path, overrides):
    section = {**debug_recipe["pretrain"], "max_steps": 4, "val_every": 0, "save_every": 0, **overrides}
    pretrain({**debug_recipe, "pretrain": section}, tmp_path, progress=False)
    losses = list(train_losses(tmp_path).values())
    assert len(losses) == 4 and all(l == l for l in losses) and losses[-1] < losses[0]


def test_muon_run_resumes_bit_for_bit_and_only_with_muon(debug_recipe, tmp_path):
    section = {**debug_recipe["pretrain"], "optimizer": "muon", "muon_lr": 5e-3, "max_steps": 8, "save_every": 4,
               "keep_checkpoints": 2, "val_every": 0}
    recipe = {**debug_recipe, "pretrain": section}
    pretrain(recipe, tmp_path / "ref", progress=False)
    # a run that stopped after its step-4 checkpoint: continue it from there
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000004")
    with pytest.raises(ValueError, match="optimizer='muon'.*optimizer='adamw'"):
        pretrain({**recipe, "pretrain": {**section, "optimizer": "adamw"}}, run, resume=True, progress=False)
    pretrain(recipe, run, resume=True, progress=False)
    expected = train_losses(tmp_path / "ref")
    assert train_losses(run) == {s: expected[s] for s in range(5, 9)}  # floats compared exactly
    ref, got = nanoseek.load(tmp_path / "ref"), nanoseek.load(run)
    for (name, a), b in zip(ref.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_time_budget_stops_validates_and_saves(debug_recipe, tmp_path):
    section = {**debug_recipe["pretrain"], "time_budget_s": 1e-6, "val_every": 0}
    final = pretrain({**debug_recipe, "pretrain": section}, tmp_path, progress=False)
    assert final.name == "step_0000001" and list(train_losses(tmp_path)) == [1]
    assert any("val_loss" in r for r in read_metrics(tmp_path / "metrics.jsonl"))


def test_an_existing_run_is_never_overwritten(debug_recipe, tmp_path):
    section = {**debug_recipe["pretrain"], "max_steps": 2, "val_every": 0}
    pretrain({**debug_recipe, "pretrain": section}, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain({**debug_recipe, "pretrain": section}, tmp_path, progress=False)
    # resuming a finished run is a no-op that returns its final checkpoint
    assert pretrain({**debug_recipe, "pretrain": section}, tmp_path, resume=True, progress=False).name == \
        "step_0000002"


@pytest.mark.parametrize("override,message", [
    ("pretrain.lrr=1", r"\[pretrain\] unknown field\(s\) \['lrr'\]"),
    ("pretrain.global_batch_tokens=1000", "not a multiple of micro_batch"),
    ("pretrain.precision=fp16", "precision"),
    ("pretrain.optimizer=sgd", r"\[pretrain\] optimizer='sgd'"),
    ("model.hidden_sizes=3", r"\[model\]"),
    ("data.doc=3", r"\[data\] unknown field"),
])
def test_recipe_errors_name_the_field(data_root, tmp_path, override, message):
    recipe = load_recipe("debug", [f"data.root={data_root}", override])
    with pytest.raises(ValueError, match=message):
        pretrain(recipe, tmp_path, progress=False)


def test_recipes_parse():
    for name in ("debug", "tiny"):
        PretrainConfig(**load_recipe(name)["pretrain"]).validate()


@pytest.mark.slow  # compiling takes a minute or more on a laptop CPU
def test_compiled_training_matches_eager(debug_recipe, tmp_path):
    section = {**debug_recipe["pretrain"], "max_steps": 3, "val_every": 0, "save_every": 0}
    pretrain({**debug_recipe, "pretrain": section}, tmp_path / "eager", progress=False)
    pretrain({**debug_recipe, "pretrain": {**section, "compile": True}}, tmp_path / "compiled", progress=False)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3]
    for step, loss in eager.items():
        assert abs(compiled[step] - loss) <= 1e-4 * loss
