"""Per-block α*, mini-batch noise, and every curvature together in one probe."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from backpack import extend
from torch import nn

from alphawrap import AlphaProbe, CurvatureError, available_curvatures
from alphawrap.curvature.diagonal import DiagonalGGNMC
from alphawrap.curvature.kronecker import KFACCurvature
from alphawrap.reference import (
    diagonal_quadratics,
    full_ggn_quadratic,
    full_hessian_quadratic,
    kronecker_dense_quadratic,
    kronecker_factors,
    recursive_block_quadratics,
    slope_standard_error,
)
from tests.cases import PROBLEM_IDS, PROBLEMS
from tests.curvature_helpers import (
    ResidualMLP,
    backend_values,
    gradient_at,
    parameters_at,
    probe_run,
)
from tests.test_curvature_diagonal import tiny_cnn

RESIDUAL = {"hessian": "keep", "ggn": "drop", "pch-clip": "clip", "pch-abs": "abs"}
BLOCKWISE = [
    "hessian", "ggn", "pch-clip", "pch-abs",
    "diag-hessian", "diag-ggn", "diag-ggn-mc", "kfac", "kflr", "kfra",
]  # fmt: skip


def block_references(model, loss_fn, x, y, directions, names, first_step=True):
    """Dense reference of each block quadratic, by curvature and parameter."""
    out = {}
    for name in names:
        if name in RESIDUAL:
            out[name] = recursive_block_quadratics(
                model, loss_fn, x, y, directions, RESIDUAL[name]
            )
        elif name in ("diag-hessian", "diag-ggn"):
            kind = name.split("-")[1]
            out[name] = diagonal_quadratics(model, loss_fn, x, y, directions, kind)
        elif name in ("kflr", "kfra"):
            factors = kronecker_factors(model, loss_fn, x, y, name)
            out[name] = {
                n: kronecker_dense_quadratic(factors[n], d)
                for n, d in directions.items()
            }
        elif name in ("kfac", "diag-ggn-mc") and first_step:
            # Monte Carlo: the same seeded draw as the probe's first step (the
            # statistical tests check the draws against diag-ggn and kflr).
            fresh = KFACCurvature() if name == "kfac" else DiagonalGGNMC()
            fresh.start_step(0)  # the draws of step 0
            _, values = backend_values(model, loss_fn, x, y, [fresh], directions)
            out[name] = values[name]
        elif name == "ggn-exact":
            out[name] = full_ggn_quadratic(model, loss_fn, x, y, directions)
        elif name == "hessian-exact":
            out[name] = full_hessian_quadratic(model, loss_fn, x, y, directions)
    return out


def _plain(value):
    """Whether ``value`` holds plain Python data only (no tensors)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


TABLE = [p.make for p in PROBLEMS] + [tiny_cnn]
TABLE_IDS = [*PROBLEM_IDS, "tiny-cnn"]


@pytest.mark.parametrize("make", TABLE, ids=TABLE_IDS)
def test_all_curvatures_together_match_their_references(make):
    """Issue 3's "done when": every curvature in one probe, each = its reference."""
    model, loss_fn, x, y = make()
    names = tuple(available_curvatures())
    _, steps = probe_run(
        model, loss_fn, x, y, names, per_block=True, noise=True,
        steps=1 if make is tiny_cnn else 2,  # the CNN's dense references are slow
        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    )  # fmt: skip
    for index, step in enumerate(steps):
        record = step.record
        with parameters_at(model, step.theta0):
            refs = block_references(
                model, loss_fn, x, y, step.directions, names, first_step=index == 0
            )
            se = slope_standard_error(model, loss_fn, x, y, step.directions).item()
        grads = gradient_at(model, loss_fn, x, y, step.theta0)
        slopes = {n: (step.directions[n] * grads[n]).sum().item() for n in grads}
        assert record.slope == pytest.approx(sum(slopes.values()), rel=1e-9)
        for name, ref in refs.items():
            total = sum(ref.values()).item() if isinstance(ref, dict) else ref.item()
            assert record.curvatures[name] == pytest.approx(
                total, rel=1e-7, abs=1e-13
            ), name
            if isinstance(ref, dict):
                for pname, value in ref.items():
                    block = record.extra["blocks"][pname]
                    assert block["curvatures"][name] == pytest.approx(
                        value.item(), rel=1e-7, abs=1e-13
                    ), (name, pname)
        noise = record.extra["noise"]
        assert noise["slope_se"] == pytest.approx(se, rel=1e-8)
        assert noise["batch_size"] == x.shape[0]
        for pname, value in slopes.items():
            assert record.extra["blocks"][pname]["slope"] == pytest.approx(
                value, rel=1e-9, abs=1e-15
            )


def _two_group_probe(model_given, noise=False):
    model, loss_fn, x, y = PROBLEMS[1].make()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = torch.optim.SGD(
        [{"params": first, "lr": 0.1}, {"params": second, "lr": 0.02}], momentum=0.9
    )
    probe = AlphaProbe(
        opt,
        curvature=("ggn", "kflr", "ggn-exact"),
        model=model,
        loss_fn=loss_fn,
        per_block=True,
        noise=noise,
    )
    if not model_given:
        probe = AlphaProbe(opt, curvature=("ggn", "kflr"), per_block=True, noise=noise)

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return model, probe, closure


@pytest.mark.parametrize("model_given", [True, False])
def test_per_block_entries_are_consistent(model_given):
    _, probe, closure = _two_group_probe(model_given)
    for _ in range(2):
        probe.step(closure)
    record = probe.history[-1]
    blocks, groups = record.extra["blocks"], record.extra["groups"]
    expected = (
        ["0.weight", "0.bias", "2.weight", "2.bias"]
        if model_given
        else ["group0.param0", "group0.param1", "group1.param0", "group1.param1"]
    )
    assert list(blocks) == expected
    assert [g["params"] for g in groups] == [expected[:2], expected[2:]]
    assert sum(b["slope"] for b in blocks.values()) == pytest.approx(record.slope)
    norms = math.sqrt(sum(b["direction_norm"] ** 2 for b in blocks.values()))
    assert norms == pytest.approx(record.direction_norm)
    for name in ("ggn", "kflr"):
        assert sum(b["curvatures"][name] for b in blocks.values()) == pytest.approx(
            record.curvatures[name]
        )
        for entry in [*blocks.values(), *groups]:
            q, s = entry["curvatures"][name], entry["slope"]
            if entry["statuses"][name] == "ok":
                assert entry["alphas"][name] == pytest.approx(-s / q)
            else:
                assert entry["alphas"][name] is None
        for g, members in zip(groups, (expected[:2], expected[2:])):
            assert g["curvatures"][name] == pytest.approx(
                sum(blocks[m]["curvatures"][name] for m in members)
            )
    # exact curvatures have no blocks
    assert all("ggn-exact" not in b["curvatures"] for b in blocks.values())


def test_extras_are_plain_numbers_and_round_trip():
    _, probe, closure = _two_group_probe(True, noise=True)
    probe.step(closure)
    extra = probe.history[-1].extra
    assert {"blocks", "groups", "noise"} <= extra.keys()
    assert _plain(extra)
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    _, probe2, _ = _two_group_probe(True, noise=True)
    probe2.load_state_dict(state)
    assert probe2.history[-1].extra == extra


def test_plain_path_has_no_extras():
    model, loss_fn, x, y = PROBLEMS[0].make()
    _, steps = probe_run(model, loss_fn, x, y, ("ggn", "diag-ggn"), steps=1)
    assert "blocks" not in steps[0].record.extra
    assert "noise" not in steps[0].record.extra


def test_one_host_transfer_per_step(monkeypatch):
    """Blocks, noise and all curvatures come back in one device-to-host transfer.

    (BackPACK itself reads the loss's output gradient once per second-order
    extension inside the backward pass, to warn about a modified loss; those
    reads are BackPACK's, not the probe's.)
    """
    import traceback

    model, loss_fn, x, y = PROBLEMS[1].make()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
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

    probe.step(closure)  # warm-up
    ours, theirs = [], []
    for method in ("tolist", "item", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, method)

        def counting(self, *a, _m=method, _o=original, **k):
            caller = traceback.extract_stack(limit=2)[0].filename
            (ours if "/alphawrap/" in caller else theirs).append((_m, caller))
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, method, counting)
    probe.step(closure)
    monkeypatch.undo()
    assert [m for m, _ in ours] == ["tolist"], ours
    assert all("basederivatives" in f for _, f in theirs), theirs


@pytest.mark.parametrize("loss", ["mse-mean", "mse-sum", "ce-mean", "ce-sum"])
def test_slope_standard_error_matches_per_sample_reference(loss):
    """Mean and sum reductions: same formula in BackPACK's per-sample scaling."""
    kind, reduction = loss.split("-")
    problem = PROBLEMS[3] if kind == "mse" else PROBLEMS[2]
    model, _, x, y = problem.make()
    loss_fn = extend(
        nn.MSELoss(reduction=reduction)
        if kind == "mse"
        else nn.CrossEntropyLoss(reduction=reduction)
    )
    _, steps = probe_run(model, loss_fn, x, y, ("ggn", "kflr"), steps=2, noise=True)
    for step in steps:
        with parameters_at(model, step.theta0):
            se = slope_standard_error(model, loss_fn, x, y, step.directions).item()
        noise = step.record.extra["noise"]
        assert noise["slope_se"] == pytest.approx(se, rel=1e-8)
        for name in ("ggn", "kflr"):
            if step.record.statuses[name] == "ok":
                assert noise["alpha_se"][name] == pytest.approx(
                    se / abs(step.record.curvatures[name]), rel=1e-8
                )
            else:
                assert noise["alpha_se"][name] is None


def test_noise_under_loss_scale_is_unscaled():
    results = []
    for scale in (1.0, 512.0):
        model, loss_fn, x, y = PROBLEMS[1].make()
        probe = AlphaProbe(
            torch.optim.SGD(model.parameters(), lr=0.1), "kflr", noise=True
        )
        with probe.capture(loss_scale=scale) as cap:
            cap.loss = loss_fn(model(x), y)
            (cap.loss * scale).backward()
        for p in model.parameters():
            p.grad /= scale
        probe.step()
        results.append(probe.history[-1].extra["noise"]["slope_se"])
    assert results[1] == pytest.approx(results[0], rel=1e-10)


def test_noise_on_unsupported_module_names_it_and_changes_nothing():
    torch.manual_seed(0)
    model = extend(ResidualMLP().double())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1),
        "ggn-exact",
        model=model,
        loss_fn=F.cross_entropy,
        noise=True,
    )
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        probe.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(CurvatureError, match=r"norm\.weight \(LayerNorm\)"):
        probe.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert len(probe.history) == 0
    assert all(p.grad is None for p in model.parameters())
    assert not any(hasattr(p, "_alphawrap_grad_batch") for p in model.parameters())
