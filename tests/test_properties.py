"""Property-based tests (issue 4, point 6).

* Over random small ``Sequential`` networks, losses, inner optimizers,
  curvatures, dtypes and seeds, observe mode is bitwise the unwrapped optimizer.
* On random convex quadratics (least squares: one bias-free ``Linear`` and
  ``MSELoss``, float64; the single parameter block makes the block-diagonal
  curvature the full Hessian), every curvature's ``α*`` is the exact minimiser of
  the loss along ``d``, and apply mode never increases the loss.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from backpack import extend
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from alphawrap import AlphaProbe
from tests._state import same_bits

BLOCK_CURVATURES = ("hessian", "ggn", "pch-clip", "pch-abs")

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "sgd-momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "sgd-nesterov-wd": lambda p, lr: torch.optim.SGD(
        p, lr=lr, momentum=0.5, nesterov=True, weight_decay=1e-2
    ),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
    "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr),
    "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
    "adamax": lambda p, lr: torch.optim.Adamax(p, lr=lr),
}
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@st.composite
def networks(draw):
    depth = draw(st.integers(1, 3))
    return {
        "widths": draw(
            st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1)
        ),
        "activation": draw(st.sampled_from(sorted(ACTIVATIONS))),
        "loss": draw(st.sampled_from(["mse", "ce"])),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "lr": draw(st.sampled_from([1e-3, 0.1, 1.0])),
        "curvature": draw(st.sampled_from(BLOCK_CURVATURES)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "batch": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 2**16)),
    }


def _build(config):
    torch.manual_seed(config["seed"])
    widths = config["widths"]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(ACTIVATIONS[config["activation"]]())
        layers.append(nn.Linear(a, b))
    model = extend(nn.Sequential(*layers).to(config["dtype"]))
    opt = OPTIMIZERS[config["optimizer"]](model.parameters(), config["lr"])
    return model, opt


def _data(config, step: int):
    gen = torch.Generator().manual_seed(config["seed"] + 7919 * step)
    x = torch.randn(
        config["batch"], config["widths"][0], generator=gen, dtype=config["dtype"]
    )
    if config["loss"] == "ce":
        y = torch.randint(0, config["widths"][-1], (config["batch"],), generator=gen)
    else:
        y = torch.randn(
            config["batch"], config["widths"][-1], generator=gen, dtype=config["dtype"]
        )
    return x, y


@settings(max_examples=30, deadline=None)
@given(config=networks())
def test_observe_mode_is_bitwise_the_inner_optimizer(config):
    loss_fn = extend(nn.CrossEntropyLoss() if config["loss"] == "ce" else nn.MSELoss())
    wrapped_model, wrapped_opt = _build(config)
    plain_model, plain_opt = _build(config)
    probe = AlphaProbe(wrapped_opt, curvature=config["curvature"])
    for step in range(3):
        x, y = _data(config, step)
        for model, stepper in ((wrapped_model, probe), (plain_model, plain_opt)):

            def closure(model=model, stepper=stepper, x=x, y=y):
                stepper.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            stepper.step(closure)
        assert same_bits(
            list(wrapped_model.parameters()), list(plain_model.parameters())
        )
        assert same_bits(wrapped_opt.state_dict(), plain_opt.state_dict())
    assert len(probe.history) == 3


# -------------------------------------------------------- convex quadratics
@st.composite
def least_squares(draw):
    n_in = draw(st.integers(1, 5))
    return {
        "n_in": n_in,
        "n_out": draw(st.integers(1, 4)),
        "batch": draw(st.integers(n_in, 8)),  # X has full column rank: H > 0
        "reduction": draw(st.sampled_from(["mean", "sum"])),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "lr": draw(st.sampled_from([1e-2, 0.1, 0.5])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _quadratic(config, mode: str, **kwargs):
    torch.manual_seed(config["seed"])
    layer = nn.Linear(config["n_in"], config["n_out"], bias=False).double()
    model = extend(nn.Sequential(layer))
    loss_fn = extend(nn.MSELoss(reduction=config["reduction"]))
    x = torch.randn(config["batch"], config["n_in"], dtype=torch.float64)
    y = torch.randn(config["batch"], config["n_out"], dtype=torch.float64)
    opt = OPTIMIZERS[config["optimizer"]](model.parameters(), config["lr"])
    probe = AlphaProbe(opt, curvature=BLOCK_CURVATURES, mode=mode, **kwargs)

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    def loss_at(weight: torch.Tensor) -> float:
        with torch.no_grad():
            return loss_fn(x @ weight.T, y).item()

    return layer.weight, x, y, probe, closure, loss_at


@settings(max_examples=25, deadline=None)
@given(config=least_squares())
def test_alpha_is_the_exact_minimiser_along_d(config):
    weight, x, y, probe, closure, loss_at = _quadratic(config, "observe")
    for _ in range(3):
        theta0 = weight.detach().clone()
        probe.step(closure)
        d = weight.detach() - theta0
        record = probe.history[-1]
        # Closed form along d: L(θ₀ + a d) ∝ ‖X(θ₀ + a d)ᵀ - Y‖², so
        # a* = -<X dᵀ, X θ₀ᵀ - Y> / ‖X dᵀ‖² whatever the reduction's scale.
        xd, residual = x @ d.T, x @ theta0.T - y
        numerator, denominator = -(xd * residual).sum().item(), (xd * xd).sum().item()
        if denominator <= 1e-20 * max(1.0, (x * x).sum().item() * (d * d).sum().item()):
            continue  # d = 0: nothing to minimise
        if numerator <= 1e-12 * math.sqrt(
            denominator * (residual * residual).sum().item()
        ):
            # dᵀg >= 0 (to rounding): d is not a descent direction.
            assert record.status in ("not-descent", "ok"), record
            continue
        exact = numerator / denominator
        event("compared α* with the exact minimiser")
        for name in BLOCK_CURVATURES:
            assert record.statuses[name] == "ok", record
            assert math.isclose(record.alphas[name], exact, rel_tol=1e-8), (
                name,
                record,
            )
        # A dense look along the line agrees: nothing beats α*.
        best = loss_at(theta0 + record.alpha * d)
        for a in (0.0, 0.5, 0.9, 0.99, 1.01, 1.1, 2.0):
            assert best <= loss_at(theta0 + a * record.alpha * d) * (1 + 1e-12) + 1e-14


@settings(max_examples=25, deadline=None)
@given(config=least_squares())
def test_apply_mode_never_increases_the_loss(config):
    # fallback="skip": where α* is undefined (an inner step that is not a descent
    # direction) no step is taken; the default fallback would take it.
    weight, _, _, probe, closure, loss_at = _quadratic(config, "apply", fallback="skip")
    losses = [loss_at(weight.detach())]
    for _ in range(4):
        probe.step(closure)
        losses.append(loss_at(weight.detach()))
    for before, after in itertools.pairwise(losses):
        assert after <= before * (1 + 1e-12) + 1e-14, losses
    assert {r.action for r in probe.history} <= {"alpha", "skip"}
