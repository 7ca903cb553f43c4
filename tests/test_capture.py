"""The closure-free path: ``probe.capture()`` and ``GradScaler``."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from backpack import extend
from torch import Tensor, nn

from alphawrap import AlphaProbe, ClosureError
from alphawrap.curvature import REGISTRY, available
from tests._state import hook_counts

IN, HIDDEN, OUT, BATCH = 4, 5, 3, 8
LOSS_FN = extend(nn.CrossEntropyLoss())
BLOCK = ["hessian", "ggn", "pch-clip", "pch-abs"]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    # Tanh: curvature has residual terms that are scaled through the backward pass
    return extend(
        nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    )


def make_batches(n: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, BATCH, IN, generator=gen)
    ys = torch.randint(0, OUT, (n, BATCH), generator=gen)
    return list(zip(xs, ys))


def make_probe(model: nn.Module, curvature=BLOCK, **kwargs) -> AlphaProbe:
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = [curvature] if isinstance(curvature, str) else curvature
    if any(getattr(REGISTRY[n], "needs_batch", False) for n in names):
        kwargs.update(model=model, loss_fn=LOSS_FN)  # the exact curvatures replay
        try:
            return AlphaProbe(inner, curvature=curvature, **kwargs)
        except TypeError as error:  # pragma: no cover
            if "loss_fn" not in str(error):
                raise
            pytest.skip(f"AlphaProbe does not take loss_fn= yet: {error}")
    return AlphaProbe(inner, curvature=curvature, **kwargs)


def closure_step(probe: AlphaProbe, model: nn.Module, batch) -> Tensor:
    x, y = batch

    def closure() -> Tensor:
        probe.zero_grad()
        loss = LOSS_FN(model(x), y)
        loss.backward()
        return loss

    return probe.step(closure)


def capture_step(probe: AlphaProbe, model: nn.Module, batch, record_loss=True):
    x, y = batch
    probe.zero_grad()
    with probe.capture() as cap:
        loss = LOSS_FN(model(x), y)
        loss.backward()
        if record_loss:
            cap.loss = loss
    assert probe.step() is None
    return loss


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("mode", ["observe", "apply"])
def test_capture_gives_the_closure_path_records(mode):
    batches = make_batches(5)
    model_a, model_b = make_model(), make_model()
    probe_a, probe_b = make_probe(model_a, mode=mode), make_probe(model_b, mode=mode)
    for batch in batches:
        loss_a = closure_step(probe_a, model_a, batch)
        loss_b = capture_step(probe_b, model_b, batch)
        assert torch.equal(loss_a, loss_b)
        assert params_equal(model_a, model_b)
        assert probe_a.history[-1] == probe_b.history[-1]
    assert probe_b.step_count == len(batches)
    assert any(r.status == "ok" for r in probe_b.history)


def test_capture_without_loss_records_none():
    model_a, model_b = make_model(), make_model()
    probe_a, probe_b = make_probe(model_a), make_probe(model_b)
    batch = make_batches(1)[0]
    closure_step(probe_a, model_a, batch)
    capture_step(probe_b, model_b, batch, record_loss=False)
    rec_a, rec_b = probe_a.history[-1], probe_b.history[-1]
    assert rec_b.loss is None and rec_a.loss is not None
    assert rec_b.alphas == rec_a.alphas and rec_b.slope == rec_a.slope
    assert params_equal(model_a, model_b)


def test_step_without_closure_or_capture_raises_and_changes_nothing():
    model = make_model()
    probe = make_probe(model)
    closure_step(probe, model, make_batches(1)[0])
    before = copy.deepcopy((model.state_dict(), probe.inner.state_dict()))
    with pytest.raises(ClosureError) as info:
        probe.step()
    message = str(info.value)
    assert "probe.step(closure)" in message  # way 1
    assert "with probe.capture() as cap:" in message and "probe.step()" in message
    assert len(probe.history) == 1 and probe.step_count == 1
    for k, v in before[0].items():
        assert torch.equal(model.state_dict()[k], v)
    # a capture is consumed by one step: the next plain step() raises again
    capture_step(probe, model, make_batches(1)[0])
    with pytest.raises(ClosureError):
        probe.step()
    assert len(probe.history) == 2


@pytest.mark.parametrize("set_to_none", [True, False, None])
def test_stale_capture_is_refused_and_changes_nothing(set_to_none):
    """A capture after which another backward ran outside the block (e.g. once
    GradScaler skipped the step meant to consume it) is refused, not silently
    paired with the new gradients, whether that backward replaced, overwrote or
    accumulated into them (``None``: no zero_grad); in-place edits of the
    gradients between block and step (unscaling, clipping) are fine."""
    model = make_model()
    probe = make_probe(model)
    batches = make_batches(3)
    capture_step(probe, model, batches[0])  # a normal captured step
    x, y = batches[1]
    with probe.capture():
        LOSS_FN(model(x), y).backward()
    x2, y2 = batches[2]
    if set_to_none is not None:
        probe.zero_grad(set_to_none=set_to_none)
    LOSS_FN(model(x2), y2).backward()  # the stale case: outside the block
    grads = [p.grad.clone() for p in model.parameters()]
    before = copy.deepcopy((model.state_dict(), probe.inner.state_dict()))
    with pytest.raises(ClosureError, match="stale"):
        probe.step()
    # The watch is gone, the monitor stays.
    assert hook_counts(model.parameters()) == [1] * 4
    assert len(probe.history) == 1 and probe.step_count == 1
    for k, v in before[0].items():
        assert torch.equal(model.state_dict()[k], v)
    assert str(probe.inner.state_dict()) == str(before[1])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    with pytest.raises(ClosureError, match="preceding capture"):
        probe.step()  # the stale capture was discarded
    # in-place changes to the captured gradients are not staleness
    with probe.capture():
        LOSS_FN(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    probe.step()
    assert len(probe.history) == 2
    assert hook_counts(model.parameters()) == [1] * 4


def test_stale_capture_on_an_unprobed_step_is_a_plain_step():
    """Between probes (interval > 1) the inner optimizer uses the gradients as
    they are, so a capture followed by another backward is not refused."""
    model = make_model()
    probe = make_probe(model, interval=2)
    batches = make_batches(3)
    capture_step(probe, model, batches[0])  # probed
    with probe.capture():
        LOSS_FN(model(batches[1][0]), batches[1][1]).backward()
    LOSS_FN(model(batches[2][0]), batches[2][1]).backward()
    probe.step()
    assert probe.step_count == 2 and len(probe.history) == 1


def test_an_abandoned_capture_leaves_no_hooks_behind():
    """A capture never consumed (the loop ended, GradScaler skipped the last
    step) and its probe dropped: the watch's hooks go with them."""
    model = make_model()
    probe = make_probe(model)
    x, y = make_batches(1)[0]
    with probe.capture():
        LOSS_FN(model(x), y).backward()
    assert all(p._post_accumulate_grad_hooks for p in model.parameters())
    del probe
    gc.collect()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    LOSS_FN(model(x), y).backward()  # nothing left to fire


def test_an_unconsumed_capture_between_probes_keeps_only_its_watch():
    """With ``interval > 1`` the backward monitor's hooks go when the capture
    block ends, even if no step() follows (GradScaler skipped it); only the
    capture's watch stays until the step, and nothing after it."""
    model = make_model()
    probe = make_probe(model, interval=2)
    x, y = make_batches(1)[0]
    with probe.capture():
        LOSS_FN(model(x), y).backward()
    assert hook_counts(model.parameters()) == [1] * 4  # the watch, no monitor
    probe.step()
    assert hook_counts(model.parameters()) == [0] * 4 and len(probe.history) == 1


@pytest.mark.parametrize("inner", ["capture", "step"])
def test_a_session_inside_the_probes_own_closure_is_refused(inner):
    """capture() or step() with the same probe inside its closure would overwrite
    the running step's recordings (silently wrong curvatures): refused with a
    clear error, and the step changes nothing; the next plain use works."""
    model = make_model()
    probe = make_probe(model)
    x, y = make_batches(1)[0]
    capture_step(probe, model, (x, y))

    def closure():
        probe.zero_grad()
        loss = LOSS_FN(model(x), y)
        loss.backward()
        if inner == "capture":
            with probe.capture():
                LOSS_FN(model(x), y).backward()
        else:
            probe.step(lambda: loss)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    state = str(probe.inner.state_dict())
    with pytest.raises(ClosureError, match="inside this probe's own closure"):
        probe.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert str(probe.inner.state_dict()) == state
    assert len(probe.history) == 1 and probe.step_count == 1
    assert hook_counts(model.parameters()) == [1] * 4  # the kept monitor only
    capture_step(probe, model, (x, y))
    assert len(probe.history) == 2


def test_a_new_capture_replaces_an_unconsumed_one_without_leaking_hooks():
    model = make_model()
    probe = make_probe(model)
    x, y = make_batches(1)[0]
    for _ in range(3):  # e.g. GradScaler skipped the steps
        probe.zero_grad()
        with probe.capture():
            LOSS_FN(model(x), y).backward()
    # The probe's backward monitor (one hook per parameter, kept while every
    # step is probed) and only the last capture's watch.
    assert hook_counts(model.parameters()) == [2] * 4
    probe.step()
    assert len(probe.history) == 1
    assert hook_counts(model.parameters()) == [1] * 4


# ----------------------------------------------------------------- GradScaler
def _grad_scaler(init_scale: float):
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    except (AttributeError, RuntimeError, TypeError) as error:  # pragma: no cover
        pytest.skip(f"torch.amp.GradScaler('cpu') unavailable: {error}")
    if not scaler.is_enabled():  # pragma: no cover
        pytest.skip("GradScaler is disabled on this device")
    return scaler


def scaled_step(probe, model, scaler, batch, poison: bool = False) -> Tensor:
    x, y = batch
    probe.zero_grad()
    with probe.capture(loss_scale=scaler) as cap:
        loss = LOSS_FN(model(x), y)
        scaler.scale(loss).backward()
        cap.loss = loss
    if poison:  # an overflow in the scaled gradients
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(probe)
    scaler.update()
    return loss


# block curvatures plus every other backend the package registers
SCALED_CURVATURES = BLOCK + [c for c in available() if c not in BLOCK]


@pytest.mark.parametrize("init_scale", [2.0**10, 3000.0])
@pytest.mark.parametrize("curvature", SCALED_CURVATURES)
def test_grad_scaler_gives_the_unscaled_alpha(curvature, init_scale):
    batches = make_batches(3)
    model_a, model_b = make_model(), make_model()
    probe_a = make_probe(model_a, curvature=curvature)
    probe_b = make_probe(model_b, curvature=curvature)
    scaler = _grad_scaler(init_scale)
    for batch in batches:
        closure_step(probe_a, model_a, batch)
        scaled_step(probe_b, model_b, scaler, batch)
        rec_a, rec_b = probe_a.history[-1], probe_b.history[-1]
        assert rec_b.status == rec_a.status
        assert rec_b.loss == rec_a.loss
        assert rec_b.slope == pytest.approx(rec_a.slope, rel=1e-5)
        assert rec_b.grad_norm == pytest.approx(rec_a.grad_norm, rel=1e-5)
        assert rec_b.curvatures[curvature] == pytest.approx(
            rec_a.curvatures[curvature], rel=1e-4, abs=1e-10
        )
        if rec_a.alpha is not None:
            assert rec_b.alpha == pytest.approx(rec_a.alpha, rel=1e-4)
        for p, q in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert probe_b.step_count == len(batches)


def test_grad_scaler_skips_the_probe_step_on_inf():
    batches = make_batches(2)
    model = make_model()
    probe = make_probe(model, mode="apply")
    scaler = _grad_scaler(2.0**10)
    hooks = []
    probe.register_step_post_hook(lambda *args: hooks.append(probe.step_count))
    before = [p.detach().clone() for p in model.parameters()]
    scaled_step(probe, model, scaler, batches[0], poison=True)
    assert hooks == []  # probe.step() never ran
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len(probe.history) == 0 and probe.step_count == 0
    assert len(probe.state) == 0  # the inner optimizer never stepped
    assert scaler.get_scale() < 2.0**10  # the scaler backed off
    # the next, clean iteration is a normal probed step
    ref_model = make_model()
    ref = make_probe(ref_model, mode="apply")
    closure_step(ref, ref_model, batches[1])
    scaled_step(probe, model, scaler, batches[1])
    assert len(probe.history) == 1 and probe.history[0].step == 0
    assert hooks == [1]  # GradScaler.step(probe) fires the probe's hooks once
    assert probe.history[0].alpha == pytest.approx(ref.history[0].alpha, rel=1e-4)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
