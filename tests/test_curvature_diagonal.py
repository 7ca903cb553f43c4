"""Diagonal curvatures against dense brute force (float64); DiagGGNMC statistically."""

import pytest
import torch
from backpack import extend
from torch import nn

from alphawrap.curvature.diagonal import DiagonalGGN, DiagonalGGNMC
from alphawrap.reference import diagonal_quadratics
from tests.cases import PROBLEM_IDS, PROBLEMS
from tests.curvature_helpers import (
    backend_values,
    gradient_at,
    parameters_at,
    probe_run,
)


def tiny_cnn():
    torch.manual_seed(0)
    model = extend(
        nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(8, 3),
        ).double()
    )
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    return model, extend(nn.CrossEntropyLoss()), x, torch.randint(0, 3, (4,))


TABLE = [p.make for p in PROBLEMS] + [tiny_cnn]
TABLE_IDS = [*PROBLEM_IDS, "tiny-cnn"]
KIND = {"diag-hessian": "hessian", "diag-ggn": "ggn"}


@pytest.mark.parametrize("make", TABLE, ids=TABLE_IDS)
def test_diagonals_match_dense_diagonal(make):
    model, loss_fn, x, y = make()
    d, values = backend_values(model, loss_fn, x, y, list(KIND))
    for name, kind in KIND.items():
        ref = diagonal_quadratics(model, loss_fn, x, y, d, kind)
        for pname, value in values[name].items():
            torch.testing.assert_close(value, ref[pname], rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("problem", PROBLEMS[:3], ids=PROBLEM_IDS[:3])
def test_probe_records_diagonals_of_its_direction(problem):
    model, loss_fn, x, y = problem.make()
    _, steps = probe_run(model, loss_fn, x, y, ("diag-ggn", "diag-hessian"))
    for step in steps:
        grads = gradient_at(model, loss_fn, x, y, step.theta0)
        slope = sum((step.directions[n] * grads[n]).sum() for n in grads).item()
        with parameters_at(model, step.theta0):
            for name, kind in KIND.items():
                ref = sum(
                    diagonal_quadratics(
                        model, loss_fn, x, y, step.directions, kind
                    ).values()
                ).item()
                assert step.record.curvatures[name] == pytest.approx(ref, rel=1e-8)
                if step.record.statuses[name] == "ok":
                    assert step.record.alphas[name] == pytest.approx(
                        -slope / ref, rel=1e-7
                    )


def test_diag_ggn_is_never_negative_diag_hessian_can_be():
    model, loss_fn, x, y = PROBLEMS[1].make()  # tanh-ce: indefinite Hessian
    _, values = backend_values(model, loss_fn, x, y, [DiagonalGGN()])
    assert all(v >= 0 for v in values["diag-ggn"].values())


@pytest.mark.parametrize("problem", [PROBLEMS[1], PROBLEMS[3]], ids=["ce", "mse"])
def test_diag_ggn_mc_is_unbiased(problem):
    """Seeded: the mean over many single-sample draws approaches diag-ggn."""
    model, loss_fn, x, y = problem.make()
    d, exact = backend_values(model, loss_fn, x, y, [DiagonalGGN()])
    exact_total = sum(exact["diag-ggn"].values())
    mc = DiagonalGGNMC(mc_samples=1, seed=123)
    draws = []
    for _ in range(120):
        _, values = backend_values(model, loss_fn, x, y, [mc], d)
        draws.append(sum(values["diag-ggn-mc"].values()))
    draws = torch.stack(draws)
    se = draws.std() / len(draws) ** 0.5
    assert draws.std() > 0  # it is random
    assert abs(draws.mean() - exact_total) < 4 * se
    # more samples per draw: closer
    _, values = backend_values(
        model, loss_fn, x, y, [DiagonalGGNMC(mc_samples=2000, seed=5)], d
    )
    many = sum(values["diag-ggn-mc"].values())
    assert abs(many - exact_total) < 4 * draws.std() / 2000**0.5


def test_mc_draws_do_not_touch_the_global_random_stream():
    model, loss_fn, x, y = PROBLEMS[1].make()
    torch.manual_seed(42)
    backend_values(model, loss_fn, x, y, [DiagonalGGNMC()])
    after = torch.rand(4)
    torch.manual_seed(42)
    backend_values(model, loss_fn, x, y, [DiagonalGGN()])
    torch.testing.assert_close(after, torch.rand(4))


def test_mc_draws_are_reproducible_from_the_seed():
    model, loss_fn, x, y = PROBLEMS[1].make()
    d, a = backend_values(model, loss_fn, x, y, [DiagonalGGNMC(seed=3)])
    _, b = backend_values(model, loss_fn, x, y, [DiagonalGGNMC(seed=3)], d)
    _, c = backend_values(model, loss_fn, x, y, [DiagonalGGNMC(seed=4)], d)
    assert a["diag-ggn-mc"] == b["diag-ggn-mc"]
    assert a["diag-ggn-mc"] != c["diag-ggn-mc"]


def test_diag_hessian_under_loss_scale_is_unscaled():
    """GradScaler-style scaled loss: the probe's diagonals equal the unscaled ones."""
    from alphawrap import AlphaProbe

    results = []
    for scale in (1.0, 1024.0):
        model, loss_fn, x, y = PROBLEMS[1].make()
        probe = AlphaProbe(
            torch.optim.SGD(model.parameters(), lr=0.1),
            curvature=("diag-hessian", "diag-ggn"),
        )
        with probe.capture(loss_scale=scale) as cap:
            cap.loss = loss_fn(model(x), y)
            (cap.loss * scale).backward()
        for p in model.parameters():
            p.grad /= scale  # what GradScaler.unscale_ does
        probe.step()
        results.append(probe.history[-1].curvatures)
    for name in ("diag-hessian", "diag-ggn"):
        assert results[1][name] == pytest.approx(results[0][name], rel=1e-10)


def _mc_probe(curvature: str = "diag-ggn-mc"):
    from alphawrap import AlphaProbe

    model, loss_fn, x, y = PROBLEMS[1].make()
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), curvature=curvature)

    def closure(target=y):
        probe.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        return loss

    return probe, model, closure, y


@pytest.mark.parametrize("curvature", ["diag-ggn-mc", "kfac"])
def test_a_refused_step_changes_no_later_draw(curvature):
    """The refused step's backward drew labels; the next step draws what it would
    have drawn had the refused one never run."""
    from alphawrap import CurvatureError

    probe, _, closure, y = _mc_probe(curvature)
    ignored = y.clone()
    ignored[0] = -100  # refused after the backward pass (BackPACK would count it)
    with pytest.raises(CurvatureError, match="ignore_index"):
        probe.step(lambda: closure(ignored))
    probe.step(closure)
    fresh, _, fresh_closure, _ = _mc_probe(curvature)
    fresh.step(fresh_closure)
    assert probe.history[-1].curvatures == fresh.history[-1].curvatures


def test_a_discarded_capture_changes_no_later_draw():
    probe, _, closure, _ = _mc_probe()
    with probe.capture():
        closure()  # discarded by the next capture: never stepped
    with probe.capture():
        closure()
    probe.step()
    fresh, _, fresh_closure, _ = _mc_probe()
    fresh.step(fresh_closure)
    assert probe.history[-1].curvatures == fresh.history[-1].curvatures


def test_a_resumed_probe_draws_what_the_saved_one_would():
    probe, model, closure, _ = _mc_probe()
    for _ in range(2):
        probe.step(closure)
    resumed, twin, twin_closure, _ = _mc_probe()
    twin.load_state_dict(model.state_dict())
    resumed.load_state_dict(probe.state_dict())
    probe.step(closure)
    resumed.step(twin_closure)
    assert resumed.history[-1].curvatures == probe.history[-1].curvatures
    # and the draws do differ from step to step
    assert probe.history[-1].curvatures != probe.history[-2].curvatures


def test_each_process_draws_its_own_labels(monkeypatch):
    """Under torch.distributed the rank enters the seed: the processes' draws are
    independent (the same on a rank from run to run)."""
    import alphawrap.curvature.extension as extension

    values = {}
    for rank in (0, 1, 1):
        monkeypatch.setattr(extension, "process_rank", lambda rank=rank: rank)
        probe, _, closure, _ = _mc_probe()
        probe.step(closure)
        values.setdefault(rank, []).append(probe.history[-1].curvatures)
    assert values[1][0] == values[1][1]
    assert values[0][0] != values[1][0]


def test_seeds_are_mixed_without_python_hash():
    """hash(-1) == hash(-2) in CPython; the mixed seeds of such parts differ."""
    from alphawrap.curvature.extension import mixed_seed

    assert mixed_seed(-1, 0, 0, 0) != mixed_seed(-2, 0, 0, 0)
    assert 0 <= mixed_seed(2**70, -5, 3, 1) < 2**63
