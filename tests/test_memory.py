"""Long runs keep memory flat (issue 4, point 5).

Two measurements:

* Python objects: ``gc`` sees every container object (closures, records, hooks,
  tensors that hold autograd graphs or BackPACK quantities). After warm-up the
  number of live objects, and of live ``torch.Tensor`` objects, must not change
  over a hundred and more steps, and their total ``sys.getsizeof`` (which grows
  when a list or dict keeps accumulating) may move only by a dict resize. This is
  exact and cheap. ``tracemalloc`` was tried and left out: it triples the step
  time and sees interpreter caches warm up for ~100 steps, so a tight bound on it
  would be flaky.
* Resident set size (``/proc/self/statm``, Linux): catches C++ allocations that
  ``gc`` cannot see; noisy (allocator caching), so its bound is loose.

``benchmarks/memory_soak.py`` runs the same loop for 5,000 steps.
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import weakref

import pytest
import torch
from backpack import extend
from torch import nn

from alphawrap import AlphaProbe

STEPS = 100
WARMUP = 20


ROUTES = ["extend", "model"]
"""How the probe sees the model: BackPACK's ``extend`` hooks, or ``model=`` and
``loss_fn=`` (its own recording hooks, which keep output gradients)."""


def _setup(history_size: int | None = 16, route: str = "extend"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    if route == "extend":
        model, loss_fn = extend(model), extend(loss_fn)
        kwargs = {"curvature": ("hessian", "ggn")}
    else:
        kwargs = {
            "curvature": ("hessian", "ggn", "hessian-exact"),
            "model": model,
            "loss_fn": loss_fn,
        }
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=0.01),
        mode="apply",
        history_size=history_size,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(4)
    ]

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]

        def closure() -> torch.Tensor:
            probe.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        probe.step(closure)

    return model, probe, step


def _footprint() -> tuple[collections.Counter, int]:
    """Live gc-tracked objects by type, and their total shallow size."""
    gc.collect()
    # Leave out Counters: the baseline taken before is one of them.
    objects = [o for o in gc.get_objects() if type(o) is not collections.Counter]
    counts = collections.Counter(type(o).__name__ for o in objects)
    return counts, sum(map(_sizeof, objects))


def _sizeof(obj: object) -> int:
    # Some objects other tests leave behind (torch.compile's) have a broken
    # __sizeof__; they are not the probe's.
    try:
        return sys.getsizeof(obj)
    except TypeError:
        return 0


def _deep_size(root: object) -> int:
    """Total shallow size of everything reachable from ``root`` (not types/modules).

    Scoped to the probe, so that other tests' background threads (TensorBoard
    writers, Lightning) cannot move the number in a full suite run.
    """
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, type(sys), type(_setup))):
            continue
        seen.add(id(obj))
        total += _sizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def _growth(before: collections.Counter, after: collections.Counter) -> dict:
    return {k: after[k] - before[k] for k in before | after if after[k] != before[k]}


_PRIMED = []


def _warm_up(step, steps: int = WARMUP) -> None:
    for i in range(steps):
        step(i)
    if not _PRIMED:
        _footprint()  # its first call in a process fills lazy caches of its own
        _PRIMED.append(True)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


@pytest.mark.parametrize("route", ROUTES)
def test_memory_stays_flat_over_many_steps(route):
    _, probe, step = _setup(route=route)
    _warm_up(step)
    counts_before, _ = _footprint()
    size_before = _deep_size(probe)
    rss_before = _rss_bytes()
    for i in range(WARMUP, WARMUP + STEPS):
        step(i)
    counts_after, _ = _footprint()
    size_after = _deep_size(probe)
    rss_after = _rss_bytes()

    assert len(probe.history) == 16
    assert probe.history.dropped == WARMUP + STEPS - 16
    growth = _growth(counts_before, counts_after)
    assert "Tensor" not in growth and "Parameter" not in growth, f"tensors: {growth}"
    assert sum(map(abs, growth.values())) <= 4, f"objects leak: {growth}"
    assert size_after - size_before < 2048, "a container keeps growing"
    if rss_before is not None:
        growth_mb = (rss_after - rss_before) / 2**20
        assert growth_mb < 8, f"RSS grew by {growth_mb:.1f} MB"


@pytest.mark.parametrize("route", ROUTES)
def test_a_step_keeps_no_graph_closure_or_backpack_quantity_alive(route):
    """Nothing of a step survives it: not the closure, the loss, the model's
    output (the recorded activations) nor BackPACK quantities. On the ``model=``
    route a hook that kept the output gradient once closed a reference cycle
    through the autograd graph that ``gc`` cannot collect: every step's
    activations leaked (about 1.4 MB per step on the digits CNN)."""
    model, probe, _ = _setup(route=route)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    loss_fn = probe.loss_fn if route == "model" else extend(nn.CrossEntropyLoss())
    refs = {}

    def closure() -> torch.Tensor:
        probe.zero_grad()
        output = model(x)
        loss = loss_fn(output, y)
        loss.backward()
        refs["loss"], refs["output"] = weakref.ref(loss), weakref.ref(output)
        return loss

    refs["closure"] = weakref.ref(closure)
    probe.step(closure)
    del closure
    gc.collect()
    assert refs["closure"]() is None, "the probe keeps the closure alive"
    assert refs["loss"]() is None, "the probe keeps the loss (and its graph) alive"
    assert refs["output"]() is None, "the probe keeps the activations alive"
    for p in model.parameters():
        leftovers = [k for k in vars(p) if k.startswith("_alphawrap")]
        assert not leftovers, f"BackPACK quantities left on a parameter: {leftovers}"
    record = probe.history[-1].to_dict()
    assert not any(isinstance(v, torch.Tensor) for v in _leaves(record))


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_uncapped_history_grows_by_its_records_only():
    """Without a cap the history is the only thing that grows: one record a step."""
    _, probe, step = _setup(history_size=None)
    _warm_up(step, 10)
    counts_before, _ = _footprint()
    for i in range(10, 10 + 25):
        step(i)
    growth = _growth(counts_before, _footprint()[0])
    assert growth.pop("ProbeRecord") == 25
    # Each record holds its curvature/alpha/status/extra dicts and its lrs tuple.
    assert set(growth) <= {"dict", "tuple"}, growth
    assert sum(growth.values()) <= 25 * 6
    assert len(probe.history) == 10 + 25


def test_unprobed_steps_leave_nothing_behind():
    _, probe, step = _setup(history_size=2)
    probe.interval = 3
    _warm_up(step, 10)
    counts_before, _ = _footprint()
    for i in range(10, 10 + 24):
        step(i)
    growth = _growth(counts_before, _footprint()[0])
    assert len(probe.history) == 2
    assert sum(map(abs, growth.values())) <= 4, growth
