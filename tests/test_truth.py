"""Line-search truth and ρ: exact on quadratics, invisible to the run."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import HMP
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from alphawrap import AlphaProbe
from alphawrap.batch import RecordedBatch
from alphawrap.truth import BatchObjective, line_search

# ------------------------------------------------------------ line_search alone


@settings(max_examples=60, deadline=None)
@given(
    minimiser=st.floats(1e-5, 1e5),
    curvature=st.floats(1e-3, 1e3),
    offset=st.floats(-10, 10),
)
def test_line_search_is_exact_on_a_parabola(minimiser, curvature, offset):
    result = line_search(lambda a: offset + curvature * (a - minimiser) ** 2)
    assert result.status == "ok"
    # Exact up to the float64 resolution of h near its minimum: h moves by less
    # than its rounding error within sqrt(eps·|h| / curvature) of the minimiser.
    scale = abs(offset) + curvature * minimiser**2
    noise = 4 * math.sqrt(2.3e-16 * scale / curvature)
    assert result.alpha == pytest.approx(minimiser, rel=1e-6, abs=noise)
    assert result.loss0 == pytest.approx(offset + curvature * minimiser**2)
    assert result.evaluations < 80


def test_line_search_resolution_on_a_non_quadratic():
    # h(α) = α⁴/4 − α: minimiser 1; the golden section alone guarantees 0.1 %.
    result = line_search(lambda a: a**4 / 4 - a)
    assert result.alpha == pytest.approx(1.0, rel=1e-3)
    result = line_search(lambda a: a**4 / 4 - 37.0**3 * a, rtol=1e-4)
    assert result.alpha == pytest.approx(37.0, rel=1e-4)


@pytest.mark.parametrize(
    ("h", "status"),
    [
        (lambda a: a, "no-decrease"),
        (lambda a: 1.0, "no-decrease"),
        (lambda a: -a, "unbounded"),
        (lambda a: math.nan, "non-finite"),
    ],
)
def test_line_search_statuses(h, status):
    result = line_search(h)
    assert result.status == status
    assert result.alpha is None and result.loss is None


def test_line_search_treats_overflow_as_infinite_and_maximises():
    result = line_search(lambda a: (a - 2.0) ** 2 if a < 8 else math.inf)
    assert result.alpha == pytest.approx(2.0)
    result = line_search(lambda a: -((a - 0.3) ** 2), maximize=True)
    assert result.alpha == pytest.approx(0.3)
    assert result.loss == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------ quadratic problem


def _linear_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = extend(nn.Linear(4, 2).double())
    loss_fn = extend(nn.MSELoss())
    x, y = (
        torch.randn(16, 4, dtype=torch.float64),
        torch.randn(16, 2, dtype=torch.float64),
    )
    return model, loss_fn, x, y


def _closure(probe, model, loss_fn, x, y):
    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("mode", ["observe", "apply"])
def test_truth_and_rho_are_exact_on_a_quadratic_loss(mode):
    model, loss_fn, x, y = _linear_problem()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5),
        curvature=("hessian-exact", "ggn"),
        mode=mode,
        model=model,
        loss_fn=loss_fn,
        truth_every=1,
        track_rho=True,
    )
    for _ in range(4):
        probe.step(_closure(probe, model, loss_fn, x, y))
    for r in probe.history:
        exact = r.alphas["hessian-exact"]
        assert r.extra["line_status"] == "ok"
        assert r.extra["alpha_line"] == pytest.approx(exact, rel=1e-7)
        assert r.extra["loss_line0"] == pytest.approx(r.loss, rel=1e-12)
        assert r.extra["loss_line"] <= r.loss
        # h(α_line) = h(0) − ½ (dᵀg)² / dᵀHd
        drop = 0.5 * r.slope**2 / r.curvatures["hessian-exact"]
        assert r.extra["loss_line"] == pytest.approx(r.loss - drop, rel=1e-9)
        assert r.extra["rho"] == pytest.approx(1.0, abs=1e-8)
        assert r.extra["curvature_secant"] == pytest.approx(
            r.curvatures["hessian-exact"], rel=1e-7
        )
        assert r.extra["alpha_secant"] == pytest.approx(exact, rel=1e-7)
        t = r.applied
        assert r.extra["predicted_change"] == pytest.approx(
            t * r.slope + 0.5 * t * t * r.curvatures["hessian-exact"]
        )


def test_truth_every_k_and_record_keys():
    model, loss_fn, x, y = _linear_problem()
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=0.01),
        curvature="ggn-exact",
        model=model,
        loss_fn=loss_fn,
        truth_every=3,
    )
    for _ in range(7):
        probe.step(_closure(probe, model, loss_fn, x, y))
    with_truth = [r.step for r in probe.history if "alpha_line" in r.extra]
    assert with_truth == [0, 3, 6]
    assert not any("rho" in r.extra for r in probe.history)
    keys = set(probe.history[0].extra)
    assert {"alpha_line", "loss_line", "loss_line0", "line_status"} <= keys


def test_truth_is_plotted():
    pytest.importorskip("matplotlib")
    from alphawrap.report import plot_history, pyplot

    model, loss_fn, x, y = _linear_problem()
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.01),
        curvature="ggn-exact",
        model=model,
        loss_fn=loss_fn,
        truth_every=1,
    )
    for _ in range(3):
        probe.step(_closure(probe, model, loss_fn, x, y))
    fig = plot_history(probe.history)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any("line search" in label for label in labels)
    pyplot().close(fig)


@pytest.mark.parametrize(
    "kwargs", [{"truth_every": 2}, {"track_rho": True}, {"adaptive_damping": True}]
)
def test_needs_model_and_loss_fn(kwargs):
    model = extend(nn.Linear(3, 1))
    with pytest.raises(TypeError, match="model= and loss_fn="):
        AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    with pytest.raises(TypeError, match="needs loss_fn="):
        AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), model=model, **kwargs)


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_invalid_truth_every(every):
    model = extend(nn.Linear(3, 1))
    with pytest.raises(ValueError, match="truth_every"):
        AlphaProbe(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            loss_fn=nn.MSELoss(),
            truth_every=every,
        )


# ------------------------------------------------------------ non-disturbance


def _noisy_model() -> nn.Sequential:
    torch.manual_seed(0)
    return extend(
        nn.Sequential(
            nn.Linear(6, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(16, 3),
        )
    )


def _data(n: int = 4):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen))
        for _ in range(n)
    ]


def _trajectory(wrap: dict | None, curvature=("hessian", "ggn-exact")):
    model = _noisy_model()
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if wrap is not None:
        opt = AlphaProbe(opt, curvature=curvature, model=model, loss_fn=loss_fn, **wrap)
    torch.manual_seed(123)
    states = []
    for x, y in _data():

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        states.append(
            (
                copy.deepcopy(model.state_dict()),  # parameters and BatchNorm buffers
                [p.grad.clone() for p in model.parameters()],
                copy.deepcopy(opt.state_dict()["state"]),
                torch.get_rng_state().clone(),  # dropout draws
            )
        )
    return states, opt


def test_observe_mode_stays_bitwise_identical_with_batchnorm_and_dropout():
    plain, _ = _trajectory(None)
    probed, probe = _trajectory({"truth_every": 1, "track_rho": True})
    for (sa, ga, oa, ra), (sb, gb, ob, rb) in zip(plain, probed):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
        assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
        assert torch.equal(ra, rb)
    for r in probe.history:
        # the replay sees the closure's batch statistics and dropout masks
        assert r.extra["loss_line0"] == r.loss
        assert r.extra["line_status"] == "ok"
        assert math.isfinite(r.extra["rho"])


def test_truth_does_not_change_the_curvatures_measured():
    _, without = _trajectory({})
    _, with_truth = _trajectory({"truth_every": 1, "track_rho": True})
    for a, b in zip(without.history, with_truth.history):
        assert a.curvatures == b.curvatures
        assert a.alphas == b.alphas


def test_batch_objective_leaves_backpack_quantities_and_grads_alone():
    model = _noisy_model()
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = _data(1)[0]
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    with backpack(HMP()):
        loss = loss_fn(model(x), y)
        loss.backward()
    stored = {
        (i, name): getattr(m, name)
        for i, m in enumerate(model.modules())
        for name in ("input0", "output")
        if hasattr(m, name)
    }
    copies = {k: v.clone() for k, v in stored.items()}
    grads = [p.grad.clone() for p in model.parameters()]
    hmps = [p.hmp for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    batch = RecordedBatch.from_call(model, loss_fn, x, y)
    batch.rng_state = (rng, None)
    params = list(model.parameters())
    directions = [torch.randn_like(p) for p in params]
    objective = BatchObjective(batch, params, params, directions)
    before = torch.get_rng_state()
    assert objective.value(0.0) == loss.item()
    for alpha in (0.5, 1.0, 3.0):
        objective(alpha)
    assert torch.equal(torch.get_rng_state(), before)
    for key, value in stored.items():
        module = list(model.modules())[key[0]]
        assert getattr(module, key[1]) is value
        assert torch.equal(value, copies[key])
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert all(p.hmp is h for p, h in zip(params, hmps))
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())


def test_batch_objective_refuses_parameters_outside_the_model():
    model, loss_fn, x, y = _linear_problem()
    stray = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    params = [*model.parameters(), stray]
    batch = RecordedBatch.from_call(model, loss_fn, x, y)
    directions = [torch.zeros_like(p) for p in params]
    BatchObjective(batch, params, params, directions)  # does not move: fine
    directions[-1] = torch.ones_like(stray)
    with pytest.raises(Exception, match="not a parameter of the model"):
        BatchObjective(batch, params, params, directions)


# ------------------------------------------------------------ torch.distributed


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    model = _ddp_model()
    loss_fn = extend(nn.CrossEntropyLoss())
    net = model
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        net = DDP(model)
    probe = AlphaProbe(
        torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        model=model,
        loss_fn=loss_fn,
        **DDP_OPTIONS,
    )
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=gen)
        x, y = x[rank::world], y[rank::world]

        def closure(x=x, y=y):
            probe.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            return loss

        probe.step(closure)
    torch.save([r.to_dict() for r in probe.history], f"{out}.{world}.{rank}")
    if world > 1:
        dist.destroy_process_group()


DDP_OPTIONS = dict(
    curvature="ggn-exact",
    mode="apply",
    truth_every=1,
    track_rho=True,
    adaptive_damping=True,
    damping=1e-2,
)


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())


@pytest.mark.distributed
def test_truth_and_rho_under_ddp_equal_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "records")
    mp.start_processes(_ddp_worker, args=(2, port, out), nprocs=2, start_method="spawn")
    _ddp_worker(0, 1, port, out)
    one = torch.load(f"{out}.1.0", weights_only=True)
    ranks = [torch.load(f"{out}.2.{r}", weights_only=True) for r in range(2)]
    assert ranks[0] == ranks[1]  # every process takes the same decisions
    for a, b in zip(one, ranks[0]):
        for key in ("alpha_line", "loss_line", "rho", "damping", "loss_new"):
            assert b["extra"][key] == pytest.approx(a["extra"][key], rel=1e-9)
