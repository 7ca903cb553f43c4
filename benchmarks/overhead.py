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
* ``rest``: what is left with all of the above removed: the closure session
  (gradient backup, the backward monitor, the context stack), validation, the
  step products, the decision and the record, the optimizer wrapper.

``part = full − (full without the part)``; ``rest = (all removed) − 1``. The
parts add up to about the full cost (they overlap a little: removing the
arithmetic also removes the chain validation it triggers). The probes with
parts removed record wrong numbers; they exist only to be timed. ::

    python benchmarks/overhead.py --pairs 101
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS, BenchProblem, write_results

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
    "all removed": ("arithmetic", "recording", "batch", "snapshot"),
}

_REAL_TRANSACTION = probe_module.StepTransaction
_BARE: set[int] = set()  # inner optimizers whose probe takes no snapshot


class _BareTransaction:
    """No copies: ``d`` is the parameters after the inner step (wrong, cheap)."""

    def __init__(self, optimizer: Any, params: list[torch.Tensor]) -> None:
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


def _transaction(optimizer: Any, params: list[torch.Tensor]) -> Any:
    if id(optimizer) in _BARE:
        return _BareTransaction(optimizer, params)
    return _REAL_TRANSACTION(optimizer, params)


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

    return lambda: opt.step(closure)


def measure(problem: BenchProblem, curvature: str, pairs: int, seed: int = 0):
    """Median ratio to the plain step of the full probe and of each variant."""
    steps = {"plain": _stepper(problem, None)}
    steps.update({v: _stepper(problem, curvature, p) for v, p in VARIANTS.items()})
    order = list(steps)
    rng = random.Random(seed)
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(pairs + 3):
        rng.shuffle(order)
        times = {}
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name] = time.perf_counter() - t0
        if round_ >= 3:  # warm-up
            for v in VARIANTS:
                ratios[v].append(times[v] / times["plain"])
    return {v: statistics.median(r) for v, r in ratios.items()}


def parts_of(ratios: dict[str, float]) -> dict[str, float]:
    full = ratios["full"]
    return {
        "full": full,
        "arithmetic": full - ratios["no arithmetic"],
        "recording": ratios["no arithmetic"] - ratios["no recording"],
        "batch": full - ratios["no batch"],
        "snapshot": full - ratios["no snapshot"],
        "rest": ratios["all removed"] - 1.0,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=101)
    parser.add_argument("--out", default="benchmarks/results/overhead_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    probe_module.StepTransaction = _transaction  # type: ignore[misc]
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
        "| snapshot | rest |\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['problem']} | `{r['curvature']}` | {r['full']:.2f} | "
            + " | ".join(
                f"{r[k]:.2f}"
                for k in ("arithmetic", "recording", "batch", "snapshot", "rest")
            )
            + " |"
        )
    write_results(args.out, {"threads": 1, "pairs": args.pairs, "rows": rows})


if __name__ == "__main__":
    main()
