r"""Mini-batch noise of :math:`d^\top g` and :math:`\alpha^*`.

With ``AlphaProbe(..., noise=True)`` the closure's backward also runs BackPACK's
``BatchGrad``, which stores each sample's contribution :math:`g_n` to the
gradient, :math:`\sum_n g_n = g` (for a mean-reduced loss BackPACK includes the
:math:`1/N`, for a sum it does not; either way the contributions add up to the
gradient). With :math:`s_n = d^\top g_n` and :math:`d^\top g = \sum_n s_n`,

.. math::

    \operatorname{SE}(d^\top g) = \sqrt{\frac{N}{N-1} \sum_n (s_n - \bar s)^2},

the standard error of :math:`d^\top g` over the draw of the :math:`N` samples;
the same formula holds for a mean (:math:`d^\top g = \frac1N \sum_n N s_n`) and
a sum reduction. For :math:`\alpha^* = -d^\top g / d^\top C d` the delta method
with the curvature held fixed gives

.. math:: \operatorname{SE}(\alpha^*) = \operatorname{SE}(d^\top g) / |d^\top C d|,

i.e. the noise that the gradient's sampling puts into :math:`\alpha^*` on this
batch's curvature (the curvature's own sampling noise is not included; it needs
per-sample curvature, which most backends do not have). A useful reading:
:math:`|d^\top g| / \operatorname{SE}(d^\top g) < 2` means the batch does not
tell whether ``d`` descends at all.

Stored in ``record.extra["noise"]`` as plain numbers::

    {"batch_size": N, "slope_se": SE(dᵀg), "alpha_se": {curvature: SE(α*) or None}}

Needs every optimized parameter to live in a module BackPACK's ``BatchGrad``
supports (Linear, Conv, BatchNorm, Embedding, RNN/LSTM); others fail at the first
step with a :class:`~alphawrap.errors.CurvatureError` that names them. Cost: one
per-sample gradient tensor per parameter (``N`` times the parameter's memory)
and a small product with ``d``. Under DDP the packed variance is reduced with
the squared weights (``squared=`` of :meth:`DistributedReducer.reduce`), so that
the result is the standard error of the averaged :math:`d^\top g`,
:math:`\sqrt{\sum_r \operatorname{SE}_r^2} / W` for ``W`` processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from backpack.extensions import BatchGrad
from torch import Tensor, nn

from alphawrap.curvature.base import EvaluationContext
from alphawrap.curvature.extension import module_names
from alphawrap.errors import CurvatureError

SAVEFIELD = "_alphawrap_grad_batch"


class GradientNoise:
    """Per-sample directional derivatives from BackPACK's ``BatchGrad``.

    Args:
        model: The model, to name the modules of unsupported parameters.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.model = model

    def backpack_extensions(self) -> list[Any]:
        """BackPACK extensions to activate during the closure's backward pass."""
        extension = BatchGrad()
        extension.savefield = SAVEFIELD
        extension._fail_mode = "SILENT"  # missing results are reported below
        return [extension]

    def check_backward(self, ctx: EvaluationContext) -> None:
        """Fail right after the backward pass if evaluation cannot work."""
        missing = [
            i for i in sorted(ctx.reached) if not hasattr(ctx.params[i], SAVEFIELD)
        ]
        if not missing:
            return
        owners = []
        for i in missing:
            name = ctx.names[i]
            owner = None
            if self.model is not None and "." in name:
                try:
                    owner = type(self.model.get_submodule(name.rsplit(".", 1)[0]))
                except AttributeError:
                    owner = None
            owners.append(f"{name} ({owner.__name__})" if owner else name)
        raise CurvatureError(
            "noise=True needs per-sample gradients from BackPACK's BatchGrad, which "
            f"got none for {', '.join(owners)}. Extend the model with "
            "backpack.extend(model) and use modules BatchGrad supports: "
            f"{', '.join(module_names(BatchGrad()))}; or turn noise off."
        )

    def cleanup(self, params: Sequence[Tensor]) -> None:
        """Drop what the backward pass stored on the parameters."""
        for p in params:
            if hasattr(p, SAVEFIELD):
                delattr(p, SAVEFIELD)

    def tensors(
        self, ctx: EvaluationContext, scale: Any = None
    ) -> tuple[list[Tensor], int]:
        """The variance term (local) and the batch size (no device sync)."""
        acc = ctx.accumulate_dtype
        samples = None
        for i in sorted(ctx.reached):
            p, d = ctx.params[i], ctx.directions[i]
            per_sample = getattr(p, SAVEFIELD).to(acc)
            s = per_sample.reshape(per_sample.shape[0], -1) @ d.to(acc).reshape(-1)
            samples = s if samples is None else samples + s
        if samples is None:
            device = ctx.directions[0].device if ctx.directions else None
            return [torch.full((1,), math.nan, dtype=acc, device=device)], 0
        if scale is not None:
            samples = samples / scale
        n = samples.numel()
        centred = samples - samples.mean()
        var = (
            torch.sum(centred * centred) * (n / (n - 1))
            if n > 1
            else samples.new_full((), math.nan)
        )
        return [var.reshape(1)], n

    @staticmethod
    def extra(
        values: Sequence[float],
        batch_size: int,
        curvatures: dict[str, float],
        statuses: dict[str, str],
    ) -> dict[str, Any]:
        """The ``"noise"`` entry of ``record.extra``."""
        var = values[0]
        se = math.sqrt(var) if math.isfinite(var) and var >= 0 else None
        alpha_se = {
            name: (
                se / abs(q)
                if se is not None and statuses.get(name) == "ok" and q != 0
                else None
            )
            for name, q in curvatures.items()
        }
        return {"batch_size": batch_size, "slope_se": se, "alpha_se": alpha_se}
