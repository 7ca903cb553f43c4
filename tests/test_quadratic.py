"""The one-dimensional quadratic model: pure maths, then an exactly quadratic loss."""

from __future__ import annotations

import math

import pytest
import torch
from backpack import extend
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from alphawrap import AlphaProbe
from alphawrap.quadratic import Status, clip_to_bounds, optimal_step, predicted_change

NAN, INF = math.nan, math.inf

# (slope dᵀg, curvature dᵀCd, maximize) -> status; where OK, α* = -slope/curvature
TABLE = [
    (-2.0, 4.0, False, Status.OK),
    (-1e-8, 1e-12, False, Status.OK),
    (2.0, 4.0, False, Status.NOT_DESCENT),
    (0.0, 4.0, False, Status.NOT_DESCENT),
    (-0.0, 4.0, False, Status.NOT_DESCENT),
    (1.0, -4.0, False, Status.NOT_DESCENT),  # checked before the curvature
    (-2.0, 0.0, False, Status.NONPOSITIVE_CURVATURE),
    (-2.0, -4.0, False, Status.NONPOSITIVE_CURVATURE),
    (NAN, 4.0, False, Status.NONFINITE),
    (-2.0, NAN, False, Status.NONFINITE),
    (-INF, 4.0, False, Status.NONFINITE),
    (-2.0, INF, False, Status.NONFINITE),
    (-1e300, 1e-300, False, Status.NONFINITE),  # α* overflows
    # maximize: the model is that of -L, so both signs flip, the formula does not
    (2.0, -4.0, True, Status.OK),
    (-2.0, -4.0, True, Status.NOT_DESCENT),
    (0.0, -4.0, True, Status.NOT_DESCENT),
    (2.0, 4.0, True, Status.NONPOSITIVE_CURVATURE),
    (2.0, 0.0, True, Status.NONPOSITIVE_CURVATURE),
    (NAN, -4.0, True, Status.NONFINITE),
]


@pytest.mark.parametrize(("slope", "curvature", "maximize", "status"), TABLE)
def test_optimal_step_table(slope, curvature, maximize, status):
    alpha, got = optimal_step(slope, curvature, maximize=maximize)
    assert got is status
    assert isinstance(got.value, str) and got == status.value  # stored as plain str
    if status is Status.OK:
        assert alpha == -slope / curvature
        assert alpha > 0
    else:
        assert alpha is None


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(deadline=None)
@given(slope=finite, curvature=finite)
def test_maximize_is_the_mirror_image(slope, curvature):
    assert optimal_step(slope, curvature, maximize=True) == optimal_step(
        -slope, -curvature
    )


@settings(deadline=None)
@given(
    slope=st.floats(min_value=-1e3, max_value=-1e-3),
    curvature=st.floats(min_value=1e-3, max_value=1e3),
    factor=st.floats(min_value=-3.0, max_value=3.0),
)
def test_alpha_minimises_the_model(slope, curvature, factor):
    alpha, status = optimal_step(slope, curvature)
    assert status is Status.OK
    # stationary point of q(α) = α·s + ½α²·c, and its minimum
    assert slope + alpha * curvature == pytest.approx(0.0, abs=1e-9 * abs(slope))
    best = predicted_change(alpha, slope, curvature)
    assert best == pytest.approx(-(slope**2) / (2 * curvature), rel=1e-12)
    assert best < 0
    assert best <= predicted_change(alpha * factor, slope, curvature) + 1e-12 * abs(
        best
    )


@pytest.mark.parametrize(
    ("alpha", "bounds", "expected"),
    [
        (12.0, (0.1, 10.0), 10.0),
        (0.05, (0.1, 10.0), 0.1),
        (3.0, (0.1, 10.0), 3.0),
        (0.1, (0.1, 10.0), 0.1),
        (10.0, (0.1, 10.0), 10.0),
        (1e9, (0.0, INF), 1e9),
        (0.7, (0.5, 0.5), 0.5),
        (12.0, None, 12.0),
    ],
)
def test_clip_to_bounds(alpha, bounds, expected):
    assert clip_to_bounds(alpha, bounds) == expected


@pytest.mark.parametrize(
    ("alpha", "slope", "curvature"),
    [(0.0, -2.0, 4.0), (0.5, -2.0, 4.0), (1.0, 3.0, -1.0), (-2.0, 0.5, 0.25)],
)
def test_predicted_change_is_the_quadratic(alpha, slope, curvature):
    value = predicted_change(alpha, slope, curvature)
    assert value == pytest.approx(alpha * slope + alpha * alpha * curvature / 2)
    # its derivative in α is slope + α·curvature (central difference, exact here)
    h = 1e-3
    derivative = (
        predicted_change(alpha + h, slope, curvature)
        - predicted_change(alpha - h, slope, curvature)
    ) / (2 * h)
    assert derivative == pytest.approx(slope + alpha * curvature, rel=1e-9, abs=1e-12)


# ------------------------------------------------ an exactly quadratic problem
N, D_IN, D_OUT = 16, 5, 2


def least_squares():
    """Linear least squares: L(W) = mean((X Wᵀ - Y)²) is quadratic in W.

    No bias, so the block-diagonal curvatures are the full Hessian.
    """
    torch.manual_seed(3)
    model = extend(nn.Linear(D_IN, D_OUT, bias=False).double())
    x = torch.randn(N, D_IN, dtype=torch.float64)
    y = torch.randn(N, D_OUT, dtype=torch.float64)
    return model, extend(nn.MSELoss()), x, y


def line_minimum(w0, d, x, y) -> float:
    """Closed-form minimiser of α ↦ mean((X(W₀ + αD)ᵀ - Y)²)."""
    r, a = x @ w0.T - y, x @ d.T
    return -(torch.sum(r * a) / torch.sum(a * a)).item()


def loss_at(w, x, y) -> float:
    return torch.mean((x @ w.T - y) ** 2).item()


OPTIMIZERS = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["observe", "apply"])
def test_alpha_is_the_exact_line_minimiser(opt, mode):
    model, loss_fn, x, y = least_squares()
    curvatures = ["hessian", "ggn", "pch-clip", "pch-abs"]
    probe = AlphaProbe(OPTIMIZERS[opt]([model.weight]), curvatures, mode=mode)

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(6):
        w0 = model.weight.detach().clone()
        probe.step(closure)
        rec = probe.history[-1]
        w_now = model.weight.detach().clone()
        d = (w_now - w0) / rec.applied  # the inner optimizer's update
        exact = line_minimum(w0, d, x, y)
        assert rec.status == "ok"
        for name in curvatures:  # all curvatures are the Hessian here
            assert rec.alphas[name] == pytest.approx(exact, rel=1e-10)
        # the quadratic model is the loss itself along d
        change = loss_at(w0 + rec.alpha * d, x, y) - loss_at(w0, x, y)
        assert predicted_change(rec.alpha, rec.slope, rec.curvatures["ggn"]) == (
            pytest.approx(change, rel=1e-9, abs=1e-12)
        )
        # a line search on a fine grid finds nothing lower than α*
        grid = torch.linspace(0.0, 3.0 * exact, 301, dtype=torch.float64).tolist()
        losses = [loss_at(w0 + a * d, x, y) for a in grid]
        minimum = loss_at(w0 + exact * d, x, y)
        assert minimum <= min(losses) + 1e-12
        if mode == "apply":
            assert rec.action == "alpha" and rec.applied == rec.alpha
            assert loss_at(w_now, x, y) == pytest.approx(minimum, abs=1e-10)
            # the applied point is stationary along d
            r = x @ w_now.T - y
            assert torch.sum(r * (x @ d.T)).item() == pytest.approx(0.0, abs=1e-10)
        else:
            assert rec.applied == 1.0


def test_block_diagonal_misses_the_weight_bias_coupling():
    """With a bias the blocks drop cross terms: α* is no longer the line minimum.

    This is the limit the exact curvatures exist for; it guards the table above
    against passing only because every α* agrees with anything.
    """
    torch.manual_seed(3)
    model = extend(nn.Linear(D_IN, D_OUT).double())
    loss_fn = extend(nn.MSELoss())
    x = torch.randn(N, D_IN, dtype=torch.float64) + 2.0  # mean input couples w, b
    y = torch.randn(N, D_OUT, dtype=torch.float64)
    probe = AlphaProbe(torch.optim.Adam(model.parameters(), lr=0.1), "hessian")

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    probe.step(closure)
    dw, db = model.weight.detach() - w0, model.bias.detach() - b0
    r, a = x @ w0.T + b0 - y, x @ dw.T + db
    exact = -(torch.sum(r * a) / torch.sum(a * a)).item()
    assert probe.history[-1].alpha != pytest.approx(exact, rel=1e-3)
