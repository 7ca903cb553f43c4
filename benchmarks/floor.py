"""How cheap can a probe step be? The bare arithmetic of each target, timed.

The step-cost targets of the performance issue are ratios of a probe step to a
plain Adam step. This script times, interleaved with plain Adam steps on the same
batch (median of the per-pair ratios), the parts no implementation of the probe
can skip, with *no* orchestration around them (no hooks API, no validation, no
history, no rollback logic):

* ``record``: the closure with the activations and output gradients kept
  (``retain_grad`` on every module output) minus the plain closure;
* ``snapshot``: what an all-or-nothing step must copy before the inner step (θ₀
  and the optimizer state) plus ``d = θ₁ - θ₀``;
* ``block sweep``: every block quadratic of the block-diagonal Hessian (the
  stacked tangents pushed through the later layers, residuals, loss Hessian), with
  alphawrap's direct tensor rules called in a bare loop;
* ``exact GGN``: the one Jacobian-vector product ``J d`` and ``(Jd)ᵀ∇²ℓ(Jd)``;
* ``exact Hessian``: the same plus the residual and bilinear cross terms.

The floor of a target is ``1 + record + snapshot + <its curvature part>``: what a
probe would cost if all the rest were free. ::

    python benchmarks/floor.py --pairs 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS, write_results

from alphawrap.curvature.rules import FAST_RULES
from alphawrap.curvature.sweep import _Trace

TARGETS = {  # (hessian, ggn-exact, hessian-exact), from the performance issue
    "relu-mlp": (1.6, 1.3, 2.0),
    "tanh-mlp-9": (3.0, 1.3, 2.0),
    "cnn": (2.5, 1.4, 2.2),
}


class Bare:
    """One problem: a plain Adam twin, the recorded pass and the bare parts."""

    def __init__(self, problem, batch: int = 128) -> None:
        self.model, self.loss_fn, self.x, self.y = problem.make(batch, extended=False)
        twin, _, _, _ = problem.make(batch, extended=False)
        self.twin, self.plain_opt = twin, torch.optim.Adam(twin.parameters())
        self.opt = torch.optim.Adam(self.model.parameters())
        self.params = list(self.model.parameters())
        self.record()
        self.opt.step()
        self.theta0 = [p.detach().clone() for p in self.params]
        self.d = [torch.randn_like(p) * 1e-3 for p in self.params]

    @torch.enable_grad()
    def plain(self) -> None:
        self.plain_opt.zero_grad()
        self.loss_fn(self.twin(self.x), self.y).backward()
        self.plain_opt.step()

    def closure(self) -> None:
        self.opt.zero_grad()
        self.loss_fn(self.model(self.x), self.y).backward()

    def record(self) -> None:
        """The closure, keeping every module's input, output and output gradient."""
        self.opt.zero_grad()
        h, self.traces = self.x, []
        for m in self.model:
            out = m(h)
            out.retain_grad()
            self.traces.append(_Trace(m, None, (h,), out, (None,), (None,)))
            h = out
        self.loss_fn(h, self.y).backward()
        for t in self.traces:
            t.g_out = (t.output.grad,)
        self.logits = h.detach()

    def snapshot(self) -> None:
        with torch.no_grad():
            theta0 = [p.detach().clone() for p in self.params]
            _ = [
                {k: v.clone() for k, v in self.opt.state[p].items()}
                for p in self.params
            ]
            torch._foreach_sub(self.params, theta0)

    def _loss_quadratic(self, tangents: Tensor) -> Tensor:
        p = torch.softmax(self.logits, 1)
        w = tangents * p
        return (w * tangents).flatten(1).sum(1) - (w.sum(2) ** 2).flatten(1).sum(1)

    def sweep(self, exact: bool, hessian: bool) -> Tensor:
        """Block quadratics (``exact=False``) or the one total tangent."""
        tangents, extra, k = None, [], 0
        for t in self.traces:
            rule = FAST_RULES[type(t.module)](None)
            if tangents is not None:
                total = tangents.sum(0, keepdim=True) if not exact else tangents
                if hessian and not rule.residual_is_zero(t):
                    r = rule.residual_diagonal(t).reshape(-1)
                    squares = (tangents * tangents).reshape(tangents.shape[0], -1)
                    extra.append(squares @ r)
                tangents = rule.jac(t, tangents)
            if isinstance(t.module, (nn.Linear, nn.Conv2d)):
                dw, db = self.d[k], self.d[k + 1]
                k += 2
                new = [rule.param_jac(t, "weight", dw), rule.param_jac(t, "bias", db)]
                if exact and hessian and tangents is not None:
                    cross = rule.param_cross(t, dw, total)
                    extra.append(2 * torch.sum(t.g_out[0] * cross[0]))
                if exact:
                    step = new[0] + new[1]
                    tangents = step if tangents is None else tangents + step
                else:
                    tangents = torch.cat(new if tangents is None else [tangents, *new])
        return self._loss_quadratic(tangents)


def _ratio(bare: Bare, part, pairs: int, baseline=None) -> float:
    """Median over interleaved pairs of time(part) / time(plain step)."""
    ratios = []
    for i in range(pairs + 3):
        t0 = time.perf_counter()
        bare.plain()
        t1 = time.perf_counter()
        part()
        t2 = time.perf_counter()
        if baseline is not None:
            baseline()
        t3 = time.perf_counter()
        if i >= 3:
            ratios.append(((t2 - t1) - (t3 - t2)) / (t1 - t0))
    return statistics.median(ratios)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/floor_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for problem in PROBLEMS:
        bare = Bare(problem)
        with torch.no_grad():
            parts = {
                "block sweep": lambda b=bare: b.sweep(exact=False, hessian=True),
                "exact GGN": lambda b=bare: b.sweep(exact=True, hessian=False),
                "exact Hessian": lambda b=bare: b.sweep(exact=True, hessian=True),
            }
            row = {"problem": problem.name}
            row["snapshot"] = _ratio(bare, bare.snapshot, args.pairs)
            row.update({k: _ratio(bare, f, args.pairs) for k, f in parts.items()})
        row["record"] = _ratio(bare, bare.record, args.pairs, baseline=bare.closure)
        base = 1 + row["record"] + row["snapshot"]
        targets = TARGETS[problem.name]
        for key, part, target in zip(
            ("hessian", "ggn-exact", "hessian-exact"),
            ("block sweep", "exact GGN", "exact Hessian"),
            targets,
        ):
            row[f"floor {key}"] = base + row[part]
            row[f"target {key}"] = target
        rows.append(
            {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        )
        print(rows[-1], flush=True)
    write_results(args.out, {"pairs": args.pairs, "rows": rows})


if __name__ == "__main__":
    main()
