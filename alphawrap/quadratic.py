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
    """Why :math:`\\alpha^*` is (un)defined on a step.

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
