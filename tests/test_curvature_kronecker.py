"""Kronecker curvatures: factors vs definitions, contraction vs torch.kron."""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from alphawrap import AlphaProbe, CurvatureError
from alphawrap.curvature import REGISTRY
from alphawrap.curvature.kronecker import (
    KFACCurvature,
    KFLRCurvature,
    KFRACurvature,
    kronecker_quadratic,
)
from alphawrap.reference import (
    block_ggn_quadratics,
    kronecker_dense_quadratic,
    kronecker_factors,
)
from tests.cases import PROBLEM_IDS, PROBLEMS
from tests.curvature_helpers import (
    backend_values,
    gradient_at,
    parameters_at,
    probe_run,
)
from tests.test_curvature_diagonal import TABLE, TABLE_IDS

DETERMINISTIC = {"kflr": KFLRCurvature, "kfra": KFRACurvature}


def _stored_factors(model, loss_fn, x, y, curvature):
    curvature.cleanup(list(model.parameters()))
    model.zero_grad()
    with backpack(*curvature.backpack_extensions()):
        loss_fn(model(x), y).backward()
    factors = {
        n: [f.clone() for f in getattr(p, curvature.savefield)]
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    curvature.cleanup(list(model.parameters()))
    return factors


@pytest.mark.parametrize(
    "shapes", [[(3, 3)], [(2, 2), (5, 5)], [(4, 4), (3, 3)], [(2, 2), (3, 3), (2, 2)]]
)
def test_contraction_equals_dense_kronecker_product(shapes):
    g = torch.Generator().manual_seed(0)
    factors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    factors = [f @ f.T for f in factors]
    numel = 1
    for s in shapes:
        numel *= s[0]
    d = torch.randn(numel, generator=g, dtype=torch.float64)
    shaped = d.reshape([s[0] for s in shapes]) if len(shapes) > 1 else d
    torch.testing.assert_close(
        kronecker_quadratic(factors, shaped),
        kronecker_dense_quadratic(factors, d),
        rtol=1e-12,
        atol=1e-12,
    )


def test_contraction_uses_backpacks_row_major_order_with_nonsymmetric_factors():
    """[B, A] acts as torch.kron(B, A) on the row-major vec (also if not symmetric)."""
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(3, 3, generator=g), torch.randn(4, 4, generator=g)
    d = torch.randn(3, 4, generator=g)
    expected = d.reshape(-1) @ torch.kron(b, a) @ d.reshape(-1)
    torch.testing.assert_close(kronecker_quadratic([b, a], d), expected)


def test_factors_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        kronecker_quadratic([torch.eye(2), torch.eye(3)], torch.zeros(5))


@pytest.mark.parametrize("make", TABLE, ids=TABLE_IDS)
@pytest.mark.parametrize("kind", list(DETERMINISTIC))
def test_factors_match_their_definitions(make, kind):
    """KFLR/KFRA factors (Linear and Conv2d) equal the dense formulas."""
    model, loss_fn, x, y = make()
    stored = _stored_factors(model, loss_fn, x, y, DETERMINISTIC[kind]())
    expected = kronecker_factors(model, loss_fn, x, y, kind)
    assert stored.keys() == {k for k in expected if k in stored}
    for name, factors in stored.items():
        assert len(factors) == len(expected[name])
        for got, ref in zip(factors, expected[name]):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", TABLE, ids=TABLE_IDS)
@pytest.mark.parametrize("kind", list(DETERMINISTIC))
def test_block_quadratics_match_dense_kronecker_of_defined_factors(make, kind):
    model, loss_fn, x, y = make()
    d, values = backend_values(model, loss_fn, x, y, [DETERMINISTIC[kind]()])
    expected = kronecker_factors(model, loss_fn, x, y, kind)
    for name, value in values[kind].items():
        ref = kronecker_dense_quadratic(expected[name], d[name])
        torch.testing.assert_close(value, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("problem", PROBLEMS[:2], ids=PROBLEM_IDS[:2])
def test_kflr_is_the_exact_block_ggn_for_one_sample(problem):
    """With a batch of one, G ⊗ A is exactly the weight's block of the GGN."""
    model, loss_fn, x, y = problem.make()
    x, y = x[:1], y[:1]
    d, values = backend_values(model, loss_fn, x, y, ["kflr", "kfra"])
    ref = block_ggn_quadratics(model, loss_fn, x, y, d)
    for name in ("kflr", "kfra"):
        for pname, value in values[name].items():
            torch.testing.assert_close(value, ref[pname], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("problem", [PROBLEMS[1], PROBLEMS[3]], ids=["ce", "mse"])
def test_kfac_is_unbiased_for_kflr(problem):
    """Seeded: KFAC's MC output factor averages to KFLR's; A is the same."""
    model, loss_fn, x, y = problem.make()
    d, exact = backend_values(model, loss_fn, x, y, ["kflr"])
    exact_total = sum(exact["kflr"].values())
    kfac = KFACCurvature(mc_samples=1, seed=11)
    draws = []
    for _ in range(120):
        _, values = backend_values(model, loss_fn, x, y, [kfac], d)
        draws.append(sum(values["kfac"].values()))
    draws = torch.stack(draws)
    assert draws.std() > 0
    assert abs(draws.mean() - exact_total) < 4 * draws.std() / len(draws) ** 0.5
    mc = _stored_factors(model, loss_fn, x, y, KFACCurvature(seed=2))
    lr = _stored_factors(model, loss_fn, x, y, KFLRCurvature())
    for name, factors in mc.items():
        if len(factors) == 2:  # weights: the input factor is deterministic
            torch.testing.assert_close(factors[1], lr[name][1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["kfac", "kflr", "kfra"])
def test_probe_records_kronecker_curvature_of_its_direction(name):
    model, loss_fn, x, y = PROBLEMS[1].make()
    _, steps = probe_run(model, loss_fn, x, y, (name,), steps=2)
    for step in steps:
        grads = gradient_at(model, loss_fn, x, y, step.theta0)
        slope = sum((step.directions[n] * grads[n]).sum() for n in grads).item()
        if name == "kfac":  # same seed, same draw as the probe's k-th step
            continue
        with parameters_at(model, step.theta0):
            factors = kronecker_factors(model, loss_fn, x, y, name)
        ref = sum(
            kronecker_dense_quadratic(factors[n], d).item()
            for n, d in step.directions.items()
        )
        assert step.record.curvatures[name] == pytest.approx(ref, rel=1e-9)
        assert step.record.alphas[name] == pytest.approx(-slope / ref, rel=1e-7)


@pytest.mark.parametrize("loss", ["mse-3d", "linear-3d"])
def test_backpack_limitations_are_curvature_errors(loss):
    """BackPACK's own refusals (3d inputs) become CurvatureErrors; nothing changes."""
    torch.manual_seed(0)
    layers = [nn.Linear(3, 2)] + ([nn.Flatten()] if loss == "linear-3d" else [])
    model = extend(nn.Sequential(*layers).double())
    loss_fn = extend(nn.MSELoss())
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    y = torch.randn(2, 8 if loss == "linear-3d" else 4, dtype=torch.float64)
    if loss == "mse-3d":
        y = y.reshape(2, 4, 1).expand(2, 4, 2).contiguous()
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), "kflr")

    def closure():
        probe.zero_grad()
        out = loss_fn(model(x), y)
        out.backward()
        return out

    with pytest.raises(CurvatureError, match="BackPACK cannot compute 'kflr'"):
        probe.step(closure)
    assert len(probe.history) == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "name", ["diag-hessian", "diag-ggn", "diag-ggn-mc", "kfac", "kflr", "kfra"]
)
@pytest.mark.parametrize("module", ["GELU", "LayerNorm", "BatchNorm1d"])
def test_unsupported_module_names_it_and_what_would_work(name, module):
    torch.manual_seed(0)
    layer = {"GELU": nn.GELU(), "LayerNorm": nn.LayerNorm(4), "BatchNorm1d": None}[
        module
    ] or nn.BatchNorm1d(4)
    model = extend(nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2)).double())
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), name)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    supported = module in REGISTRY[name]().supported_modules()
    if supported:  # diag-ggn(-mc) know BatchNorm1d, but refuse it in training mode
        with pytest.raises(CurvatureError, match="BatchNorm module in training mode"):
            probe.step(closure)
        model.eval()
        probe.step(closure)
        return
    with pytest.raises(CurvatureError) as info:
        probe.step(closure)
    text = str(info.value)
    assert f"cannot handle module {module}" in text
    assert "'ggn-exact', 'hessian-exact'" in text
    handling = [n for n, c in REGISTRY.items() if module in c().supported_modules()]
    if handling:
        assert f"handles {module}: " + ", ".join(map(repr, handling)) in text
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert len(probe.history) == 0
