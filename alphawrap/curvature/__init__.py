"""Curvature backends, by the name users pass as ``AlphaProbe(curvature=...)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from alphawrap.curvature.base import Curvature, EvaluationContext
from alphawrap.curvature.blockdiag import (
    BlockDiagonalCurvature,
    BlockGGN,
    BlockHessian,
    PCHAbs,
    PCHClip,
)
from alphawrap.curvature.diagonal import DiagonalGGN, DiagonalGGNMC, DiagonalHessian
from alphawrap.curvature.exact import ExactGGN, ExactHessian
from alphawrap.curvature.kronecker import KFACCurvature, KFLRCurvature, KFRACurvature
from alphawrap.curvature.sweep import (
    SweepCurvature,
    SweepGGN,
    SweepHessian,
    SweepPCHAbs,
    SweepPCHClip,
    share_engine,
)

REGISTRY: dict[str, type[Curvature]] = {
    cls.name: cls
    for cls in (
        SweepHessian,
        SweepGGN,
        SweepPCHClip,
        SweepPCHAbs,
        ExactGGN,
        ExactHessian,
        DiagonalHessian,
        DiagonalGGN,
        DiagonalGGNMC,
        KFACCurvature,
        KFLRCurvature,
        KFRACurvature,
    )
}
"""All curvature backends by name, in the order the README lists them."""


def available() -> list[str]:
    """Names of all curvatures."""
    return list(REGISTRY)


def resolve(
    curvature: str | Sequence[str],
    model: nn.Module | None = None,
    loss_fn: Any = None,
) -> list[Curvature]:
    """Turn a name or a sequence of names into backend instances.

    The backends of one selection share one tangent sweep, and learn ``model``
    and ``loss_fn`` when given (the block curvatures then record with plain
    hooks instead of BackPACK's ``extend``).

    Raises:
        ValueError: For an unknown, duplicate or empty selection; the message
            lists the valid names.
    """
    names = [curvature] if isinstance(curvature, str) else list(curvature)
    if not names:
        raise ValueError(f"curvature must name at least one of {available()}.")
    for name in names:
        if not isinstance(name, str) or name not in REGISTRY:
            raise ValueError(
                f"Unknown curvature {name!r}. Valid choices: {', '.join(available())}."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"curvature lists a name twice: {names}.")
    curvatures = [REGISTRY[name]() for name in names]
    share_engine(curvatures)
    for c in curvatures:
        c.bind(model, loss_fn)
    return curvatures


__all__ = [
    "REGISTRY",
    "BlockDiagonalCurvature",
    "BlockGGN",
    "BlockHessian",
    "Curvature",
    "DiagonalGGN",
    "DiagonalGGNMC",
    "DiagonalHessian",
    "EvaluationContext",
    "ExactGGN",
    "ExactHessian",
    "KFACCurvature",
    "KFLRCurvature",
    "KFRACurvature",
    "PCHAbs",
    "PCHClip",
    "SweepCurvature",
    "SweepGGN",
    "SweepHessian",
    "SweepPCHAbs",
    "SweepPCHClip",
    "available",
    "resolve",
]
