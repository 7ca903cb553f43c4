"""The tangent sweep (fast path) against BackPACK's closures and dense brute force."""

import pytest
import torch
from backpack import backpack, extend
from torch import nn

from alphawrap.curvature import EvaluationContext
from alphawrap.curvature.blockdiag import BlockGGN, BlockHessian, PCHAbs, PCHClip
from alphawrap.curvature.sweep import (
    SweepGGN,
    SweepHessian,
    SweepPCHAbs,
    SweepPCHClip,
    share_engine,
)
from alphawrap.errors import CurvatureError
from alphawrap.reference import recursive_block_quadratics
from tests.cases import CONV_IDS, CONV_PROBLEMS, PROBLEM_IDS, PROBLEMS

FAST = [SweepHessian, SweepGGN, SweepPCHClip, SweepPCHAbs]
REFERENCE = {
    "hessian": BlockHessian,
    "ggn": BlockGGN,
    "pch-clip": PCHClip,
    "pch-abs": PCHAbs,
}
RESIDUAL = {"hessian": "keep", "ggn": "drop", "pch-clip": "clip", "pch-abs": "abs"}


def _backward_and_context(model, loss_fn, x, y, extensions, seed=1):
    """Backward under ``extensions``; random directions and their context."""
    with backpack(*extensions):
        loss_fn(model(x), y).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    directions = {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in named
    }
    ctx = EvaluationContext(
        params=[p for _, p in named],
        directions=list(directions.values()),
        reached=set(range(len(named))),
        names=[n for n, _ in named],
        accumulate_dtype=torch.promote_types(named[0][1].dtype, torch.float32),
    )
    return directions, ctx


def _quadratics(model, loss_fn, x, y, curvatures, seed=1):
    extensions = [e for c in curvatures for e in c.backpack_extensions()]
    directions, ctx = _backward_and_context(model, loss_fn, x, y, extensions, seed)
    with torch.no_grad():
        for c in curvatures:
            c.check_backward(ctx)
        values = {c.name: c.quadratic(ctx) for c in curvatures}
    for c in curvatures:
        c.cleanup(ctx.params)
    return directions, values


def _cnn(dtype):
    torch.manual_seed(0)
    model = extend(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 2, 2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 4),
            nn.ReLU(),
            nn.Linear(4, 3),
        ).to(dtype)
    )
    x = torch.randn(4, 1, 8, 8, dtype=dtype)
    y = torch.randint(0, 3, (4,))
    return model, extend(nn.CrossEntropyLoss()), x, y


@pytest.mark.parametrize(
    "fast_rules", [True, False], ids=["fast-rules", "backpack-rules"]
)
@pytest.mark.parametrize(
    "problem", PROBLEMS + CONV_PROBLEMS, ids=PROBLEM_IDS + CONV_IDS
)
def test_sweep_matches_dense_reference(problem, fast_rules):
    model, loss_fn, x, y = problem.make()
    fast = [cls() for cls in FAST]
    share_engine(fast, fast=fast_rules)
    directions, values = _quadratics(model, loss_fn, x, y, fast)
    for name, residual in RESIDUAL.items():
        ref = recursive_block_quadratics(model, loss_fn, x, y, directions, residual)
        torch.testing.assert_close(
            values[name],
            torch.stack([ref[n] for n in directions]),
            rtol=1e-10,
            atol=1e-12,
        )


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_sweep_matches_backpack_on_cnn(name, dtype, rtol):
    """Reference path (BackPACK closures) vs fast path, conv/pool/flatten included."""
    model, loss_fn, x, y = _cnn(dtype)
    _, ref = _quadratics(model, loss_fn, x, y, [REFERENCE[name]()])
    model, loss_fn, x, y = _cnn(dtype)
    fast = [cls() for cls in FAST]
    share_engine(fast)
    _, got = _quadratics(model, loss_fn, x, y, fast)
    torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=1e-6 * rtol)


def test_shared_engine_records_once():
    fast = [cls() for cls in FAST]
    share_engine(fast)
    assert len({id(c.engine) for c in fast}) == 1
    assert sum(len(c.backpack_extensions()) for c in fast) == 1


def test_functional_op_between_modules_is_refused():
    """Two extended Sequentials with a functional tanh between them: BackPACK's
    closures would silently ignore the tanh; the sweep detects the broken chain."""
    first = extend(nn.Sequential(nn.Linear(3, 4)))
    second = extend(nn.Sequential(nn.Linear(4, 2)))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    curv = SweepHessian()
    with backpack(*curv.backpack_extensions()):
        extend(nn.MSELoss())(second(torch.tanh(first(x))), y).backward()
    params = [*first.parameters(), *second.parameters()]
    ctx = EvaluationContext(
        params=params,
        directions=[torch.ones_like(p) for p in params],
        reached=set(range(4)),
        names=list("abcd"),
        accumulate_dtype=torch.float32,
    )
    with pytest.raises(CurvatureError, match="chain"):
        curv.check_backward(ctx)


def test_operation_between_model_and_loss_is_refused():
    model = extend(nn.Sequential(nn.Linear(3, 2)))
    curv = SweepGGN()
    with backpack(*curv.backpack_extensions()):
        extend(nn.MSELoss())(2 * model(torch.randn(5, 3)), torch.randn(5, 2)).backward()
    params = list(model.parameters())
    ctx = EvaluationContext(
        params=params,
        directions=[torch.ones_like(p) for p in params],
        reached={0, 1},
        names=["w", "b"],
        accumulate_dtype=torch.float32,
    )
    with pytest.raises(CurvatureError, match="loss's input"):
        curv.check_backward(ctx)


def _engine_exact(model, loss_fn, x, y, kinds, seed=1):
    from alphawrap.curvature.sweep import TangentSweep

    engine = TangentSweep()
    for kind in kinds:
        engine.add(kind)
    directions, ctx = _backward_and_context(
        model, loss_fn, x, y, [engine.recorder], seed
    )
    assert engine.supports_exact(ctx)
    with torch.no_grad():
        values = engine.quadratics(ctx)
    engine.reset()
    return directions, values


@pytest.mark.parametrize(
    "with_blocks", [False, True], ids=["total-only", "with-blocks"]
)
@pytest.mark.parametrize("problem", [*PROBLEMS, "cnn"], ids=[*PROBLEM_IDS, "cnn"])
def test_sweep_exact_matches_dense(problem, with_blocks):
    """ggn-exact and hessian-exact from the stored forward equal the dense full
    GGN/Hessian quadratics (cross-layer terms included)."""
    from alphawrap.reference import full_ggn_quadratic, full_hessian_quadratic

    model, loss_fn, x, y = _cnn(torch.float64) if problem == "cnn" else problem.make()
    kinds = ["ggn-exact", "hessian-exact"] + (["hessian", "ggn"] if with_blocks else [])
    directions, values = _engine_exact(model, loss_fn, x, y, kinds)
    ggn = full_ggn_quadratic(model, loss_fn, x, y, directions)
    hess = full_hessian_quadratic(model, loss_fn, x, y, directions)
    torch.testing.assert_close(values["ggn-exact"], ggn, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(values["hessian-exact"], hess, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["hessian", "ggn"])
def test_sweep_matches_backpack_with_batchnorm(name):
    """BatchNorm1d in training mode: a non-diagonal residual (BackPACK's rule)."""

    def build():
        torch.manual_seed(0)
        model = extend(
            nn.Sequential(
                nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)
            ).double()
        )
        x, y = (
            torch.randn(6, 3, dtype=torch.float64),
            torch.randn(6, 2, dtype=torch.float64),
        )
        return model, extend(nn.MSELoss()), x, y

    _, ref = _quadratics(*build(), [REFERENCE[name]()])
    fast = [cls() for cls in FAST[:2]]
    share_engine(fast)
    _, got = _quadratics(*build(), fast)
    torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)
