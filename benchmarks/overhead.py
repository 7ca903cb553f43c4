"""Where a probe step's time goes: the cost of each part, measured by removing it.

For each benchmark model and curvature, a plain Adam step, a probe step and
probe steps with parts removed run on the same batch, in a shuffled order in
every round (the step that runs after another pays for its cache misses, so a
fixed order biases the comparison by a few percent). Each variant's time over
the plain step's is taken per round; the medians are reported, in plain steps:

* ``arithmetic``: the curvatures' own tensor work (the tangent sweep, or the
  model replay of the exact curvatures), removed by returning 0;
* ``recording``: keeping each module's input, output and output gradient
  (hooks), removed together with the arithmetic that reads it;
* ``batch``: recording the closure's batch for a replay (exact curvatures),
  removed by not creating the recorder;
* ``snapshot``: copying θ₀ and the optimizer state before the inner step and
  forming ``d``, removed by a transaction that copies nothing;
* ``checks``: the probe's validation (the parameter groups, the chain check of
  the recorded modules, the exact curvatures' check of the batch), removed by
  skipping it;
* ``backup``: the gradient backup that restores the gradients when a step
  fails, removed by keeping references instead of copies;
* ``wrapper``: torch's ``Optimizer`` step wrapper around the probe's own step
  (the global and per-instance step hooks, the profiler region), removed by
  calling the wrapped function (the inner optimizer's step keeps its own);
* ``history``: appending the step's record to the history, removed by dropping
  the record (it is still built: the step's numbers come from it);
* ``rest``: what is left with arithmetic, recording, batch and snapshot
  removed: the closure session (the backup, the backward monitor, the context
  stack), the checks, the step products, the decision and the record, the
  optimizer wrapper.

``part = full − (full without the part)``; ``rest = (all removed) − 1``. The
parts add up to about the full cost (they overlap: removing the arithmetic also
removes the chain check it triggers, and ``checks``, ``backup``, ``wrapper`` and
``history`` are inside ``rest``). ``unguarded`` is a probe without batch, checks
and backup: what a probe step would cost that neither validates its input nor
keeps a step all-or-nothing (the cost of those guarantees is ``full − unguarded``). The
probes with parts removed record wrong numbers or corrupt state on a failure;
they exist only to be timed. ::

    python benchmarks/overhead.py --pairs 201
"""

from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS, BenchProblem, shuffled_ratios, write_results

import alphawrap.closure as closure_module
import alphawrap.probe as probe_module
from alphawrap import AlphaProbe

warnings.filterwarnings("ignore")

CURVATURES = ("hessian", "ggn-exact", "hessian-exact")
VARIANTS = {  # the parts each variant removes
    "full": (),
    "no arithmetic": ("arithmetic",),
    "no recording": ("arithmetic", "recording"),
    "no batch": ("batch",),
    "no snapshot": ("snapshot",),
    "no checks": ("checks",),
    "no backup": ("backup",),
    "all removed": ("arithmetic", "recording", "batch", "snapshot"),
    "unguarded": ("batch", "checks", "backup"),
    "no wrapper": ("wrapper",),
    "no history": ("history",),
}

_REAL_TRANSACTION = probe_module.StepTransaction
_BARE: set[int] = set()  # inner optimizers whose probe takes no snapshot
_REAL_BACKUP = closure_module.GradBackup
_UNSAVED: set[int] = set()  # first parameters of probes that back nothing up


class _BareTransaction:
    """No copies: ``d`` is the parameters after the inner step (wrong, cheap)."""

    def __init__(
        self, optimizer: Any, params: list[torch.Tensor], pool: Any = None
    ) -> None:
        self._optimizer, self.params = optimizer, params
        self.directions: list[torch.Tensor] = []

    def take_inner_step(self) -> None:
        self._optimizer.step()
        self.directions = [p.detach() for p in self.params]

    def swap(self) -> None:
        pass

    commit_inner = rollback = swap

    def commit_scaled(self, alpha: float) -> None:
        pass


class _ReferenceBackup:
    """Keeps the gradient tensors, not copies (wrong if the closure accumulates)."""

    def __init__(self, params: list[torch.Tensor], pool: Any = None) -> None:
        self._params, self._grads = params, [p.grad for p in params]

    def restore(self) -> None:
        for p, g in zip(self._params, self._grads):
            p.grad = g


def _backup(params: list[torch.Tensor], pool: Any = None) -> Any:
    if params and id(params[0]) in _UNSAVED:
        return _ReferenceBackup(params)
    return _REAL_BACKUP(params, pool)


def _unchecked_chain(engine: Any) -> tuple[Any, list[Any]]:
    """The recorded loss and modules as they come (the benchmark models are chains)."""
    trace = engine.source.trace
    engine._bilinear = True
    return trace[0], trace[:0:-1]


def _transaction(optimizer: Any, params: list[torch.Tensor], pool: Any = None) -> Any:
    if id(optimizer) in _BARE:
        return _BareTransaction(optimizer, params)
    return _REAL_TRANSACTION(optimizer, params, pool)


SWITCHES = [
    (probe_module, "StepTransaction", _transaction),
    (closure_module, "GradBackup", _backup),
]
"""What :func:`main` replaces so that single probes can drop a part."""


def _remove(probe: AlphaProbe, parts: tuple[str, ...]) -> None:
    """Take ``parts`` out of this probe only (instance attributes)."""
    n = len(probe._params())
    for c in probe._curvatures:
        if "arithmetic" in parts:
            zero = torch.zeros(n) if c.blockwise else torch.zeros(())
            c.quadratic = lambda ctx, zero=zero: zero  # type: ignore[method-assign]
        if "recording" in parts:
            c.recording = nullcontext  # type: ignore[method-assign]
            c.check_backward = lambda ctx: None  # type: ignore[method-assign]
        if "batch" in parts and c.needs_batch:
            c.check_backward = lambda ctx: None  # type: ignore[method-assign]
    if "batch" in parts:
        probe._batch_recorder = lambda: None  # type: ignore[method-assign]
    if "snapshot" in parts:
        _BARE.add(id(probe.inner))
    if "checks" in parts:
        probe._check_groups = lambda: None  # type: ignore[method-assign]
        for c in probe._curvatures:
            if c.needs_batch:  # the exact curvatures' batch check
                c.check_backward = lambda ctx: None  # type: ignore[method-assign]
            engine = getattr(c, "engine", None) or getattr(c, "sweep", None)
            if engine is not None:
                engine._validated_chain = lambda ctx, e=engine: _unchecked_chain(e)
    if "backup" in parts:
        _UNSAVED.add(id(probe._params()[0]))
    if "history" in parts:
        probe.history.append = lambda record: None  # type: ignore[method-assign]


def _stepper(problem: BenchProblem, curvature: str | None, parts=()):
    model, loss_fn, x, y = problem.make(batch=128, extended=False)
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt: Any = inner
    if curvature is not None:
        opt = AlphaProbe(inner, curvature=curvature, model=model, loss_fn=loss_fn)
        _remove(opt, parts)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    if "wrapper" in parts:  # AlphaProbe.step without torch's Optimizer wrapper
        unwrapped = type(opt).step.__wrapped__
        return lambda: unwrapped(opt, closure)
    return lambda: opt.step(closure)


def measure(problem: BenchProblem, curvature: str, pairs: int, seed: int = 0):
    """Median ratio to the plain step of the full probe and of each variant."""
    steps = {"plain": _stepper(problem, None)}
    steps.update({v: _stepper(problem, curvature, p) for v, p in VARIANTS.items()})
    return shuffled_ratios(steps, pairs, seed)


def parts_of(ratios: dict[str, float]) -> dict[str, float]:
    full = ratios["full"]
    return {
        "full": full,
        "arithmetic": full - ratios["no arithmetic"],
        "recording": ratios["no arithmetic"] - ratios["no recording"],
        "batch": full - ratios["no batch"],
        "snapshot": full - ratios["no snapshot"],
        "checks": full - ratios["no checks"],
        "backup": full - ratios["no backup"],
        "rest": ratios["all removed"] - 1.0,
        "wrapper": full - ratios["no wrapper"],
        "history": full - ratios["no history"],
        "unguarded": ratios["unguarded"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=101)
    parser.add_argument("--out", default="benchmarks/results/overhead_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for module, name, switch in SWITCHES:
        setattr(module, name, switch)
    rows = []
    for problem in PROBLEMS:
        for curvature in CURVATURES:
            ratios = measure(problem, curvature, args.pairs)
            parts = {k: round(v, 3) for k, v in parts_of(ratios).items()}
            rows.append({"problem": problem.name, "curvature": curvature, **parts})
            rows[-1]["variants"] = {k: round(v, 3) for k, v in ratios.items()}
            print(rows[-1], flush=True)
    print(
        "\n| model | curvature | probe step | arithmetic | recording | batch "
        "| snapshot | rest | (checks | backup | wrapper | history) | unguarded |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['problem']} | `{r['curvature']}` | {r['full']:.2f} | "
            + " | ".join(
                f"{r[k]:.2f}"
                for k in (
                    "arithmetic",
                    "recording",
                    "batch",
                    "snapshot",
                    "rest",
                    "checks",
                    "backup",
                    "wrapper",
                    "history",
                    "unguarded",
                )
            )
            + " |"
        )
    write_results(args.out, {"threads": 1, "pairs": args.pairs, "rows": rows})


if __name__ == "__main__":
    main()
