"""How cheap can a probe step be? The bare arithmetic of each target, timed.

The step-cost targets of the performance issue are ratios of a probe step to a
plain Adam step. This script times, interleaved with plain Adam steps on the same
batch (median of the per-pair ratios), the parts no implementation of the probe
can skip, with *no* orchestration around them (no hooks API, no validation, no
history, no rollback logic):

* ``record``: the closure with the activations and the output gradients the
  sweeps read kept (``retain_grad``) minus the plain closure;
* ``snapshot``: what an all-or-nothing step must copy before the inner step (θ₀
  and the optimizer state) plus ``d = θ₁ - θ₀``;
* ``block sweep``: every block quadratic of the block-diagonal Hessian (the
  stacked tangents pushed through the later layers, residuals, loss Hessian), with
  alphawrap's direct tensor rules called in a bare loop;
* ``exact GGN``: the one Jacobian-vector product ``J d`` and ``(Jd)ᵀ∇²ℓ(Jd)``;
* ``exact Hessian``: the same plus the residual and bilinear cross terms.

The floor of a target is ``1 + record + snapshot + <its curvature part>``: what a
probe would cost if all the rest were free.

Summed parts are each timed warm, in a tight loop. A probe step runs them once
each, one after the other, with colder caches. So the script also times *whole*
bare ``"hessian-exact"`` steps in shuffled rounds next to the plain step and
the real probe (``AlphaProbe(..., curvature="hessian-exact", model=, loss_fn=)``):

* ``bare step``: a straight-line observe-mode probe step with nothing but the
  arithmetic (``tests/test_benchmarks.py`` checks that it computes the
  probe's numbers). It copies the gradients (their backup) and then runs the recorded
  closure. It copies θ₀ and the optimizer state, takes the inner step, forms
  ``d`` and points the parameters at θ₀. Then it runs the exact-Hessian sweep
  and forms ``dᵀg``, ``‖d‖²``, ``‖g‖²``, with one host transfer for all of
  them, and points the parameters back at θ₁;
* ``bare step, unguarded``: the same without the gradient backup and the
  optimizer-state copy (a step that could not be undone);
* ``bare step, hooked``: the guarded bare step recorded the way a wrapper
  must, since the user's closure calls the model: a global forward hook for
  the closure keeps the inputs and outputs and hooks the output gradients (the
  bare step loops over the modules itself and calls ``retain_grad``).

What separates ``probe`` from ``bare step, hooked`` is the probe's
orchestration: the checks that explain bad input (the backward monitor, the
chain and batch checks), the batch kept for the replay fallback, the record and
its history, the optimizer wrapper's contract. ::

    python benchmarks/floor.py --pairs 60
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS, shuffled_ratios, write_results

from alphawrap import AlphaProbe
from alphawrap.curvature.rules import FAST_RULES
from alphawrap.curvature.sweep import _Trace

TARGETS = {  # (hessian, ggn-exact, hessian-exact), from the performance issue
    "relu-mlp": (1.6, 1.3, 2.0),
    "tanh-mlp-9": (3.0, 1.3, 2.0),
    "cnn": (2.5, 1.4, 2.2),
}


class Bare:
    """One problem: a plain Adam twin, the recorded pass and the bare parts.

    Args:
        problem: The benchmark problem.
        batch: The batch size.
        hooked: Record the way a wrapper must, without owning the forward: the
            closure calls ``model(x)`` and a global forward hook (installed
            for the closure, as the probe does) keeps each module's input and
            output and hooks the output gradients the sweep reads. Otherwise the
            forward loops over the modules and calls ``retain_grad``.
    """

    def __init__(self, problem, batch: int = 128, hooked: bool = False) -> None:
        self.hooked = hooked
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
        """The closure, keeping every module's input and output, and the output
        gradients the sweeps read: at a module with a second derivative (Tanh)
        and, for the exact Hessian's cross terms, at a Linear or Conv layer that a
        tangent reaches (not the first)."""
        self.opt.zero_grad()
        self.traces, self._reached = [], False
        if self.hooked:
            self._modules = {id(m) for m in self.model}
            handle = register_module_forward_hook(self._keep)
            try:
                h = self.model(self.x)
                loss = self.loss_fn(h, self.y)
            finally:
                handle.remove()
            loss.backward()
        else:
            h = self.x
            for m in self.model:
                out = m(h)
                if self._needs_delta(m):
                    out.retain_grad()
                self.traces.append(_Trace(m, None, (h,), out, (None,), (None,)))
                h = out
            loss = self.loss_fn(h, self.y)
            loss.backward()
            for t in self.traces:
                t.g_out = (t.output.grad if t.output.retains_grad else None,)
        self.logits = h.detach()
        self.loss = loss.detach()

    def _needs_delta(self, module: nn.Module) -> bool:
        """Whether the sweep reads the output gradient of ``module`` (in order)."""
        bilinear = isinstance(module, (nn.Linear, nn.Conv2d))
        needs = (bilinear and self._reached) or not FAST_RULES[type(module)](
            None
        ).residual_is_zero(None)
        self._reached = self._reached or bilinear
        return needs

    def _keep(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        """Global forward hook of the hooked recording (filtered by module)."""
        if id(module) not in self._modules:
            return
        trace = _Trace(module, None, inputs, output, (None,), [None])
        if self._needs_delta(module):
            # Weakly, as the probe does: a strong reference would close a cycle
            # through the autograd graph that the garbage collector cannot see.
            output.register_hook(functools.partial(_set_delta, weakref.ref(trace)))
        self.traces.append(trace)

    def whole_step(self, guarded: bool = True) -> list[float]:
        """One bare observe-mode ``"hessian-exact"`` probe step.

        Returns:
            ``[loss, dᵀg, ‖d‖², ‖g‖², dᵀHd]``, read in one host transfer (``α* =
            -dᵀg / dᵀHd``, a float division, is left out).
        """
        params, opt = self.params, self.opt
        with torch.no_grad():
            if guarded:  # what a failed step would restore
                _ = [None if p.grad is None else p.grad.clone() for p in params]
        with torch.enable_grad():
            self.record()
        with torch.no_grad():
            theta0 = [p.clone() for p in params]
            if guarded:
                _ = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
        opt.step()
        with torch.no_grad():
            theta1 = [p.detach() for p in params]
            d = torch._foreach_sub(theta1, theta0)
            for p, t in zip(params, theta0):
                p.data = t
            quadratic = self.sweep(exact=True, hessian=True, directions=d)
            packed_d = torch.cat([t.reshape(-1) for t in d])
            packed_g = torch.cat([p.grad.reshape(-1) for p in params])
            numbers = torch.stack(
                [
                    self.loss,
                    packed_d @ packed_g,
                    packed_d @ packed_d,
                    packed_g @ packed_g,
                    quadratic,
                ]
            ).tolist()
            for p, t in zip(params, theta1):
                p.data = t
        return numbers

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

    def sweep(
        self, exact: bool, hessian: bool, directions: list[Tensor] | None = None
    ) -> Tensor:
        """Block quadratics (``exact=False``) or the exact ``dᵀCd`` (``exact=True``)."""
        d = self.d if directions is None else directions
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
                dw, db = d[k], d[k + 1]
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
        if not exact:
            return self._loss_quadratic(tangents)
        # The mean loss: its Hessian carries 1/N; δ (residuals, cross terms) too.
        total = self._loss_quadratic(tangents).sum() / self.x.shape[0]
        return sum((e.sum() for e in extra), total)


def _set_delta(ref: weakref.ref[_Trace], grad: Tensor) -> None:
    trace = ref()
    if trace is not None:
        trace.g_out[0] = grad  # type: ignore[index]


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


def probe_twin(problem, bare: Bare, batch: int = 128):
    """The real probe on a copy of ``bare``'s model, optimizer state and batch."""
    model, loss_fn, _, _ = problem.make(batch, extended=False)
    model.load_state_dict(bare.model.state_dict())
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters()),
        curvature="hessian-exact",
        model=model,
        loss_fn=loss_fn,
    )
    # A deep copy: loading shares the state's tensors with ``bare``'s optimizer.
    probe.inner.load_state_dict(copy.deepcopy(bare.opt.state_dict()))

    def closure() -> Tensor:
        probe.zero_grad()
        loss = loss_fn(model(bare.x), bare.y)
        loss.backward()
        return loss

    return probe, closure


def whole_steps(problem, pairs: int) -> dict[str, float]:
    """Whole bare steps and the real probe step over plain, in shuffled rounds."""
    bare, hooked = Bare(problem), Bare(problem, hooked=True)
    probe, closure = probe_twin(problem, bare)
    steps = {
        "plain": bare.plain,
        "probe": lambda: probe.step(closure),
        "bare step": lambda: bare.whole_step(guarded=True),
        "bare step, unguarded": lambda: bare.whole_step(guarded=False),
        "bare step, hooked": lambda: hooked.whole_step(guarded=True),
    }
    return shuffled_ratios(steps, pairs)


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
        row.update(whole_steps(problem, args.pairs))
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
