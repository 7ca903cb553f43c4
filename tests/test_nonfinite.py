"""NaN and infinity never crash the probe nor reach the parameters (issue 4, point 2).

Policy (documented on ``AlphaProbe``): in apply mode a non-finite loss, gradient,
direction, curvature, or an update ``θ₀ + α d`` that would overflow, is recorded
with status ``"non-finite"``; ``on_nonfinite="skip"`` (default) rolls the whole
step back, inner state included, ``on_nonfinite="inner"`` takes the inner step
unchanged. Observe mode always takes the inner step, as the unwrapped optimizer.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from backpack import extend
from torch import nn

from alphawrap import AlphaProbe
from alphawrap.curvature import REGISTRY
from tests._state import Snapshot, same_bits


def _problem(dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)))
    model.to(dtype)
    loss_fn = extend(nn.MSELoss())
    x, y = torch.randn(5, 3, dtype=dtype), torch.randn(5, 2, dtype=dtype)
    return model, loss_fn, x, y


def _closure(opt, model, loss_fn, x, y, fault: str | None):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        inputs = x.clone()
        if fault == "nan-loss":
            inputs[0, 0] = math.nan
        loss = loss_fn(model(inputs), y)
        if fault == "inf-loss":
            loss = loss + math.inf  # infinite loss, finite gradient
        loss.backward()
        if fault == "nan-grad":
            model[0].weight.grad[1, 2] = math.nan
        if fault == "inf-grad":
            model[2].bias.grad[0] = -math.inf
        return loss

    return closure


def _patch_curvature(monkeypatch, fault: str | None) -> None:
    value = {"nan-curvature": math.nan, "inf-curvature": math.inf}.get(fault)
    if value is None:
        return
    original = REGISTRY["hessian"].quadratic

    def quadratic(self, ctx):
        return torch.full_like(original(self, ctx), value)

    monkeypatch.setattr(REGISTRY["hessian"], "quadratic", quadratic)


FAULTS = [
    "nan-loss",
    "inf-loss",
    "nan-grad",
    "inf-grad",
    "nan-curvature",
    "inf-curvature",
]


def _steps(mode: str | None, fault: str, monkeypatch, steps: int = 3, **kwargs: Any):
    """Two clean steps, then one with ``fault``; ``mode=None``: unwrapped Adam."""
    model, loss_fn, x, y = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    probe = AlphaProbe(opt, mode=mode, **kwargs) if mode else None
    stepper = probe or opt
    for i in range(steps):
        faulty = i == steps - 1
        closure = _closure(stepper, model, loss_fn, x, y, fault if faulty else None)
        if faulty:
            snapshot = Snapshot(probe) if probe else None
            with monkeypatch.context() as patch:
                if probe:
                    _patch_curvature(patch, fault)
                stepper.step(closure)
        else:
            stepper.step(closure)
    return model, opt, probe, snapshot


@pytest.mark.parametrize("fault", FAULTS)
def test_apply_mode_skips_the_whole_step_by_default(fault, monkeypatch):
    model, _, probe, snapshot = _steps("apply", fault, monkeypatch)
    record = probe.history[-1]
    assert record.status == "non-finite"
    assert record.action == "skip" and record.applied == 0.0
    assert record.alpha is None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Everything but the gradients (the closure's, as after any step) and the
    # new record is as before the step.
    assert set(snapshot.differences(probe)) == {"grads", "history", "step_count"}
    assert len(probe.history) == 3 and probe.step_count == 3


@pytest.mark.parametrize("fault", FAULTS)
def test_apply_mode_passes_the_inner_step_through_on_request(fault, monkeypatch):
    model, loss_fn, x, y = _problem()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    probe = AlphaProbe(opt, mode="apply", on_nonfinite="inner")
    for _ in range(2):
        probe.step(_closure(probe, model, loss_fn, x, y, None))
    # An unwrapped twin that stands where the probe stands now.
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_opt.step(_closure(twin_opt, twin, loss_fn, x, y, fault))
    with monkeypatch.context() as patch:
        _patch_curvature(patch, fault)
        probe.step(_closure(probe, model, loss_fn, x, y, fault))
    assert probe.history[-1].status == "non-finite"
    assert probe.history[-1].action == "inner"
    assert probe.history[-1].applied == 1.0
    assert same_bits(list(model.parameters()), list(twin.parameters()))
    assert same_bits(opt.state_dict()["state"], twin_opt.state_dict()["state"])


@pytest.mark.parametrize("fault", FAULTS)
def test_observe_mode_is_the_unwrapped_optimizer(fault, monkeypatch):
    model, opt, probe, _ = _steps("observe", fault, monkeypatch)
    plain_model, plain_opt, _, _ = _steps(None, fault, monkeypatch)
    assert same_bits(list(model.parameters()), list(plain_model.parameters()))
    assert same_bits(opt.state_dict()["state"], plain_opt.state_dict()["state"])
    assert probe.history[-1].status == "non-finite"
    assert probe.history[-1].action == "inner"


def test_records_hold_plain_numbers_even_when_non_finite(monkeypatch):
    _, _, probe, _ = _steps("apply", "nan-loss", monkeypatch)
    record = probe.history[-1].to_dict()
    assert math.isnan(record["loss"]) and math.isnan(record["slope"])
    assert all(isinstance(v, float) for v in record["curvatures"].values())


def test_overflowing_update_is_not_written(monkeypatch):
    """A finite but huge α* would overflow float32 parameters: skip instead."""
    model, loss_fn, x, y = _problem(torch.float32)
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), mode="apply")
    original = REGISTRY["hessian"].quadratic
    monkeypatch.setattr(  # tiny positive curvature (float32): α* ≈ 1e40
        REGISTRY["hessian"],
        "quadratic",
        lambda self, ctx: torch.full_like(original(self, ctx), 1e-42),
    )
    snapshot = Snapshot(probe)
    probe.step(_closure(probe, model, loss_fn, x, y, None))
    record = probe.history[-1]
    assert math.isfinite(record.alpha) and record.alpha > 1e39
    assert record.status == "non-finite" and record.action == "skip"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(snapshot.differences(probe)) == {"grads", "history", "step_count"}

    inner = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), mode="apply", on_nonfinite="inner"
    )
    before = [p.detach().clone() for p in model.parameters()]
    inner.step(_closure(inner, model, loss_fn, x, y, None))
    assert inner.history[-1].action == "inner"
    expected = [
        torch.add(b, p.grad, alpha=-0.1) for b, p in zip(before, model.parameters())
    ]
    assert same_bits([p.detach() for p in model.parameters()], expected)


def test_policy_is_documented_and_validated():
    doc = AlphaProbe.__doc__
    assert "on_nonfinite" in doc and '"skip"' in doc and '"inner"' in doc
    assert "default" in doc[doc.index("on_nonfinite") :].lower()
    model, *_ = _problem()
    with pytest.raises(ValueError, match="on_nonfinite"):
        AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), on_nonfinite="zero")
