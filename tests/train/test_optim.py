"""train.optim: torch.optim.AdamW(fused=True) + LambdaLR's numbers and checkpoints, without torch.optim."""

from __future__ import annotations

import pytest
import torch

from tuneforge.train.optim import AdamW, warmup_then_decay

SCHEDULE = warmup_then_decay(2, 6)


def params(seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((5, 3), (7,), (2, 4))]


def gradients(step: int, ps) -> None:
    """A fixed gradient for each step; the last tensor has none on odd steps (torch then skips it)."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(ps):
        p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=g)


def run_torch(steps, ps, optimizer=None, scheduler=None):
    optimizer = optimizer or torch.optim.AdamW(ps, lr=0.1, weight_decay=0.05, fused=True)
    scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULE)
    lrs = []
    for step in steps:
        gradients(step, ps)
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler, lrs


def run_ours(steps, ps, optimizer=None):
    optimizer = optimizer or AdamW(ps, lr=0.1, weight_decay=0.05, schedule=SCHEDULE)
    lrs = []
    for step in steps:
        gradients(step, ps)
        lrs.append(optimizer.lr)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, lrs


def test_same_updates_and_learning_rates_as_torch():
    ours, theirs = params(), params()
    _, our_lrs = run_ours(range(6), ours)
    _, _, their_lrs = run_torch(range(6), theirs)
    assert our_lrs == pytest.approx(their_lrs) and our_lrs[-1] > 0 and our_lrs[0] < our_lrs[1]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same kernel on the same tensors
    assert not torch.equal(ours[0], params()[0])


def test_resuming_from_a_state_dict_continues_exactly():
    straight = params()
    run_ours(range(6), straight)
    first = params()
    optimizer, _ = run_ours(range(3), first)
    saved = optimizer.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    again = AdamW(resumed, lr=0.1, weight_decay=0.05, schedule=SCHEDULE)
    again.load_state_dict(saved)
    assert again.lr == optimizer.lr
    run_ours(range(3, 6), resumed, again)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_checkpoint_written_by_torch_optim_resumes():
    """Checkpoints from before train.optim hold torch.optim.AdamW's and LambdaLR's state dicts."""
    theirs = params()
    optimizer, scheduler, _ = run_torch(range(3), theirs)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    resumed = AdamW(ours, lr=0.1, weight_decay=0.05, schedule=SCHEDULE)
    resumed.load_state_dict(optimizer.state_dict(), scheduler.state_dict())
    run_torch(range(3, 6), theirs, optimizer, scheduler)
    run_ours(range(3, 6), ours, resumed)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_for_another_model_is_refused():
    optimizer, _ = run_ours(range(2), params())
    with pytest.raises(ValueError, match="for 3 tensors, this model trains 2"):
        AdamW(params()[:2], lr=0.1).load_state_dict(optimizer.state_dict())


def test_warmup_then_decay():
    factor = warmup_then_decay(2, 6)
    assert [factor(s) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
