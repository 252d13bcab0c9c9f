"""Checkpoint faults (issue 13): an unfinished save is never loaded or resumed, leftovers go when training starts, a
full disk fails a save cleanly, and loading refuses (naming the file) weights or a config.json it cannot trust."""

import errno
import json
import os
import shutil
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import nanoseek
import nanoseek.model.hf as hf
from nanoseek.config import load_recipe
from nanoseek.data.builtin import DataConfig, cached
from nanoseek.model import Transformer, preset
from nanoseek.model.hf import list_checkpoints, resolve_checkpoint
from nanoseek.train.checkpoint import (
    DiskFullError,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
)
from nanoseek.train.optim import build_optimizer
from nanoseek.train.parallelize import Parallel
from nanoseek.train.pretrain import pretrain


def saved_run(run, steps=(10,), seed=0):
    """A run directory with single-process checkpoints of a debug model at `steps`; returns the model."""
    torch.manual_seed(seed)
    model = Transformer(preset("debug"))
    opt = build_optimizer(model, 1e-3)
    for step in steps:
        save_checkpoint(run, step, model, opt, {"step_marker": step}, {}, Parallel())
    return model, opt


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def unfinished_save(run, step: int, like: int) -> None:
    """What kill -9 during the save of `step` leaves: a .tmp_ directory with some files written, one torn."""
    tmp = run / "checkpoints" / f".tmp_step_{step:07d}"
    shutil.copytree(checkpoint_dir(run, like), tmp)
    data = (tmp / "model.safetensors").read_bytes()
    (tmp / "model.safetensors").write_bytes(data[: len(data) // 2])


def test_a_run_directory_never_resolves_to_an_unfinished_save(tmp_path):
    model, _ = saved_run(tmp_path, steps=(10,))
    unfinished_save(tmp_path, 20, like=10)
    (tmp_path / "checkpoints" / ".old_step_0000030").mkdir()  # a replaced checkpoint mid-rename: not listed either
    expected = checkpoint_dir(tmp_path, 10)
    assert resolve_checkpoint(tmp_path) == expected  # what nanoseek.load, generate, chat, serve and eval use
    assert list_checkpoints(tmp_path) == [expected] and latest_checkpoint(tmp_path) == expected
    assert same_weights(nanoseek.load(tmp_path), model)


def test_remove_leftovers_deletes_unfinished_saves_and_puts_back_a_replaced_checkpoint(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    root = tmp_path / "checkpoints"
    unfinished_save(tmp_path, 7, like=2)
    # killed between the two renames of a re-save of step 2: step_2 moved aside, the new one not yet in place
    (root / "step_0000002").rename(root / ".old_step_0000002")
    unfinished_save(tmp_path, 2, like=1)
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]
    state = torch.load(root / "step_0000002" / "trainer_state.pt", weights_only=True)
    assert state["step_marker"] == 2  # the complete checkpoint came back, not the torn one


@pytest.fixture(scope="module")
def debug_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data = load_recipe("debug")["data"]
    cached(DataConfig(**data, root=str(root)))
    return load_recipe("debug", [f"data.root={root}", "pretrain.plots=false", "pretrain.val_every=0"])


def test_a_leftover_of_a_killed_save_is_removed_when_training_resumes_at_a_lower_step(debug_recipe, tmp_path):
    pretrain(debug_recipe, tmp_path, max_steps=2, save_every=1, progress=False)
    unfinished_save(tmp_path, 20, like=2)  # killed while saving step 20 of a longer schedule
    assert resolve_checkpoint(tmp_path).name == "step_0000002"
    final = pretrain(debug_recipe, tmp_path, max_steps=3, save_every=1, resume=True, progress=False)
    assert final.name == "step_0000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert resolve_checkpoint(tmp_path) == final


def torn_safetensors(tensors, path, metadata=None):
    """safetensors on a full disk: half the file written, then its error (which carries only the OS message)."""
    with open(path, "wb") as f:
        f.write(b"\0" * 1000)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def torn_torch_save(obj, f, *args, **kwargs):
    """torch.save into a Python file on a full disk: some bytes, then OSError(ENOSPC)."""
    f.write(b"PK\3\4 partial")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target,writer", [(hf, ("save_file", torn_safetensors)),
                                           (torch, ("save", torn_torch_save))], ids=["model.safetensors", "torch.save"])
def test_a_full_disk_fails_the_save_and_leaves_the_last_good_checkpoint(tmp_path, monkeypatch, target, writer):
    model, opt = saved_run(tmp_path, steps=(1,))
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}
    monkeypatch.setattr(target, *writer)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(tmp_path, 2, model, opt, {}, {}, Parallel())
    message = str(err.value)
    assert "no space left on device" in message and str(checkpoint_dir(tmp_path, 1)) in message
    assert "\n" not in message and isinstance(err.value, OSError)  # the command line prints it as one line
    monkeypatch.undo()
    assert {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} == before  # no partial file anywhere
    assert same_weights(nanoseek.load(tmp_path), model)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_torch_save_through_a_file_reports_a_full_disk_with_its_errno():
    """Given a path, torch.save says `unexpected pos ...` on a full disk; through a Python file it is ENOSPC."""
    from nanoseek.train.checkpoint import _is_disk_full, _torch_save

    with pytest.raises(OSError) as err:
        _torch_save({"x": torch.zeros(100_000)}, "/dev/full")
    assert err.value.errno == errno.ENOSPC and _is_disk_full(err.value)


# --- loading ------------------------------------------------------------------------------------------------------

@pytest.fixture
def export(tmp_path):
    torch.manual_seed(0)
    Transformer(preset("debug")).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def rewrite(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def set_first(value):
    def change(tensors):
        tensors["model.norm.weight"][0] = value
    return change


EXPERT = "model.layers.1.mlp.experts.3.down_proj.weight"
WEIGHT_FAULTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), "unreadable safetensors file"),
    "garbage header": (lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "unreadable safetensors file"),
    "empty file": (lambda p: p.write_bytes(b""), "unreadable safetensors file"),
    "NaN weight": (lambda p: rewrite(p, set_first(float("nan"))), "'model.norm.weight' holds NaN or infinite"),
    "inf weight": (lambda p: rewrite(p, set_first(float("inf"))), "'model.norm.weight' holds NaN or infinite"),
    "integer dtype": (lambda p: rewrite(p, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.long)})),
                      "'model.norm.weight' has dtype int64"),
    "expert shape": (lambda p: rewrite(p, lambda t: t.update({EXPERT: torch.zeros(64, 31)})),
                     r"experts.3.down_proj has shape \(64, 31\), expected \(64, 32\)"),
    "extra expert": (lambda p: rewrite(p, lambda t: t.update({EXPERT.replace(".3.", ".8."): t[EXPERT].clone()})),
                     "expert 8 under .* n_routed_experts=8"),
}


@pytest.mark.parametrize("fault", sorted(WEIGHT_FAULTS))
def test_loading_refuses_bad_weights_and_names_the_file(export, fault):
    damage, reason = WEIGHT_FAULTS[fault]
    damage(export / "model.safetensors")
    with pytest.raises(ValueError, match=reason) as err:
        nanoseek.load(export)
    assert str(export) in str(err.value)


def test_a_corrupt_shard_index_is_named(export):
    (export / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index"):
        nanoseek.load(export)


def test_resuming_refuses_nan_weights_too(tmp_path):
    model, opt = saved_run(tmp_path, steps=(1,))
    rewrite(checkpoint_dir(tmp_path, 1) / "model.safetensors", set_first(float("nan")))
    with pytest.raises(ValueError, match="step_0000001/model.safetensors: tensor 'model.norm.weight' holds NaN"):
        load_checkpoint(latest_checkpoint(tmp_path), model, opt, Parallel())


CONFIG_FAULTS = {
    "num_hidden_layers": ("two", "num_hidden_layers='two' must be an integer"),
    "max_position_embeddings": (1e12, "max_position_embeddings=1000000000000.0 must be an integer"),
    "vocab_size": (10**15, r"vocab_size=1000000000000000 must be in \[1, "),
    "hidden_size": (-64, r"hidden_size=-64 must be in \[1, "),
    "n_routed_experts": (True, "n_routed_experts=True must be an integer"),
    "rms_norm_eps": (float("nan"), "rms_norm_eps=nan must be finite"),
    "rope_theta": (0, "rope_theta=0 must be > 0"),
    "first_k_dense_replace": (5, "first_k_dense_replace=5 exceeds num_hidden_layers=2"),
    "hidden_act": (None, "hidden_act=None must be a string"),
}


@pytest.mark.parametrize("field", sorted(CONFIG_FAULTS))
def test_a_bad_config_json_is_one_line_naming_file_and_field(export, field):
    value, reason = CONFIG_FAULTS[field]
    config = json.loads((export / "config.json").read_text())
    config[field] = value
    (export / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=reason) as err:
        nanoseek.load(export)
    assert time.perf_counter() - start < 5  # refused before anything is allocated
    assert str(err.value).startswith(f"{export / 'config.json'}: ") and "\n" not in str(err.value)


def test_a_huge_integer_context_is_refused_by_its_range(export):
    config = json.loads((export / "config.json").read_text())
    config["max_position_embeddings"] = 10**12
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"max_position_embeddings=1000000000000 must be in \[1, 16777216\]"):
        nanoseek.load(export)


@pytest.mark.parametrize("text,reason", [("[1, 2]", "expected a JSON object, got list"),
                                         ('{"vocab_size": ', "Expecting value")])
def test_a_config_json_that_is_not_an_object_is_named(export, text, reason):
    (export / "config.json").write_text(text)
    with pytest.raises(ValueError, match=reason) as err:
        nanoseek.load(export)
    assert str(export / "config.json") in str(err.value)
