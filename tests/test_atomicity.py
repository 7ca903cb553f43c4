"""A probe step is all or nothing (issue 4, point 1).

A failure is injected at each stage of a step: in the closure before and after
backward, midway through the inner optimizer's step (after it mutated state and
parameters in place), while computing each curvature and while writing the
record, both as an ordinary exception and as a ``KeyboardInterrupt``. Afterwards
parameters, gradients, every tensor of the inner state, the groups' settings and
the history are bit for bit as before the step; the error keeps its type and says
which stage failed; and the next step gives exactly what it would have given had
the failure never happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from backpack import extend
from torch import nn
from torch.optim import Optimizer

from alphawrap import AlphaProbe
from alphawrap.curvature import REGISTRY
from alphawrap.history import History
from tests._state import Snapshot, same_bits


class FlakySGD(Optimizer):
    """Momentum SGD from scratch; set ``fail_with`` to make its next step raise.

    The failure comes midway: after the step already updated two parameters, their
    momentum buffers and a counter in place, and added a key to the group.
    """

    def __init__(self, params: Any, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.fail_with: BaseException | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            group["calls"] = group.get("calls", 0) + 1
            for i, p in enumerate(group["params"]):
                state = self.state[p]
                if not state:
                    state["buf"] = torch.zeros_like(p)
                    state["count"] = torch.zeros((), dtype=torch.int64)
                state["buf"].mul_(group["momentum"]).add_(p.grad)
                state["count"] += 1
                p.add_(state["buf"], alpha=-group["lr"])
                if i == 1 and self.fail_with is not None:
                    error, self.fail_with = self.fail_with, None
                    raise error


@dataclass
class Run:
    """A tiny problem wrapped in a probe, with a closure that can fail on demand."""

    model: nn.Module
    probe: AlphaProbe
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: nn.Module

    def closure(self, before: BaseException | None = None, after: Any = None):
        def closure() -> torch.Tensor:
            self.probe.zero_grad()
            loss = self.loss_fn(self.model(self.x), self.y)
            if before is not None:
                raise before
            loss.backward()
            if after is not None:
                raise after
            return loss

        return closure


def make_run(
    inner: str = "flaky", mode: str = "observe", warmup: int = 2, **kwargs: Any
) -> Run:
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    if inner == "flaky":
        opt = FlakySGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    kwargs.setdefault("curvature", ("hessian", "ggn"))
    probe = AlphaProbe(opt, mode=mode, **kwargs)
    run = Run(model, probe, x, y, loss_fn)
    for _ in range(warmup):
        probe.step(run.closure())
    return run


@pytest.fixture(autouse=True, params=["clones", "kept buffers"])
def copies(request, monkeypatch):
    """Every test twice: snapshots cloned, and copied into kept buffers.

    With ``POOL_MIN = 1`` every tensor of these small models goes through the
    probe's :class:`~alphawrap.direction.CopyPool`, whose buffers a rollback
    hands to the optimizer and the parameters.
    """
    if request.param == "clones":
        yield request.param
        return
    monkeypatch.setattr("alphawrap.direction.POOL_MIN", 1)
    monkeypatch.setattr("alphawrap.probe.POOL_MIN", 1)  # small models get a pool
    real = AlphaProbe._copy_pool
    pools: list[Any] = []

    def counted(self: AlphaProbe) -> Any:
        pool = real(self)
        if self.interval == 1:  # with interval > 1 the probe keeps no buffers
            pools.append(pool)
        return pool

    monkeypatch.setattr(AlphaProbe, "_copy_pool", counted)
    yield request.param
    assert all(pool is not None for pool in pools)  # the copies went to the pool


def _raiser(error: BaseException):
    def raise_(*args: Any, **kwargs: Any) -> None:
        raise error

    return raise_


# stage -> (how to inject the error, fragment the error or its notes must contain)
def _closure_before(run, error, patch):
    return run.closure(before=error)


def _closure_after(run, error, patch):
    return run.closure(after=error)


def _inner(run, error, patch):
    run.probe.inner.fail_with = error
    return run.closure()


def _curvature(name):
    def inject(run, error, patch):
        patch.setattr(REGISTRY[name], "quadratic", _raiser(error))
        return run.closure()

    return inject


def _check(name: str):
    def inject(run, error, patch):
        patch.setattr(REGISTRY[name], "check_backward", _raiser(error))
        return run.closure()

    return inject


def _record(run, error, patch):
    patch.setattr(History, "append", _raiser(error))
    return run.closure()


STAGES = {
    "closure-before-backward": (_closure_before, "closure raised before backward"),
    "closure-after-backward": (_closure_after, "closure raised after backward"),
    "inner-step": (_inner, "inner optimizer FlakySGD raised during its step"),
    "curvature-hessian": (_curvature("hessian"), "computing curvature 'hessian'"),
    "curvature-ggn": (_curvature("ggn"), "computing curvature 'ggn'"),
    "check-hessian": (
        _check("hessian"),
        "checking curvature 'hessian' after the backward pass raised",
    ),
    "record": (_record, "recording the step"),
}
ERRORS = {
    "error": lambda: RuntimeError("injected"),
    "interrupt": lambda: KeyboardInterrupt(),
}


def _text(error: BaseException) -> str:
    return "\n".join([str(error), *getattr(error, "__notes__", [])])


def assert_same_run(a: Run, b: Run) -> None:
    assert same_bits(list(a.model.parameters()), list(b.model.parameters()))
    assert Snapshot(a.probe).differences(b.probe) == []
    assert a.probe.history.to_dicts() == b.probe.history.to_dicts()


@pytest.mark.parametrize("mode", ["observe", "apply"])
@pytest.mark.parametrize("kind", list(ERRORS))
@pytest.mark.parametrize("stage", list(STAGES))
def test_failed_step_changes_nothing(stage, kind, mode, monkeypatch):
    inject, fragment = STAGES[stage]
    run = make_run(mode=mode)
    snapshot = Snapshot(run.probe)
    error = ERRORS[kind]()
    with monkeypatch.context() as patch:
        closure = inject(run, error, patch)
        with pytest.raises(type(error)) as info:
            run.probe.step(closure)
    assert info.value is error, "the original exception must propagate"
    assert fragment in _text(info.value)
    assert "unchanged" in _text(info.value)
    snapshot.assert_same(run.probe)
    # The failure left no trace: the next step is the one an undisturbed run takes.
    run.probe.step(run.closure())
    twin = make_run(mode=mode, warmup=3)
    assert_same_run(run, twin)


@pytest.mark.parametrize("kind", list(ERRORS))
def test_inner_failure_on_first_step_drops_lazily_created_state(kind):
    run = make_run(warmup=0)
    assert not run.probe.state
    snapshot = Snapshot(run.probe)
    error = ERRORS[kind]()
    run.probe.inner.fail_with = error
    with pytest.raises(type(error)):
        run.probe.step(run.closure())
    snapshot.assert_same(run.probe)
    assert not run.probe.state
    assert all("calls" not in g for g in run.probe.param_groups)


def test_a_step_that_failed_before_the_update_leaves_version_counters_alone():
    """The rollback writes through ``.data`` (as torch.optim does): a step that
    failed before the parameters were updated leaves their version counters as
    they were, so a graph that saved them stays usable."""
    run = make_run(warmup=1)
    params = list(run.model.parameters())
    versions = [p._version for p in params]
    run.probe.inner.step = _raiser(RuntimeError("injected"))  # before any update
    with pytest.raises(RuntimeError, match="injected"):
        run.probe.step(run.closure())
    assert [p._version for p in params] == versions


@pytest.mark.parametrize("kind", list(ERRORS))
def test_unprobed_step_failure_is_named_and_not_recorded(kind):
    """Steps between probes take no snapshot (documented): no rollback promised."""
    run = make_run(interval=2, warmup=1)  # step 1 is not probed
    snapshot = Snapshot(run.probe)
    error = ERRORS[kind]()
    run.probe.inner.fail_with = error
    with pytest.raises(type(error)) as info:
        run.probe.step(run.closure())
    assert "inner optimizer FlakySGD raised during its step" in _text(info.value)
    assert "not rolled back" in _text(info.value)
    assert set(snapshot.differences(run.probe)) <= {
        "params",
        "grads",
        "state",
        "groups",
    }
    assert "not rolled back" in AlphaProbe.__doc__


@pytest.mark.parametrize("stage", ["curvature-ggn", "record"])
def test_failure_with_torch_optimizer_restores_every_state_tensor(stage, monkeypatch):
    inject, _ = STAGES[stage]
    run = make_run(inner="adam", mode="apply")
    snapshot = Snapshot(run.probe)
    with monkeypatch.context() as patch:
        closure = inject(run, RuntimeError("injected"), patch)
        with pytest.raises(RuntimeError, match="injected"):
            run.probe.step(closure)
    snapshot.assert_same(run.probe)
    run.probe.step(run.closure())
    assert_same_run(run, make_run(inner="adam", mode="apply", warmup=3))


def test_failure_in_a_capture_block_restores_gradients():
    run = make_run()
    snapshot = Snapshot(run.probe)
    with pytest.raises(KeyboardInterrupt), run.probe.capture():
        run.probe.zero_grad()
        run.loss_fn(run.model(run.x), run.y).backward()
        raise KeyboardInterrupt
    snapshot.assert_same(run.probe)


@pytest.mark.parametrize("inner", ["flaky", "adam"])
def test_failed_steps_in_a_row_change_nothing(inner, monkeypatch):
    """A failed step hands the snapshot's tensors to the optimizer and the
    gradient backup's to the parameters: the next step must not copy into them
    (with kept buffers), or its own failure restores what the failed step wrote.
    (The skipped steps below check the rollback's own hand-over, which has no
    gradient restore after it.)"""
    run = make_run(inner=inner)
    snapshot = Snapshot(run.probe)
    with monkeypatch.context() as patch:
        patch.setattr(REGISTRY["ggn"], "quadratic", _raiser(RuntimeError("injected")))
        for _ in range(2):
            with pytest.raises(RuntimeError, match="injected"):
                run.probe.step(run.closure())
    snapshot.assert_same(run.probe)
    run.probe.step(run.closure())
    assert_same_run(run, make_run(inner=inner, warmup=3))


def test_failed_closures_in_a_row_restore_gradients_zeroed_in_place():
    """The same for the gradient backup, with a closure that zeroes the restored
    gradients in place before its backward."""
    run = make_run()
    snapshot = Snapshot(run.probe)

    def closure() -> torch.Tensor:
        run.probe.zero_grad(set_to_none=False)
        run.loss_fn(run.model(run.x), run.y).backward()
        raise RuntimeError("injected")

    for _ in range(2):
        with pytest.raises(RuntimeError, match="injected"):
            run.probe.step(closure)
    snapshot.assert_same(run.probe)


@pytest.mark.parametrize("inner", ["flaky", "adam"])
def test_skipped_steps_in_a_row_undo_the_inner_step(inner, monkeypatch):
    """Apply mode's ``fallback="skip"`` rolls the inner step back without any
    failure (the closure's gradients stay): twice in a row, parameters and
    optimizer state stay as they were."""
    run = make_run(inner=inner, mode="apply", fallback="skip")
    snapshot = Snapshot(run.probe)

    def negative(self, ctx):  # no positive curvature: α* undefined
        return torch.full((len(ctx.params),), -1.0)

    with monkeypatch.context() as patch:
        patch.setattr(REGISTRY["hessian"], "quadratic", negative)
        for _ in range(2):
            run.probe.step(run.closure())
    assert [r.action for r in run.probe.history][-2:] == ["skip", "skip"]
    assert set(snapshot.differences(run.probe)) <= {"history", "step_count", "grads"}


def test_interrupt_while_telling_the_other_processes_still_undoes_the_step(
    monkeypatch,
):
    """Under DDP a failed step joins the probe's collective (``abort``) so that
    the other processes do not wait; an interrupt while it waits there must find
    the step already undone, the parameters back in their own storage."""
    run = make_run()
    snapshot = Snapshot(run.probe)
    with monkeypatch.context() as patch:
        patch.setattr(REGISTRY["ggn"], "quadratic", _raiser(RuntimeError("injected")))
        patch.setattr(run.probe._distributed, "abort", _raiser(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            run.probe.step(run.closure())
    snapshot.assert_same(run.probe)
    run.probe.step(run.closure())
    assert_same_run(run, make_run(warmup=3))
