"""The benchmarks measure what they say they measure.

``benchmarks/floor.py`` times a bare, hand-written probe step as the floor of
the step-cost targets; a floor that computed something cheaper than the probe
would be no floor. Its exact-Hessian sweep is checked against a dense Hessian-
vector product, and its whole step against the probe's numbers on the same model,
optimizer state and batch. ``overhead.py`` and ``copy_pool.py`` patch the probe's
internals; one short round of each checks that the patched probes still step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import copy_pool
import overhead
import step_cost
from floor import Bare, probe_twin
from problems import PROBLEMS

from alphawrap import AlphaProbe

CASES = [pytest.param(p, id=p.name) for p in PROBLEMS]


def _dense_quadratic(bare: Bare, directions: list[torch.Tensor]) -> float:
    names = [n for n, _ in bare.model.named_parameters()]
    theta = tuple(p.detach() for p in bare.params)

    def loss(*values: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(bare.model, dict(zip(names, values)), bare.x)
        return bare.loss_fn(out, bare.y)

    _, hvp = torch.autograd.functional.hvp(loss, theta, tuple(directions))
    return sum((h * d).sum() for h, d in zip(hvp, directions)).item()


@pytest.mark.parametrize("problem", CASES)
def test_bare_exact_hessian_sweep_matches_dense(problem) -> None:
    bare = Bare(problem, batch=16)
    bare.model.double()
    bare.x = bare.x.double()
    bare.params = list(bare.model.parameters())
    directions = [torch.randn_like(p) for p in bare.params]
    bare.record()
    with torch.no_grad():
        swept = bare.sweep(exact=True, hessian=True, directions=directions).item()
    assert swept == pytest.approx(_dense_quadratic(bare, directions), rel=1e-10)


@pytest.mark.parametrize("problem", CASES)
def test_bare_whole_step_computes_the_probes_numbers(problem) -> None:
    bare, twin = Bare(problem, batch=32), Bare(problem, batch=32)
    hooked = Bare(problem, batch=32, hooked=True)
    probe, closure = probe_twin(problem, bare, batch=32)
    numbers = bare.whole_step(guarded=True)
    assert twin.whole_step(guarded=False) == numbers  # the guards change nothing
    assert hooked.whole_step(guarded=True) == numbers  # nor does recording by hooks
    assert [type(t.module) for t in hooked.traces] == [
        type(t.module) for t in bare.traces
    ]
    assert [t.g_out[0] is None for t in hooked.traces] == [
        t.g_out[0] is None for t in bare.traces
    ]
    probe.step(closure)
    record = probe.history[-1]
    loss, slope, dd, gg, quadratic = numbers
    assert loss == pytest.approx(record.loss, rel=1e-6)
    assert slope == pytest.approx(record.slope, rel=1e-5)
    assert dd == pytest.approx(record.direction_norm**2, rel=1e-5)
    assert gg == pytest.approx(record.grad_norm**2, rel=1e-5)
    assert quadratic == pytest.approx(record.curvatures["hessian-exact"], rel=1e-4)
    for p, q in zip(bare.params, probe._params()):
        assert torch.equal(p, q)  # observe mode: both took the same inner step


def test_overhead_variants_all_step(monkeypatch) -> None:
    """Every variant of ``overhead.py`` (parts of the probe removed) takes steps."""
    for module, name, switch in overhead.SWITCHES:
        monkeypatch.setattr(module, name, switch)
    ratios = overhead.measure(PROBLEMS[0], "hessian-exact", pairs=1)
    assert set(ratios) == set(overhead.VARIANTS)
    assert all(0 < r < 100 for r in ratios.values())


def test_overhead_without_wrapper_skips_only_the_probes_step_hooks() -> None:
    """``no wrapper`` calls the probe's step function itself: torch's step hooks
    fire for the inner optimizer only."""
    seen: list[str] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(type(opt).__name__)
    )
    try:
        overhead._stepper(PROBLEMS[0], "hessian-exact", ("wrapper",))()
        overhead._stepper(PROBLEMS[0], "hessian-exact")()
    finally:
        handle.remove()
    assert seen == ["Adam", "AlphaProbe", "Adam"]


def test_copy_pool_benchmark_compares_kept_buffers_with_clones() -> None:
    row = copy_pool.compare(copy_pool.CASES[-1], "ggn-exact", rounds=1)
    assert row["buffers kept"] > 0  # the large model's copies go to the pool
    assert row["kept buffers"] > 0 and row["clones"] > 0


def test_step_cost_times_steps_between_probes_only() -> None:
    """``interval=10``: the probed steps run untimed, every timed one is between."""
    probed: list[bool] = []
    step = AlphaProbe.step

    def spy(self, closure=None):
        probed.append(self._will_probe())
        return step(self, closure)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AlphaProbe, "step", spy)
        timed = {"plain": 0, "between": 0}
        original = step_cost.shuffled_ratios

        def count(steps, rounds, **kwargs):
            wrapped = {}
            for name, fn in steps.items():

                def run(name=name, fn=fn):
                    timed[name] += 1
                    if name == "between":
                        probed.append(None)  # marks the timed probe step next
                    fn()

                wrapped[name] = run
            return original(wrapped, rounds, **kwargs)

        patch.setattr(step_cost, "shuffled_ratios", count)
        ratios = step_cost.time_ratios(
            PROBLEMS[0], {"between": {"names": ("hessian",), "interval": 10}}, 4
        )
    assert set(ratios) == {"between"} and ratios["between"] > 0
    assert timed == {"plain": 7, "between": 7}  # 3 warm-up rounds + 4
    after_mark = [probed[i + 1] for i, v in enumerate(probed) if v is None]
    assert after_mark == [False] * 7  # every timed probe step is between probes
    assert True in probed  # the probed ones ran (untimed)
