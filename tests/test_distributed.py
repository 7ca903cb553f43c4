"""AlphaProbe under torch.distributed: 2 CPU processes, gloo, DDP.

One start of two processes (fork on Linux, else spawn) runs every scenario in
turn; the tests compare what the ranks saved with each other and with a
single-process reference. Deselect with ``-m "not distributed"``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import os
import pickle
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from backpack import extend
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from alphawrap import AlphaProbe, cli
from alphawrap.distributed import (
    DistributedReducer,
    Launch,
    is_distributed,
    launch_from_env,
)
from alphawrap.errors import CurvatureError, ProbeError

WORLD = 2
BATCH = 4  # per process
CURVATURES = ("hessian", "ggn", "pch-clip", "diag-ggn")
CLI_ARGS = (
    *("--dataset", "regression", "--hidden", "6", "--steps", "4"),
    *("--batch-size", "8", "--curvature", "hessian,ggn", "--mode", "apply"),
    *("--dtype", "float64", "--quiet"),
)
SHORT_TIMEOUT = 3.0  # seconds, for the groups in which a process fails


def build(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]
    return extend(nn.Sequential(*layers).to(dtype))


def batch(step: int, reduction: str, dtype: torch.dtype, rank: int | None = None):
    """The global batch of ``WORLD * BATCH`` samples of a step, or a rank's shard."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * BATCH, 4, generator=g, dtype=dtype)
    if reduction == "mean":
        y = torch.randint(0, 3, (WORLD * BATCH,), generator=g)
    else:
        y = torch.randn(WORLD * BATCH, 3, generator=g, dtype=dtype)
    if rank is not None:
        x, y = (
            x[rank * BATCH : (rank + 1) * BATCH],
            y[rank * BATCH : (rank + 1) * BATCH],
        )
    return x, y


def loss_module(reduction: str) -> nn.Module:
    if reduction == "mean":
        return extend(nn.CrossEntropyLoss())
    return extend(nn.MSELoss(reduction="sum"))


def train(model, probe, loss_fn, reduction, dtype, modes, rank=None):
    """Run one probed step per entry of ``modes``; return the records as dicts."""
    for step, mode in enumerate(modes):
        probe.mode = mode
        x, y = batch(step, reduction, dtype, rank)

        def closure(x=x, y=y):
            probe.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        probe.step(closure)
    return [r.to_dict() for r in probe.history]


MODES = ("observe", "observe", "apply", "apply", "apply")


def optimizer(params, reduction: str, processes: int) -> torch.optim.Optimizer:
    """Adam for the mean loss; for the sum loss SGD whose step is the same ``d``.

    DDP averages gradients, so with a sum-reduced loss the processes descend
    ``1/W`` of the concatenated batch's sum: SGD with ``1/W`` of the learning
    rate takes the same step on one process.
    """
    if reduction == "mean":
        return torch.optim.Adam(params, lr=0.05)
    return torch.optim.SGD(params, lr=0.002 * processes / WORLD)


# ----------------------------------------------------------------- scenarios
def scenario_equivalence(rank: int, reduction: str) -> dict:
    model = build()
    ddp = DDP(model)
    probe = AlphaProbe(
        optimizer(ddp.parameters(), reduction, WORLD), CURVATURES, fallback=0.5
    )
    records = train(
        ddp, probe, loss_module(reduction), reduction, torch.float64, MODES, rank
    )
    return {
        "records": records,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def scenario_replicas(rank: int, reduce: bool) -> dict:
    model = build(dtype=torch.float32)
    ddp = DDP(model)
    probe = AlphaProbe(
        torch.optim.Adam(ddp.parameters(), lr=0.05),
        ("ggn", "hessian"),
        mode="apply",
        distributed=None if reduce else False,
    )
    records = train(
        ddp, probe, loss_module("mean"), "mean", torch.float32, ("apply",) * 6, rank
    )
    return {
        "records": records,
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _one_step(probe, ddp, step: int) -> None:
    x, y = batch(step, "mean", torch.float64, dist.get_rank())
    loss_fn = loss_module("mean")

    def closure():
        probe.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        return loss

    probe.step(closure)


def _attempt(probe, ddp, step: int) -> dict:
    start = time.monotonic()
    try:
        _one_step(probe, ddp, step)
    except BaseException as error:
        notes = "\n".join(getattr(error, "__notes__", []))
        return {
            "error": type(error).__name__,
            "message": f"{error}\n{notes}",
            "seconds": time.monotonic() - start,
        }
    return {"error": None, "seconds": time.monotonic() - start}


def scenario_probe_failure(rank: int) -> dict:
    """Rank 1 fails inside the probe (curvature; closure checks); all must raise."""
    model = build(seed=3)
    ddp = DDP(model)
    probe = AlphaProbe(torch.optim.SGD(ddp.parameters(), lr=0.1), "ggn", mode="apply")
    curvature = probe._curvatures[0]
    out = {"ok0": _attempt(probe, ddp, 0)}  # learns the packet layout
    if rank == 1:

        def broken(ctx):
            raise RuntimeError("injected failure in the curvature")

        curvature.quadratic = broken
    out["in_probe"] = _attempt(probe, ddp, 1)
    if rank == 1:
        del curvature.quadratic

        def refuse(ctx):
            raise CurvatureError("injected failure after backward")

        curvature.check_backward = refuse
    out["after_backward"] = _attempt(probe, ddp, 1)
    if rank == 1:
        del curvature.check_backward
    out["ok1"] = _attempt(probe, ddp, 1)  # both still in step, collectives aligned
    out["history"] = len(probe.history)
    out["step_count"] = probe.step_count
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def scenario_ignored_targets(rank: int) -> dict:
    """Only rank 1's shard has an ignored target; diag-ggn must refuse on both."""
    model = build(seed=6)
    ddp = DDP(model)
    probe = AlphaProbe(torch.optim.SGD(ddp.parameters(), lr=0.1), "diag-ggn")
    loss_fn = loss_module("mean")
    x, y = batch(0, "mean", torch.float64, rank)
    if rank == 1:
        y = y.clone()
        y[0] = loss_fn.ignore_index

    def closure():
        probe.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        return loss

    try:
        probe.step(closure)
        error, message = None, ""
    except CurvatureError as caught:
        error, message = type(caught).__name__, str(caught)
    return {
        "error": error,
        "message": message,
        "history": len(probe.history),
        "params": [p.detach().clone() for p in model.parameters()],
        "initial": [p.detach().clone() for p in build(seed=6).parameters()],
    }


def scenario_first_step_failure(rank: int) -> dict:
    """Rank 1 fails in the probe before any collective: the probe's timeout."""
    group = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=SHORT_TIMEOUT)
    )
    ddp = DDP(build(seed=4), process_group=group)
    reducer = DistributedReducer(group, timeout=1.0)
    probe = AlphaProbe(
        torch.optim.SGD(ddp.parameters(), lr=0.1), "ggn", distributed=reducer
    )
    if rank == 1:

        def broken(ctx):
            raise RuntimeError("injected failure in the curvature")

        probe._curvatures[0].quadratic = broken
    return _attempt(probe, ddp, 0)


def scenario_closure_failure(rank: int) -> dict:
    """Rank 1 raises in its closure before backward: the process group's timeout."""
    group = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=SHORT_TIMEOUT)
    )
    ddp = DDP(build(seed=5), process_group=group)
    probe = AlphaProbe(
        torch.optim.SGD(ddp.parameters(), lr=0.1), "ggn", process_group=group
    )
    if rank == 1:

        def ddp(x):
            raise ValueError("injected failure in forward")

    return _attempt(probe, ddp, 0)


EXTRAS_BATCH = 128  # per process: the noise estimate compares standard errors


def extras_run(model, forward, rank: int | None = None) -> list[dict]:
    """Per-block numbers and the noise estimate (opt-in), 2 observe steps."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * EXTRAS_BATCH, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * EXTRAS_BATCH,), generator=g)
    if rank is not None:
        part = slice(rank * EXTRAS_BATCH, (rank + 1) * EXTRAS_BATCH)
        x, y = x[part], y[part]
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=0.05),
        ("ggn", "hessian"),
        model=model,
        per_block=True,
        noise=True,
    )
    loss_fn = loss_module("mean")
    for _ in range(2):

        def closure():
            probe.zero_grad()
            loss = loss_fn(forward(x), y)
            loss.backward()
            return loss

        probe.step(closure)
    return [r.to_dict() for r in probe.history]


def scenario_extras(rank: int) -> list[dict]:
    model = build(seed=6)
    return extras_run(model, DDP(model), rank)


def scenario_compiled(rank: int) -> dict:
    """``torch.compile(DDP(model))`` as ``model=``, probing every second step,
    next to the same run uncompiled; the steps between probes run compiled."""
    from torch._dynamo.utils import counters

    out = {}
    for compiled in (False, True):
        graphs = counters["stats"]["unique_graphs"]
        model = build(seed=8, dtype=torch.float32)
        ddp = DDP(model)
        forward = torch.compile(ddp, backend="eager") if compiled else ddp
        # Compiled (and run) before the probe exists, as in a training script.
        # (This passes without the probe's eager stance too: under DDP the
        # probe's hooks still saw every module. It guards the combination.)
        forward(batch(0, "mean", torch.float32, rank)[0]).sum().backward()
        model.zero_grad(set_to_none=True)
        probe = AlphaProbe(
            torch.optim.Adam(model.parameters(), lr=0.05),
            ("hessian-exact", "ggn-exact", "hessian"),
            model=forward,
            loss_fn=loss_module("mean"),
            interval=2,
        )
        records = train(
            forward, probe, probe.loss_fn, "mean", torch.float32, ["observe"] * 4, rank
        )
        out["compiled" if compiled else "eager"] = {
            "records": records,
            "params": [p.detach().clone() for p in model.parameters()],
            "graphs": counters["stats"]["unique_graphs"] - graphs,
        }
    return out


def scenario_mc_draws(rank: int) -> float:
    """The same model and shard on both processes, numbers not combined."""
    model = build(seed=7)
    probe = AlphaProbe(
        torch.optim.SGD(model.parameters(), lr=0.1), "diag-ggn-mc", distributed=False
    )
    # rank=0: both processes train on the first shard
    train(model, probe, loss_module("mean"), "mean", torch.float64, ["observe"], 0)
    return probe.history[-1].curvatures["diag-ggn-mc"]


def scenario_cli(rank: int, out: Path) -> dict:
    """The command-line tool in each process, as under torchrun."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main([*CLI_ARGS, "--out", str(out / f"cli{rank}")])
    return {"status": status, "stdout": stdout.getvalue()}


SCENARIOS = {
    "mean": lambda r, out: scenario_equivalence(r, "mean"),
    "sum": lambda r, out: scenario_equivalence(r, "sum"),
    "replicas": lambda r, out: scenario_replicas(r, True),
    "replicas-unreduced": lambda r, out: scenario_replicas(r, False),
    "probe-failure": lambda r, out: scenario_probe_failure(r),
    "ignored-targets": lambda r, out: scenario_ignored_targets(r),
    "extras": lambda r, out: scenario_extras(r),
    "mc-draws": lambda r, out: scenario_mc_draws(r),
    "compiled": lambda r, out: scenario_compiled(r),
    "cli": scenario_cli,
    # These two leave a process group broken: keep them last.
    "first-step-failure": lambda r, out: scenario_first_step_failure(r),
    "closure-failure": lambda r, out: scenario_closure_failure(r),
}


def _worker(rank: int, port: int, out: str, started: float) -> None:
    torch.set_num_threads(1)
    # What torchrun sets; launch_from_env is what the command-line tool calls.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    results: dict = {}
    try:
        launch = launch_from_env("cpu", timeout=60)
        results["launch"] = (launch.rank, launch.world, launch.owns_group)
        results["active"] = AlphaProbe(
            torch.optim.SGD(build().parameters(), lr=0.1)
        ).distributed.active
        results["seconds"] = {"start": time.monotonic() - started}
        for name, scenario in SCENARIOS.items():
            begin = time.monotonic()
            results[name] = scenario(rank, Path(out))
            dist.barrier()  # the default group stays healthy
            results["seconds"][name] = time.monotonic() - begin
    except BaseException:
        results["crash"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


# ------------------------------------------------------------------- fixture
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    start = time.monotonic()
    # fork (Linux) skips re-importing torch in each process (seconds on a busy
    # machine); the workers set one thread first, like DataLoader workers.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    # The first optimizer of a process imports torch._dynamo (seconds): do it once.
    AlphaProbe(torch.optim.SGD(build().parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork + threads, 3.12+
        context = mp.start_processes(
            _worker,
            args=(_free_port(), str(tmp), time.monotonic()),
            nprocs=WORLD,
            join=False,
            start_method=method,
        )
    deadline = time.monotonic() + 120  # a hang must fail the test, not CI
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process run did not finish within 120 s")
    results = [pickle.loads((tmp / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
    for res in results:
        res["out"] = str(tmp)
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    print(f"2-process run: {time.monotonic() - start:.1f}s", results[0]["seconds"])
    return results


def reference(reduction: str) -> list[dict]:
    model = build()
    probe = AlphaProbe(
        optimizer(model.parameters(), reduction, 1), CURVATURES, fallback=0.5
    )
    return train(model, probe, loss_module(reduction), reduction, torch.float64, MODES)


# --------------------------------------------------------------------- tests
@pytest.mark.distributed
def test_a_compiled_ddp_model_gives_the_uncompiled_numbers(ranks):
    """DDP and torch.compile together: probed steps equal the uncompiled run's,
    on both processes; the steps between probes (compiled) take the same steps."""
    for res in ranks:
        eager, compiled = res["compiled"]["eager"], res["compiled"]["compiled"]
        assert [r["step"] for r in compiled["records"]] == [0, 2]
        assert compiled["graphs"] > 0 and eager["graphs"] == 0
        for a, b in zip(eager["records"], compiled["records"]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
            for name, value in a["curvatures"].items():
                assert b["curvatures"][name] == pytest.approx(value, rel=1e-5)
        for p, q in zip(eager["params"], compiled["params"]):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert (
        ranks[0]["compiled"]["compiled"]["records"]
        == (ranks[1]["compiled"]["compiled"]["records"])
    )


@pytest.mark.distributed
def test_monte_carlo_draws_differ_between_processes(ranks):
    """Same model and data on both ranks: only the rank in the seed differs."""
    assert ranks[0]["mc-draws"] != ranks[1]["mc-draws"]


@pytest.mark.distributed
def test_active_under_ddp(ranks):
    assert [r["active"] for r in ranks] == [True, True]


@pytest.mark.distributed
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_one_process_on_the_concatenated_batch(ranks, reduction):
    ref = reference(reduction)
    scale = 1.0 if reduction == "mean" else 1.0 / WORLD  # DDP averages gradients
    for res in ranks:
        got = res[reduction]["records"]
        assert len(got) == len(ref) == len(MODES)
        for g, r in zip(got, ref):
            assert g["statuses"] == r["statuses"]
            assert g["action"] == r["action"]
            assert g["loss"] == pytest.approx(r["loss"] * scale, rel=1e-9)
            assert g["slope"] == pytest.approx(r["slope"] * scale, rel=1e-9)
            for name in CURVATURES:
                assert g["curvatures"][name] == pytest.approx(
                    r["curvatures"][name] * scale, rel=1e-9
                )
                assert g["alphas"][name] == pytest.approx(r["alphas"][name], rel=1e-9)
    assert ranks[0][reduction]["records"] == ranks[1][reduction]["records"]


def assert_close(got, want, rel: float) -> None:
    """Nested records: numbers to ``rel``, everything else equal."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_close(got[key], want[key], rel)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w, rel)
    elif isinstance(want, float) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=rel, abs=1e-15)
    else:
        assert got == want


@pytest.mark.distributed
def test_per_block_numbers_and_noise_equal_one_process(ranks):
    model = build(seed=6)
    want = extras_run(model, model)
    got = ranks[0]["extras"]
    assert got == ranks[1]["extras"]
    for g, w in zip(got, want):
        assert_close(g["extra"]["blocks"], w["extra"]["blocks"], rel=1e-9)
        assert_close(g["extra"]["groups"], w["extra"]["groups"], rel=1e-9)
        # Within-process variances combine as a variance of the mean over
        # processes (weight²): close to the whole batch's, not √2 off.
        se, se_one = g["extra"]["noise"]["slope_se"], w["extra"]["noise"]["slope_se"]
        assert se == pytest.approx(se_one, rel=0.05)


@pytest.mark.distributed
def test_apply_mode_keeps_replicas_bitwise_equal(ranks):
    a, b = (r["replicas"] for r in ranks)
    assert [rec["action"] for rec in a["records"]].count("alpha") >= 4
    assert a["records"] == b["records"]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
    # Without the reduction every process takes its own α*: the replicas drift.
    a, b = (r["replicas-unreduced"] for r in ranks)
    assert not all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


@pytest.mark.distributed
def test_failure_inside_the_probe_raises_on_every_process(ranks):
    r0, r1 = (r["probe-failure"] for r in ranks)
    for res in (r0, r1):
        assert res["ok0"]["error"] is None and res["ok1"]["error"] is None
    assert r1["in_probe"]["error"] == "RuntimeError"
    assert "other processes were told" in r1["in_probe"]["message"]
    assert r1["after_backward"]["error"] == "CurvatureError"
    for case in ("in_probe", "after_backward"):
        assert r0[case]["error"] == "DistributedProbeError"
        assert "1 of 2 processes failed" in r0[case]["message"]
        assert r0[case]["seconds"] < 10.0  # the default group's timeout is 60 s
    # Both rolled the failed steps back and went on in step.
    assert r0["history"] == r1["history"] == 2
    assert r0["step_count"] == r1["step_count"] == 2
    assert all(torch.equal(p, q) for p, q in zip(r0["params"], r1["params"]))


@pytest.mark.distributed
def test_ignored_targets_on_one_process_are_refused_on_every_process(ranks):
    """The ignored-target flag rides in the step's one collective: the process
    whose shard is clean refuses too, and both leave the parameters alone."""
    for res in (r["ignored-targets"] for r in ranks):
        assert res["error"] == "CurvatureError"
        assert "ignore_index (-100)" in res["message"]
        assert res["history"] == 0
        assert all(torch.equal(p, q) for p, q in zip(res["params"], res["initial"]))


@pytest.mark.distributed
def test_failure_before_the_first_collective_is_bounded_by_the_probe_timeout(ranks):
    r0, r1 = (r["first-step-failure"] for r in ranks)
    assert r1["error"] == "RuntimeError"
    assert "before the probe's first collective" in r1["message"]
    assert r0["error"] == "DistributedProbeError"
    assert "Another process most likely failed" in r0["message"]
    assert r0["seconds"] < 1.0 + 5.0


@pytest.mark.distributed
def test_failure_in_the_closure_is_bounded_by_the_group_timeout(ranks):
    r0, r1 = (r["closure-failure"] for r in ranks)
    assert r1["error"] == "ValueError"
    assert r0["error"] is not None
    assert "another process" in r0["message"].lower()
    assert r0["seconds"] < SHORT_TIMEOUT + 5.0


# ------------------------------------------------- no process group needed
def test_inactive_without_process_group():
    assert not is_distributed()
    model = build()
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1))
    assert probe.distributed.active is False
    assert (
        AlphaProbe(
            torch.optim.SGD(model.parameters(), lr=0.1), distributed=False
        ).distributed.enabled
        is False
    )


def test_distributed_true_without_process_group_fails_and_changes_nothing():
    model = build()
    probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1), distributed=True)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0, "mean", torch.float64, 0)
    loss_fn = loss_module("mean")

    def closure():
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ProbeError, match="not initialised"):
        probe.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert len(probe.history) == 0


def test_options_are_validated():
    params = build().parameters()
    with pytest.raises(TypeError, match="distributed must be"):
        AlphaProbe(torch.optim.SGD(params, lr=0.1), distributed="yes")
    with pytest.raises(ValueError, match="process_group"):
        DistributedReducer.from_option(DistributedReducer(), process_group=object())
    with pytest.raises(ValueError, match="timeout"):
        DistributedReducer(timeout=0)


def test_reducer_copies_and_pickles():
    group = object()
    reducer = DistributedReducer(group, weight=0.5, timeout=3.0)
    clone = copy.deepcopy(reducer)
    assert clone.process_group is group and clone.weight == 0.5
    restored = pickle.loads(pickle.dumps(reducer))
    assert restored.process_group is None and restored.timeout == 3.0


def test_cost_of_one_step():
    # [loss, dᵀg, ‖d‖², ‖g‖², 3 curvatures] + 3 shared means + 1 failure flag
    assert DistributedReducer.bytes_per_step(4 + 3, itemsize=8) == 88


@pytest.mark.distributed
def test_command_line_tool_under_torchrun(ranks, tmp_path):
    r0, r1 = (r["cli"] for r in ranks)
    assert ranks[0]["launch"] == (0, WORLD, True)
    assert ranks[1]["launch"] == (1, WORLD, True)
    assert r0["status"] == r1["status"] == 0
    assert "Held-out loss" in r0["stdout"] and r1["stdout"] == ""
    out = Path(ranks[0]["out"])
    assert not any((out / "cli1").iterdir())  # only rank 0 writes files
    # The global batch of 8 is split 4 + 4: the same run as one process.
    assert cli.main([*CLI_ARGS, "--out", str(tmp_path)]) == 0
    got = json.loads((out / "cli0" / "history.json").read_text())
    want = json.loads((tmp_path / "history.json").read_text())
    got = got["records"] if isinstance(got, dict) else got
    want = want["records"] if isinstance(want, dict) else want
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-9)
        assert g["alphas"] == pytest.approx(w["alphas"], rel=1e-9)


def test_single_process_launch_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launch = launch_from_env("cpu")
    assert (launch.rank, launch.world, launch.main, launch.owns_group) == (
        0,
        1,
        True,
        False,
    )
    model = build()
    assert launch.wrap(model) is model and Launch.unwrap(model) is model
    index = torch.arange(8)
    assert torch.equal(launch.shard(index), index)
    launch.close()


def test_launch_shards_and_checks_the_global_batch():
    launch = Launch(rank=1, world=2)
    assert launch.shard(torch.arange(8)).tolist() == [4, 5, 6, 7]
    launch.check_batch_size(8)
    with pytest.raises(ValueError, match="multiple of 2"):
        launch.check_batch_size(7)


def test_world_size_without_torchrun_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        launch_from_env("cpu")
