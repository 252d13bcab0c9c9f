"""Atomic checkpoints: layout, exact restore, pruning, interrupted saves, and `nanoseek.load` compatibility."""

import pytest
import torch

import nanoseek
from nanoseek.model import Transformer, preset
from nanoseek.train.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from nanoseek.train.objectives import pretrain_loss
from nanoseek.train.optim import build_optimizer
from nanoseek.train.parallelize import Parallel


def trained(seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(preset("debug"))
    opt = build_optimizer(model, 1e-3)
    ids = torch.randint(0, 512, (2, 17))
    loss, _ = pretrain_loss(model(ids[:, :-1], extras=True), ids[:, 1:], mtp_lambda=0.3, balance_alpha=1e-4)
    loss.backward()
    opt.step()
    model.moe_layers()[0].gate.e_score_correction_bias += torch.arange(8.0) * 1e-3  # a balancing bias
    return model, opt


def test_save_and_load_restore_everything_exactly(tmp_path):
    model, opt = trained()
    rng = torch.get_rng_state()
    path = save_checkpoint(tmp_path, 7, model, opt, {"loader": {"rows": 12}}, {"rng": rng},
                           Parallel(), json_files={"nanoseek.json": {"stage": "pretrain"}})
    assert path == checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoints" / "step_0000007"
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "optimizer.pt",
                                                 "trainer_state.pt", "nanoseek.json"}
    fresh, fresh_opt = trained(seed=1)
    state, rank_state = load_checkpoint(path, fresh, fresh_opt, Parallel())
    assert state["step"] == 7 and state["loader"] == {"rows": 12} and state["world_size"] == 1
    assert torch.equal(rank_state["rng"], rng)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for k in sa:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][field], sb[k][field])


def test_checkpoint_directory_loads_with_nanoseek_load(tmp_path):
    model, opt = trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {}, {}, Parallel())
    for target in (path, tmp_path):  # the checkpoint itself, or the run directory (its latest checkpoint)
        loaded = nanoseek.load(target)
        ids = torch.randint(0, 512, (1, 9))
        torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)


def test_keep_last_k_and_latest(tmp_path):
    model, opt = trained()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, opt, {}, {}, Parallel(), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000030", "step_0000040"]
    assert latest_checkpoint(tmp_path).name == "step_0000040"


def test_a_failed_save_leaves_no_checkpoint_behind(tmp_path):
    model, opt = trained()
    save_checkpoint(tmp_path, 1, model, opt, {}, {}, Parallel())
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path, 2, model, opt, {}, {}, Parallel(), copy_files=[tmp_path / "missing.json"])
    assert latest_checkpoint(tmp_path).name == "step_0000001"  # the earlier checkpoint is untouched
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]  # no partial step 2
    save_checkpoint(tmp_path, 2, model, opt, {}, {}, Parallel())
    assert latest_checkpoint(tmp_path).name == "step_0000002"


def test_loading_a_non_training_checkpoint_names_the_problem(tmp_path):
    model, opt = trained()
    model.save_pretrained(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        load_checkpoint(tmp_path / "export", model, opt, Parallel())
