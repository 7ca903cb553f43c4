"""Apply-mode options: the pure maths, then their orchestration in AlphaProbe."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from backpack import extend
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from alphawrap import AlphaProbe
from alphawrap.quadratic import (
    adapt_damping,
    damped_curvature,
    optimal_step,
    reduction_ratio,
    secant_curvature,
    smooth_log_alpha,
)

# ------------------------------------------------------------------ pure maths


def test_damped_curvature_and_step():
    assert damped_curvature(4.0, 2.0, 0.5) == 5.0
    assert damped_curvature(-4.0, 2.0, 0.5, maximize=True) == -5.0
    # damping makes a step defined where the curvature is not positive ...
    alpha, status = optimal_step(-1.0, damped_curvature(-1.0, 1.0, 2.0))
    assert status.value == "ok" and alpha == 1.0
    # ... and bounds it by -dᵀg / (λ‖d‖²)
    alpha, _ = optimal_step(-3.0, damped_curvature(1e-12, 2.0, 0.5))
    assert alpha <= 3.0 / (0.5 * 2.0)


@settings(max_examples=50, deadline=None)
@given(
    alphas=st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=30),
    beta=st.floats(0.0, 0.99),
)
def test_smoothing_is_a_geometric_average(alphas, beta):
    state = None
    for a in alphas:
        state = smooth_log_alpha(state, a, beta)
    smoothed = math.exp(state)
    assert min(alphas) * (1 - 1e-9) <= smoothed <= max(alphas) * (1 + 1e-9)
    weights = [beta ** (len(alphas) - 1)] + [
        (1 - beta) * beta ** (len(alphas) - 1 - i) for i in range(1, len(alphas))
    ]
    expected = sum(w * math.log(a) for w, a in zip(weights, alphas))
    assert state == pytest.approx(expected, abs=1e-9)


def test_smoothing_edges():
    assert smooth_log_alpha(None, 5.0, 0.9) == math.log(5.0)
    assert smooth_log_alpha(math.log(2.0), 5.0, 0.0) == math.log(5.0)
    for bad_alpha in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            smooth_log_alpha(None, bad_alpha, 0.5)
    with pytest.raises(ValueError):
        smooth_log_alpha(None, 1.0, 1.0)


def test_reduction_ratio_and_secant():
    assert reduction_ratio(-0.25, -0.5) == 0.5
    assert reduction_ratio(0.1, -0.5) == pytest.approx(-0.2)
    assert reduction_ratio(-0.1, 0.3) is None  # model predicts an increase
    assert reduction_ratio(-0.1, 0.0) is None
    assert reduction_ratio(0.25, 0.5, maximize=True) == 0.5
    assert reduction_ratio(math.nan, -1.0) is None
    # secant of an exact parabola h(t) = t·s + ½ t² c is c
    s, c, t = -2.0, 3.0, 0.7
    assert secant_curvature(t * s + 0.5 * t * t * c, t, s) == pytest.approx(c)
    assert secant_curvature(1.0, 0.0, -1.0) is None


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        (0.1, 3.0),
        (-5.0, 3.0),
        (0.5, 2.0),
        (0.25, 2.0),
        (0.75, 2.0),
        (0.9, 4 / 3),
        (None, 2.0),
        (math.nan, 2.0),
    ],
)
def test_levenberg_marquardt_rule(rho, expected):
    assert adapt_damping(2.0, rho, factor=1.5) == pytest.approx(expected)


def test_levenberg_marquardt_bounds():
    assert adapt_damping(1e-8, 1.0, bounds=(1e-8, 1.0)) == 1e-8
    assert adapt_damping(1.0, 0.0, bounds=(1e-8, 1.0)) == 1.0
    assert adapt_damping(0.0, 0.0, bounds=(1e-6, 1.0)) == 1e-6


# ------------------------------------------------------------------ orchestration


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    model = extend(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    gen = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(8)
    ]
    return model, loss_fn, data


def _probe(model, loss_fn, inner=None, **kwargs):
    inner = inner or torch.optim.Adam(model.parameters(), lr=1e-2)
    kwargs.setdefault("curvature", "ggn")
    kwargs.setdefault("mode", "apply")
    return AlphaProbe(inner, model=model, loss_fn=loss_fn, **kwargs)


def _step(opt, model, loss_fn, batch):
    x, y = batch

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return opt.step(closure)


def test_defaults_are_documented():
    doc = AlphaProbe.__doc__
    for name in (
        "truth_every",
        "track_rho",
        "smoothing",
        "damping",
        "adaptive_damping",
        "damping_factor",
        "reuse_alpha",
    ):
        assert f"{name}:" in doc, name


def test_fixed_damping_enters_the_applied_alpha():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, smoothing=0.0, damping=0.3, adaptive_damping=False)
    for batch in data[:3]:
        _step(probe, model, loss_fn, batch)
    for r in probe.history:
        dd = r.direction_norm**2
        expected = -r.slope / (r.curvatures["ggn"] + 0.3 * dd)
        assert r.extra["damping"] == 0.3
        assert r.extra["alpha_damped"] == pytest.approx(expected, rel=1e-5)
        assert r.applied == pytest.approx(expected, rel=1e-5)
        assert r.applied < r.alpha  # damping shortens the step
        assert r.action == "alpha"


def test_damping_defines_alpha_where_the_curvature_is_negative():
    # h(α) = cos(w + α d): negative curvature along d at w = 0.3
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.3)
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature="hessian-exact",
        mode="apply",
        model=model,
        loss_fn=lambda out, y: torch.cos(out).mean(),
        damping=5.0,
        track_rho=True,
    )
    x = torch.ones(4, 1)

    def closure():
        probe.zero_grad()
        loss = probe.loss_fn(model(x), None)
        loss.backward()
        return loss

    probe.step(closure)
    r = probe.history[-1]
    assert r.status == "nonpositive-curvature" and r.alpha is None
    dd = r.direction_norm**2
    expected = -r.slope / (r.curvatures["hessian-exact"] + 5.0 * dd)
    assert r.action == "alpha"
    assert r.applied == pytest.approx(expected, rel=1e-5)
    assert r.extra["loss_change"] < 0


def test_smoothing_follows_the_ema_of_ln_alpha():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, smoothing=0.8, damping=0.0, adaptive_damping=False)
    state = None
    for batch in data:
        _step(probe, model, loss_fn, batch)
        r = probe.history[-1]
        if r.status != "ok":
            continue
        state = smooth_log_alpha(state, r.alpha, 0.8)
        assert r.extra["alpha_smoothed"] == pytest.approx(math.exp(state))
        assert r.applied == pytest.approx(math.exp(state))
    assert probe.apply_state["smoothed_alpha"] == pytest.approx(math.exp(state))


def test_bounds_clip_after_smoothing():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, smoothing=0.5, bounds=(0.0, 2.0))
    for batch in data[:3]:
        _step(probe, model, loss_fn, batch)
    for r in probe.history:
        assert r.applied == min(r.extra["alpha_smoothed"], 2.0)


def test_adaptive_damping_follows_rho():
    model, loss_fn, data = _problem()
    probe = _probe(
        model,
        loss_fn,
        inner=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        damping=1e-2,
        adaptive_damping=True,
        damping_factor=2.0,
        smoothing=0.0,
    )
    for batch in data:
        _step(probe, model, loss_fn, batch)
    damping = 1e-2
    for r in probe.history:
        assert r.extra["damping"] == pytest.approx(damping)
        assert "rho" in r.extra  # computed without track_rho
        damping = adapt_damping(damping, r.extra["rho"], factor=2.0)
    assert probe.apply_state["damping"] == pytest.approx(damping)
    assert len({r.extra["damping"] for r in probe.history}) > 1


def test_reuse_alpha_between_probes():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, interval=2, smoothing=0.0, reuse_alpha=True)
    _step(probe, model, loss_fn, data[0])
    alpha = probe.history[-1].applied
    assert probe.apply_state["last_alpha"] == alpha
    # the unprobed step takes θ₀ + α_last·d with d the inner update
    shadow_model = copy.deepcopy(model)
    shadow = torch.optim.Adam(shadow_model.parameters(), lr=1e-2)
    shadow.load_state_dict(copy.deepcopy(probe.inner.state_dict()))
    theta0 = [p.detach().clone() for p in model.parameters()]
    _step(probe, model, loss_fn, data[1])
    _step(shadow, shadow_model, loss_fn, data[1])
    for p, q, t0 in zip(model.parameters(), shadow_model.parameters(), theta0):
        expected = torch.add(t0, q.detach() - t0, alpha=alpha)
        assert torch.equal(p.detach(), expected)
    assert len(probe.history) == 1


def test_no_reuse_takes_the_inner_step_between_probes():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, interval=2, reuse_alpha=False)
    _step(probe, model, loss_fn, data[0])
    shadow_model = copy.deepcopy(model)
    shadow = torch.optim.Adam(shadow_model.parameters(), lr=1e-2)
    shadow.load_state_dict(copy.deepcopy(probe.inner.state_dict()))
    _step(probe, model, loss_fn, data[1])
    _step(shadow, shadow_model, loss_fn, data[1])
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), shadow_model.parameters())
    )


def test_fallback_last_uses_the_last_applied_alpha():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, fallback="last", smoothing=0.0)
    _step(probe, model, loss_fn, data[0])
    last = probe.history[-1].applied
    # force an undefined α*: ascent direction (maximize flips the sign of d)
    for group in probe.param_groups:
        group["lr"] = -1e-2
    _step(probe, model, loss_fn, data[1])
    r = probe.history[-1]
    assert r.status == "not-descent"
    assert r.action == "fallback" and r.applied == last


def test_observe_mode_ignores_apply_options_bitwise():
    model, loss_fn, data = _problem()
    plain_model = copy.deepcopy(model)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-2)
    probe = _probe(
        model,
        loss_fn,
        mode="observe",
        smoothing=0.9,
        damping=0.1,
        adaptive_damping=True,
        interval=2,
    )
    for batch in data:
        _step(probe, model, loss_fn, batch)
        _step(plain, plain_model, loss_fn, batch)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters())
    )
    assert probe.apply_state["damping"] == 0.1  # adapts in apply mode only


def test_state_dict_round_trip_resumes_exactly():
    options = dict(
        smoothing=0.7, damping=1e-3, adaptive_damping=True, interval=2, track_rho=True
    )
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, **options)
    for batch in data[:5]:
        _step(probe, model, loss_fn, batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": probe.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["alphawrap"]["apply"]["damping"] == probe.apply_state["damping"]

    resumed_model, _, _ = _problem(seed=7)  # other weights: all come from the file
    resumed_model.load_state_dict(saved["model"])
    resumed = _probe(
        resumed_model,
        loss_fn,
        inner=torch.optim.Adam(resumed_model.parameters(), lr=1e-2),
        **options,
    )
    resumed.load_state_dict(saved["opt"])
    assert resumed.apply_state == probe.apply_state
    for batch in data[5:]:
        _step(probe, model, loss_fn, batch)
        _step(resumed, resumed_model, loss_fn, batch)
    assert all(
        torch.equal(p, q)
        for p, q in zip(model.parameters(), resumed_model.parameters())
    )
    assert resumed.apply_state == probe.apply_state
    assert resumed.history[-1] == probe.history[-1]


def test_plain_state_dict_resets_the_apply_state():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, smoothing=0.5, damping=0.2, adaptive_damping=True)
    for batch in data[:3]:
        _step(probe, model, loss_fn, batch)
    with pytest.warns(UserWarning, match="plain optimizer state dict"):
        probe.load_state_dict(probe.inner.state_dict())
    assert probe.apply_state == {
        "damping": 0.2,
        "smoothed_alpha": None,
        "last_alpha": None,
    }


def test_corrupted_apply_state_is_refused_before_any_change():
    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, adaptive_damping=True)
    _step(probe, model, loss_fn, data[0])
    state = probe.state_dict()
    state["alphawrap"]["apply"] = {"damping": math.nan}
    before = probe.apply_state
    with pytest.raises(ValueError, match="apply"):
        probe.load_state_dict(state)
    assert probe.apply_state == before


def test_a_failed_measurement_rolls_the_apply_state_back(monkeypatch):
    from alphawrap.truth import BatchObjective

    model, loss_fn, data = _problem()
    probe = _probe(model, loss_fn, smoothing=0.5, adaptive_damping=True, damping=0.1)
    for batch in data[:2]:
        _step(probe, model, loss_fn, batch)
    before = (probe.apply_state, [p.detach().clone() for p in model.parameters()])
    records = len(probe.history)

    def boom(self, alpha):
        raise RuntimeError("boom")

    monkeypatch.setattr(BatchObjective, "__call__", boom)
    with pytest.raises(RuntimeError, match="boom") as info:
        _step(probe, model, loss_fn, data[2])
    assert any("re-evaluating the loss" in n for n in info.value.__notes__)
    assert probe.apply_state == before[0]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[1]))
    assert len(probe.history) == records


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"smoothing": 1.0}, "smoothing"),
        ({"smoothing": -0.1}, "smoothing"),
        ({"damping": -1.0}, "damping"),
        ({"damping": math.inf}, "damping"),
        ({"damping_factor": 1.0}, "damping_factor"),
        ({"adaptive_damping": 1}, "adaptive_damping"),
        ({"reuse_alpha": "yes"}, "reuse_alpha"),
        ({"fallback": "previous"}, "fallback"),
    ],
)
def test_invalid_options(kwargs, match):
    model, loss_fn, _ = _problem()
    with pytest.raises((ValueError, TypeError), match=match):
        _probe(model, loss_fn, **kwargs)
