"""Template base class of the curvature backends.

A backend turns the directions ``d`` (one tensor per parameter, evaluated at
``θ₀``) into the quadratic form ``dᵀCd``. Block backends return one value per
parameter (the block quadratics ``d_bᵀ C_bb d_b``, summed for the total);
the others return a scalar.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class EvaluationContext:
    """What a curvature backend gets to evaluate ``dᵀCd`` at ``θ₀``.

    Attributes:
        params: All parameters of the optimizer's groups, holding ``θ₀``.
        directions: The inner optimizer's update ``d`` for each parameter.
        reached: Indices of the parameters the closure's backward reached.
        names: A display name for each parameter.
        accumulate_dtype: dtype in which quadratic forms are accumulated.
        batch: What the closure fed to ``model`` and ``loss_fn`` (a
            :class:`~alphawrap.batch.RecordedBatch`), for the curvatures with
            :attr:`Curvature.needs_batch`; ``None`` otherwise.
        curvatures: All curvatures evaluated in this step, so that backends can
            share work (see :mod:`alphawrap.curvature.exact`).
        cache: Scratch space shared by the backends during one evaluation.
    """

    params: Sequence[Tensor]
    directions: Sequence[Tensor]
    reached: set[int]
    names: Sequence[str]
    accumulate_dtype: torch.dtype
    batch: Any = None
    curvatures: Sequence[Curvature] = ()
    cache: dict[str, Any] = field(default_factory=dict)

    def reached_except(self, tensors: Iterable[Tensor]) -> list[str]:
        """Names of the reached parameters that are not among ``tensors``."""
        known = {id(t) for t in tensors}
        return [
            self.names[i]
            for i in sorted(self.reached)
            if id(self.params[i]) not in known
        ]


class Curvature(ABC):
    """A curvature matrix ``C`` along which ``α* = -dᵀg / dᵀCd`` is evaluated.

    Subclasses set :attr:`name` and implement :meth:`quadratic`; those that need
    quantities from the closure's backward pass list the BackPACK extensions in
    :meth:`backpack_extensions`.
    """

    name: ClassVar[str]
    """The name users pass as ``curvature=``."""
    description: ClassVar[str]
    """One line for error messages and the README."""
    blockwise: ClassVar[bool] = False
    """Whether :meth:`quadratic` returns one value per parameter block."""
    needs_batch: ClassVar[bool] = False
    """Whether evaluation re-runs ``loss_fn(model(...))`` on the closure's batch
    (the probe then needs ``model=`` and ``loss_fn=``)."""
    scales_with_loss: ClassVar[bool] = True
    """Whether ``dᵀCd`` comes out multiplied by a loss scale applied before
    ``backward()`` (mixed precision); the probe divides it out if so."""
    needs_backpack_modules: ClassVar[bool] = False
    """Whether the model must consist of modules BackPACK supports."""

    def supported_modules(self) -> list[str]:
        """Module classes this curvature supports (empty: any differentiable model)."""
        return []

    def backpack_extensions(self) -> list[Any]:
        """BackPACK extensions to activate during the closure's backward pass."""
        return []

    def recording(self) -> AbstractContextManager[Any]:
        """Context to enter around a probed closure (e.g. recording hooks)."""
        return nullcontext()

    def start_step(self, step: int) -> None:  # noqa: B027
        """Learn the probe's step count before a probed closure runs.

        Backends that draw random numbers seed them by it, so that a refused
        step, a discarded capture or a resumed checkpoint leaves the draws of
        every later step as they would be in an uninterrupted run.
        """

    def bind(self, model: nn.Module | None, loss_fn: Any) -> None:  # noqa: B027
        """Learn the model and loss function the probe was given (if any)."""

    def check_backward(self, ctx: EvaluationContext) -> None:  # noqa: B027
        """Fail early, right after the backward pass, if evaluation cannot work.

        Raises:
            CurvatureError: With a message that says what to do.
        """

    @abstractmethod
    def quadratic(self, ctx: EvaluationContext) -> Tensor:
        """Return ``dᵀCd``: ``[len(params)]`` if :attr:`blockwise`, else ``[]``."""

    def cleanup(self, params: Sequence[Tensor]) -> None:  # noqa: B027
        """Drop what the backward pass stored (called before and after a step)."""

    def deferred_refusal(self) -> tuple[Tensor, str] | None:
        """A check of this step's input that needs the device's answer, if any.

        Returns ``(flag, message)``: the probe reads the 0-d ``flag`` in the
        step's one device-to-host transfer and raises a
        :class:`~alphawrap.errors.CurvatureError` with ``message`` (undoing the
        step) if it is nonzero, instead of a synchronising check of its own.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
