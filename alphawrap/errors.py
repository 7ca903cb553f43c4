"""Exceptions raised by alphawrap.

Every error the probe raises during a step leaves parameters, gradients, the
inner optimizer's state and the history exactly as they were before the step.
"""

from __future__ import annotations


class ProbeError(RuntimeError):
    """Base class: a probe step could not be carried out (nothing was changed)."""


class ClosureError(ProbeError):
    """The closure raised, returned no usable loss, or did not call backward."""


class CurvatureError(ProbeError):
    """A requested curvature cannot be computed for this model or loss."""


class DistributedProbeError(ProbeError):
    """Another process failed in this probe step, or the step's collective failed."""
