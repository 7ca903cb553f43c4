r"""Per-block :math:`\alpha^*`: which layer's step is too short or too long.

With ``AlphaProbe(..., per_block=True)`` every record carries, for each
parameter :math:`b` and each parameter group, the restriction of the quadratic
model to that block,

.. math::

    \alpha^*_b = -\frac{d_b^\top g_b}{d_b^\top C_{bb}\, d_b},

for every requested curvature that defines blocks (``blockwise = True``: the
block-diagonal, diagonal and Kronecker ones; the exact curvatures have
cross-block terms and no per-block split). A group's numbers are the sums over
its parameters. :math:`\alpha^*_b \gg 1` says the optimizer's step for that
block could be much longer; :math:`\ll 1`, much shorter.

Stored as plain Python numbers in ``record.extra``::

    record.extra["blocks"] = {
        "0.weight": {
            "slope": dᵀg restricted to the block,
            "direction_norm": ‖d_b‖,
            "curvatures": {"ggn": d_bᵀC_bb d_b, ...},
            "alphas": {"ggn": α*_b or None, ...},
            "statuses": {"ggn": "ok", ...},
        },
        ...
    }
    record.extra["groups"] = [{..., "params": ["0.weight", ...]}, ...]

Parameters are named by ``model.named_parameters()`` when the probe got
``model=``, else ``group{i}.param{j}``. The numbers travel in the step's single
packed tensor (still one device-to-host transfer); the block slopes and norms are
built from the already-global gradient and update, the block curvatures are
local (averaged across processes under DDP like the totals).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from alphawrap.curvature.base import Curvature, EvaluationContext
from alphawrap.quadratic import Status, optimal_step


def _summary(
    slope: float, dd: float, curvatures: dict[str, float], maximize: bool
) -> dict[str, Any]:
    alphas: dict[str, float | None] = {}
    statuses: dict[str, str] = {}
    for name, q in curvatures.items():
        if not (math.isfinite(slope) and math.isfinite(dd)):
            alpha, status = None, Status.NONFINITE
        elif dd == 0.0:
            alpha, status = None, Status.ZERO_DIRECTION
        else:
            alpha, status = optimal_step(slope, q, maximize=maximize)
        alphas[name], statuses[name] = alpha, status.value
    return {
        "slope": slope,
        "direction_norm": math.sqrt(dd) if dd >= 0 else math.nan,
        "curvatures": dict(curvatures),
        "alphas": alphas,
        "statuses": statuses,
    }


class BlockBreakdown:
    """Per-block numbers on the device, the record entries on the host."""

    def backpack_extensions(self) -> list[Any]:
        """BackPACK extensions to activate during the closure's backward pass."""
        return []

    def check_backward(self, ctx: EvaluationContext) -> None:
        """Fail right after the backward pass if evaluation cannot work."""
        pass

    def cleanup(self, params: Sequence[Tensor]) -> None:
        """Drop what the backward pass stored on the parameters."""
        pass

    def tensors(
        self,
        ctx: EvaluationContext,
        curvatures: Sequence[Curvature],
        quadratics: Sequence[Tensor],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """``(shared, local)``: block slopes and ‖d_b‖²; block curvatures."""
        acc = ctx.accumulate_dtype
        slopes, norms = [], []
        for i, (p, d) in enumerate(zip(ctx.params, ctx.directions)):
            d = d.to(acc)
            norms.append(torch.sum(d * d))
            if i in ctx.reached and p.grad is not None:
                slopes.append(torch.sum(d * p.grad.to(acc)))
            else:
                slopes.append(torch.zeros((), dtype=acc, device=d.device))
        local = [
            q.to(acc).reshape(-1) for c, q in zip(curvatures, quadratics) if c.blockwise
        ]
        return [torch.stack(slopes), torch.stack(norms)], local

    @staticmethod
    def extra(
        shared: Sequence[float],
        local: Sequence[float],
        *,
        names: Sequence[str],
        group_sizes: Sequence[int],
        curvature_names: Sequence[str],
        maximize: bool,
    ) -> dict[str, Any]:
        """The ``"blocks"`` and ``"groups"`` entries of ``record.extra``."""
        n = len(names)
        slopes, dds = list(shared[:n]), list(shared[n : 2 * n])
        per_curv = {
            name: list(local[k * n : (k + 1) * n])
            for k, name in enumerate(curvature_names)
        }
        blocks = {
            names[i]: _summary(
                slopes[i], dds[i], {c: v[i] for c, v in per_curv.items()}, maximize
            )
            for i in range(n)
        }
        groups, start = [], 0
        for size in group_sizes:
            members = range(start, start + size)
            entry = _summary(
                sum(slopes[i] for i in members),
                sum(dds[i] for i in members),
                {c: sum(v[i] for i in members) for c, v in per_curv.items()},
                maximize,
            )
            entry["params"] = [names[i] for i in members]
            groups.append(entry)
            start += size
        return {"blocks": blocks, "groups": groups}
