r"""Exact curvature along :math:`d`: the full GGN and the full Hessian, any model.

With :math:`f(\theta)` the model's output on the batch and :math:`\ell` the loss
of that output,

.. math::

    d^\top G d = (J d)^\top \nabla^2 \ell\, (J d), \qquad
    d^\top H d = (J d)^\top \nabla^2 \ell\, (J d) + \nabla \ell^\top f''[d, d],

where :math:`J d` and :math:`f''[d,d] = \frac{d^2}{dt^2} f(\theta + t d)` are
directional derivatives of the model. No matrix is formed and every cross-layer
term is included: this is what the block, diagonal and Kronecker curvatures
approximate.

How: after the inner step, with the parameters swapped back to
:math:`\theta_0`, the model is re-run on the batch the closure used (recorded
by :mod:`alphawrap.batch`; the probe needs ``model=`` and ``loss_fn=``) with
:func:`torch.func.functional_call`:

* ``"ggn-exact"``: one forward pass with dual numbers
  (``torch.autograd.forward_ad``) through the model gives :math:`f` and
  :math:`Jd`; the loss's curvature along :math:`Jd` comes
  from a double backward through the loss alone (output-sized, cheap). Never
  negative for a loss convex in the model's output (cross-entropy, MSE, NLL,
  BCE). If an operation has no forward-mode derivative (e.g. CPU flash
  attention), ``method="auto"`` switches to reverse mode (:math:`Jd` by the
  double-vjp trick) once and for all.
* ``"hessian-exact"``: double backward, :math:`d^\top \nabla(\nabla L \cdot d)`,
  one forward, one backward with graph, one second backward.

Choice of the methods, measured with ``python benchmarks/curvature_cost.py
--methods --model all`` (one evaluation after the backward pass, relative to a
plain Adam step run alternately; single CPU thread of an otherwise idle
machine, float32, batch 128; ReLU MLP / 9-layer Tanh MLP / CNN):

=================================  ======  ======  ======
method                             ReLU    Tanh    CNN
=================================  ======  ======  ======
GGN, dual numbers (default)        1.04x   0.86x   0.94x
GGN, double-vjp                    1.41x   1.42x   1.62x
Hessian, double backward (default) 1.71x   2.05x   2.02x
Hessian, forward-over-reverse      3.11x   3.25x   2.60x
Hessian, forward-over-forward      3.29x   3.79x   2.40x
=================================  ======  ======  ======

Double backward is also the most robust: in torch 2.14 nested forward mode gives
silently WRONG second derivatives through ``layer_norm`` and training-mode
``batch_norm``, and forward-over-reverse fails on ``mse_loss`` and on modules
with full backward hooks of their own. Both stay available as
``ExactHessian(method=...)``; the tests check every method where it is exact.

Any differentiable model works: residual connections, LayerNorm, GELU,
Embedding, functional operations, non-``Sequential`` modules, a loss from
``torch.nn.functional``. The replay uses the random state of the closure's
forward (same dropout masks), clones the buffers (BatchNorm running statistics
are not updated twice), takes BackPACK's hooks off the modules meanwhile (what
BackPACK stored for the other curvatures stays), and leaves ``.grad``
untouched (``torch.autograd.grad`` only). Other module hooks fire as in any
forward.

Cost of the evaluation: ``"ggn-exact"`` about one plain training step (a
forward pass with dual numbers and a small double backward through the loss);
``"hessian-exact"`` about two (a forward and two backward passes).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from backpack import hook_run_extensions, hook_store_io
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import grad, jvp

from alphawrap.batch import RecordedBatch
from alphawrap.curvature.base import Curvature, EvaluationContext
from alphawrap.errors import CurvatureError

METHODS = ("auto", "forward-over-reverse", "double-backward", "forward-over-forward")


@contextlib.contextmanager
def _without_backpack_hooks(modules: list[nn.Module]) -> Iterator[None]:
    """Take BackPACK's hooks off the modules while the model is replayed.

    BackPACK's forward hook would overwrite the inputs/outputs it stored during
    the closure (other curvatures of the step still read them) and its backward
    hook would delete them; its full backward hooks also keep
    :func:`torch.func.grad` from running. Other hooks stay in place.
    """
    saved = []
    for module in modules:
        forward, backward = module._forward_hooks, module._backward_hooks
        if any(h is hook_store_io for h in forward.values()) or any(
            h is hook_run_extensions for h in backward.values()
        ):
            saved.append((module, forward, backward))
            module._forward_hooks = OrderedDict(
                (k, h) for k, h in forward.items() if h is not hook_store_io
            )
            module._backward_hooks = OrderedDict(
                (k, h) for k, h in backward.items() if h is not hook_run_extensions
            )
    try:
        yield
    finally:
        for module, forward, backward in saved:
            module._forward_hooks, module._backward_hooks = forward, backward


class _Pass:
    """The model, the batch and the direction, set up for one evaluation."""

    def __init__(self, ctx: EvaluationContext) -> None:
        batch: RecordedBatch = ctx.batch
        self.batch = batch
        model = batch.model
        names = {id(p): n for n, p in model.named_parameters()}
        self.primals: dict[str, Tensor] = {}
        self.tangents: dict[str, Tensor] = {}
        for p, d in zip(ctx.params, ctx.directions):
            name = names.get(id(p))
            if name is not None:
                self.primals[name] = p.detach()
                self.tangents[name] = d.detach().to(p.dtype)
        training = any(m.training for m in model.modules())
        self.buffers = (
            {n: b.clone() for n, b in model.named_buffers()} if training else {}
        )
        self.modules = list(model.modules())
        if isinstance(batch.loss_fn, nn.Module):
            self.modules += list(batch.loss_fn.modules())
        self.results: dict[str, Any] = {}

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with _without_backpack_hooks(self.modules), self.batch.replay_rng():
            yield

    def output(self, params: dict[str, Tensor]) -> Tensor:
        return self.batch.forward({**self.buffers, **params})

    def loss(self, output: Tensor) -> Tensor:
        return self.batch.loss(output)

    # ------------------------------------------------------------ forward mode
    def first_order(self) -> tuple[Tensor, Tensor]:
        """``(f, Jd)`` from one forward pass with dual numbers (forward-mode AD).

        ``torch.autograd.forward_ad`` directly: same numbers as
        :func:`torch.func.jvp`, less overhead (measured 1.1 vs 1.7 ms on the
        ReLU MLP of the benchmark).
        """
        if "order2" in self.results:
            out, jd, _ = self.results["order2"]
            return out, jd
        if "order1" not in self.results:
            with self.running(), forward_ad.dual_level():
                duals = {
                    n: forward_ad.make_dual(p, self.tangents[n])
                    for n, p in self.primals.items()
                }
                out, jd = forward_ad.unpack_dual(self.output(duals))
                jd = torch.zeros_like(out) if jd is None else jd
            self.results["order1"] = (out, jd)
        return self.results["order1"]

    def second_order(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, Jd, f''[d, d])`` from a nested jvp."""
        if "order2" not in self.results:

            def along(params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
                return jvp(self.output, (params,), (self.tangents,))

            with self.running():
                (out, jd), (_, fdd) = jvp(along, (self.primals,), (self.tangents,))
            self.results["order2"] = (out, jd, fdd)
        return self.results["order2"]

    def loss_quadratic(self, out: Tensor, v: Tensor) -> Tensor:
        """``vᵀ ∇²ℓ(out) v`` by double backward through the loss alone (cheap).

        Reverse mode here: nested forward mode is not reliable for every loss.
        """
        with self.running(), torch.enable_grad():
            o = out.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.loss(o), o, create_graph=True)
            if not g.requires_grad:  # loss linear in the output
                return torch.zeros((), dtype=out.dtype, device=out.device)
            (hv,) = torch.autograd.grad(torch.sum(g * v), o, allow_unused=True)
        if hv is None:
            return torch.zeros((), dtype=out.dtype, device=out.device)
        return torch.sum(hv * v)

    def loss_slope(self, out: Tensor, v: Tensor) -> Tensor:
        with self.running(), torch.enable_grad():
            o = out.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.loss(o), o)
        return torch.sum(g * v)

    # ------------------------------------------------------------ reverse mode
    def _leaves(self) -> dict[str, Tensor]:
        return {n: p.detach().requires_grad_() for n, p in self.primals.items()}

    def ggn_reverse(self) -> Tensor:
        """``(Jd)ᵀ ∇²ℓ (Jd)`` with ``Jd`` from the double-vjp trick."""
        with self.running(), torch.enable_grad():
            leaves = self._leaves()
            out = self.output(leaves)
            u = torch.zeros_like(out, requires_grad=True)
            vjps = torch.autograd.grad(
                out, list(leaves.values()), u, create_graph=True, allow_unused=True
            )
            used = [
                (g, self.tangents[n]) for g, n in zip(vjps, leaves) if g is not None
            ]
            if not used:
                return torch.zeros((), dtype=out.dtype, device=out.device)
            (jd,) = torch.autograd.grad(
                [g for g, _ in used], u, [t for _, t in used], allow_unused=True
            )
            jd = torch.zeros_like(out) if jd is None else jd.detach()
        return self.loss_quadratic(out.detach(), jd)

    def hessian_double_backward(self) -> Tensor:
        with self.running(), torch.enable_grad():
            leaves = self._leaves()
            loss = self.loss(self.output(leaves))
            grads = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=True, allow_unused=True
            )
            slope = sum(
                torch.sum(g * self.tangents[n])
                for g, n in zip(grads, leaves)
                if g is not None
            )
            if not isinstance(slope, Tensor) or not slope.requires_grad:
                return torch.zeros((), dtype=loss.dtype, device=loss.device)
            hds = torch.autograd.grad(slope, list(leaves.values()), allow_unused=True)
        return sum(
            (
                torch.sum(h * self.tangents[n])
                for h, n in zip(hds, leaves)
                if h is not None
            ),
            torch.zeros((), dtype=loss.dtype, device=loss.device),
        )

    def hessian_forward_over_reverse(self) -> Tensor:
        def total(params: dict[str, Tensor]) -> Tensor:
            return self.loss(self.output(params))

        with self.running():
            _, hd = jvp(grad(total), (self.primals,), (self.tangents,))
        return sum(
            (torch.sum(hd[n] * t) for n, t in self.tangents.items()),
            next(iter(hd.values())).new_zeros(()),
        )


def _pass(ctx: EvaluationContext) -> _Pass:
    if "exact" not in ctx.cache:
        ctx.cache["exact"] = _Pass(ctx)
    return ctx.cache["exact"]


class ExactCurvature(Curvature):
    """Template: curvature along ``d`` from re-running ``loss_fn(model(...))``."""

    needs_batch = True
    scales_with_loss = False  # recomputed from loss_fn itself, never scaled
    methods: ClassVar[tuple[str, ...]]
    default_method: ClassVar[str]

    sweep: Any = None
    """The probe's :class:`~alphawrap.curvature.sweep.TangentSweep`: with
    ``method="auto"`` it serves this curvature from the stored forward when the
    model is a chain of modules it supports (no second forward pass)."""

    def recording(self) -> AbstractContextManager[Any]:
        if self.sweep is None:
            return contextlib.nullcontext()
        return self.sweep.recording_for(self)

    def bind(self, model: nn.Module | None, loss_fn: Any) -> None:
        if self.sweep is not None:
            self.sweep.bind(model, loss_fn)

    def cleanup(self, params: Any) -> None:
        if self.sweep is not None:
            self.sweep.reset()

    def __init__(self, method: str = "auto") -> None:
        if method not in self.methods:
            raise ValueError(
                f"Invalid method {method!r} for {self.name!r}: use one of "
                f"{self.methods}."
            )
        self.method = method
        self.resolved = self.default_method if method == "auto" else method

    def check_backward(self, ctx: EvaluationContext) -> None:
        """Fail right after the backward pass if evaluation cannot work."""
        if ctx.batch is None:
            raise CurvatureError(
                f"Curvature {self.name!r} needs the batch of the closure; create the "
                "probe with model= and loss_fn= (see alphawrap.batch)."
            )
        if (
            self.sweep is not None
            and self.sweep.hooks is not None
            and self._sweep_serves(ctx)
        ):
            # The chain check found every reached parameter in a recorded module,
            # and the hooks record only model='s own leaf modules (and the loss):
            # no parameter outside model= is reached. Skips a walk of the model.
            return
        outside = ctx.reached_except(ctx.batch.model.parameters())
        if outside:
            raise CurvatureError(
                f"Curvature {self.name!r} differentiates loss_fn(model(...)) with "
                "respect to the parameters of model=, but the optimizer also updates "
                f"{', '.join(outside)}, which the loss depends on and which are not "
                "parameters of that model. Pass the module that owns all optimized "
                "parameters as model=."
            )

    def _sweep_serves(self, ctx: EvaluationContext) -> bool:
        """Whether the tangent sweep serves this step (checks the chain once)."""
        return (
            self.method == "auto"
            and self.sweep is not None
            and self.sweep.supports_exact(ctx)
        )

    def quadratic(self, ctx: EvaluationContext) -> Tensor:
        """Return ``dᵀCd`` (see :class:`~alphawrap.curvature.base.Curvature`)."""
        if self._sweep_serves(ctx):
            return self.sweep.quadratics(ctx)[self.name]
        run = _pass(ctx)
        try:
            value = self._evaluate(run, self.resolved)
        except (NotImplementedError, RuntimeError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise  # not a missing derivative; reverse mode needs more memory
            if self.method != "auto" or self.resolved == _REVERSE:
                raise _unsupported(self, error) from error
            # An operation without a (correct) forward-mode derivative: use
            # reverse mode from now on.
            self.resolved = _REVERSE
            try:
                value = self._evaluate(run, _REVERSE)
            except (NotImplementedError, RuntimeError) as second:
                raise _unsupported(self, second) from second
        return value.to(ctx.accumulate_dtype)

    def _evaluate(self, run: _Pass, method: str) -> Tensor:
        raise NotImplementedError


_REVERSE = "double-backward"


def _unsupported(curvature: Curvature, error: BaseException) -> CurvatureError:
    return CurvatureError(
        f"Curvature {curvature.name!r} could not differentiate the model twice: "
        f"{str(error).splitlines()[0]} If this is attention "
        "(scaled_dot_product_attention), select the math kernel with "
        "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) in the model."
    )


class ExactGGN(ExactCurvature):
    """Full generalized Gauss-Newton along ``d``: ``(Jd)ᵀ ∇²ℓ (Jd)``.

    Args:
        method: ``"auto"`` (one forward-mode jvp through the model, falling back
            to reverse mode if an operation has no forward derivative),
            ``"forward"`` or ``"double-backward"`` (``Jd`` from the double-vjp
            trick: a backward pass and the backward of that).
    """

    name = "ggn-exact"
    description = "exact generalized Gauss-Newton along d (one jvp through the model)"
    methods = ("auto", "forward", "double-backward")
    default_method = "forward"

    def _evaluate(self, run: _Pass, method: str) -> Tensor:
        if method == "forward":
            out, jd = run.first_order()
            return run.loss_quadratic(out, jd)
        return run.ggn_reverse()


class ExactHessian(ExactCurvature):
    """Full Hessian along ``d``: ``dᵀ H d``, of any sign.

    Args:
        method: ``"auto"`` (the measured default: ``"double-backward"``),
            ``"double-backward"``, ``"forward-over-reverse"`` (``jvp`` of
            ``torch.func.grad``; fails on ``mse_loss`` and with full backward
            hooks other than BackPACK's) or ``"forward-over-forward"`` (nested
            ``jvp``; NOT reliable: torch 2.14's second-order forward mode is
            wrong for ``layer_norm`` and training-mode ``batch_norm``).
    """

    name = "hessian-exact"
    description = "exact Hessian along d (double backward through the model)"
    methods = METHODS
    default_method = "double-backward"

    def _evaluate(self, run: _Pass, method: str) -> Tensor:
        if method == "forward-over-reverse":
            return run.hessian_forward_over_reverse()
        if method == "forward-over-forward":
            out, jd, fdd = run.second_order()
            return run.loss_quadratic(out, jd) + run.loss_slope(out, fdd)
        return run.hessian_double_backward()
