r"""Diagonal curvature: :math:`d^\top \operatorname{diag}(C)\, d` from BackPACK.

BackPACK's ``DiagHessian``, ``DiagGGNExact`` and ``DiagGGNMC`` store the
diagonal of the Hessian, of the generalized Gauss-Newton matrix and of its
Monte-Carlo estimate (one sampled label per example, ``mc_samples`` times) on
each parameter. Keeping only the diagonal drops every off-diagonal term, also
within a layer, so these are the cheapest and crudest estimates; per parameter
block

.. math:: d_b^\top \operatorname{diag}(C_{bb})\, d_b = \sum_i C_{ii}\, d_i^2 .

All three come from the closure's backward pass (no extra pass) and need a
model BackPACK supports (see :mod:`alphawrap.curvature.extension`).

Loss scaling (``GradScaler``): the GGN diagonals are built from the loss
Hessian alone, which BackPACK computes from the loss module's input, so they do
not see a scale applied after the loss (``scales_with_loss = False``). The
Hessian diagonal mixes that part with residual terms that do see it; the loss
part is multiplied by the scale here as well so that the probe can divide the
whole by it.
"""

from __future__ import annotations

from typing import Any

import torch
from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn

from alphawrap.curvature.extension import (
    _LOSS_MODULES,
    BackpackCurvature,
    SeededMixin,
)


class DiagonalCurvature(BackpackCurvature):
    """Template: ``Σ_i diag(C)_i d_i²`` from a BackPACK diagonal extension."""

    def block_quadratic(
        self, stored: Any, direction: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """``d_bᵀ C_bb d_b`` from what the extension stored on the parameter."""
        d = direction.to(dtype)
        return torch.sum(stored.to(dtype) * d * d)


class _SqrtLossScale:
    """Mixin: scale the loss's Hessian square root by √(output gradient).

    For an unscaled loss the output gradient is 1 and nothing changes; a
    ``GradScaler`` scale ``s > 0`` multiplies the loss part by ``s``, as the
    residual terms already are.
    """

    def backpropagate(
        self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        out = super().backpropagate(ext, module, g_inp, g_out, backproped)  # type: ignore[misc]
        factor = g_out[0].detach().abs().sqrt()
        return {**out, "matrices": [m * factor for m in out["matrices"]]}


class DiagonalHessian(DiagonalCurvature):
    """Diagonal of the Hessian (BackPACK ``DiagHessian``)."""

    name = "diag-hessian"
    description = "diagonal of the Hessian, BackPACK DiagHessian"
    savefield = "_alphawrap_diag_h"
    extension_class = DiagHessian

    def make_extension(self) -> BackpropExtension:
        """Return a fresh BackPACK extension saving to :attr:`savefield`."""
        extension = super().make_extension()
        mapping = getattr(extension, "_BackpropExtension__module_extensions", {})
        for module_cls in _LOSS_MODULES:
            base = mapping.get(module_cls)
            if base is not None:
                scaled = type(
                    f"_Scaled{type(base).__name__}", (_SqrtLossScale, type(base)), {}
                )
                extension.set_module_extension(module_cls, scaled(), overwrite=True)
        return extension


class DiagonalGGN(DiagonalCurvature):
    """Diagonal of the generalized Gauss-Newton matrix (BackPACK ``DiagGGNExact``)."""

    name = "diag-ggn"
    description = "diagonal of the generalized Gauss-Newton, BackPACK DiagGGNExact"
    savefield = "_alphawrap_diag_ggn_exact"
    extension_class = DiagGGNExact
    scales_with_loss = False


class DiagonalGGNMC(SeededMixin, DiagonalCurvature):
    """Monte-Carlo estimate of the GGN diagonal (BackPACK ``DiagGGNMC``).

    Unbiased for the GGN diagonal; its labels are drawn from a private seeded
    stream (the training's random stream is untouched).

    Args:
        mc_samples: Sampled labels per example.
        seed: Seed of the private random stream.
    """

    name = "diag-ggn-mc"
    description = "Monte-Carlo diagonal of the GGN, BackPACK DiagGGNMC"
    savefield = "_alphawrap_diag_ggn_mc"
    extension_class = DiagGGNMC
    scales_with_loss = False
