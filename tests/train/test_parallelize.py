"""Single-process pieces of the parallel layer (the multi-process behaviour is in test_distributed.py)."""

import pytest
import torch

from nanoseek.model import Transformer, preset
from nanoseek.train.parallelize import Parallel, clip_grad_norm, init_parallel, parallelize


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a, b = Transformer(preset("debug")), Transformer(preset("debug"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 512, (2, 16))
    for m in (a, b):
        (m(ids[:, :-1]).square().mean() * 100).backward()
    ours = clip_grad_norm(a, 0.5, Parallel())
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    torch.testing.assert_close(ours, ref)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


def test_non_finite_norm_is_reported_and_gradients_left_alone():
    model = torch.nn.Linear(3, 3)
    model.weight.grad = torch.full((3, 3), float("inf"))
    model.bias.grad = torch.ones(3)
    assert not torch.isfinite(clip_grad_norm(model, 1.0, Parallel()))
    assert torch.equal(model.bias.grad, torch.ones(3))


def test_single_process_setup_and_its_errors():
    par = init_parallel(None, 1, "cpu")
    assert par.mode == "none" and par.world_size == 1 and not par.distributed
    model = torch.nn.Linear(2, 2)
    assert parallelize(model, par) is model
    with pytest.raises(ValueError, match="needs 2 processes"):
        init_parallel(None, 2, "cpu")
    with pytest.raises(ValueError, match="--parallel 'tp'"):
        init_parallel("tp", 1, "cpu")
