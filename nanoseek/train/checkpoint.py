"""Checkpoints that never lose work: written under a temporary name, renamed when complete, self-describing.

    RUN/checkpoints/step_0000100/
        config.json, model.safetensors   HF DeepseekV3 format: `nanoseek.load` and transformers read it
        nanoseek.json                    recipe, stage, step, metrics summary
        tokenizer files                  copied from the data stage, so the directory stands alone
        trainer_state.pt                 step, data-loader positions, RNG states, counters (no tensors of size)
        optimizer.pt                     single process: AdamW moments (+ Muon momenta) keyed by parameter name
        dcp/                             several processes: model + optimizer via torch.distributed.checkpoint

A single-process checkpoint resumes under torchrun and a distributed one resumes on any number of processes
(DCP reshards; expert slices are stored as DTensors sharded over the expert ranks). Balancing biases are
model buffers, so they travel inside model.safetensors / dcp. Only the last `keep` checkpoints are kept.

Only complete `step_N` directories are ever listed, loaded or resumed (`nanoseek.model.hf.list_checkpoints`). A save
that fails (a full disk, a missing file) removes its partial directory and leaves the earlier checkpoints as they
were; what a killed save leaves (`.tmp_step_N`) is removed by `remove_leftovers` when training starts.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from nanoseek.common import write_json
from nanoseek.model.hf import CHECKPOINTS, STEP_DIR, from_hf_state_dict, list_checkpoints, read_tensors
from nanoseek.model.transformer import Transformer
from nanoseek.train.parallelize import Parallel, expert_dtensors, gather_full_state_dict, local_experts

STATE_FILE = "trainer_state.pt"
OPTIMIZER_FILE = "optimizer.pt"
DCP_DIR = "dcp"
Optimizers = torch.optim.Optimizer | list[torch.optim.Optimizer]  # torch's state-dict helpers take either


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space; its partial files are gone, earlier checkpoints kept."""


def remove_leftovers(run_dir: str | Path) -> None:
    """Delete what interrupted saves left under RUN/checkpoints: `.tmp_step_N` (a save killed while writing: never
    complete) and `.old_step_N` (a checkpoint being replaced by a new save of its step). An `.old_step_N` whose
    `step_N` is missing was complete when the save was killed between its two renames: it is put back.

    Only the process that trains into the run calls this (when training starts, and before each save): a reader
    (`nanoseek.load`, a server) must not, since a `.tmp_step_N` may be a save in progress."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        prefix, _, name = path.name.partition("_")
        if prefix not in (".tmp", ".old") or not STEP_DIR.match(name):
            continue
        if prefix == ".old" and not (root / name).exists():
            os.replace(path, root / name)
        else:
            shutil.rmtree(path)


def save_checkpoint(run_dir: str | Path, step: int, model: Transformer, optimizer: Optimizers,
                    state: dict[str, Any], rank_state: dict[str, Any], par: Parallel, keep: int = 3,
                    json_files: dict[str, dict] | None = None, copy_files: list[Path] | None = None) -> Path:
    """Write checkpoint `step` atomically; every process must call it. Returns the final directory.

    state: picklable-by-torch trainer state shared by all ranks; rank_state: this rank's own (data position,
    RNG). `model` is the unwrapped model (not the DDP wrapper). `optimizer`: one, or a list whose states are
    stored together, keyed by parameter name. A failed save removes its temporary directory and re-raises; a full
    disk becomes a DiskFullError that says so and names the last complete checkpoint.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    try:
        if par.is_main:
            remove_leftovers(run_dir)
            tmp.mkdir(parents=True)
        par.barrier()
        _write_checkpoint(tmp, step, model, optimizer, state, rank_state, par, json_files, copy_files)
    except BaseException as e:
        if par.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            last = latest_checkpoint(run_dir)
            raise DiskFullError(f"no space left on device while saving {final}: removed the partial checkpoint; "
                                f"the last complete one is {last or 'none'} (free space, then --resume)") from e
        raise
    if par.is_main:
        if final.exists():  # re-saving a step (e.g. interrupted right after resuming): replace it
            old = final.with_name(f".old_{final.name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    par.barrier()
    return final


def _write_checkpoint(tmp: Path, step: int, model: Transformer, optimizer: Optimizers, state: dict[str, Any],
                      rank_state: dict[str, Any], par: Parallel, json_files: dict[str, dict] | None,
                      copy_files: list[Path] | None) -> None:
    """Every file of checkpoint `step` into `tmp`, flushed to disk."""
    rank_states = par.all_gather_object(rank_state)
    if par.distributed:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": expert_dtensors(msd, par), "optim": expert_dtensors(_without_groups(osd), par)},
                 checkpoint_id=str(tmp / DCP_DIR))
        full = gather_full_state_dict(model, par)
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = None
        _torch_save(get_optimizer_state_dict(model, optimizer), tmp / OPTIMIZER_FILE)
    if par.is_main:
        _export_model(model, full, tmp)
        _torch_save({**state, "step": step, "world_size": par.world_size, "ranks": rank_states}, tmp / STATE_FILE)
        for name, data in (json_files or {}).items():
            write_json(tmp / name, data)
        for f in copy_files or []:
            shutil.copy2(f, tmp / Path(f).name)
        _fsync_tree(tmp)


def _without_groups(osd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict without its param_groups, for DCP: pipeline stages hold different parameters, so
    their groups differ, and DCP stores a non-tensor entry once (one rank's). The groups hold only the recipe's
    hyperparameters and parameter names, which the resuming run rebuilds itself."""
    return {k: v for k, v in osd.items() if k != "param_groups"}


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save through a Python file, whose write errors are OSErrors with their errno (given a path, torch
    reports a full disk as `unexpected pos ...`)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _is_disk_full(error: BaseException) -> bool:
    """Whether a write failed for lack of space or quota: an OSError's errno, or the OS message inside another
    library's error (safetensors reports `I/O error: No space left on device (os error 28)`)."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, OSError) and error.errno in codes:
        return True
    return any(os.strerror(code) in str(error) for code in codes)


def _export_model(model: Transformer, full: dict[str, torch.Tensor] | None, out: Path) -> None:
    """config.json + model.safetensors. Distributed runs pass the gathered full state dict."""
    if full is None:
        model.save_pretrained(out)
        return
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.load_state_dict(full, strict=False, assign=True)
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"gathered state dict lacks {missing[:4]}")
    plain.save_pretrained(out)


def load_checkpoint(path: str | Path, model: Transformer, optimizer: Optimizers, par: Parallel,
                    expect: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model and optimizer in place (every process calls it). Returns (state, this rank's rank_state),
    the latter None when the checkpoint was written by a different number of processes.

    expect: trainer-state fields that must match this run's (e.g. the optimizer, whose state would not fit);
    a field the checkpoint lacks is not checked.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path}: no {STATE_FILE}; not a resumable training checkpoint")
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    for key, value in (expect or {}).items():
        if state.get(key, value) != value:
            raise ValueError(f"{path}: saved with {key}={state[key]!r}, this run has {key}={value!r}; resume "
                             f"with the same {key}")
    if (path / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        msd, osd = get_state_dict(model, optimizer)
        optim = _without_groups(osd)
        target = {"model": expert_dtensors(msd, par), "optim": expert_dtensors(optim, par)} if par.distributed \
            else {"model": msd, "optim": optim}
        dcp.load(target, checkpoint_id=str(path / DCP_DIR))
        optim = {**local_experts(target["optim"], par), "param_groups": osd["param_groups"]}
        set_state_dict(model, optimizer, model_state_dict=local_experts(target["model"], par),
                       optim_state_dict=optim)
    else:
        weights = from_hf_state_dict(model.config, read_tensors(path), where=str(path))
        optim = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        options = StateDictOptions(full_state_dict=True, strict=True)
        set_state_dict(model, optimizer, model_state_dict=local_experts(weights, par),
                       optim_state_dict=local_experts(optim, par), options=options)
    ranks = state.pop("ranks")
    mine = ranks[par.rank] if state["world_size"] == par.world_size else None
    return state, mine


def _fsync_tree(root: Path) -> None:
    """Flush every file to disk before the rename makes the checkpoint visible (power loss, not just kill -9)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

