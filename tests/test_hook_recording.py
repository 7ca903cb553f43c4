"""model= and loss_fn= let the sweep record with plain hooks: no extend needed."""

import pytest
import torch
from torch import nn

from alphawrap import AlphaProbe, CurvatureError
from alphawrap.curvature import exact
from alphawrap.reference import (
    block_hessian_quadratics,
    full_ggn_quadratic,
    full_hessian_quadratic,
    recursive_block_quadratics,
)
from tests._state import hook_counts

RESIDUAL = {"hessian": "keep", "ggn": "drop", "pch-clip": "clip", "pch-abs": "abs"}
_CLASS_WEIGHTS = torch.tensor([0.5, 2.0, 1.25], dtype=torch.float64)


def _plain_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    return model, nn.CrossEntropyLoss(), x, y


def _positional(loss_fn, output, y):
    return loss_fn(output, y)


def _step(probe, model, loss_fn, x, y, call=_positional):
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def closure():
        probe.zero_grad()
        loss = call(loss_fn, model(x), y)
        loss.backward()
        return loss

    probe.step(closure)
    directions = {n: p.detach() - theta0[n] for n, p in model.named_parameters()}
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta0[n])
    return directions, current


def _assert_exact_match_dense(record, model, loss_fn, x, y, directions, names):
    """The record's exact curvatures ``names`` equal the dense ones along d."""
    dense = {"ggn-exact": full_ggn_quadratic, "hessian-exact": full_hessian_quadratic}
    for name in names:
        assert record.curvatures[name] == pytest.approx(
            dense[name](model, loss_fn, x, y, directions).item(), rel=1e-9
        ), name


def _assert_ggn_exact_is_exact(model, loss_fn, x, y, optimizer):
    """One probed step with ``ggn-exact``; it equals the dense GGN along d."""
    probe = AlphaProbe(
        optimizer(model.parameters(), lr=0.1),
        curvature="ggn-exact",
        model=model,
        loss_fn=loss_fn,
    )
    directions, _ = _step(probe, model, loss_fn, x, y)
    _assert_exact_match_dense(
        probe.history[-1], model, loss_fn, x, y, directions, ["ggn-exact"]
    )


def test_block_curvatures_without_extend_match_reference():
    model, loss_fn, x, y = _plain_problem()
    names = list(RESIDUAL)
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        curvature=[*names, "ggn-exact"],
        model=model,
        loss_fn=loss_fn,
    )
    for _ in range(3):
        directions, current = _step(probe, model, loss_fn, x, y)
        rec = probe.history[-1]
        for name in names:
            ref = recursive_block_quadratics(
                model, loss_fn, x, y, directions, RESIDUAL[name]
            )
            assert rec.curvatures[name] == pytest.approx(
                sum(ref.values()).item(), rel=1e-9
            )
        assert rec.curvatures["ggn-exact"] == pytest.approx(
            full_ggn_quadratic(model, loss_fn, x, y, directions).item(), rel=1e-9
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(current[n])


def test_no_hooks_remain_between_steps():
    model, loss_fn, x, y = _plain_problem()
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters()), model=model, loss_fn=loss_fn
    )
    _step(probe, model, loss_fn, x, y)
    for module in [*model.modules(), loss_fn]:
        assert not module._forward_hooks and not module._forward_pre_hooks
    # the recorder's hooks are global ones, installed for the probed closure only
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


@pytest.mark.parametrize(
    "curvature,with_delta",
    [
        ("hessian", {"Tanh", "CrossEntropyLoss"}),
        ("ggn-exact", {"Tanh", "CrossEntropyLoss"}),
        ("hessian-exact", {"Linear", "Tanh", "CrossEntropyLoss"}),
    ],
)
def test_output_gradients_recorded_only_where_the_sweep_reads_them(
    curvature, with_delta
):
    """δ hooks cost a Python call per module in backward: only the loss, modules
    with a second derivative, and (exact Hessian) the bilinear layers get one,
    and none where no tangent arrives (the first layer: its input depends on no
    parameter)."""
    model, loss_fn, x, y = _plain_problem()
    model = nn.Sequential(*model, nn.ReLU(), nn.Linear(3, 3)).double()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature=curvature,
        model=model,
        loss_fn=loss_fn,
    )
    recorded = {}
    first = probe._curvatures[0]
    engine = getattr(first, "engine", None) or first.sweep
    original = engine._sweep

    def spy(ctx, loss, layers):
        assert layers[0].g_out[0] is None  # the first layer
        for t in [*layers[1:], loss]:
            recorded.setdefault(type(t.module).__name__, set()).add(
                t.g_out[0] is not None
            )
        return original(ctx, loss, layers)

    engine._sweep = spy
    directions, _ = _step(probe, model, loss_fn, x, y)
    assert {k for k, v in recorded.items() if True in v} == with_delta
    assert all(len(v) == 1 for v in recorded.values())
    reference = {
        "hessian": lambda: sum(
            recursive_block_quadratics(
                model, loss_fn, x, y, directions, "keep"
            ).values()
        ),
        "ggn-exact": lambda: full_ggn_quadratic(model, loss_fn, x, y, directions),
        "hessian-exact": lambda: full_hessian_quadratic(
            model, loss_fn, x, y, directions
        ),
    }[curvature]().item()
    assert probe.history[-1].curvatures[curvature] == pytest.approx(reference, rel=1e-9)


def _no_replay(*args, **kwargs):
    raise AssertionError("replayed the model")


def test_exact_curvatures_reuse_the_stored_forward(monkeypatch):
    """On a chain of supported modules the exact curvatures come from the sweep:
    the model-replay path is never entered."""
    model, loss_fn, x, y = _plain_problem()
    monkeypatch.setattr(exact, "_pass", _no_replay)
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters()),
        curvature=("ggn-exact", "hessian-exact"),
        model=model,
        loss_fn=loss_fn,
    )
    _step(probe, model, loss_fn, x, y)
    assert probe.history[-1].status == "ok" or probe.history[-1].alpha is None


def _metric_then_keywords(loss_fn, output, y):
    """A metric without gradients (positional, on an edited copy) first: what the
    hooks saw of that call must not count for the keyword call after it."""
    with torch.no_grad():
        loss_fn(output.clone().clamp_(-10.0, 10.0), y)
    return loss_fn(input=output, target=y)


KEYWORD_CALLS = {
    "keywords": lambda loss_fn, output, y: loss_fn(input=output, target=y),
    "keyword-target": lambda loss_fn, output, y: loss_fn(output, target=y),
    "no-grad-metric-then-keywords": _metric_then_keywords,
}


@pytest.mark.parametrize("call", KEYWORD_CALLS.values(), ids=KEYWORD_CALLS)
def test_loss_called_with_keywords_is_swept(call, monkeypatch):
    """Keyword arguments are put in place: the sweep serves every curvature (no
    replay) and matches the references, with the target it needs for an ignored
    position (without the target the loss Hessian would count that row)."""
    model, loss_fn, x, y = _plain_problem()
    y[0] = loss_fn.ignore_index
    monkeypatch.setattr(exact, "_pass", _no_replay)
    names = list(RESIDUAL)
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature=[*names, "ggn-exact", "hessian-exact"],
        model=model,
        loss_fn=loss_fn,
    )
    directions, _ = _step(probe, model, loss_fn, x, y, call)
    rec = probe.history[-1]
    for name in names:
        ref = recursive_block_quadratics(
            model, loss_fn, x, y, directions, RESIDUAL[name]
        )
        assert rec.curvatures[name] == pytest.approx(sum(ref.values()).item(), rel=1e-9)
    _assert_exact_match_dense(
        rec, model, loss_fn, x, y, directions, ["ggn-exact", "hessian-exact"]
    )


def test_in_place_change_before_a_keyword_loss_call_is_detected():
    """With no positional input the version is read after the call: an in-place
    change of the model's output before it still breaks the chain."""
    model, loss_fn, x, y = _plain_problem()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )

    def scaled(loss_fn, output, y):
        return loss_fn(input=output.mul_(2.0), target=y)

    with pytest.raises(CurvatureError, match="in place"):
        _step(probe, model, loss_fn, x, y, scaled)
    assert len(probe.history) == 0


def test_unsupported_module_names_it_and_the_alternatives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(CurvatureError, match=r"GELU.*ggn-exact"):
        _step(probe, model, loss_fn, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(probe.history) == 0


def test_module_used_twice_is_refused():
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    loss_fn = nn.MSELoss()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )
    with pytest.raises(CurvatureError, match="more than once"):
        _step(probe, model, loss_fn, torch.randn(4, 3), torch.randn(4, 3))


class _WithCriterion(nn.Module):
    """A model that owns a loss module of the loss's type (never in forward)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.crit = nn.MSELoss()

    def forward(self, x):
        return self.lin(x)


def _criterion_of_the_loss(curvature, outside: bool):
    """The closure applies the model's own criterion to loss_fn's value; with
    ``outside``, loss_fn holds a parameter that is not one of model='s."""
    torch.manual_seed(0)
    model, loss_fn = _WithCriterion().double(), nn.MSELoss()
    extra = []
    if outside:
        loss_fn.weight = nn.Parameter(torch.ones(4, dtype=torch.float64))
        extra = [loss_fn.weight]
    probe = AlphaProbe(
        torch.optim.SGD([*model.parameters(), *extra], lr=0.1),
        curvature,
        model=model,
        loss_fn=loss_fn,
    )
    x, y = (
        torch.randn(5, 3, dtype=torch.float64),
        torch.randn(5, 4, dtype=torch.float64),
    )
    zero = torch.zeros((), dtype=torch.float64)

    def closure():
        probe.zero_grad()
        loss = model.crit(loss_fn(model(x), y), zero)
        if outside:
            loss = loss + (loss_fn.weight**2).sum()
        loss.backward()
        return loss

    return probe, closure


def test_a_second_loss_module_in_the_closure_is_refused_by_blocks():
    """The criterion would sit among the swept layers (it has no Jacobian rule)."""
    probe, closure = _criterion_of_the_loss("hessian", outside=False)
    before = [p.detach().clone() for p in probe._params()]
    with pytest.raises(CurvatureError, match=r"second loss module \(MSELoss\)"):
        probe.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, probe._params()))


def test_a_criterion_of_the_model_as_the_only_loss_is_swept():
    """The last loss may be a loss module of model= (not loss_fn=): the blocks
    sweep the loss the closure computed."""
    torch.manual_seed(0)
    model, loss_fn = _WithCriterion().double(), nn.MSELoss()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64)
    directions, _ = _step(probe, model, model.crit, x, y)
    blocks = block_hessian_quadratics(model, model.crit, x, y, directions)
    expected = sum(q.item() for q in blocks.values())
    assert probe.history[-1].curvatures["hessian"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("curvature", ["ggn-exact", "hessian-exact"])
def test_a_parameter_of_a_loss_inside_the_chain_is_outside_the_model(curvature):
    """With loss_fn among the recorded layers its parameters would pass for
    model='s; the chain refuses, and the exact curvatures' check walks model=."""
    probe, closure = _criterion_of_the_loss(curvature, outside=True)
    with pytest.warns(UserWarning, match="not the value loss_fn returned"):
        with pytest.raises(CurvatureError, match="not parameters of that model"):
            probe.step(closure)


def test_loss_subclass_falls_back_to_the_replay():
    """A subclass of a loss module may compute something else: the sweep does not
    claim it (exact class match, like BackPACK); the exact curvature replays."""

    class LabelSmoothed(nn.CrossEntropyLoss):
        def __init__(self):
            super().__init__(label_smoothing=0.1)

    model, _, x, y = _plain_problem()
    _assert_ggn_exact_is_exact(model, LabelSmoothed(), x, y, torch.optim.Adam)


def test_apply_mode_with_a_block_curvature_warns():
    model, _loss_fn, _, _ = _plain_problem()
    with pytest.warns(UserWarning, match="ggn-exact"):
        AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), mode="apply")
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match="ggn-exact"):
        probe.mode = "apply"


def _bn_problem():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)
    ).double()
    return (
        model,
        nn.MSELoss(),
        torch.randn(6, 3, dtype=torch.float64),
        torch.randn(6, 2, dtype=torch.float64),
    )


@pytest.mark.parametrize("order", [("hessian-exact",), ("hessian", "hessian-exact")])
def test_exact_hessian_does_not_depend_on_what_else_is_requested(order):
    """A block curvature must not make the sweep serve hessian-exact on a module
    that is not bilinear (train-mode BatchNorm): it must fall back to the replay."""
    from alphawrap.reference import full_hessian_quadratic

    model, loss_fn, x, y = _bn_problem()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature=order,
        model=model,
        loss_fn=loss_fn,
    )
    directions, _ = _step(probe, model, loss_fn, x, y)
    model.train()
    assert probe.history[-1].curvatures["hessian-exact"] == pytest.approx(
        full_hessian_quadratic(model, loss_fn, x, y, directions).item(), rel=1e-8
    )


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        h.mul_(3.0)  # invisible to the recorded forward
        return self.b(h)


def test_in_place_change_between_modules_is_detected():
    torch.manual_seed(0)
    model, loss_fn = _InPlace(), nn.MSELoss()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )
    with pytest.raises(CurvatureError, match="in place"):
        _step(probe, model, loss_fn, torch.randn(5, 3), torch.randn(5, 2))


def test_probed_step_runs_the_closure_with_grad_enabled():
    model, loss_fn, x, y = _plain_problem()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        probe.step(closure)
    assert len(probe.history) == 1


def test_block_names_survive_deepcopy():
    import copy

    model, loss_fn, x, y = _plain_problem()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model=model,
        loss_fn=loss_fn,
        per_block=True,
    )
    twin = copy.deepcopy(probe)
    twin_model, twin_loss = twin._model, twin.loss_fn  # deepcopy copied both

    def closure():
        twin.zero_grad()
        loss = twin_loss(twin_model(x), y)
        loss.backward()
        return loss

    twin.step(closure)
    assert set(twin.history[-1].extra["blocks"]) == {
        n for n, _ in model.named_parameters()
    }


def test_reparametrised_weight_is_refused_by_blocks_and_replayed_by_exact():
    """torch.nn.utils.prune trains ``weight_orig`` and computes ``weight`` from it
    in a pre-hook: the sweep, which follows ``module.weight``, would give that
    block no curvature. Block curvatures refuse (nothing changed); the exact ones
    replay the model and match the dense reference."""
    prune = pytest.importorskip("torch.nn.utils.prune")
    model, loss_fn, x, y = _plain_problem()
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    blocks = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CurvatureError, match=r"0\.weight_orig.*ggn-exact"):
        _step(blocks, model, loss_fn, x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert len(blocks.history) == 0
    exact = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature=["ggn-exact", "hessian-exact"],
        model=model,
        loss_fn=loss_fn,
    )
    directions, _ = _step(exact, model, loss_fn, x, y)
    _assert_exact_match_dense(
        exact.history[-1], model, loss_fn, x, y, directions, exact.curvatures
    )


def test_user_pre_hook_editing_the_input_in_place_is_detected():
    """A module pre-hook that scales its input in place runs after the recorder's
    global pre-hook: the recorded chain no longer describes the model, so the
    block curvatures refuse and the exact ones replay (and stay exact)."""
    model, loss_fn, x, y = _plain_problem()

    def scale_input(module, inputs):
        inputs[0].mul_(2)

    model[1].register_forward_pre_hook(scale_input)
    blocks = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )
    with pytest.raises(CurvatureError, match="in place"):
        _step(blocks, model, loss_fn, x, y)
    _assert_ggn_exact_is_exact(model, loss_fn, x, y, torch.optim.SGD)


def test_unbatched_convolution_input_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(0), nn.Linear(4 * 4 * 5, 2)
    )
    x, y, loss_fn = torch.randn(1, 4, 5), torch.randn(2), nn.MSELoss()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), model=model, loss_fn=loss_fn
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CurvatureError, match="batch dimension"):
        _step(probe, model, loss_fn, x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("route", ["closure", "capture"])
def test_no_hooks_remain_when_entering_the_recording_fails(
    monkeypatch, route, interval
):
    """A failure while the recording is entered undoes what was entered. Only the
    backward monitor's hooks stay, and only while every step is probed (they
    record nothing outside a step); between probes none stays."""
    from alphawrap import batch

    model, loss_fn, x, y = _plain_problem()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature=["hessian", "ggn-exact"],
        model=model,
        loss_fn=loss_fn,
        interval=interval,
    )

    def broken(self):
        raise RuntimeError("cannot record")

    monkeypatch.setattr(batch.BatchRecorder, "__enter__", broken)
    with pytest.raises(RuntimeError, match="cannot record"):
        if route == "closure":
            _step(probe, model, loss_fn, x, y)
        else:
            with probe.capture():
                pass
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks
    kept = 1 if interval == 1 else 0
    hooks = hook_counts(model.parameters())
    assert hooks == [kept] * len(hooks)
    assert probe._monitor is None or not probe._monitor.active


@pytest.mark.parametrize("exact_only", [False, True], ids=["with-blocks", "exact-only"])
def test_cross_entropy_class_weights_on_image_outputs(exact_only):
    """Per-pixel cross-entropy ([N, C, H, W] logits) with class weights, ignored
    pixels and label smoothing, through the block sweep and through the
    one-slot path of the exact curvatures alone, against dense references."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)
    ).double()
    loss_fn = nn.CrossEntropyLoss(weight=_CLASS_WEIGHTS, label_smoothing=0.1)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 3, 3))
    y[0, 1, :2] = -100
    curvatures = ["ggn-exact", "hessian-exact"]
    if not exact_only:
        curvatures = ["hessian", *curvatures]
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        curvature=curvatures,
        model=model,
        loss_fn=loss_fn,
    )
    directions, _ = _step(probe, model, loss_fn, x, y)
    record = probe.history[-1]
    exact = ["ggn-exact", "hessian-exact"]
    _assert_exact_match_dense(record, model, loss_fn, x, y, directions, exact)
    if not exact_only:
        blocks = recursive_block_quadratics(model, loss_fn, x, y, directions, "keep")
        assert record.curvatures["hessian"] == pytest.approx(
            sum(blocks.values()).item(), rel=1e-9
        )


def test_hook_recorder_entered_twice_leaves_no_hooks():
    from alphawrap.curvature.sweep import HookRecorder

    model, loss_fn, _, _ = _plain_problem()
    recorder = HookRecorder(model, loss_fn)
    recorder.__enter__()
    recorder.__enter__()
    recorder.__exit__()
    assert not torch.nn.modules.module._global_forward_hooks
    assert not torch.nn.modules.module._global_forward_pre_hooks


@pytest.mark.parametrize(
    "loss_fn,targets",
    [
        (nn.CrossEntropyLoss(), "ignored"),
        (nn.CrossEntropyLoss(label_smoothing=0.2), "ignored"),
        (nn.CrossEntropyLoss(ignore_index=1, reduction="sum"), "classes"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "probabilities"),
        (nn.CrossEntropyLoss(weight=_CLASS_WEIGHTS), "classes"),
        (nn.CrossEntropyLoss(weight=_CLASS_WEIGHTS, label_smoothing=0.2), "ignored"),
        (nn.CrossEntropyLoss(weight=_CLASS_WEIGHTS, reduction="sum"), "ignored"),
        (
            nn.CrossEntropyLoss(weight=_CLASS_WEIGHTS, label_smoothing=0.1),
            "probabilities",
        ),
    ],
    ids=[
        "ignore-index",
        "ignore-index-smoothed",
        "custom-ignore-sum",
        "soft-targets",
        "class-weights",
        "class-weights-ignored-smoothed",
        "class-weights-ignored-sum",
        "class-weights-soft-targets",
    ],
)
def test_cross_entropy_targets_the_loss_hessian_must_weigh(loss_fn, targets):
    """Ignored targets contribute nothing (and the mean divides by the others);
    class probabilities weigh a sample by their sum; class weights weigh it by
    its target's weight (and the mean divides by their sum). BackPACK's loss
    Hessian assumes none of these (and refuses class weights); the sweep's own
    matches the dense reference."""
    model, _, x, y = _plain_problem()
    if targets == "ignored":
        y[[1, 4]] = -100
    elif targets == "probabilities":
        y = 2 * torch.softmax(torch.randn(6, 3, dtype=torch.float64), dim=1)
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        curvature=["hessian", "ggn-exact"],
        model=model,
        loss_fn=loss_fn,
    )
    directions, _ = _step(probe, model, loss_fn, x, y)
    record = probe.history[-1]
    blocks = recursive_block_quadratics(model, loss_fn, x, y, directions, "keep")
    assert record.curvatures["hessian"] == pytest.approx(
        sum(blocks.values()).item(), rel=1e-9
    )
    _assert_exact_match_dense(record, model, loss_fn, x, y, directions, ["ggn-exact"])


def _probe_through(module, call, passed, loss_fn, x, y, names, **sgd):
    """A probe of ``module``'s parameters (``model=passed``) and a closure that
    runs the model through ``call`` (the module or a compiled wrapper)."""
    probe = AlphaProbe(
        torch.optim.SGD(module.parameters(), lr=0.1, **sgd),
        curvature=names,
        model=passed,
        loss_fn=loss_fn,
    )

    def closure():
        probe.zero_grad()
        loss = loss_fn(call(x), y)
        loss.backward()
        return loss

    return probe, closure


@pytest.mark.parametrize("given", ["module", "compiled"])
def test_compiled_model_gives_the_same_numbers(given):
    """With ``torch.compile`` the recording hooks also fire for the compiled
    wrapper (torch warns about it, once per process with the default filters);
    they record only the model's own modules, so the numbers equal the
    uncompiled run. ``model=`` may be the module or its compiled wrapper."""
    import copy

    model, loss_fn, x, y = _plain_problem()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="eager")
    names = ["hessian", "ggn-exact", "hessian-exact"]
    records = []
    runs = (
        (model, model, model),
        (twin, compiled, twin if given == "module" else compiled),
    )
    for module, call, passed in runs:
        probe, closure = _probe_through(
            module, call, passed, loss_fn, x, y, names, momentum=0.9
        )
        for _ in range(2):
            probe.step(closure)
        records.append(probe.history[-1])
    plain, compiled_record = records
    for name in names:
        assert compiled_record.curvatures[name] == pytest.approx(
            plain.curvatures[name], rel=1e-9
        )


def test_functionalized_compile_with_an_in_place_activation_matches_eager():
    """Under a functionalizing ``torch.compile`` backend (``aot_eager``, like
    inductor) the recording hooks are not traced. Traced, they read the tensors'
    versions at trace time and refused the in-place ReLU on the first step."""
    import copy

    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Linear(4, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    names = ["hessian", "hessian-exact"]
    histories = []
    torch.compiler.reset()  # what earlier tests compiled decides nothing here
    for compiled in (False, True):
        model = copy.deepcopy(base)
        call = torch.compile(model, backend="aot_eager") if compiled else model
        probe, closure = _probe_through(model, call, model, loss_fn, x, y, names)
        for _ in range(3):
            probe.step(closure)
        histories.append(probe.history)
    for eager, compiled in zip(*histories):
        for name in names:
            assert compiled.curvatures[name] == pytest.approx(
                eager.curvatures[name], rel=1e-12
            )


class _DetachedInside(nn.Module):
    """A chain of modules with a ``.detach()`` after the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.t = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.t(self.c(self.a(x).detach())))


def test_a_detached_input_between_modules_is_not_swept():
    """With ``.detach()`` between two modules (and the first layer still reached
    through another term of the closure's loss) no gradient flows back through the
    stored forward: the block curvatures refuse with a clear error and change
    nothing; the exact ones replay the model, which respects the detach, and match
    the dense Hessian of ``loss_fn(model(x))``."""
    torch.manual_seed(0)
    model = _DetachedInside().double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))

    def make(curvature):
        return AlphaProbe(
            torch.optim.SGD(model.parameters(), lr=0.1),
            curvature=curvature,
            model=model,
            loss_fn=loss_fn,
        )

    def closure_of(probe):
        def closure():
            probe.zero_grad()
            loss = loss_fn(model(x), y) + 0.1 * model.a.weight.pow(2).sum()
            loss.backward()
            return loss

        return closure

    probe = make(["hessian", "hessian-exact"])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CurvatureError, match="detached"):
        probe.step(closure_of(probe))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len(probe.history) == 0
    probe = make("hessian-exact")
    with pytest.warns(UserWarning, match="not the value loss_fn returned"):
        probe.step(closure_of(probe))
    directions = {
        n: p.detach() - b for (n, p), b in zip(model.named_parameters(), before)
    }
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    _assert_exact_match_dense(
        probe.history[-1], model, loss_fn, x, y, directions, ["hessian-exact"]
    )


class _FrozenBackbone(nn.Module):
    """Linear probing: a backbone cut off from the head with ``.detach()``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).detach())


def test_a_backbone_detached_from_its_head_is_swept(monkeypatch):
    """A ``.detach()`` before which no parameter is reached (a frozen backbone
    whose parameters still require grad) is harmless: no tangent crosses it. The
    block Hessian is swept and equals the dense block quadratics of the head."""
    torch.manual_seed(0)
    model = _FrozenBackbone().double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature=["hessian", "hessian-exact"],
        model=model,
        loss_fn=loss_fn,
    )
    monkeypatch.setattr(exact, "_pass", _no_replay)  # the sweep serves both
    directions, _ = _step(probe, model, loss_fn, x, y)
    record = probe.history[-1]
    blocks = sum(
        full_hessian_quadratic(model, loss_fn, x, y, {n: d})
        for n, d in directions.items()
        if n.startswith("head.")
    )
    assert record.curvatures["hessian"] == pytest.approx(blocks.item(), rel=1e-9)
    _assert_exact_match_dense(
        record, model, loss_fn, x, y, directions, ["hessian-exact"]
    )
