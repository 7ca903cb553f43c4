r"""Ground truth for :math:`\alpha^*`: the loss along the update, re-evaluated.

Two opt-in measurements of ``AlphaProbe`` use it (both need ``model=`` and
``loss_fn=``, which let the probe record the closure's batch, see
:mod:`alphawrap.batch`):

* ``truth_every=k``: the **line-search truth** :math:`\alpha_{line}`, the
  minimiser of :math:`h(\alpha) = L(\theta_0 + \alpha d)` on the step's own
  mini-batch, found by :func:`line_search` (bracketing on a log\ :sub:`2` grid,
  then golden-section search in :math:`\ln\alpha`), with :math:`h(0)` and
  :math:`h(\alpha_{line})`;
* ``track_rho=True``: one forward pass at the parameters actually taken,
  :math:`\theta_0 + t d`, giving the reduction ratio :math:`\rho` (actual over
  predicted decrease) and the secant curvature over the step (see
  :func:`alphawrap.quadratic.reduction_ratio` and
  :func:`~alphawrap.quadratic.secant_curvature`).

:class:`BatchObjective` evaluates :math:`h` without disturbing the run: under
``torch.no_grad()``, with :func:`torch.func.functional_call` (the parameters
are substituted, never written: ``θ₀ + α d`` is built in new tensors with the
same ``torch.add`` the probe uses to commit a step), the buffers cloned for
every evaluation (BatchNorm's running statistics are not touched), the random
state of the closure's forward replayed (the same dropout masks) and the
caller's random state restored afterwards, and BackPACK's hooks taken off the
modules (what the backward pass stored for the curvatures stays). Gradients,
parameters and optimizer state are never written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alphawrap.batch import RecordedBatch
from alphawrap.curvature.exact import _without_backpack_hooks
from alphawrap.errors import ProbeError

__all__ = ["GOLDEN_RTOL", "BatchObjective", "LineSearchResult", "line_search"]

GOLDEN_RTOL = 1e-3
"""Default resolution of :func:`line_search` in :math:`\\ln\\alpha`."""

_INVPHI = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...


@dataclass(frozen=True)
class LineSearchResult:
    r"""Outcome of :func:`line_search`.

    Attributes:
        alpha: The minimiser :math:`\alpha_{line}` (``None`` unless ``status`` is
            ``"ok"``).
        loss: :math:`h(\alpha_{line})` (``None`` unless ``"ok"``).
        loss0: :math:`h(0)`.
        status: ``"ok"``; ``"no-decrease"`` (no :math:`\alpha` down to
            ``alpha_min`` lowers :math:`h` below :math:`h(0)`: ``d`` does not
            descend on this batch, the minimum is at 0); ``"unbounded"``
            (:math:`h` still decreases at ``alpha_max``); ``"non-finite"``
            (:math:`h(0)` is NaN or infinite).
        evaluations: Number of evaluations of :math:`h`, :math:`h(0)` included.
    """

    alpha: float | None
    loss: float | None
    loss0: float
    status: str
    evaluations: int


def line_search(
    h: Callable[[float], float],
    *,
    rtol: float = GOLDEN_RTOL,
    alpha_min: float = 2.0**-20,
    alpha_max: float = 2.0**20,
    maximize: bool = False,
) -> LineSearchResult:
    r"""Minimise the one-dimensional function ``h`` over :math:`\alpha > 0`.

    1. Bracketing on the grid :math:`2^k` starting at :math:`\alpha = 1`: walk
       up (doubling) while :math:`h` decreases, or down (halving) until
       :math:`h(\alpha) < h(0)` and then while it decreases, until a grid point
       :math:`b` with :math:`h(b) < h(0)`, :math:`h(b) \le h(b/2)` and
       :math:`h(b) \le h(2b)`. Costs :math:`|\log_2 \alpha_{line}| + 3`
       evaluations or so.
    2. Golden-section search for the minimum in :math:`\ln\alpha` on
       :math:`[b/2, 2b]` until the bracket is narrower than ``2·rtol`` in
       :math:`\ln\alpha`: the midpoint returned is within a factor
       :math:`e^{\pm\text{rtol}}` of the minimiser (0.1 % for the default),
       about 15 more evaluations. The lowest point evaluated is returned.

    Non-finite values of :math:`h` count as :math:`+\infty`. If :math:`h` has
    several local minima, the one reached from :math:`\alpha = 1` is found
    (usually the first one along ``d``, which is what a step would reach).

    Args:
        h: The function, e.g. :class:`BatchObjective` (loss at ``θ₀ + α d``).
        rtol: Resolution in :math:`\ln\alpha`.
        alpha_min: Smallest multiplier tried.
        alpha_max: Largest multiplier tried.
        maximize: Find the maximiser instead (for ``maximize=True`` optimizers).

    Example:
        >>> result = line_search(lambda a: (a - 3.0) ** 2)
        >>> round(result.alpha, 2), result.status
        (3.0, 'ok')
    """
    sign = -1.0 if maximize else 1.0
    seen: dict[float, float] = {}

    def f(alpha: float) -> float:
        if alpha not in seen:
            value = sign * float(h(alpha))
            seen[alpha] = value if math.isfinite(value) else math.inf
        return seen[alpha]

    def result(status: str, alpha: float | None = None) -> LineSearchResult:
        loss = None if alpha is None else sign * seen[alpha]
        return LineSearchResult(alpha, loss, sign * h0, status, len(seen))

    h0 = f(0.0)
    if not math.isfinite(h0):
        h0 = sign * float(h(0.0))  # report the NaN/inf itself
        return LineSearchResult(None, None, h0, "non-finite", 1)
    b = 1.0
    if f(b) < h0:
        while f(2 * b) < f(b):  # up: the minimum lies further out
            b *= 2
            if b > alpha_max:
                return result("unbounded")
    else:
        while not f(b) < h0:  # down: find a decrease first
            b /= 2
            if b < alpha_min:
                return result("no-decrease")
    while f(b / 2) < f(b) and b / 2 >= alpha_min:  # then follow it down
        b /= 2
    # Golden-section search in ln α on [b/2, 2b].
    lo, hi = math.log(b / 2), math.log(2 * b)
    x1, x2 = hi - _INVPHI * (hi - lo), lo + _INVPHI * (hi - lo)
    f1, f2 = f(math.exp(x1)), f(math.exp(x2))
    while hi - lo > 2 * rtol:
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - _INVPHI * (hi - lo)
            f1 = f(math.exp(x1))
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + _INVPHI * (hi - lo)
            f2 = f(math.exp(x2))
    # One parabolic interpolation through the best point and its neighbours
    # (exact when h is quadratic); kept only if it is lower.
    best = min((a for a in seen if a > 0), key=lambda a: (seen[a], a))
    left = max((a for a in seen if a < best), default=None)
    right = min((a for a in seen if a > best), default=None)
    if left is not None and right is not None:
        vertex = _parabola_vertex(
            (left, seen[left]), (best, seen[best]), (right, seen[right])
        )
        if vertex is not None and left < vertex < right and f(vertex) <= seen[best]:
            best = vertex
    return result("ok", best)


def _parabola_vertex(
    p: tuple[float, float], q: tuple[float, float], r: tuple[float, float]
) -> float | None:
    """Abscissa of the vertex of the parabola through three points (a minimum)."""
    (a, fa), (b, fb), (c, fc) = p, q, r
    if not all(math.isfinite(v) for v in (fa, fb, fc)):
        return None
    num = (b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)
    den = (b - a) * (fb - fc) - (b - c) * (fb - fa)
    if den == 0.0 or not math.isfinite(num / den):
        return None
    # Positive curvature of the parabola: the middle point lies below the chord.
    chord = fa + (fc - fa) * (b - a) / (c - a)
    if not fb < chord:
        return None
    return b - 0.5 * num / den


class BatchObjective:
    r"""The mini-batch loss along the update, :math:`h(\alpha)=L(\theta_0+\alpha d)`.

    Evaluated on the recorded batch of the step without changing anything (see
    the module docstring). Call it with a float to get the loss as a 0-d tensor
    on the parameters' device, or use :meth:`value` for a Python float.

    Args:
        batch: The step's :class:`~alphawrap.batch.RecordedBatch`.
        params: The optimizer's parameters (their values are ignored: ``theta0``
            is used).
        theta0: :math:`\theta_0`, one tensor per parameter.
        directions: :math:`d`, one tensor per parameter.

    Raises:
        ProbeError: A parameter that the update moves is not a parameter of
            ``batch.model`` (its effect on the loss could not be evaluated).
    """

    def __init__(
        self,
        batch: RecordedBatch,
        params: Sequence[Tensor],
        theta0: Sequence[Tensor],
        directions: Sequence[Tensor],
    ) -> None:
        self.batch = batch
        model = batch.model
        names = {id(p): n for n, p in model.named_parameters()}
        self._named: list[tuple[str, Tensor, Tensor]] = []
        for p, t0, d in zip(params, theta0, directions):
            name = names.get(id(p))
            if name is None:
                if d.numel() and bool(torch.any(d != 0)):
                    raise ProbeError(
                        "A parameter of the optimizer that the update moves is not a "
                        f"parameter of the model passed as model= "
                        f"({type(model).__name__}); the loss along the update "
                        "cannot be evaluated. Pass the model that holds all the "
                        "optimizer's parameters."
                    )
                continue
            self._named.append((name, t0.detach(), d.detach().to(t0.dtype)))
        self._modules = list(model.modules())
        if isinstance(batch.loss_fn, nn.Module):
            self._modules += list(batch.loss_fn.modules())

    def parameters_at(self, alpha: float) -> dict[str, Tensor]:
        """``θ₀ + α d`` by name, as the probe would commit it."""
        return {n: torch.add(t0, d, alpha=alpha) for n, t0, d in self._named}

    @torch.no_grad()
    def __call__(self, alpha: float) -> Tensor:
        """The loss at ``θ₀ + α d`` (0-d tensor, detached)."""
        model = self.batch.model
        overrides = {n: b.clone() for n, b in model.named_buffers()}
        overrides.update(self.parameters_at(alpha))
        with _without_backpack_hooks(self._modules), self.batch.replay_rng():
            loss = self.batch.loss(self.batch.forward(overrides))
        return loss.detach().reshape(())

    def value(self, alpha: float) -> float:
        """The loss at ``θ₀ + α d`` as a Python float."""
        return float(self(alpha))
