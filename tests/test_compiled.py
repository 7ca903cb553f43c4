"""Compiled models run eagerly while the probe records or replays them."""

import copy

import pytest
import torch
from torch import nn

from alphawrap import AlphaProbe
from alphawrap.compiled import eager_if_compiled, is_compiled


def _compile_wrapper(module: nn.Module) -> nn.Module:
    return torch.compile(module, backend="eager")


def _compile_in_place(module: nn.Module) -> nn.Module:
    module.compile(backend="eager")
    return module


@pytest.mark.parametrize("compile_", [_compile_wrapper, _compile_in_place])
@pytest.mark.parametrize("where", ["model", "submodule"])
def test_compiled_models_and_submodules_are_recognised(compile_, where):
    body = nn.Linear(2, 2)
    assert not is_compiled(body) and not is_compiled(None)
    if where == "model":
        model = compile_(body)
    else:
        model = nn.Sequential(compile_(body), nn.Tanh())
    assert is_compiled(model)


def test_the_stance_is_switched_only_for_compiled_models_and_restored():
    torch.compiler.reset()
    compiled = torch.compile(nn.Linear(2, 2), backend="eager")
    calls = []

    def counting_backend(graph, example_inputs):
        calls.append(1)
        return graph

    x = torch.ones(2)
    twice = torch.compile(lambda t: t * 2, backend=counting_backend)
    with eager_if_compiled(compiled):
        twice(x)
    assert calls == []  # compiled model: compiled code runs eagerly
    twice(x)
    assert calls == [1]  # the default stance is back
    thrice = torch.compile(lambda t: t * 3, backend=counting_backend)
    with eager_if_compiled(nn.Linear(2, 2)):
        thrice(x)
    assert calls == [1, 1]  # plain model: nothing switched


class _Residual(nn.Module):
    """Not a chain: the exact curvatures replay it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)) + x)


def _chain() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _counting(runs: list[int], aot: bool):
    """A backend that counts the runs of its graphs (aot: through aot_autograd,
    as inductor, which has no double backward)."""

    def backend(graph, example_inputs):
        if aot:
            from torch._dynamo.backends.common import aot_autograd

            graph = aot_autograd(fw_compiler=lambda g, _: g)(graph, example_inputs)

        def run(*args):
            runs[0] += 1
            return graph(*args)

        return run

    return backend


def _graph_runs_and_records(build, curvature, aot=False, warm_up=False):
    """Four steps (interval 2) of a compiled model= and of an uncompiled twin:
    how often each step entered the compiled graph, and both histories."""
    torch.compiler.reset()  # what earlier tests compiled decides nothing here
    torch.manual_seed(0)
    model = build().double()
    twin = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    runs = [0]
    compiled = torch.compile(model, backend=_counting(runs, aot))
    if warm_up:
        compiled(x)  # compiled before the probe exists
    histories, graph_runs = [], []
    for module in (compiled, twin):
        probe = AlphaProbe(
            torch.optim.SGD(module.parameters(), lr=0.1),
            curvature=curvature,
            model=module,
            loss_fn=loss_fn,
            interval=2,
        )

        def closure(probe=probe, module=module):
            probe.zero_grad()
            loss = loss_fn(module(x), y)
            loss.backward()
            return loss

        for _ in range(4):
            before = runs[0]
            probe.step(closure)
            graph_runs.append(runs[0] - before)
        histories.append(probe.history)
    return graph_runs, histories


@pytest.mark.parametrize(
    "build,curvature,aot,warm_up",
    [
        (_chain, ["hessian", "hessian-exact"], False, True),
        (_Residual, ["ggn-exact", "hessian-exact"], True, False),
    ],
    ids=["chain-swept-after-a-warm-up", "residual-replayed-aot"],
)
def test_probed_steps_run_a_compiled_model_eagerly(build, curvature, aot, warm_up):
    """With a compiled model= probed steps run it eagerly: the hooks see each
    module call (a graph compiled before the probe existed no longer hides the
    modules), and the exact curvatures' replay has its double backward (an
    aot_autograd graph has none: every probed step failed). The steps between
    probes run the compiled graph; the numbers equal an uncompiled twin's."""
    graph_runs, (compiled, eager) = _graph_runs_and_records(
        build, curvature, aot, warm_up
    )
    assert graph_runs == [0, 1, 0, 1, 0, 0, 0, 0]  # the twin compiles nothing
    assert len(compiled) == len(eager) == 2
    for got, want in zip(compiled, eager):
        for name in curvature:
            assert got.curvatures[name] == pytest.approx(
                want.curvatures[name], rel=1e-12
            )
