"""The update d, observe-mode transparency and apply-mode arithmetic.

Every inner optimizer is run twice on the same mini-batches: wrapped in an
observe-mode ``AlphaProbe`` and unwrapped. After every step parameters and every
tensor of the optimizer state must be bitwise identical. Apply mode must take
exactly ``θ₀ + α·d`` while the inner state advances exactly as in its own step.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from backpack import extend
from torch import Tensor, nn
from torch.optim import Optimizer

from alphawrap import AlphaProbe
from alphawrap.direction import POOL_MIN, POOL_SMALL, CopyPool, GradBackup
from tests._state import hook_counts, same_bits

IN, HIDDEN, OUT, BATCH = 4, 6, 3, 8
STEPS = 100


# ----------------------------------------------------------------- problem data
def make_model(
    dtype: torch.dtype = torch.float32, seed: int = 0, extended: bool = True
) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    model = model.to(dtype)
    return extend(model) if extended else model


def make_batches(
    n: int, dtype: torch.dtype = torch.float32, seed: int = 1
) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, BATCH, IN, generator=gen, dtype=dtype)
    ys = torch.randint(0, OUT, (n, BATCH), generator=gen)
    return list(zip(xs, ys))


LOSS_FN = extend(nn.CrossEntropyLoss())


def closure_for(probe: Optimizer, model: nn.Module, batch: tuple[Tensor, Tensor]):
    x, y = batch

    def closure() -> Tensor:
        probe.zero_grad()
        loss = LOSS_FN(model(x), y)
        loss.backward()
        return loss

    return closure


def plain_step(opt: Optimizer, model: nn.Module, batch: tuple[Tensor, Tensor]):
    """The canonical unwrapped training step."""
    x, y = batch
    opt.zero_grad()
    loss = LOSS_FN(model(x), y)
    loss.backward()
    opt.step()
    return loss


# ------------------------------------------------------- optimizers as test data
class SignMomentum(Optimizer):
    """Sign-SGD with momentum: derives from nothing but ``Optimizer``."""

    def __init__(self, params, lr: float = 1e-2, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["buf"] = torch.zeros_like(p)
                state["step"] += 1
                buf = state["buf"]
                buf.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


class Uphill(Optimizer):
    """Steps *along* the gradient (d = lr·g): never a descent direction."""

    def __init__(self, params, lr: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["steps"] = state.get("steps", 0) + 1
                state["last_grad"] = p.grad.clone()
                p.add_(p.grad, alpha=group["lr"])


@dataclass(frozen=True)
class OptCase:
    name: str
    build: Callable[[nn.Sequential], Optimizer]


def _two_groups(model: nn.Sequential) -> Optimizer:
    return torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 2e-2, "weight_decay": 0.1},
            {"params": model[2].parameters()},
        ],
        lr=1e-3,
    )


OPTIMIZERS = [
    OptCase("sgd", lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    OptCase(
        "sgd-momentum", lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    ),
    OptCase(
        "sgd-nesterov",
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    ),
    OptCase(
        "sgd-weight-decay",
        lambda m: torch.optim.SGD(
            m.parameters(), lr=0.1, momentum=0.5, dampening=0.1, weight_decay=1e-2
        ),
    ),
    OptCase(
        "sgd-maximize",
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01, maximize=True),
    ),
    OptCase("adam", lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)),
    OptCase(
        "adam-amsgrad",
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, amsgrad=True),
    ),
    OptCase("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)),
    OptCase("adamax", lambda m: torch.optim.Adamax(m.parameters(), lr=1e-2)),
    OptCase("nadam", lambda m: torch.optim.NAdam(m.parameters(), lr=1e-2)),
    OptCase("radam", lambda m: torch.optim.RAdam(m.parameters(), lr=1e-2)),
    OptCase(
        "rmsprop",
        lambda m: torch.optim.RMSprop(
            m.parameters(), lr=1e-3, momentum=0.5, centered=True
        ),
    ),
    OptCase("rprop", lambda m: torch.optim.Rprop(m.parameters(), lr=1e-2)),
    OptCase("adagrad", lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1)),
    OptCase("adadelta", lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0)),
    OptCase("asgd", lambda m: torch.optim.ASGD(m.parameters(), lr=1e-2, t0=10)),
    OptCase("adam-two-groups", _two_groups),
    OptCase("sign-momentum-custom", lambda m: SignMomentum(m.parameters())),
]
OPT_IDS = [c.name for c in OPTIMIZERS]
BY_NAME = {c.name: c for c in OPTIMIZERS}


# --------------------------------------------------------------------- helpers
def group_params(opt: Optimizer) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def assert_values_equal(a, b, where: str) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def assert_same_optimizer(opt: Optimizer, ref: Optimizer, where: str = "") -> None:
    """Parameters, per-parameter state and group settings bitwise equal."""
    for i, (p, q) in enumerate(zip(group_params(opt), group_params(ref), strict=True)):
        assert torch.equal(p, q), f"{where}: parameter {i} differs"
        s, r = opt.state.get(p, {}), ref.state.get(q, {})
        assert s.keys() == r.keys(), f"{where}: state keys of parameter {i}"
        for key in s:
            assert_values_equal(s[key], r[key], f"{where}: state[{i}][{key!r}]")
    for g, h in zip(opt.param_groups, ref.param_groups, strict=True):
        assert {k: v for k, v in g.items() if k != "params"} == {
            k: v for k, v in h.items() if k != "params"
        }, where


def snapshot(opt: Optimizer) -> list[Tensor]:
    return [p.detach().clone() for p in group_params(opt)]


def twin_step(probe: AlphaProbe, model: nn.Module, batch) -> Optimizer:
    """Copy model and inner optimizer as they are now; take one plain step."""
    twin_model, twin_opt = copy.deepcopy((model, probe.inner))
    plain_step(twin_opt, twin_model, batch)
    return twin_opt


def expected_scaled(theta0: list[Tensor], theta1: list[Tensor], alpha: float):
    """θ₀ + α·(θ₁ − θ₀), computed the way a user would."""
    return [torch.add(t0, t1 - t0, alpha=alpha) for t0, t1 in zip(theta0, theta1)]


# ------------------------------------------------------ observe: bitwise identity
@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_observe_is_bitwise_identical_to_unwrapped(case):
    batches = make_batches(STEPS)
    model, ref_model = make_model(), make_model(extended=False)
    probe = AlphaProbe(case.build(model), curvature=["hessian", "ggn"])
    ref = case.build(ref_model)
    for i, batch in enumerate(batches):
        loss = probe.step(closure_for(probe, model, batch))
        ref_loss = plain_step(ref, ref_model, batch)
        assert torch.equal(loss, ref_loss)
        assert_same_optimizer(probe.inner, ref, f"{case.name} step {i}")
    assert len(probe.history) == STEPS
    assert [r.step for r in probe.history] == list(range(STEPS))
    assert all(r.action == "inner" and r.applied == 1.0 for r in probe.history)
    # the probe measured something on every step (not a silent no-op)
    for r in probe.history:
        assert r.direction_norm > 0 and r.grad_norm > 0
        assert all(math.isfinite(q) and q != 0 for q in r.curvatures.values())


@pytest.mark.parametrize("case", OPTIMIZERS, ids=OPT_IDS)
def test_direction_and_slope_are_those_of_the_unwrapped_update(case):
    """direction_norm = ‖θ₁−θ₀‖ of the plain step; slope = dᵀg by hand (float64)."""
    dtype = torch.float64
    model, ref_model = make_model(dtype), make_model(dtype)
    probe = AlphaProbe(case.build(model))
    ref = case.build(ref_model)
    for batch in make_batches(4, dtype):
        theta0 = snapshot(ref)
        plain_step(ref, ref_model, batch)
        grads = [p.grad.clone() for p in group_params(ref)]
        d = [p.detach() - t0 for p, t0 in zip(group_params(ref), theta0)]
        probe.step(closure_for(probe, model, batch))
        rec = probe.history[-1]
        norm = math.sqrt(sum(torch.sum(x * x).item() for x in d))
        slope = sum(torch.sum(x * g).item() for x, g in zip(d, grads))
        gnorm = math.sqrt(sum(torch.sum(g * g).item() for g in grads))
        assert norm > 0
        assert rec.direction_norm == pytest.approx(norm, rel=1e-12)
        assert rec.slope == pytest.approx(slope, rel=1e-9, abs=1e-15)
        assert rec.grad_norm == pytest.approx(gnorm, rel=1e-12)
        assert_same_optimizer(probe.inner, ref)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda ps: torch.optim.LBFGS(ps), "LBFGS is not supported"),
        (lambda ps: torch.optim.SparseAdam(ps), "SparseAdam is not supported"),
    ],
    ids=["lbfgs", "sparse-adam"],
)
def test_closure_reevaluating_and_sparse_optimizers_are_refused(build, match):
    model = make_model()
    with pytest.raises(TypeError, match=match):
        AlphaProbe(build(list(model.parameters())))


# ------------------------------------------------------------------ apply mode
APPLY_CASES = [
    "sgd-momentum",
    "adam",
    "rmsprop",
    "adam-two-groups",
    "sign-momentum-custom",
]


@pytest.mark.parametrize("name", APPLY_CASES)
def test_apply_takes_theta0_plus_alpha_d_and_inner_state_advances(name):
    model = make_model()
    probe = AlphaProbe(BY_NAME[name].build(model), curvature="ggn", mode="apply")
    actions = []
    for i, batch in enumerate(make_batches(12)):
        theta0 = snapshot(probe)
        twin = twin_step(probe, model, batch)
        probe.step(closure_for(probe, model, batch))
        rec = probe.history[-1]
        actions.append(rec.action)
        if rec.status == "ok":
            assert rec.action == "alpha"
            assert rec.applied == rec.alpha
        else:  # default fallback: the inner step unchanged
            assert (rec.action, rec.applied) == ("inner", 1.0)
        expected = expected_scaled(theta0, group_params(twin), rec.applied)
        for j, (p, e) in enumerate(zip(group_params(probe), expected)):
            assert torch.equal(p, e), f"step {i} param {j}"
        # the inner state is exactly what the optimizer's own step made of it
        for p, q in zip(group_params(probe), group_params(twin)):
            for key, value in probe.state[p].items():
                assert_values_equal(value, twin.state[q][key], f"step {i} {key}")
    assert actions.count("alpha") >= len(actions) // 2


# Triggers of an undefined α*: (optimizer, curvature, expected status).
UNDEFINED = {
    "not-descent": (lambda m: Uphill(m.parameters()), "hessian", "not-descent"),
    # maximising a loss whose GGN is PSD: the model of -L has no maximum along d
    "maximize-psd": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01, maximize=True),
        "ggn",
        "nonpositive-curvature",
    ),
    "zero-direction": (
        lambda m: torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9),
        "hessian",
        "zero-direction",
    ),
}


@pytest.mark.parametrize("trigger", list(UNDEFINED))
@pytest.mark.parametrize(
    ("mode", "fallback"),
    [
        ("apply", "inner"),
        ("apply", "skip"),
        ("apply", 0.5),
        ("apply", 0.0),
        ("observe", "skip"),
    ],
)
def test_fallback_when_alpha_is_undefined(trigger, mode, fallback):
    build, curvature, status = UNDEFINED[trigger]
    model = make_model()
    probe = AlphaProbe(build(model), curvature=curvature, mode=mode, fallback=fallback)
    for i, batch in enumerate(make_batches(3)):
        theta0 = snapshot(probe)
        state0 = copy.deepcopy(probe.inner.state_dict())
        twin = twin_step(probe, model, batch)
        probe.step(closure_for(probe, model, batch))
        rec = probe.history[-1]
        assert (rec.step, rec.status, rec.alpha, rec.mode) == (i, status, None, mode)
        params = group_params(probe)
        if mode == "observe" or fallback == "inner":
            assert (rec.action, rec.applied) == ("inner", 1.0)
            assert_same_optimizer(probe.inner, twin)
        elif fallback == "skip":
            assert (rec.action, rec.applied) == ("skip", 0.0)
            assert all(torch.equal(p, t0) for p, t0 in zip(params, theta0))
            after = probe.inner.state_dict()
            assert after["state"].keys() == state0["state"].keys()
            for k, s in state0["state"].items():
                for key, value in s.items():
                    assert_values_equal(after["state"][k][key], value, key)
        else:
            assert (rec.action, rec.applied) == ("fallback", fallback)
            expected = expected_scaled(theta0, group_params(twin), fallback)
            assert all(torch.equal(p, e) for p, e in zip(params, expected))
            for p, q in zip(params, group_params(twin)):
                for key, value in probe.state[p].items():
                    assert_values_equal(value, twin.state[q][key], key)
    assert probe.step_count == 3 and len(probe.history) == 3


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (2.0, 3.0, 2.0),  # α* below the bounds: raised to low
        (0.0, 0.5, 0.5),  # α* above the bounds: cut to high
        (0.5, 2.0, 1.0),  # inside: unchanged
        (0.0, math.inf, 1.0),
    ],
)
def test_bounds_clip_the_applied_alpha(low, high, expected):
    """Bounds are given as multiples of this step's α*, measured on a copy first."""
    batches = make_batches(3)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-3)
    # a few observe steps away from the initialisation
    warm = AlphaProbe(opt, curvature="ggn")
    for batch in batches[:2]:
        warm.step(closure_for(warm, model, batch))
    scout_model, scout_opt = copy.deepcopy((model, opt))
    scout = AlphaProbe(scout_opt, curvature="ggn")
    scout.step(closure_for(scout, scout_model, batches[2]))
    alpha = scout.history[-1].alpha
    assert alpha is not None and alpha > 0
    bounds = (low * alpha, high * alpha)
    probe = AlphaProbe(opt, curvature="ggn", mode="apply", bounds=bounds)
    theta0 = snapshot(probe)
    probe.step(closure_for(probe, model, batches[2]))
    rec = probe.history[-1]
    assert rec.alpha == pytest.approx(alpha, rel=1e-12)  # bounds do not alter α*
    assert rec.applied == pytest.approx(expected * alpha, rel=1e-12)
    assert low * alpha <= rec.applied <= high * alpha
    theta1 = group_params(scout_opt)  # the inner step, bitwise
    for p, e in zip(group_params(probe), expected_scaled(theta0, theta1, rec.applied)):
        assert torch.equal(p, e)


@pytest.mark.parametrize(
    "bounds",
    [(2.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (0.0, math.nan), (math.inf,) * 2],
)
def test_invalid_bounds_are_rejected(bounds):
    with pytest.raises(ValueError, match="Invalid bounds"):
        AlphaProbe(torch.optim.SGD(make_model().parameters(), lr=0.1), bounds=bounds)


def test_mode_toggled_between_steps():
    modes = ["observe", "apply", "apply", "observe", "apply", "observe"]
    model = make_model()
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=1e-2), curvature="ggn", fallback=0.25
    )
    for i, (mode, batch) in enumerate(zip(modes, make_batches(len(modes)))):
        probe.mode = mode
        theta0 = snapshot(probe)
        twin = twin_step(probe, model, batch)
        probe.step(closure_for(probe, model, batch))
        rec = probe.history[-1]
        assert rec.mode == mode
        if mode == "observe":
            assert (rec.action, rec.applied) == ("inner", 1.0)
            assert_same_optimizer(probe.inner, twin, f"step {i}")
        else:
            assert rec.action in ("alpha", "fallback")
            assert rec.applied == (rec.alpha if rec.action == "alpha" else 0.25)
            expected = expected_scaled(theta0, group_params(twin), rec.applied)
            assert all(torch.equal(p, e) for p, e in zip(group_params(probe), expected))
    with pytest.raises(ValueError, match="Invalid mode"):
        probe.mode = "rescale"
    assert probe.mode == modes[-1]


@pytest.mark.parametrize(
    ("dtype", "limit", "packed"),
    [
        (torch.float64, 1 << 24, True),  # small model: packed, three dot products
        (torch.float32, 1 << 24, True),
        (torch.float64, 10, False),  # above the limit: per block, no copy of d, g
        (torch.bfloat16, 1 << 24, False),  # accumulated in float32: per block
    ],
)
@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "kept buffers"])
def test_step_products_packs_small_models_only(
    monkeypatch, dtype, limit, packed, pooled
):
    """dᵀg, ‖d‖², ‖g‖² match a float64 reference. Only up to ``PACK_LIMIT``
    elements are the blocks concatenated (a concatenation copies all of d and g:
    twice the parameters' memory); above it, or for a dtype accumulated in a wider
    one, the products are taken per block. With a pool, the packed copies go into
    its buffers, the same on every call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from alphawrap import direction
    from alphawrap.direction import step_products

    monkeypatch.setattr(direction, "PACK_LIMIT", limit)
    monkeypatch.setattr(direction, "POOL_MIN", 1)
    pool = CopyPool() if pooled else None

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 3, 2), (0,)]
    ds = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    gs[0] = gs[0].T.contiguous().T  # a non-contiguous gradient
    gs[1] = None  # a block without gradient counts in ‖d‖² only
    acc = torch.promote_types(dtype, torch.float32)
    with Ops() as ops:
        slope, dd, gg = step_products(ds, gs, acc, pool)
    assert ops.names.count("cat") == (2 if packed else 0)
    if pooled:
        kept = dict(pool._slots)
        assert len(kept) == (2 if packed else 0)
        again = step_products(ds, gs, acc, pool)
        assert all(torch.equal(a, b) for a, b in zip(again, (slope, dd, gg)))
        assert all(pool._slots[k] is v for k, v in kept.items())
    ref = [(d.double(), None if g is None else g.double()) for d, g in zip(ds, gs)]
    tol = (
        {"rtol": 1e-12, "atol": 1e-12}
        if dtype == torch.float64
        else {"rtol": 1e-6, "atol": 1e-6}
        if dtype == torch.float32
        else {}
    )
    torch.testing.assert_close(
        slope.double(),
        sum((d * g).sum() for d, g in ref if g is not None),
        **tol,
    )
    torch.testing.assert_close(dd.double(), sum((d * d).sum() for d, _ in ref), **tol)
    torch.testing.assert_close(
        gg.double(), sum((g * g).sum() for _, g in ref if g is not None), **tol
    )
    assert slope.dtype == dd.dtype == gg.dtype == acc


@pytest.mark.parametrize("limit", [1 << 24, 1])
def test_step_products_without_any_gradient(monkeypatch, limit):
    """No block has a gradient: dᵀg = ‖g‖² = 0, packed or not."""
    from alphawrap import direction

    monkeypatch.setattr(direction, "PACK_LIMIT", limit)
    ds = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    products = direction.step_products(ds, [None, None], torch.float32)
    assert [t.item() for t in products] == [0.0, 14.0, 0.0]


def test_backward_monitor_records_only_while_entered_and_knows_its_parameters():
    """Reached indices are those of the parameters a backward accumulated into,
    only inside the ``with`` block; ``serves`` tells whether the hooks still sit
    on exactly these parameters; ``close`` (or collection) removes them."""
    import gc

    from alphawrap.direction import BackwardMonitor

    a, b, c = (nn.Parameter(torch.randn(3)) for _ in range(3))
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)
    params = [a, b, frozen, c]
    monitor = BackwardMonitor(params)
    assert sum(hook_counts(params)) == 3  # none on the frozen one
    (a * b).sum().backward()
    assert monitor.reached == set()  # not entered: not recorded
    with monitor:
        (a * c).sum().backward()
    assert monitor.reached == {0, 3}
    with monitor:  # a new session starts empty
        b.sum().backward()
    assert monitor.reached == {1}
    assert monitor.serves(params)
    assert not monitor.serves([a, b, frozen])
    assert not monitor.serves([a, b, frozen, nn.Parameter(torch.randn(3))])
    frozen.requires_grad_(True)
    assert not monitor.serves(params)
    monitor.close()
    assert sum(hook_counts(params)) == 0
    monitor.close()  # at most once
    again = BackwardMonitor(params)
    assert sum(hook_counts(params)) == 4
    del again
    gc.collect()
    assert sum(hook_counts(params)) == 0


def _probe_and_closure(interval: int):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    loss_fn = extend(nn.MSELoss())
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), interval=interval)

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return probe, closure, list(model.parameters())


def test_monitor_hooks_are_registered_once_while_every_step_is_probed(monkeypatch):
    """Registering a hook per parameter on every step cost more than the rest of
    a small model's bookkeeping: with ``interval=1`` the probe registers them
    once and keeps them; a copy of the probe does not carry them; they go with
    the probe."""
    import gc

    probe, closure, params = _probe_and_closure(interval=1)
    calls = []
    register = torch.Tensor.register_post_accumulate_grad_hook

    def counting(self, hook):
        calls.append(self)
        return register(self, hook)

    monkeypatch.setattr(torch.Tensor, "register_post_accumulate_grad_hook", counting)
    for _ in range(4):
        probe.step(closure)
    assert len(calls) == len(params)
    assert sum(hook_counts(params)) == len(params)
    assert all(r.slope < 0 for r in probe.history)
    twin = copy.deepcopy(probe)
    assert twin._monitor is None
    model = probe.inner.param_groups[0]["params"]  # copied and saved without them
    assert sum(hook_counts(copy.deepcopy(model))) == 0
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert sum(hook_counts(torch.load(buffer, weights_only=False))) == 0
    del probe, closure  # the closure refers to the probe
    gc.collect()
    assert sum(hook_counts(params)) == 0


def test_monitor_hooks_are_gone_between_probes():
    """With ``interval > 1`` the steps in between cost a plain step: no hook of
    the probe stays on the parameters after any step."""
    probe, closure, params = _probe_and_closure(interval=3)
    for _ in range(7):
        probe.step(closure)
        assert sum(hook_counts(params)) == 0
    assert [r.step for r in probe.history] == [0, 3, 6]


def test_monitor_follows_parameters_frozen_or_unfrozen_between_steps():
    """The kept hooks are rebuilt when a parameter's ``requires_grad`` changes: a
    parameter frozen at the first step and unfrozen later counts in ‖g‖ (it is
    reached) from then on."""
    probe, closure, params = _probe_and_closure(interval=1)
    params[0].requires_grad_(False)
    probe.step(closure)
    assert params[0].grad is None
    assert sum(hook_counts(params)) == len(params) - 1
    params[0].requires_grad_(True)
    probe.step(closure)
    grads = [p.grad for p in params]
    expected = torch.sqrt(sum((g * g).sum() for g in grads))
    assert all(g is not None for g in grads)
    assert probe.history[-1].grad_norm == pytest.approx(expected.item(), rel=1e-6)
    assert sum(hook_counts(params)) == len(params)


# ------------------------------------------------- copies into kept buffers
def test_copy_pool_reuses_fitting_buffers_and_clones_the_rest():
    pool = CopyPool()
    big = torch.arange(float(POOL_MIN))
    first = pool.copy("a", big)
    assert torch.equal(first, big) and first.data_ptr() != big.data_ptr()
    again = pool.copy("a", big + 1)
    assert again is first and torch.equal(again, big + 1)  # reused, refilled
    other = pool.copy("a", big.double())  # another dtype: a new buffer
    assert other is not first and other.dtype == torch.float64
    assert pool.copy("b", big) is not other  # one buffer per slot
    for tensor in (  # cloned, never pooled
        torch.ones(3),
        torch.ones(POOL_MIN, requires_grad=True),
        torch.ones(2, POOL_MIN).t(),
    ):
        copy_ = pool.copy("c", tensor)
        assert torch.equal(copy_, tensor) and pool.copy("c", tensor) is not copy_
    pool.clear()
    assert pool.copy("a", big) is not again
    medium = torch.ones(POOL_SMALL)  # kept only once the parameters are large
    assert not pool.keeps(medium)
    pool.small = True
    assert pool.keeps(medium) and pool.copy("m", medium) is pool.copy("m", medium)
    assert not pool.keeps(torch.empty(POOL_MIN, device="meta"))  # CPU only
    # A slot no copy used since the last step's end is dropped.
    pool.release_unused()
    kept = pool.copy("a", big)
    pool.release_unused()
    assert set(pool._slots) == {"a"} and pool.copy("a", big) is kept


def test_grad_backup_keeps_a_gradient_graph():
    """A gradient made with ``create_graph=True`` comes back with its graph."""
    p = torch.ones(3, requires_grad=True)
    (p * p).sum().backward(create_graph=True)
    backup = GradBackup([p])
    p.grad = None
    backup.restore()
    assert p.grad.requires_grad and p.grad.grad_fn is not None
    assert torch.equal(p.grad.detach(), 2 * torch.ones(3))


def test_probe_keeps_medium_tensors_of_large_models_only(monkeypatch):
    probe, _, _ = _probe_and_closure(interval=1)
    # Fewer than POOL_MIN parameter elements: no copy could be kept, plain clones.
    assert probe._copy_pool() is None
    monkeypatch.setattr("alphawrap.probe.POOL_MIN", 1)
    assert not probe._copy_pool().small
    monkeypatch.setattr("alphawrap.probe.POOL_TOTAL", 1)
    assert probe._copy_pool().small


def _big_probe(interval: int = 1, mode: str = "apply"):
    """Adam on a model with one weight above POOL_MIN elements."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 3))
    assert model[0].weight.numel() >= POOL_MIN
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(16, 512), torch.randint(0, 3, (16,))
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=0.01),
        curvature="hessian-exact",
        model=model,
        loss_fn=loss_fn,
        mode=mode,
        interval=interval,
    )

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return probe, closure, model


@pytest.mark.parametrize("mode", ["observe", "apply"])
def test_kept_buffers_take_the_same_steps_as_clones(mode):
    """θ₀, the optimizer state, the gradients and ``d`` of large parameters, and
    the packed ``d`` and ``g``, are copied into buffers kept from the step before:
    the same steps, bit for bit, as with fresh clones, and the buffers are
    reused."""
    probe, closure, model = _big_probe(mode=mode)
    ref, ref_closure, ref_model = _big_probe(mode=mode)
    ref._copy_pool = lambda: None  # fresh clones every step
    kept: dict = {}
    for step in range(4):
        probe.step(closure)
        ref.step(ref_closure)
        assert same_bits(list(model.parameters()), list(ref_model.parameters()))
        assert_same_optimizer(probe.inner, ref.inner, f"step {step}")
        slots = probe._pool._slots
        # Adam's state and the gradients exist from the second step on.
        pooled = {("theta", 0), ("d", 0), ("packed", "d"), ("packed", "g")}
        if step:
            pooled |= {("state", 0, "exp_avg"), ("state", 0, "exp_avg_sq")}
            pooled |= {("grad", 0)}
        assert set(slots) == pooled  # the small tensors are cloned
        assert all(slots[k] is v for k, v in kept.items())  # reused, refilled
        kept = dict(slots)
    assert probe.history.to_dicts() == ref.history.to_dicts()
    assert all(
        r.action == ("alpha" if mode == "apply" else "inner") for r in probe.history
    )
    assert not copy.deepcopy(probe)._pool._slots  # a copy starts without them


def test_kept_buffers_of_a_tensor_that_stops_qualifying_are_dropped():
    probe, closure, model = _big_probe()
    for _ in range(2):
        probe.step(closure)
    assert ("theta", 0) in probe._pool._slots
    with torch.no_grad():  # the same values, no longer contiguous
        model[0].weight.data = model[0].weight.data.t().contiguous().t()
    probe.step(closure)
    assert ("theta", 0) not in probe._pool._slots
    assert ("d", 0) not in probe._pool._slots
    assert ("state", 0, "exp_avg") in probe._pool._slots  # Adam's own tensor


def test_kept_buffers_are_dropped_between_probes():
    probe, closure, _ = _big_probe(interval=2)
    for _ in range(4):
        probe.step(closure)
        assert not probe._pool._slots
    assert len(probe.history) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_copy_pool_clones_cuda_tensors():
    """CUDA's caching allocator reuses freed memory without page faults: the pool
    would only hold memory between steps."""
    big = torch.ones(POOL_MIN, device="cuda")
    pool = CopyPool()
    assert not pool.keeps(big)
    assert pool.copy("a", big) is not pool.copy("a", big)
