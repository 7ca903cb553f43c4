"""Exact GGN and Hessian along d against dense brute force (float64), any model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from backpack import extend
from torch import nn

from alphawrap import AlphaProbe, CurvatureError
from alphawrap.batch import RecordedBatch
from alphawrap.curvature.exact import ExactGGN, ExactHessian
from alphawrap.reference import full_ggn_quadratic, full_hessian_quadratic
from tests.cases import CONV_IDS, CONV_PROBLEMS, PROBLEM_IDS, PROBLEMS
from tests.curvature_helpers import (
    FREE_IDS,
    FREE_PROBLEMS,
    ResidualMLP,
    backend_values,
    gradient_at,
    parameters_at,
    probe_run,
    reference_pair,
)

EXACT = ("ggn-exact", "hessian-exact")
RTOL = 1e-8


def _references(model, loss, x, y, theta0, directions):
    with parameters_at(model, theta0):
        ggn = full_ggn_quadratic(model, loss, x, y, directions).item()
        hess = full_hessian_quadratic(model, loss, x, y, directions).item()
    return {"ggn-exact": ggn, "hessian-exact": hess}


def _assert_record_matches(record, references, slope):
    assert record.slope == pytest.approx(slope, rel=RTOL, abs=1e-14)
    for name, ref in references.items():
        assert record.curvatures[name] == pytest.approx(ref, rel=RTOL, abs=1e-14)
        if record.statuses[name] == "ok":
            assert record.alphas[name] == pytest.approx(-slope / ref, rel=1e-7)


@pytest.mark.parametrize(
    "problem", PROBLEMS + CONV_PROBLEMS, ids=PROBLEM_IDS + CONV_IDS
)
def test_exact_on_backpack_problems(problem):
    """Sequential problems: both exact curvatures match the dense full matrices."""
    model, loss_fn, x, y = problem.make()
    _, steps = probe_run(model, loss_fn, x, y, EXACT)
    for step in steps:
        grads = gradient_at(model, loss_fn, x, y, step.theta0)
        slope = sum((step.directions[n] * grads[n]).sum() for n in grads).item()
        refs = _references(model, loss_fn, x, y, step.theta0, step.directions)
        _assert_record_matches(step.record, refs, slope)


@pytest.mark.parametrize("problem", FREE_PROBLEMS, ids=FREE_IDS)
def test_exact_on_any_model(problem):
    """Residual+LayerNorm+GELU, Embedding, reshape, dict output, BatchNorm, ..."""
    model, loss_fn, x, y = problem.build()
    _, steps = probe_run(model, loss_fn, x, y, EXACT, call=problem.call)
    for step in steps:
        ref_model, ref_loss, rename = reference_pair(problem, model, loss_fn)
        theta0 = rename(step.theta0)
        directions = rename(step.directions)
        grads = gradient_at(ref_model, ref_loss, x, y, theta0)
        slope = sum((directions[n] * grads[n]).sum() for n in grads).item()
        refs = _references(ref_model, ref_loss, x, y, theta0, directions)
        _assert_record_matches(step.record, refs, slope)
        assert step.record.curvatures["ggn-exact"] >= 0.0


def test_done_when_residual_layernorm_gelu_functional_ce_trains():
    """Issue 3's "done when": AdamW + both exact curvatures, α* = dense reference."""
    torch.manual_seed(0)
    model = ResidualMLP().double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    probe = AlphaProbe(
        torch.optim.AdamW(model.parameters(), lr=0.02),
        curvature=("ggn-exact", "hessian-exact"),
        model=model,
        loss_fn=F.cross_entropy,
    )

    def closure():
        probe.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = []
    for step in range(12):
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses.append(probe.step(closure).item())
        if step % 4:
            continue
        record = probe.history[-1]
        d = {n: p.detach() - theta0[n] for n, p in model.named_parameters()}
        refs = _references(model, F.cross_entropy, x, y, theta0, d)
        for name, ref in refs.items():
            assert record.alphas[name] == pytest.approx(-record.slope / ref, rel=1e-7)
    assert losses[-1] < losses[0]
    assert all(r.status == "ok" for r in probe.history)


@pytest.mark.parametrize(
    "method",
    ["auto", "double-backward", "forward-over-reverse", "forward-over-forward"],
)
def test_hessian_methods_agree_without_normalisation(method):
    """Every Hessian method is exact on a model without LayerNorm/BatchNorm.

    (Cross-entropy: forward-over-reverse fails on mse_loss in torch 2.14.)
    """
    problem = PROBLEMS[2]  # sigmoid-ce
    model, loss_fn, x, y = problem.make()
    d, values = backend_values(model, loss_fn, x, y, [ExactHessian(method)])
    ref = full_hessian_quadratic(model, loss_fn, x, y, d)
    torch.testing.assert_close(values["hessian-exact"], ref, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("method", ["auto", "forward", "double-backward"])
def test_ggn_methods_on_residual_model(method):
    torch.manual_seed(0)
    model = ResidualMLP().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    d, values = backend_values(model, F.cross_entropy, x, y, [ExactGGN(method)])
    ref = full_ggn_quadratic(model, F.cross_entropy, x, y, d)
    torch.testing.assert_close(values["ggn-exact"], ref, rtol=RTOL, atol=1e-14)


def test_custom_op_without_jvp_falls_back_to_reverse_mode():
    problem = FREE_PROBLEMS[-1]
    model, loss_fn, x, y = problem.build()
    ggn = ExactGGN()
    d, values = backend_values(model, loss_fn, x, y, [ggn])
    assert ggn.resolved == "double-backward"  # remembered for later steps
    ref = full_ggn_quadratic(model, loss_fn, x, y, d)
    torch.testing.assert_close(values["ggn-exact"], ref, rtol=RTOL, atol=1e-14)
    with pytest.raises(CurvatureError, match="could not differentiate"):
        backend_values(model, loss_fn, x, y, [ExactGGN("forward")], d)


def test_dropout_masks_are_replayed():
    """The replay draws the closure's dropout masks; the user's RNG is untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)
    ).double()
    x, y = (
        torch.randn(6, 4, dtype=torch.float64),
        torch.randn(6, 2, dtype=torch.float64),
    )
    _, steps = probe_run(
        model,
        F.mse_loss,
        x,
        y,
        EXACT,
        steps=1,
        call=lambda m, f, a, b: (torch.manual_seed(7), f(m(a), b))[1],
    )
    after = torch.rand(3)
    torch.manual_seed(7)
    model(x)  # the closure's draws, and nothing else: the replay forks the RNG
    torch.testing.assert_close(after, torch.rand(3))

    class Seeded(nn.Module):  # same masks as the closure for the reference
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a):
            torch.manual_seed(7)
            return self.inner(a)

    step = steps[0]
    ref_model = Seeded(model)
    rename = lambda t: {f"inner.{k}": v for k, v in t.items()}  # noqa: E731
    refs = _references(
        ref_model, F.mse_loss, x, y, rename(step.theta0), rename(step.directions)
    )
    for name, ref in refs.items():
        assert step.record.curvatures[name] == pytest.approx(ref, rel=RTOL)


def test_batchnorm_running_stats_as_without_probe():
    """The replay does not update BatchNorm's running statistics a second time."""
    problem = FREE_PROBLEMS[4]
    model, loss_fn, x, y = problem.build()
    twin = copy.deepcopy(model)
    probe_run(model, loss_fn, x, y, EXACT, steps=2)
    opt = torch.optim.AdamW(twin.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(twin(x), y).backward()
        opt.step()
    for (n, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), n
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_backpack_model_with_exact_and_block_curvatures_in_one_step():
    """Exact and BackPACK curvatures share the closure; the replay leaves BackPACK's
    stored quantities alone whatever the order."""
    problem = PROBLEMS[1]
    model, loss_fn, x, y = problem.make()
    _, first = probe_run(model, loss_fn, x, y, ("ggn-exact", "hessian", "kflr"))
    model, loss_fn, x, y = problem.make()
    _, last = probe_run(model, loss_fn, x, y, ("hessian", "kflr", "ggn-exact"))
    for a, b in zip(first, last):
        for name in ("ggn-exact", "hessian", "kflr"):
            assert a.record.curvatures[name] == pytest.approx(
                b.record.curvatures[name], rel=1e-12
            )


# ----------------------------------------------------------------- errors
def _snapshot(model, probe):
    return (
        [p.detach().clone() for p in model.parameters()],
        len(probe.history),
        probe.step_count,
    )


def _assert_unchanged(model, probe, snap):
    params, n, steps = snap
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a, b)
    assert len(probe.history) == n and probe.step_count == steps


@pytest.mark.parametrize("missing", ["model", "loss_fn", "both"])
def test_constructor_says_what_to_pass(missing):
    model = nn.Linear(2, 1)
    kwargs = {"model": model, "loss_fn": F.mse_loss}
    if missing == "both":
        kwargs = {}
    else:
        kwargs.pop(missing)
    with pytest.raises(TypeError, match="model=model, loss_fn=loss_fn"):
        AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), "ggn-exact", **kwargs)


def _residual_setup(curvature, loss_fn=F.cross_entropy, extended=False):
    torch.manual_seed(0)
    model = ResidualMLP().double()
    if extended:
        model = extend(model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        curvature=curvature,
        model=model,
        loss_fn=loss_fn,
    )
    return model, probe, x, y


@pytest.mark.parametrize("curvature", ["kflr", "diag-ggn", "kfac", "diag-hessian"])
def test_backpack_curvature_on_residual_model_names_module_and_alternatives(curvature):
    model, probe, x, y = _residual_setup(
        (curvature, "ggn-exact"), loss_fn=extend(nn.CrossEntropyLoss()), extended=True
    )
    snap = _snapshot(model, probe)

    def closure():
        probe.zero_grad()
        loss = probe.loss_fn(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(CurvatureError) as info:
        probe.step(closure)
    text = str(info.value)
    assert f"Curvature {curvature!r}" in text and "ResidualMLP" in text
    assert "'ggn-exact', 'hessian-exact'" in text
    _assert_unchanged(model, probe, snap)
    assert all(p.grad is None for p in model.parameters())


def test_exact_only_runs_without_backpack_on_extended_unsupported_model():
    model, probe, x, y = _residual_setup(EXACT, extended=True)

    def closure():
        probe.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    probe.step(closure)
    assert probe.history[-1].status == "ok"


@pytest.mark.parametrize(
    "closure_kind, match",
    [
        ("model-twice", "exactly once"),
        ("no-model", "exactly once"),
        ("loss-not-seen", "probe.loss_fn"),
        ("slice", "did not get the output"),
    ],
)
def test_recording_errors_change_nothing(closure_kind, match):
    loss_fn = sum_like = lambda out, t: F.cross_entropy(out, t)
    model, probe, x, y = _residual_setup(EXACT, loss_fn=sum_like)
    snap = _snapshot(model, probe)

    def closure():
        probe.zero_grad()
        if closure_kind == "model-twice":
            loss = probe.loss_fn(model(x) + 0 * model(x), y)
        elif closure_kind == "no-model":
            with torch.no_grad():
                model(x)
            loss = probe.loss_fn(model.out(model.inp(x)), y)
        elif closure_kind == "loss-not-seen":
            loss = loss_fn(model(x), y)
        else:
            loss = probe.loss_fn(model(x)[:, :2], y.clamp(max=1))
        loss.backward()
        return loss

    with pytest.raises(CurvatureError, match=match):
        probe.step(closure)
    _assert_unchanged(model, probe, snap)
    assert all(p.grad is None for p in model.parameters())


def test_regulariser_outside_loss_fn_warns_once():
    model, probe, x, y = _residual_setup(EXACT)

    def closure():
        probe.zero_grad()
        loss = F.cross_entropy(model(x), y) + 1e-3 * model.out.weight.square().sum()
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="not the value loss_fn returned"):
        probe.step(closure)


def test_parameters_outside_the_model_are_refused():
    class TemperedCE(nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, out, target):
            return F.cross_entropy(out / self.temperature, target)

    torch.manual_seed(0)
    model, loss_fn = nn.Linear(3, 2).double(), TemperedCE()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    probe = AlphaProbe(
        torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1),
        "ggn-exact",
        model=model,
        loss_fn=loss_fn,
    )

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(CurvatureError, match="not parameters of that model"):
        probe.step(closure)


class _Scaled(nn.Module):
    """A chain whose output is scaled by a parameter the model does not own."""

    def __init__(self, scale: nn.Parameter | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.__dict__["scale"] = scale  # not registered: not among parameters()

    def forward(self, x):
        out = self.body(x)
        return out if self.scale is None else out * self.scale


def _chain_probe(curvature: str, scale: nn.Parameter | None = None):
    torch.manual_seed(0)
    model = _Scaled(scale).double()
    loss_fn = nn.CrossEntropyLoss()  # a loss module: the sweep's hooks record
    extra = [] if scale is None else [scale]
    probe = AlphaProbe(
        torch.optim.SGD([*model.parameters(), *extra], lr=0.1),
        curvature,
        model=model,
        loss_fn=loss_fn,
    )
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return probe, model, closure


@pytest.mark.parametrize("curvature", EXACT)
def test_parameters_outside_the_model_are_refused_when_hooks_record(curvature):
    """A scale the model uses but does not own breaks the recorded chain, so the
    check walks the model and refuses."""
    scale = nn.Parameter(torch.ones((), dtype=torch.float64))
    probe, _, closure = _chain_probe(curvature, scale)
    before = [p.detach().clone() for p in probe._params()]
    with pytest.raises(CurvatureError, match="not parameters of that model"):
        probe.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(probe._params(), before))


@pytest.mark.parametrize("curvature", EXACT)
def test_a_served_chain_skips_the_walk_of_the_model(curvature, monkeypatch):
    """The chain check already placed every reached parameter in one of model='s
    modules; the batch check does not walk the model again (every probed step)."""
    probe, model, closure = _chain_probe(curvature)

    def walked(*args, **kwargs):
        raise AssertionError("model.parameters() walked on a served step")

    monkeypatch.setattr(model, "parameters", walked)
    probe.step(closure)
    assert probe.history[-1].statuses[curvature] == "ok"


def test_recorded_batch_from_call_matches_probe():
    problem = FREE_PROBLEMS[0]
    model, loss_fn, x, y = problem.build()
    batch = RecordedBatch.from_call(model, loss_fn, x, y)
    assert batch.loss(batch.forward({})).item() == pytest.approx(
        loss_fn(model(x), y).item()
    )
