"""alphawrap: how far should your optimizer's next step go?

``AlphaProbe`` wraps any ``torch.optim`` optimizer and measures, on every step,
the optimal step length ``α* = -dᵀg / dᵀCd`` along the update ``d`` the optimizer
is about to take, with curvature ``C`` from BackPACK; in apply mode it takes the
rescaled step.
"""

from alphawrap.curvature import available as available_curvatures
from alphawrap.errors import (
    ClosureError,
    CurvatureError,
    DistributedProbeError,
    ProbeError,
)
from alphawrap.history import History, ProbeRecord
from alphawrap.probe import AlphaProbe, Capture
from alphawrap.quadratic import Status, optimal_step

__version__ = "0.1.0"

__all__ = [
    # the wrapper
    "AlphaProbe",
    "Capture",
    # errors
    "ClosureError",
    "CurvatureError",
    "DistributedProbeError",
    # records
    "History",
    "ProbeError",
    "ProbeRecord",
    "Status",
    # maths
    "available_curvatures",
    "optimal_step",
]
