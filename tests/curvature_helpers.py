"""Helpers for the tests of the exact, diagonal and Kronecker curvatures (issue 3).

Problems beyond ``tests/cases.py`` (any model, any loss) and two ways to get
curvature values: a backend evaluated on its own after one backward pass
(:func:`backend_values`), and a probe run end to end (:func:`probe_run`), with
the direction each step actually took.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from backpack import backpack, extend
from torch import Tensor, nn

from alphawrap import AlphaProbe
from alphawrap.batch import RecordedBatch
from alphawrap.curvature import REGISTRY, Curvature, EvaluationContext

D = torch.float64


# --------------------------------------------------------------------- models
class ResidualMLP(nn.Module):
    """Pre-norm residual MLP: LayerNorm, GELU, a skip connection; not a Sequential."""

    def __init__(self, d_in: int = 4, width: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.act = nn.GELU()
        self.out = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.hidden(self.act(self.norm(h)))
        return self.out(F.gelu(h))


class BagOfEmbeddings(nn.Module):
    """Token ids -> Embedding -> tanh -> mean over tokens -> Linear."""

    def __init__(self, vocab: int = 7, dim: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, d_out)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens)).mean(1))


class TokenTagger(nn.Module):
    """Per-token logits ``[N, T, C]``; the loss sees them reshaped to ``[N·T, C]``."""

    def __init__(self, vocab: int = 6, dim: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, d_out)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.sigmoid(self.mix(self.embed(tokens))))


class DictOutput(nn.Module):
    """Keyword argument and a dict output (``as_dict=True``), like HF models."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: Tensor, scale: float = 1.0, as_dict: bool = False) -> Any:
        logits = self.b(torch.tanh(self.a(x) * scale))
        return {"logits": logits, "hidden": x} if as_dict else logits


class NormNet(nn.Module):
    """BatchNorm1d in training mode (batch statistics, running-stat buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


class _Cube(torch.autograd.Function):
    """Old-style autograd.Function: no jvp, no setup_context (no torch.func)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class CustomOpNet(nn.Module):
    """Uses an operation without a forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_Cube.apply(torch.tanh(self.a(x))))


def sum_mse(output: Tensor, target: Tensor) -> Tensor:
    """A plain Python loss function (the probe cannot intercept it by itself)."""
    return F.mse_loss(output, target, reduction="sum")


@dataclass(frozen=True)
class FreeProblem:
    """A problem for the exact curvatures: any model, any loss.

    ``call(model, loss_fn, x, y)`` is what the closure computes; ``reference``
    is ``(model, loss)`` such that ``loss(model(x), y)`` is the same function for
    the dense references (``model`` shares the parameters and their names).
    """

    name: str
    build: Callable[[], tuple[nn.Module, Any, Tensor, Tensor]]
    call: Callable[..., Tensor] = lambda model, loss_fn, x, y: loss_fn(model(x), y)
    reference_loss: Callable[[Tensor, Tensor], Tensor] | None = None
    extras: dict = field(default_factory=dict)


def _seeded(build: Callable[[], tuple]) -> Callable[[], tuple]:
    def make() -> tuple:
        torch.manual_seed(0)
        return build()

    return make


FREE_PROBLEMS = [
    FreeProblem(
        "residual-layernorm-gelu-functional-ce",
        _seeded(
            lambda: (
                ResidualMLP().to(D),
                F.cross_entropy,
                torch.randn(6, 4, dtype=D),
                torch.randint(0, 3, (6,)),
            )
        ),
    ),
    FreeProblem(
        "embedding-ce-module",
        _seeded(
            lambda: (
                BagOfEmbeddings().to(D),
                nn.CrossEntropyLoss(),
                torch.randint(0, 7, (5, 3)),
                torch.randint(0, 3, (5,)),
            )
        ),
    ),
    FreeProblem(
        "token-tagger-reshaped-functional-ce",
        _seeded(
            lambda: (
                TokenTagger().to(D),
                F.cross_entropy,
                torch.randint(0, 6, (3, 4)),
                torch.randint(0, 3, (3, 4)),
            )
        ),
        call=lambda model, loss_fn, x, y: loss_fn(
            model(x).reshape(-1, 3), y.reshape(-1)
        ),
        reference_loss=lambda out, y: F.cross_entropy(
            out.reshape(-1, 3), y.reshape(-1)
        ),
    ),
    FreeProblem(
        "dict-output-kwargs-python-loss",
        _seeded(
            lambda: (
                DictOutput().to(D),
                sum_mse,
                torch.randn(5, 4, dtype=D),
                torch.randn(5, 2, dtype=D),
            )
        ),
        call=lambda model, loss_fn, x, y: loss_fn(
            model(x, scale=0.5, as_dict=True)["logits"], y
        ),
        extras={"reference_kwargs": {"scale": 0.5}},
    ),
    FreeProblem(
        "batchnorm-train-functional-mse",
        _seeded(
            lambda: (
                NormNet().to(D),
                F.mse_loss,
                torch.randn(6, 4, dtype=D),
                torch.randn(6, 2, dtype=D),
            )
        ),
    ),
    FreeProblem(
        "custom-op-without-jvp",
        _seeded(
            lambda: (
                CustomOpNet().to(D),
                extend(nn.MSELoss()),
                torch.randn(5, 3, dtype=D),
                torch.randn(5, 2, dtype=D),
            )
        ),
    ),
]
FREE_IDS = [p.name for p in FREE_PROBLEMS]


class WithKwargs(nn.Module):
    """``model`` with fixed keyword arguments, for the dense references."""

    def __init__(self, model: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, **self.kwargs)


def reference_pair(
    problem: FreeProblem, model: nn.Module, loss_fn: Any
) -> tuple[nn.Module, Callable, Callable[[dict], dict]]:
    """``(model, loss, rename)`` for the dense references of a free problem.

    ``rename`` maps a dict keyed by ``model.named_parameters()`` names to the
    reference model's names.
    """
    ref_model = copy.deepcopy(model)  # BatchNorm: do not touch the real buffers
    kwargs = problem.extras.get("reference_kwargs")
    loss = problem.reference_loss or loss_fn
    if kwargs:
        return (
            WithKwargs(ref_model, kwargs),
            loss,
            lambda t: {f"model.{k}": v for k, v in t.items()},
        )
    return ref_model, loss, lambda t: t


# --------------------------------------------------------- backend evaluation
def directions_for(model: nn.Module, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def backend_values(
    model: nn.Module,
    loss_fn: Any,
    x: Tensor,
    y: Tensor,
    curvatures: list[Curvature | str],
    directions: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor | dict[str, Tensor]]]:
    """Evaluate backends on their own after one backward pass.

    Returns the directions and, per curvature, a dict of block values by
    parameter name (blockwise backends) or the scalar.
    """
    instances = [REGISTRY[c]() if isinstance(c, str) else c for c in curvatures]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    directions = directions or directions_for(model)
    extensions = [e for c in instances for e in c.backpack_extensions()]
    for c in instances:
        c.cleanup([p for _, p in named])
    model.zero_grad()
    ctx_manager = backpack(*extensions) if extensions else contextlib.nullcontext()
    with ctx_manager:
        loss_fn(model(x), y).backward()
    ctx = EvaluationContext(
        params=[p for _, p in named],
        directions=[directions[n] for n, _ in named],
        reached=set(range(len(named))),
        names=[n for n, _ in named],
        accumulate_dtype=D,
        batch=RecordedBatch.from_call(model, loss_fn, x, y),
        curvatures=instances,
    )
    values: dict[str, Any] = {}
    with torch.no_grad():
        for c in instances:
            c.check_backward(ctx)
            q = c.quadratic(ctx)
            values[c.name] = dict(zip([n for n, _ in named], q)) if c.blockwise else q
    for c in instances:
        c.cleanup([p for _, p in named])
    return directions, values


# ----------------------------------------------------------- probe end to end
@contextlib.contextmanager
def parameters_at(model: nn.Module, theta: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily load ``theta`` into the model's parameters."""
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(theta[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(current[n])


@dataclass
class ProbedStep:
    record: Any
    theta0: dict[str, Tensor]
    directions: dict[str, Tensor]


def probe_run(
    model: nn.Module,
    loss_fn: Any,
    x: Tensor,
    y: Tensor,
    curvature: tuple[str, ...],
    *,
    steps: int = 2,
    call: Callable[..., Tensor] | None = None,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    **probe_kwargs: Any,
) -> tuple[AlphaProbe, list[ProbedStep]]:
    """Train ``steps`` steps under a probe (observe mode); keep each direction."""
    call = call or (lambda m, f, a, b: f(m(a), b))
    params = [p for p in model.parameters() if p.requires_grad]
    inner = (optimizer or (lambda ps: torch.optim.AdamW(ps, lr=0.05)))(params)
    probe = AlphaProbe(
        inner, curvature=curvature, model=model, loss_fn=loss_fn, **probe_kwargs
    )

    def closure() -> Tensor:
        probe.zero_grad()
        loss = call(model, probe.loss_fn, x, y)
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        probe.step(closure)
        directions = {
            n: p.detach() - theta0[n]
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        out.append(ProbedStep(probe.history[-1], theta0, directions))
    return probe, out


def gradient_at(
    model: nn.Module, loss: Callable, x: Tensor, y: Tensor, theta0: dict[str, Tensor]
) -> dict[str, Tensor]:
    with parameters_at(model, theta0):
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss(model(x), y), params, allow_unused=True)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return {
            n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(names, params, grads)
        }
