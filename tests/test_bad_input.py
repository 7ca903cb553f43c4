"""Invalid input is refused with a message that says what was wrong (issue 4, point 3).

In torch.optim's test style the cases are data: what to build, the expected
error type and a fragment of its message. Every error raised by ``step()`` or
``load_state_dict()`` leaves parameters, gradients, the inner state and the
history exactly as before, which each case asserts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from backpack import extend
from torch import nn

from alphawrap import AlphaProbe, ClosureError, CurvatureError, ProbeError
from tests._state import Snapshot, same_bits


@dataclass(frozen=True)
class Case:
    """One invalid input: ``make`` triggers the error; ``match`` is in its text."""

    id: str
    make: Callable[..., Any]
    error: type[BaseException]
    match: str


def _net(*hidden: nn.Module, out: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), *hidden, nn.Linear(4, out))


def _sgd(model: nn.Module = None, **kw: Any) -> torch.optim.Optimizer:
    model = model if model is not None else _net()
    return torch.optim.SGD(model.parameters(), lr=0.1, **kw)


# ----------------------------------------------------------------- constructor
CONSTRUCTOR_CASES = [
    Case(
        "not-an-optimizer",
        lambda: AlphaProbe(_net()),
        TypeError,
        "torch.optim.Optimizer",
    ),
    Case("parameters", lambda: AlphaProbe(_net().parameters()), TypeError, "generator"),
    Case(
        "optimizer-class", lambda: AlphaProbe(torch.optim.Adam), TypeError, "instance"
    ),
    Case(
        "nested",
        lambda: AlphaProbe(AlphaProbe(_sgd())),
        TypeError,
        "another AlphaProbe",
    ),
    Case(
        "empty-parameter-list",
        lambda: AlphaProbe(torch.optim.SGD([{"params": []}], lr=0.1)),
        ValueError,
        "no parameters",
    ),
    Case(
        "unknown-curvature",
        lambda: AlphaProbe(_sgd(), "newton"),
        ValueError,
        "hessian, ggn",
    ),
    Case("no-curvature", lambda: AlphaProbe(_sgd(), []), ValueError, "at least one"),
    Case(
        "duplicate-curvature",
        lambda: AlphaProbe(_sgd(), ["ggn", "ggn"]),
        ValueError,
        "twice",
    ),
    Case(
        "curvature-not-str",
        lambda: AlphaProbe(_sgd(), [3]),
        ValueError,
        "Valid choices",
    ),
    Case(
        "bad-mode",
        lambda: AlphaProbe(_sgd(), mode="train"),
        ValueError,
        "'observe', 'apply'",
    ),
    Case(
        "bad-fallback",
        lambda: AlphaProbe(_sgd(), fallback="zero"),
        ValueError,
        "'inner', 'skip'",
    ),
    Case(
        "negative-fallback",
        lambda: AlphaProbe(_sgd(), fallback=-1.0),
        ValueError,
        ">= 0",
    ),
    Case(
        "nan-fallback",
        lambda: AlphaProbe(_sgd(), fallback=math.nan),
        ValueError,
        "finite",
    ),
    Case(
        "bool-fallback",
        lambda: AlphaProbe(_sgd(), fallback=True),
        TypeError,
        "fallback",
    ),
    Case(
        "bad-on-nonfinite",
        lambda: AlphaProbe(_sgd(), on_nonfinite="nan"),
        ValueError,
        "'skip', 'inner'",
    ),
    Case(
        "bounds-reversed",
        lambda: AlphaProbe(_sgd(), bounds=(2.0, 1.0)),
        ValueError,
        "low <= high",
    ),
    Case(
        "bounds-negative",
        lambda: AlphaProbe(_sgd(), bounds=(-1.0, 1.0)),
        ValueError,
        "0 <= low",
    ),
    Case(
        "bounds-nan",
        lambda: AlphaProbe(_sgd(), bounds=(0.0, math.nan)),
        ValueError,
        "Invalid bounds",
    ),
    Case("bounds-scalar", lambda: AlphaProbe(_sgd(), bounds=1.0), TypeError, "pair"),
    Case(
        "bounds-triple", lambda: AlphaProbe(_sgd(), bounds=(0, 1, 2)), TypeError, "pair"
    ),
    Case(
        "interval-zero", lambda: AlphaProbe(_sgd(), interval=0), ValueError, "interval"
    ),
    Case(
        "interval-float",
        lambda: AlphaProbe(_sgd(), interval=1.5),
        ValueError,
        "int >= 1",
    ),
    Case(
        "interval-bool",
        lambda: AlphaProbe(_sgd(), interval=True),
        ValueError,
        "interval",
    ),
    Case(
        "history-size-zero",
        lambda: AlphaProbe(_sgd(), history_size=0),
        ValueError,
        "history_size",
    ),
    Case(
        "history-size-float",
        lambda: AlphaProbe(_sgd(), history_size=2.5),
        ValueError,
        "history_size",
    ),
    Case(
        "lbfgs",
        lambda: AlphaProbe(torch.optim.LBFGS(_net().parameters())),
        TypeError,
        "LBFGS is not supported",
    ),
    Case(
        "sparse-adam",
        lambda: AlphaProbe(torch.optim.SparseAdam(_net().parameters())),
        TypeError,
        "SparseAdam is not supported",
    ),
]


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=lambda c: c.id)
def test_constructor_refuses(case):
    with pytest.raises(case.error, match=_re(case.match)):
        case.make()


def _re(fragment: str) -> str:
    import re

    return re.escape(fragment)


# --------------------------------------------------------------- step time
@dataclass
class Setup:
    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]
    probe: AlphaProbe
    x: torch.Tensor
    y: torch.Tensor
    params: list[torch.Tensor]

    def closure(self) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            self.probe.zero_grad()
            loss = self.loss_fn(self.model(self.x), self.y)
            loss.backward()
            return loss

        return closure


def setup(
    model: nn.Module | None = None,
    loss_fn: Any = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    extra: list[torch.Tensor] = (),
    extend_model: bool = True,
    inner: type[torch.optim.Optimizer] = torch.optim.Adam,
    **kwargs: Any,
) -> Setup:
    """A probe with inner state, gradients and (when possible) a history."""
    torch.manual_seed(0)
    model = model if model is not None else _net(nn.ReLU())
    if extend_model:
        model = extend(model)
    loss_fn = loss_fn if loss_fn is not None else extend(nn.CrossEntropyLoss())
    x = x if x is not None else torch.randn(6, 3)
    y = y if y is not None else torch.randint(0, 2, (6,))
    params = [*model.parameters(), *extra]
    opt_kwargs = {"momentum": 0.9} if inner is torch.optim.SGD else {}
    probe = AlphaProbe(inner(params, lr=0.01, **opt_kwargs), **kwargs)
    s = Setup(model, loss_fn, probe, x, y, params)
    # Inner state and leftover gradients through a plain backward...
    probe.zero_grad()
    model(x).pow(2).mean().backward()
    for p in extra:
        p.grad = torch.ones_like(p)
    probe.inner.step()
    # ...and a history, when the model and loss allow a probed step.
    try:
        probe.step(s.closure())
    except ProbeError:
        pass
    return s


def _closure_raising(error: type[BaseException], message: str):
    """A closure that raises the user's own ``error(message)`` after backward."""

    def make(s: Setup):
        def closure():
            s.probe.zero_grad()
            s.loss_fn(s.model(s.x), s.y).backward()
            raise error(message)

        return closure

    return make


def _closure_returning(value: Callable[[torch.Tensor], Any], backward: bool = True):
    def make(s: Setup):
        def closure():
            s.probe.zero_grad()
            loss = s.loss_fn(s.model(s.x), s.y)
            if backward:
                loss.backward()
            return value(loss)

        return closure

    return make


def _closure_no_grad(s: Setup):
    def closure():
        s.probe.zero_grad()
        with torch.no_grad():
            return s.loss_fn(s.model(s.x), s.y)

    return closure


def _closure_functional_loss(s: Setup):
    def closure():
        s.probe.zero_grad()
        loss = nn.functional.cross_entropy(s.model(s.x), s.y)
        loss.backward()
        return loss

    return closure


CLOSURE_CASES = [
    Case(
        "raises",
        _closure_raising(ValueError, "user bug in the closure"),
        ValueError,
        "user bug in the closure",
    ),
    Case(  # worded like BackPACK's missing input: not taken for BackPACK's
        "raises-attribute-error",
        _closure_raising(
            AttributeError, "'CrossEntropyLoss' object has no attribute 'input1'"
        ),
        AttributeError,
        "has no attribute 'input1'",
    ),
    Case(
        "returns-none",
        _closure_returning(lambda loss: None),
        ClosureError,
        "returned None",
    ),
    Case(
        "returns-non-scalar",
        _closure_returning(lambda loss: torch.stack([loss, loss])),
        ClosureError,
        "shape (2,)",
    ),
    Case(
        "returns-float",
        _closure_returning(lambda loss: loss.item()),
        ClosureError,
        "returned a float",
    ),
    Case("returns-no-grad", _closure_no_grad, ClosureError, "does not require grad"),
    Case(
        "no-backward",
        _closure_returning(lambda loss: loss, backward=False),
        ClosureError,
        "did not call backward",
    ),
    Case(
        "functional-loss", _closure_functional_loss, CurvatureError, "backpack.extend"
    ),
    Case("not-callable", lambda s: 42, TypeError, "callable"),
]


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=lambda c: c.id)
def test_bad_closure_changes_nothing(case):
    s = setup()
    assert len(s.probe.history) == 1
    snapshot = Snapshot(s.probe)
    with pytest.raises(case.error) as info:
        s.probe.step(case.make(s))
    text = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert case.match in text
    snapshot.assert_same(s.probe)


@pytest.mark.parametrize(
    "keywords", ["input-and-target", "target", "target-after-a-logged-loss"]
)
@pytest.mark.parametrize("curvature", ["hessian", "kfac", "diag-ggn"])
def test_keyword_loss_call_on_the_backpack_route_is_explained(curvature, keywords):
    """BackPACK records positional inputs only; each of its routes says so (the
    tangent sweep's chain check, a missing input0 or target, nothing propagated).
    Without the target, ignored positions could not be left out. A target that
    BackPACK kept from an earlier forward without backward (a loss logged with
    gradients on) is not taken for this call's."""
    s = setup(curvature=curvature)
    if keywords == "target-after-a-logged-loss":
        s.loss_fn(s.model(s.x), torch.zeros_like(s.y)).item()
    snapshot = Snapshot(s.probe)

    def closure():
        s.probe.zero_grad()
        if keywords != "input-and-target":
            loss = s.loss_fn(s.model(s.x), target=s.y)
        else:
            loss = s.loss_fn(input=s.model(s.x), target=s.y)
        loss.backward()
        return loss

    with pytest.raises(CurvatureError, match="keyword") as info:
        s.probe.step(closure)
    assert "positional" in str(info.value)
    snapshot.assert_same(s.probe)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "diag-ggn", "kfac"])
def test_a_loss_logged_under_backpack_disable_keeps_the_training_loss_inputs(
    curvature,
):
    """BackPACK stores nothing under ``backpack.disable()``: dropping the loss's
    leftover inputs there would lose those of the training loss. The record
    equals that of the same step without the logged loss."""
    from backpack import disable

    records = []
    for log in (False, True):
        s = setup(curvature=curvature)

        def closure(s=s, log=log):
            s.probe.zero_grad()
            out = s.model(s.x)
            loss = s.loss_fn(out, s.y)
            if log:
                with disable():
                    s.loss_fn(out, torch.zeros_like(s.y)).item()
            loss.backward()
            return loss

        s.probe.step(closure)
        records.append(s.probe.history[-1])
    assert records[0].curvatures == records[1].curvatures


@pytest.mark.parametrize(
    "curvature", ["diag-ggn", "diag-ggn-mc", "diag-hessian", "kfac", "kflr", "kfra"]
)
def test_ignored_targets_are_refused_where_backpack_would_count_them(curvature):
    """BackPACK's cross-entropy Hessian counts positions whose target is
    ignore_index (diag-ggn was 2 % off on a small MLP); its curvatures refuse
    them, and the tangent sweep (which weighs them) is what the message offers."""
    y = torch.tensor([0, 1, -100, 1, 0, -100])
    s = setup(y=y, curvature=curvature)
    snapshot = Snapshot(s.probe)
    with pytest.raises(CurvatureError, match=r"ignore_index \(-100\).*'hessian'"):
        s.probe.step(s.closure())
    snapshot.assert_same(s.probe)


def _embedding_features(sparse: bool) -> dict[str, Any]:
    """A sparse embedding outside the extended model feeds an extended Linear."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 3, sparse=sparse)
    head = extend(nn.Sequential(nn.Linear(3, 2)))
    return {
        "model": nn.Sequential(emb, head),
        "extend_model": False,
        "x": torch.tensor([0, 1, 2, 3, 4, 1]),
        "inner": torch.optim.SGD,  # Adam refuses sparse gradients itself
    }


def _meta() -> list[torch.Tensor]:
    return [nn.Parameter(torch.zeros(2, device="meta"))]


SETUP_CASES = [
    Case(
        "model-not-extended",
        lambda: {"extend_model": False},
        CurvatureError,
        "backpack.extend(model)",
    ),
    Case(
        "loss-not-extended",
        lambda: {"loss_fn": nn.CrossEntropyLoss()},
        CurvatureError,
        "backpack.extend(torch.nn.CrossEntropyLoss())",
    ),
    Case(
        "gelu",
        lambda: {"model": _net(nn.GELU())},
        CurvatureError,
        "cannot handle module GELU",
    ),
    Case(
        "layernorm",
        lambda: {"model": _net(nn.LayerNorm(4))},
        CurvatureError,
        "cannot handle module LayerNorm",
    ),
    Case(
        "ggn-layernorm",
        lambda: {"model": _net(nn.LayerNorm(4)), "curvature": "ggn"},
        CurvatureError,
        "Curvature 'ggn'",
    ),
    Case(
        "unsupported-lists-supported",
        lambda: {"model": _net(nn.GELU())},
        CurvatureError,
        "Supported modules: ",
    ),
    Case(
        # BackPACK's loss Hessian refuses class weights (the sweep's own, behind
        # the default curvature, weighs them): it raises lazily, in backward.
        "ce-class-weights",
        lambda: {
            "loss_fn": extend(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))),
            "curvature": "diag-ggn",
        },
        CurvatureError,
        "without class weights",
    ),
    Case(
        "ce-class-weights-apply",
        lambda: {
            "loss_fn": extend(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0]))),
            "curvature": "kflr",
            "mode": "apply",
        },
        CurvatureError,
        "without class weights",
    ),
    Case("mixed-devices", lambda: {"extra": _meta()}, ProbeError, "several devices"),
    Case(
        "sparse-embedding-in-model",
        lambda: {
            "model": nn.Sequential(nn.Embedding(5, 2, sparse=True)),
            "x": torch.tensor([0, 1, 2, 3, 4, 1]),
            "inner": torch.optim.SGD,
        },
        CurvatureError,
        "cannot handle module Embedding",
    ),
    Case(
        "sparse-gradient",
        lambda: _embedding_features(True),
        ProbeError,
        "sparse gradient",
    ),
]


@pytest.mark.parametrize("case", SETUP_CASES, ids=lambda c: c.id)
def test_bad_setup_changes_nothing(case):
    s = setup(**case.make())
    snapshot = Snapshot(s.probe)
    with pytest.raises(case.error) as info:
        s.probe.step(s.closure())
    assert case.match in str(info.value)
    snapshot.assert_same(s.probe)


def test_unsupported_module_message_lists_the_supported_ones():
    s = setup(model=_net(nn.GELU()))
    with pytest.raises(CurvatureError) as info:
        s.probe.step(s.closure())
    supported = str(info.value).split("Supported modules: ")[1]
    for name in ("Linear", "ReLU", "Sigmoid", "Tanh", "CrossEntropyLoss", "MSELoss"):
        assert name in supported


def test_mixed_dtypes_are_supported_with_promotion():
    """Parameters of different float dtypes in one optimizer are fine.

    BackPACK needs one dtype along the model's chain, so a mix arises from
    parameters the loss does not reach (another head, a frozen table). The step's
    scalars accumulate in the promoted dtype, and the numbers are those of the
    same probe without the extra parameter.
    """

    def build(extra: list[torch.Tensor]) -> AlphaProbe:
        torch.manual_seed(0)
        model = extend(_net(nn.Tanh()).double())
        loss_fn = extend(nn.MSELoss())
        x = torch.randn(6, 3, dtype=torch.float64)
        t = torch.randn(6, 2, dtype=torch.float64)
        probe = AlphaProbe(torch.optim.Adam([*model.parameters(), *extra], lr=0.1))

        def closure():
            probe.zero_grad()
            loss = loss_fn(model(x), t)
            loss.backward()
            return loss

        for _ in range(2):
            probe.step(closure)
        return probe

    extra = [nn.Parameter(torch.ones(3, dtype=torch.float32))]
    mixed, reference = build(extra), build([])
    assert mixed._accumulate_dtype(mixed._params()) == torch.float64
    # Equal up to summation order (dᵀg of one dtype is packed, of two per block).
    got, want = mixed.history.to_dicts(), reference.history.to_dicts()
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for r, e in zip(got, want):
        for key, value in e.items():
            if isinstance(value, float):
                assert r[key] == pytest.approx(value, rel=1e-12, nan_ok=True), key
            else:
                assert r[key] == value, key
    assert mixed.history[-1].status == "ok"
    assert same_bits(extra[0].detach(), torch.ones(3))
    assert "dtype" in AlphaProbe.__doc__


@pytest.mark.parametrize("interval", [1, 2])
def test_mixed_maximize_groups_are_refused(interval):
    """Probed steps refuse groups that disagree on ``maximize``; steps between
    probes are the inner optimizer's own and are not checked (they cost what it
    costs)."""
    torch.manual_seed(0)
    model = extend(_net())
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters()},
            {"params": model[1].parameters(), "maximize": True},
        ],
        lr=0.1,
    )
    probe = AlphaProbe(opt, interval=interval)
    if interval > 1:
        probe._step_count = 1  # a step between probes comes first
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    loss_fn = extend(nn.CrossEntropyLoss())

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    if interval > 1:
        theta0 = [p.detach().clone() for p in model.parameters()]
        probe.step(closure)  # between probes: the inner SGD step
        assert not any(torch.equal(p, t) for p, t in zip(model.parameters(), theta0))
        assert probe.step_count == 2 and len(probe.history) == 0
    snapshot = Snapshot(probe)
    with pytest.raises(ProbeError, match="maximize"):
        probe.step(closure)
    snapshot.assert_same(probe)


def test_step_without_closure_or_capture_shows_both_ways():
    s = setup()
    snapshot = Snapshot(s.probe)
    with pytest.raises(ClosureError) as info:
        s.probe.step()
    assert "probe.step(closure)" in str(info.value)
    assert "probe.capture()" in str(info.value)
    snapshot.assert_same(s.probe)


# ---------------------------------------------------------------- state dict
def _probe_sd(opt_cls=torch.optim.Adam, n_layers: int = 2, **kw: Any) -> dict:
    s = setup(
        model=nn.Sequential(*[nn.Linear(3, 3) for _ in range(n_layers)]),
        loss_fn=extend(nn.MSELoss()),
        y=torch.randn(6, 3),
    )
    if opt_cls is not torch.optim.Adam:
        probe = AlphaProbe(opt_cls(s.model.parameters(), lr=0.1, **kw))
        s.probe = probe
        s.probe.step(s.closure())
    return s.probe.state_dict()


def _corrupt(**changes: Any) -> Callable[[], dict]:
    def make() -> dict:
        sd = _probe_sd()
        section = dict(sd["alphawrap"])
        for key, value in changes.items():
            if value is _DELETE:
                del section[key]
            else:
                section[key] = value
        sd["alphawrap"] = section
        return sd

    return make


_DELETE = object()


def _whole_section(value: Any) -> Callable[[], dict]:
    def make() -> dict:
        sd = _probe_sd()
        sd["alphawrap"] = value
        return sd

    return make


LOAD_CASES = [
    Case(
        "probe-around-sgd",
        lambda: _probe_sd(torch.optim.SGD, momentum=0.9),
        ValueError,
        "around SGD",
    ),
    Case(
        "plain-sgd",
        lambda: {
            k: v
            for k, v in _probe_sd(torch.optim.SGD, momentum=0.9).items()
            if k != "alphawrap"
        },
        ValueError,
        "another optimizer class",
    ),
    Case(
        "more-parameters", lambda: _probe_sd(n_layers=3), ValueError, "parameter group"
    ),
    Case(
        "fewer-parameters", lambda: _probe_sd(n_layers=1), ValueError, "parameter group"
    ),
    Case("not-a-dict", lambda: [1, 2], ValueError, "Not an optimizer state dict"),
    Case(
        "no-state-key",
        lambda: {"param_groups": []},
        ValueError,
        "Not an optimizer state dict",
    ),
    Case("section-string", _whole_section("garbage"), ValueError, "corrupted"),
    Case("section-list", _whole_section([1, 2]), ValueError, "corrupted"),
    Case("section-empty", _whole_section({}), ValueError, "corrupted"),
    Case("no-history", _corrupt(history=_DELETE), ValueError, "corrupted"),
    Case("history-not-dict", _corrupt(history=[1]), ValueError, "corrupted"),
    Case(
        "bad-record",
        _corrupt(history={"records": [{"step": 0}], "maxlen": None}),
        ValueError,
        "corrupted",
    ),
    Case("bad-format", _corrupt(format=99), ValueError, "corrupted"),
    Case("bad-step", _corrupt(step="many"), ValueError, "corrupted"),
    Case("bad-mode", _corrupt(mode="train"), ValueError, "mode"),
    Case("bad-curvature", _corrupt(curvature=5), ValueError, "corrupted"),
    Case(
        "bad-maxlen",
        _corrupt(history={"records": [], "maxlen": -3}),
        ValueError,
        "corrupted",
    ),
]


def _target() -> Setup:
    return setup(
        model=nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)),
        loss_fn=extend(nn.MSELoss()),
        y=torch.randn(6, 3),
    )


@pytest.mark.parametrize("case", LOAD_CASES, ids=lambda c: c.id)
def test_bad_state_dict_changes_nothing(case):
    s = _target()
    state_dict = case.make()
    snapshot = Snapshot(s.probe)
    before = s.probe.state_dict()
    with pytest.raises(case.error, match=_re(case.match)):
        s.probe.load_state_dict(state_dict)
    snapshot.assert_same(s.probe)
    assert same_bits(s.probe.state_dict(), before)


def test_plain_inner_state_dict_loads_with_a_warning():
    s = _target()
    inner_sd = {k: v for k, v in _probe_sd().items() if k != "alphawrap"}
    with pytest.warns(UserWarning, match="plain optimizer state dict"):
        s.probe.load_state_dict(inner_sd)
    assert same_bits(s.probe.inner.state_dict(), inner_sd)
    assert len(s.probe.history) == 0 and s.probe.step_count == 0
    s.probe.step(s.closure())  # and it keeps training
    assert len(s.probe.history) == 1


def test_adam_state_dict_loads_into_adamw():
    """Optimizers with the same hyperparameters are compatible (no false alarm)."""
    s = _target()
    inner_sd = {k: v for k, v in _probe_sd().items() if k != "alphawrap"}
    model = s.model
    probe = AlphaProbe(torch.optim.AdamW(model.parameters()))
    with pytest.warns(UserWarning, match="plain optimizer state dict"):
        probe.load_state_dict(inner_sd)
