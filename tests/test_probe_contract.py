"""AlphaProbe honours the torch.optim.Optimizer contract.

Schedulers, hooks, state dicts, copies and pickles must treat the probe exactly
like the optimizer it wraps.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from backpack import extend
from torch import Tensor, nn
from torch.optim import Optimizer, lr_scheduler

from alphawrap import AlphaProbe, ProbeRecord, Status

IN, HIDDEN, OUT, BATCH = 4, 5, 3, 8
LOSS_FN = extend(nn.CrossEntropyLoss())


def make_model(extended: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    return extend(model) if extended else model


def make_batches(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, BATCH, IN, generator=gen)
    ys = torch.randint(0, OUT, (n, BATCH), generator=gen)
    return list(zip(xs, ys))


def make_probe(model: nn.Module, **kwargs) -> AlphaProbe:
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs.setdefault("curvature", ("ggn", "hessian"))
    return AlphaProbe(inner, **kwargs)


def closure_for(opt: Optimizer, model: nn.Module, batch):
    x, y = batch

    def closure() -> Tensor:
        opt.zero_grad()
        loss = LOSS_FN(model(x), y)
        loss.backward()
        return loss

    return closure


def run(opt: Optimizer, model: nn.Module, batches) -> list[Tensor]:
    return [opt.step(closure_for(opt, model, b)) for b in batches]


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -------------------------------------------------------------------- identity
def test_is_an_optimizer_and_forwards_live_objects():
    model = make_model()
    probe = make_probe(model)
    assert isinstance(probe, Optimizer)
    inner = probe.inner
    assert probe.param_groups is inner.param_groups
    assert probe.state is inner.state
    assert probe.defaults is inner.defaults
    probe.param_groups[0]["lr"] = 0.05  # writes reach the inner optimizer
    assert inner.param_groups[0]["lr"] == 0.05
    run(probe, model, make_batches(2))
    saved = probe.state_dict()
    probe.load_state_dict(saved)  # replaces the inner list and state
    assert probe.param_groups is inner.param_groups
    assert probe.state is inner.state
    assert probe.defaults is inner.defaults
    inner.load_state_dict(saved)  # also when the inner optimizer is loaded directly
    assert probe.param_groups is inner.param_groups
    assert probe.state is inner.state


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_delegates(set_to_none):
    model = make_model()
    probe = make_probe(model)
    run(probe, model, make_batches(1))
    assert all(p.grad is not None for p in model.parameters())
    probe.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()


def test_added_param_group_is_stepped_and_probed():
    batches = make_batches(3)
    model, ref_model = make_model(), make_model()
    probe = AlphaProbe(torch.optim.SGD(model[0].parameters(), lr=0.1), "ggn")
    ref = AlphaProbe(
        torch.optim.SGD(
            [
                {"params": ref_model[0].parameters()},
                {"params": ref_model[2].parameters(), "lr": 0.02},
            ],
            lr=0.1,
        ),
        "ggn",
    )
    probe.add_param_group({"params": model[2].parameters(), "lr": 0.02})
    assert (
        len(probe.param_groups) == 2 and probe.param_groups is probe.inner.param_groups
    )
    before = [p.detach().clone() for p in model[2].parameters()]
    run(probe, model, batches)
    run(ref, ref_model, batches)
    assert not any(torch.equal(p, b) for p, b in zip(model[2].parameters(), before))
    assert params_equal(model, ref_model)
    assert [r.to_dict() for r in probe.history] == [r.to_dict() for r in ref.history]


def test_repr_names_probe_settings_and_inner_optimizer():
    model = make_model()
    probe = make_probe(model, mode="apply", bounds=(0.0, 4.0))
    text = repr(probe)
    assert text.startswith("AlphaProbe(")
    for piece in ("ggn", "hessian", "'apply'", "(0.0, 4.0)"):
        assert piece in text
    for line in repr(probe.inner).splitlines():
        assert line.strip() in text


@pytest.mark.parametrize("interval", [1, 2])
def test_step_hooks_fire_once_per_step(interval):
    model = make_model()
    probe = make_probe(model, interval=interval)
    calls: list[tuple[str, int]] = []
    pre = probe.register_step_pre_hook(
        lambda opt, args, kwargs: calls.append(("pre", opt.step_count))
    )
    post = probe.register_step_post_hook(
        lambda opt, args, kwargs: calls.append(("post", opt.step_count))
    )
    inner_calls = []
    probe.inner.register_step_post_hook(lambda *a: inner_calls.append(1))
    run(probe, model, make_batches(4))
    expected = [
        (kind, n + (kind == "post")) for n in range(4) for kind in ("pre", "post")
    ]
    assert calls == expected
    assert len(inner_calls) == 4
    pre.remove()
    post.remove()
    run(probe, model, make_batches(1))
    assert len(calls) == 8


def test_global_step_hooks_fire_and_a_pre_hook_can_replace_the_arguments():
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model = make_model()
    probe = make_probe(model)
    seen: list[str] = []
    batches = make_batches(2)
    other = closure_for(probe, model, batches[1])

    def replace(opt, args, kwargs):
        if opt is probe:  # the inner optimizer's own step fires global hooks too
            seen.append("global pre")
            assert args[0] is probe  # as torch passes them: self first
            return (probe, other), {}
        return None

    handles = [
        register_optimizer_step_pre_hook(replace),
        register_optimizer_step_post_hook(
            lambda opt, args, kwargs: opt is probe and seen.append("global post")
        ),
    ]
    try:
        loss = probe.step(closure_for(probe, model, batches[0]))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == ["global pre", "global post"]
    x, y = batches[1]
    assert probe.history[-1].loss == pytest.approx(LOSS_FN(make_model()(x), y).item())
    assert loss.item() == probe.history[-1].loss


def test_a_pre_hook_returning_something_else_is_an_error():
    model = make_model()
    probe = make_probe(model)
    probe.register_step_pre_hook(lambda opt, args, kwargs: "oops")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        run(probe, model, make_batches(1))


def test_step_is_a_profiler_region_like_any_optimizers():
    model = make_model()
    probe = make_probe(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        run(probe, model, make_batches(1))
    names = [e.name for e in p.events()]
    assert names.count("Optimizer.step#AlphaProbe.step") == 1
    assert names.count("Optimizer.step#SGD.step") == 1  # the inner step, inside


# ------------------------------------------------------------------ schedulers
SCHEDULERS: dict[str, Callable[[Optimizer], object]] = {
    "step": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "one-cycle": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=12),
    "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "plateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def _sched_step(sched, loss: Tensor) -> None:
    if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
        sched.step(loss.item())
    else:
        sched.step()


def _schedule(opt, model, sched, batches) -> list[float]:
    lrs = []
    for b in batches:
        loss = opt.step(closure_for(opt, model, b))
        _sched_step(sched, loss)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_drive_the_probe_like_the_inner_optimizer(name):
    build = SCHEDULERS[name]
    batches = make_batches(12)
    ref_model = make_model(extended=False)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_lrs = _schedule(ref, ref_model, build(ref), batches)
    assert len(set(ref_lrs)) > 2  # the schedule does move

    model = make_model()
    probe = make_probe(model)
    sched = build(probe)
    lrs = _schedule(probe, model, sched, batches[:5])
    assert [r.lrs[0] for r in probe.history[1:]] == lrs[:4]
    # checkpoint mid-run, resume into fresh objects
    saved = copy.deepcopy((model.state_dict(), probe.state_dict(), sched.state_dict()))
    model = make_model()
    probe = make_probe(model)
    sched = build(probe)
    model.load_state_dict(saved[0])
    probe.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    lrs += _schedule(probe, model, sched, batches[5:])
    assert lrs == ref_lrs
    assert params_equal(model, ref_model)
    assert [r.step for r in probe.history] == list(range(12))


# ----------------------------------------------------------------- state dicts
@pytest.mark.parametrize("mode", ["observe", "apply"])
def test_state_dict_round_trip_resumes_bitwise(mode, tmp_path):
    batches = make_batches(8)
    ref_model = make_model()
    ref = make_probe(ref_model, mode=mode)
    run(ref, ref_model, batches[:4])

    model = make_model()
    probe = make_probe(model, mode=mode)
    run(probe, model, batches[:4])
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": probe.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)

    model = make_model()
    probe = make_probe(model, mode="observe" if mode == "apply" else "apply")
    model.load_state_dict(loaded["model"])
    probe.load_state_dict(loaded["opt"])
    assert probe.mode == mode and probe.step_count == 4
    assert list(probe.history) == list(ref.history)[:4]
    assert params_equal(model, ref_model)
    for b in batches[4:]:
        probe.step(closure_for(probe, model, b))
        ref.step(closure_for(ref, ref_model, b))
        assert params_equal(model, ref_model)
        assert probe.history[-1] == ref.history[-1]
    assert list(probe.history) == list(ref.history)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(
            probe.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"]
        )


def test_plain_inner_state_dict_loads_with_warning():
    batches = make_batches(4)
    ref_model = make_model(extended=False)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    run(ref, ref_model, batches[:2])

    model = make_model()
    probe = make_probe(model)
    run(probe, model, batches[:1])  # a history that the plain state dict resets
    model.load_state_dict(ref_model.state_dict())
    with pytest.warns(UserWarning, match="plain optimizer state dict"):
        # deepcopy: torch.optim shares the state tensors of a live state dict
        probe.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert len(probe.history) == 0 and probe.step_count == 0
    run(ref, ref_model, batches[2:])
    run(probe, model, batches[2:])
    assert params_equal(model, ref_model)
    assert [r.step for r in probe.history] == [0, 1]


def test_probe_state_dict_loads_into_plain_inner_optimizer():
    batches = make_batches(5)
    model = make_model()
    probe = make_probe(model)
    run(probe, model, batches[:3])
    plain_model = make_model(extended=False)
    plain_model.load_state_dict(model.state_dict())
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.load_state_dict(copy.deepcopy(probe.state_dict()))
    run(probe, model, batches[3:])
    run(plain, plain_model, batches[3:])
    assert params_equal(model, plain_model)


# ----------------------------------------------------------- copies, pickles
def test_deepcopy_is_independent_and_continues_identically():
    batches = make_batches(6)
    model = make_model()
    probe = make_probe(model)
    run(probe, model, batches[:2])
    model2, probe2 = copy.deepcopy((model, probe))
    assert probe2.inner is not probe.inner and probe2.history is not probe.history
    assert probe2.param_groups is probe2.inner.param_groups
    assert set(map(id, probe2.state)) == set(map(id, model2.parameters()))
    run(probe2, model2, batches[2:])  # the copy runs ahead ...
    assert len(probe.history) == 2 and probe.step_count == 2  # ... alone
    probe2.mode = "apply"
    assert probe.mode == "observe"
    probe2.mode = "observe"
    run(probe, model, batches[2:])
    assert params_equal(model, model2)
    assert list(probe.history) == list(probe2.history)


def test_deepcopy_after_scheduler_steps_the_copy():
    """A scheduler patches ``step`` on the instance; the copy must step itself."""
    batches = make_batches(3)
    model = make_model()
    probe = make_probe(model)
    lr_scheduler.StepLR(probe, step_size=1)
    run(probe, model, batches[:1])
    model2, probe2 = copy.deepcopy((model, probe))
    run(probe2, model2, batches[1:])
    assert len(probe.history) == 1 and len(probe2.history) == 3


def test_pickle_round_trip_continues_identically():
    batches = make_batches(5)
    model = make_model()
    probe = make_probe(model, mode="apply")
    run(probe, model, batches[:2])
    model2, probe2 = pickle.loads(pickle.dumps((model, probe)))
    assert probe2.mode == "apply" and probe2.step_count == 2
    assert list(probe2.history) == list(probe.history)
    for b in batches[2:]:
        probe.step(closure_for(probe, model, b))
        probe2.step(closure_for(probe2, model2, b))
        assert params_equal(model, model2)
    assert list(probe.history) == list(probe2.history)
    # hooks registered after unpickling work on the new probe
    fired = []
    probe2.register_step_post_hook(lambda *a: fired.append(1))
    run(probe2, model2, batches[:1])
    assert fired == [1]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_carry_no_hooks_or_callbacks_like_torch_optim(how):
    """torch.optim drops hooks from copies; so does the probe, record callbacks
    included (a lambda or a TensorBoard writer would not pickle, and a copy
    would otherwise write into the original's log). The original keeps them."""
    batches = make_batches(3)
    model = make_model()
    probe = make_probe(model)
    fired = []
    probe.register_step_pre_hook(lambda *a: fired.append("pre"))
    probe.register_step_post_hook(lambda *a: fired.append("post"))
    probe.register_state_dict_pre_hook(lambda *a: fired.append("sd"))
    probe.add_record_callback(lambda record: fired.append("record"))
    run(probe, model, batches[:1])
    assert fired == ["pre", "record", "post"]
    if how == "deepcopy":
        model2, probe2 = copy.deepcopy((model, probe))
    else:
        model2, probe2 = pickle.loads(pickle.dumps((model, probe)))
    fired.clear()
    run(probe2, model2, batches[1:2])
    probe2.state_dict()
    assert fired == [] and len(probe2.history) == 2
    run(probe, model, batches[1:2])  # the original still has them
    assert fired == ["pre", "record", "post"]
    # the copy takes new ones
    probe2.add_record_callback(lambda record: fired.append("copy"))
    run(probe2, model2, batches[2:])
    assert fired[-1] == "copy"


# -------------------------------------------------------------------- history
PLAIN = (int, float, str, type(None), bool)


def _assert_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            assert type(k) is str, where
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
    else:
        # exact types: no tensors, numpy scalars or str-enums such as Status
        assert type(value) in PLAIN, f"{where} is a {type(value).__name__}"


@pytest.mark.parametrize("mode", ["observe", "apply"])
def test_one_plain_record_per_step(mode):
    batches = make_batches(5)
    model = make_model()
    probe = make_probe(model, mode=mode)
    losses = run(probe, model, batches)
    assert len(probe.history) == probe.step_count == len(batches)
    statuses = {s.value for s in Status}
    for i, (rec, loss) in enumerate(zip(probe.history, losses)):
        assert isinstance(rec, ProbeRecord)
        _assert_plain(rec.to_dict(), "record")
        for name in ("step", "loss", "slope", "direction_norm", "grad_norm", "applied"):
            _assert_plain(getattr(rec, name), name)
        for name in ("curvatures", "alphas", "statuses", "lrs"):
            _assert_plain(getattr(rec, name), name)
        _assert_plain(rec.alpha, "alpha")
        _assert_plain(rec.status, "status")
        _assert_plain(rec.mode, "mode")
        _assert_plain(rec.action, "action")
        assert rec.step == i and rec.mode == mode
        assert rec.loss == loss.item()
        assert set(rec.curvatures) == set(rec.alphas) == {"ggn", "hessian"}
        assert rec.alpha == rec.alphas["ggn"] and rec.status == rec.statuses["ggn"]
        assert rec.status in statuses
        assert rec.action in {"inner", "alpha", "fallback", "skip"}
        assert math.isfinite(rec.slope) and rec.direction_norm > 0
        assert rec.lrs == (0.1,)
        if mode == "observe":
            assert (rec.action, rec.applied) == ("inner", 1.0)
    assert ProbeRecord.from_dict(probe.history[-1].to_dict()) == probe.history[-1]


def test_step_returns_the_closure_result():
    model = make_model()
    probe = make_probe(model)
    batch = make_batches(1)[0]
    returned = []

    def closure():
        probe.zero_grad()
        loss = LOSS_FN(model(batch[0]), batch[1])
        loss.backward()
        returned.append(loss)
        return loss

    assert probe.step(closure) is returned[0]
    assert len(returned) == 1  # the closure ran exactly once
