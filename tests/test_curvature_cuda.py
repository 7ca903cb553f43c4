"""The exact, diagonal and Kronecker curvatures on CUDA (skipped without a GPU).

Same numbers as on the CPU, the CUDA random stream replayed (dropout) or left
alone (Monte-Carlo backends), and one device-to-host transfer per step.
"""

import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alphawrap import AlphaProbe, available_curvatures
from alphawrap.curvature.diagonal import DiagonalGGNMC
from alphawrap.curvature.kronecker import KFACCurvature
from alphawrap.reference import full_ggn_quadratic, full_hessian_quadratic
from tests.cases import PROBLEMS
from tests.curvature_helpers import (
    ResidualMLP,
    backend_values,
    parameters_at,
    probe_run,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MONTE_CARLO = ("kfac", "diag-ggn-mc")


def _on(device, problem=PROBLEMS[1]):
    model, loss_fn, x, y = problem.make()
    return model.to(device), loss_fn, x.to(device), y.to(device)


def test_all_curvatures_on_cuda_equal_cpu():
    names = tuple(available_curvatures())
    records = {}
    for device in ("cpu", "cuda"):
        model, loss_fn, x, y = _on(device)
        _, steps = probe_run(
            model, loss_fn, x, y, names, steps=2, per_block=True, noise=True
        )
        records[device] = [s.record for s in steps]
    for cpu, gpu in zip(records["cpu"], records["cuda"]):
        assert gpu.slope == pytest.approx(cpu.slope, rel=1e-9)
        for name in names:
            if name in MONTE_CARLO:  # other generator on the GPU
                continue
            assert gpu.curvatures[name] == pytest.approx(
                cpu.curvatures[name], rel=1e-8
            ), name
        assert gpu.extra["noise"]["slope_se"] == pytest.approx(
            cpu.extra["noise"]["slope_se"], rel=1e-8
        )


def test_exact_on_cuda_match_dense_reference_any_model():
    torch.manual_seed(0)
    model = ResidualMLP().double().cuda()
    x = torch.randn(6, 4, dtype=torch.float64, device="cuda")
    y = torch.randint(0, 3, (6,), device="cuda")
    _, steps = probe_run(model, F.cross_entropy, x, y, ("ggn-exact", "hessian-exact"))
    for step in steps:
        with parameters_at(model, step.theta0):
            ggn = full_ggn_quadratic(model, F.cross_entropy, x, y, step.directions)
            hess = full_hessian_quadratic(model, F.cross_entropy, x, y, step.directions)
        assert step.record.curvatures["ggn-exact"] == pytest.approx(
            ggn.item(), rel=1e-8
        )
        assert step.record.curvatures["hessian-exact"] == pytest.approx(
            hess.item(), rel=1e-8
        )


def test_dropout_replay_uses_the_cuda_stream_and_leaves_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2))
    model = model.double().cuda()
    x = torch.randn(6, 4, dtype=torch.float64, device="cuda")
    y = torch.randn(6, 2, dtype=torch.float64, device="cuda")

    def call(m, f, a, b):
        torch.cuda.manual_seed(7)
        return f(m(a), b)

    _, steps = probe_run(
        model, F.mse_loss, x, y, ("ggn-exact", "hessian-exact"), steps=1, call=call
    )
    after = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(7)
    model(x)
    torch.testing.assert_close(after, torch.rand(3, device="cuda"))

    class Seeded(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a):
            torch.cuda.manual_seed(7)
            return self.inner(a)

    step = steps[0]
    with parameters_at(model, step.theta0):
        d = {f"inner.{k}": v for k, v in step.directions.items()}
        ref = full_ggn_quadratic(Seeded(model), F.mse_loss, x, y, d).item()
    assert step.record.curvatures["ggn-exact"] == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("backend", [KFACCurvature, DiagonalGGNMC])
def test_monte_carlo_backends_leave_the_cuda_stream_alone(backend):
    model, loss_fn, x, y = _on("cuda")
    torch.cuda.manual_seed(3)
    _, first = backend_values(model, loss_fn, x, y, [backend(seed=1)])
    after = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(3)
    torch.testing.assert_close(after, torch.rand(4, device="cuda"))
    _, second = backend_values(model, loss_fn, x, y, [backend(seed=1)])
    name = backend.name
    assert first[name] == second[name]  # reproducible from the seed


def test_one_host_transfer_per_step_on_cuda(monkeypatch):
    model, loss_fn, x, y = _on("cuda")
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        curvature=tuple(available_curvatures()),
        model=model,
        loss_fn=loss_fn,
        per_block=True,
        noise=True,
    )

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    probe.step(closure)
    ours = []
    for method in ("tolist", "item", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, method)

        def counting(self, *a, _m=method, _o=original, **k):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "/alphawrap/" in caller:
                ours.append(_m)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, counting)
    probe.step(closure)
    monkeypatch.undo()
    assert ours == ["tolist"]
