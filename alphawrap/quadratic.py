r"""Pure maths of the one-dimensional quadratic model (no autograd, no tensors).

Along the direction :math:`d` the optimizer is about to step, the mini-batch loss
is modelled as

.. math::

    h(\alpha) = L(\theta_0 + \alpha d)
    \approx L(\theta_0) + \alpha\, d^\top g + \tfrac{1}{2} \alpha^2\, d^\top C d,

whose minimiser is :math:`\alpha^* = -d^\top g / d^\top C d`. The functions here
decide when that number is defined and what multiplier to apply when it is not.
They work on plain Python floats so they can be tested without a network.
"""

from __future__ import annotations

import math
from enum import Enum


class Status(str, Enum):
    r"""Why :math:`\alpha^*` is (un)defined on a step.

    The value is the string stored in history records.
    """

    OK = "ok"
    """Descent direction with positive curvature: :math:`\\alpha^*` is defined."""
    NOT_DESCENT = "not-descent"
    """:math:`d^\\top g \\ge 0`: the update does not decrease the batch loss."""
    NONPOSITIVE_CURVATURE = "nonpositive-curvature"
    """:math:`d^\\top C d \\le 0`: the model has no minimum along ``d``."""
    NONFINITE = "non-finite"
    """Loss, gradient, direction or curvature is NaN or infinite."""
    ZERO_DIRECTION = "zero-direction"
    """The optimizer proposes no change (``d = 0``)."""
    NOT_PROBED = "not-probed"
    """The step was not probed (``interval > 1``)."""


def optimal_step(
    slope: float, curvature: float, *, maximize: bool = False
) -> tuple[float | None, Status]:
    r"""Return :math:`\alpha^* = -d^\top g / d^\top C d` and its status.

    Args:
        slope: Directional derivative :math:`d^\top g` of the loss.
        curvature: Curvature along the direction, :math:`d^\top C d`.
        maximize: Whether the optimizer maximises the objective. The quadratic
            model is then that of :math:`-L`, so the guards flip sign; the formula
            for :math:`\alpha^*` is unchanged.

    Returns:
        ``(alpha, status)``; ``alpha`` is ``None`` unless ``status`` is
        :attr:`Status.OK`.

    Example:
        >>> optimal_step(-2.0, 4.0)
        (0.5, <Status.OK: 'ok'>)
        >>> optimal_step(1.0, 4.0)
        (None, <Status.NOT_DESCENT: 'not-descent'>)
    """
    if not (math.isfinite(slope) and math.isfinite(curvature)):
        return None, Status.NONFINITE
    sign = -1.0 if maximize else 1.0
    slope, curvature = sign * slope, sign * curvature
    if slope >= 0.0:
        return None, Status.NOT_DESCENT
    if curvature <= 0.0:
        return None, Status.NONPOSITIVE_CURVATURE
    alpha = -slope / curvature
    if not math.isfinite(alpha):
        return None, Status.NONFINITE
    return alpha, Status.OK


def clip_to_bounds(alpha: float, bounds: tuple[float, float] | None) -> float:
    """Clip ``alpha`` into the closed interval ``bounds`` (``None``: no bounds).

    Example:
        >>> clip_to_bounds(12.0, (0.1, 10.0))
        10.0
    """
    if bounds is None:
        return alpha
    low, high = bounds
    return min(max(alpha, low), high)


def predicted_change(alpha: float, slope: float, curvature: float) -> float:
    r"""Change of the quadratic model for a step :math:`\alpha d`.

    .. math:: \Delta q(\alpha) = \alpha\, d^\top g + \tfrac12 \alpha^2\, d^\top C d

    Example:
        >>> predicted_change(0.5, -2.0, 4.0)
        -0.5
    """
    return alpha * slope + 0.5 * alpha * alpha * curvature


# ------------------------------------------------------------------ apply mode
def damped_curvature(
    curvature: float, sq_norm: float, damping: float, *, maximize: bool = False
) -> float:
    r"""Damped curvature :math:`d^\top C d + \lambda \|d\|^2` (Levenberg–Marquardt).

    For ``maximize=True`` the damping is added to the curvature of :math:`-L`, so
    the value returned is :math:`d^\top C d - \lambda \|d\|^2`. Pass the result
    to :func:`optimal_step`: :math:`\alpha = -d^\top g / (d^\top C d + \lambda
    \|d\|^2)` is defined wherever the damped curvature is positive, also where
    :math:`d^\top C d \le 0`, and never exceeds :math:`-d^\top g / (\lambda
    \|d\|^2)`.

    Example:
        >>> damped_curvature(4.0, 2.0, 0.5)
        5.0
    """
    sign = -1.0 if maximize else 1.0
    return curvature + sign * damping * sq_norm


def smooth_log_alpha(state: float | None, alpha: float, beta: float) -> float:
    r"""One step of the exponential moving average of :math:`\ln\alpha`.

    .. math:: s \leftarrow \beta s + (1 - \beta) \ln\alpha

    Started at the first value (``state=None`` returns :math:`\ln\alpha`), so no
    bias correction is needed. The smoothed multiplier is :math:`e^s`, a
    geometric mean that weighs the last :math:`1/(1-\beta)` steps or so: a
    single outlier :math:`\alpha` moves it by the factor
    :math:`\alpha^{1-\beta}` only. ``beta=0`` returns :math:`\ln\alpha`.

    Example:
        >>> import math
        >>> round(math.exp(smooth_log_alpha(math.log(1.0), 100.0, 0.5)), 6)
        10.0
    """
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be finite and positive, got {alpha!r}.")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}.")
    value = math.log(alpha)
    if state is None:
        return value
    return beta * state + (1.0 - beta) * value


def reduction_ratio(
    actual: float, predicted: float, *, maximize: bool = False
) -> float | None:
    r"""Reduction ratio :math:`\rho` = actual change / predicted change of the loss.

    ``actual`` is :math:`L(\theta_0 + t d) - L(\theta_0)`, ``predicted`` the
    change of the quadratic model for the same step, :func:`predicted_change`.
    :math:`\rho = 1`: the model was exact along the step; :math:`\rho < 1`: the
    loss decreased less than predicted (:math:`\rho < 0`: it increased);
    :math:`\rho > 1`: more. ``None`` where the model predicts no improvement
    (``predicted >= 0``, or ``<= 0`` for ``maximize``) or a value is not finite:
    the ratio then says nothing about the model's trust region.

    Example:
        >>> reduction_ratio(-0.25, -0.5)
        0.5
    """
    if not (math.isfinite(actual) and math.isfinite(predicted)):
        return None
    sign = -1.0 if maximize else 1.0
    if not sign * predicted < 0.0:
        return None
    return actual / predicted


def secant_curvature(change: float, t: float, slope: float) -> float | None:
    r"""Curvature along ``d`` of the parabola through the loss before and after a step.

    .. math:: c_{sec} = \frac{2\,(L(\theta_0 + t d) - L(\theta_0) - t\, d^\top g)}{t^2}

    on the same scale as :math:`d^\top C d`, so :math:`-d^\top g / c_{sec}` is the
    minimiser of that parabola. ``None`` for ``t = 0`` or non-finite input.

    Example:
        >>> secant_curvature(-0.5, 0.5, -2.0)
        4.0
    """
    if t == 0.0 or not all(math.isfinite(v) for v in (change, t, slope)):
        return None
    return 2.0 * (change - t * slope) / (t * t)


def adapt_damping(
    damping: float,
    rho: float | None,
    *,
    factor: float = 1.5,
    low: float = 0.25,
    high: float = 0.75,
    bounds: tuple[float, float] = (1e-8, 1e8),
) -> float:
    r"""Levenberg–Marquardt rule: the damping :math:`\lambda` for the next step.

    As in K-FAC (Martens & Grosse 2015, §6.5; kfac-jax): :math:`\lambda
    \leftarrow \omega\lambda` if :math:`\rho < 1/4` (the model promised too
    much: trust it less), :math:`\lambda \leftarrow \lambda/\omega` if
    :math:`\rho > 3/4` (trust it more), unchanged otherwise or when
    :math:`\rho` is ``None``; the result is clipped into ``bounds``.

    Args:
        damping: The current :math:`\lambda`.
        rho: The reduction ratio of the last step (:func:`reduction_ratio`).
        factor: :math:`\omega > 1`.
        low: Below this :math:`\rho`, increase.
        high: Above this :math:`\rho`, decrease.
        bounds: ``(min, max)`` of :math:`\lambda`; the minimum must be positive or
            a :math:`\lambda` of 0 would never grow.

    Example:
        >>> adapt_damping(1.0, 0.1, factor=2.0)
        2.0
        >>> adapt_damping(1.0, 0.9, factor=2.0)
        0.5
    """
    if rho is not None and math.isfinite(rho):
        if rho < low:
            damping *= factor
        elif rho > high:
            damping /= factor
    return min(max(damping, bounds[0]), bounds[1])
