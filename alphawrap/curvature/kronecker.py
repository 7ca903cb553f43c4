r"""Kronecker-factored curvature: :math:`d^\top (B \otimes A)\, d` without the product.

BackPACK's ``KFAC`` (Monte-Carlo), ``KFLR`` (exact loss Hessian) and ``KFRA``
(batch-averaged recursion) store on each parameter a list of Kronecker factors
whose product approximates that parameter's diagonal block of the generalized
Gauss-Newton matrix, in PyTorch's row-major flattening:

* ``Linear`` weight :math:`W \in \mathbb{R}^{o \times i}`: ``[B, A]`` with
  :math:`B \in \mathbb{R}^{o \times o}` from the backpropagated loss Hessian
  (KFAC/KFLR: :math:`\sum_n J_n^\top H_n J_n` w.r.t. the layer output, the
  :math:`1/N` of a mean loss included; KFRA: the batch-averaged recursion) and
  :math:`A = \frac1N \sum_n x_n x_n^\top` from the layer input;
* ``Conv2d`` weight :math:`W \in \mathbb{R}^{o \times c \times k \times k}`:
  ``[B, A]`` with :math:`B` summed over output positions and :math:`A` the
  second moment of the unfolded input patches (``c k k`` square);
* biases: ``[B]`` (the same output factor; no input factor).

For a weight with factors ``[B, A]`` and direction :math:`D` reshaped to
:math:`o \times m`,

.. math::

    \operatorname{vec}(D)^\top (B \otimes A) \operatorname{vec}(D)
    = \sum_{jk} D_{jk}\, (B D A^\top)_{jk},

two small matrix products instead of an :math:`(om)^2` matrix;
:func:`kronecker_quadratic` does this for any number of factors. The test suite
checks it against ``torch.kron`` of the same factors and the factors against
their definitions.

All three come from the closure's backward pass (no extra pass), need a model
BackPACK supports, and are GGN approximations: they see no loss scale
(``scales_with_loss = False``). ``KFAC`` draws its labels from a private seeded
stream (see :mod:`alphawrap.curvature.extension`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from backpack.extensions import KFAC, KFLR, KFRA
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn

from alphawrap.curvature.extension import (
    BackpackCurvature,
    SeededMixin,
)
from alphawrap.errors import CurvatureError


def kronecker_quadratic(factors: Sequence[Tensor], direction: Tensor) -> Tensor:
    r""":math:`v^\top (F_1 \otimes \dots \otimes F_k)\, v`, :math:`v = \mathrm{vec}(d)`.

    ``vec`` is row-major (``d.reshape(-1)``), as in ``torch.kron``; each factor is
    square and the product of their sizes is ``d.numel()``. Costs one small
    matrix product per factor.

    Raises:
        ValueError: If the factors do not fit ``direction``.
    """
    sizes = [f.shape[0] for f in factors]
    if any(f.dim() != 2 or f.shape[0] != f.shape[1] for f in factors) or (
        torch.Size(sizes).numel() != direction.numel()
    ):
        raise ValueError(
            f"Kronecker factors of shapes {[tuple(f.shape) for f in factors]} do not "
            f"fit a block of {direction.numel()} entries."
        )
    x = direction.reshape(sizes)
    y = x
    for axis, factor in enumerate(factors):
        y = torch.tensordot(factor, y, dims=([1], [axis])).movedim(0, axis)
    return torch.sum(x * y)


class KroneckerCurvature(BackpackCurvature):
    """Template: block quadratics from BackPACK's Kronecker factors."""

    def block_quadratic(
        self, stored: Any, direction: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """``d_bᵀ C_bb d_b`` from what the extension stored on the parameter."""
        factors = [f.to(dtype) for f in stored]
        try:
            return kronecker_quadratic(factors, direction.to(dtype))
        except ValueError as error:
            raise CurvatureError(f"Curvature {self.name!r}: {error}") from error


class KFACCurvature(SeededMixin, KroneckerCurvature):
    """K-FAC with Monte-Carlo loss Hessian (BackPACK ``KFAC``).

    Args:
        mc_samples: Sampled labels per example.
        seed: Seed of the private random stream.
    """

    name = "kfac"
    description = "Kronecker-factored GGN, Monte-Carlo (BackPACK KFAC)"
    savefield = "_alphawrap_kfac"
    extension_class = KFAC
    scales_with_loss = False


class KFLRCurvature(KroneckerCurvature):
    """Kronecker-factored GGN with the exact loss Hessian (BackPACK ``KFLR``)."""

    name = "kflr"
    description = "Kronecker-factored GGN, exact loss Hessian (BackPACK KFLR)"
    savefield = "_alphawrap_kflr"
    extension_class = KFLR
    scales_with_loss = False


class _MSESumHessian:
    """Mixin: the ``MSELoss`` Hessian summed over the batch, in the input's dtype.

    BackPACK 1.7.1 builds it with ``torch.eye`` in the default dtype, which breaks
    ``KFRA`` for float64 models (and rounds ``2/D`` to float32).
    """

    def backpropagate(
        self, ext: Any, module: Any, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        x = module.input0
        if x.dim() != 2:
            return super().backpropagate(ext, module, g_inp, g_out, backproped)  # type: ignore[misc]
        n, d = x.shape
        hessian = 2 * torch.eye(d, dtype=x.dtype, device=x.device)
        if module.reduction == "sum":
            hessian = hessian * n
        elif module.reduction == "mean":
            hessian = hessian / d
        return hessian


class KFRACurvature(KroneckerCurvature):
    """Kronecker-factored GGN, batch-averaged recursion (BackPACK ``KFRA``)."""

    name = "kfra"
    description = "Kronecker-factored GGN, batch-averaged recursion (BackPACK KFRA)"
    savefield = "_alphawrap_kfra"
    extension_class = KFRA
    scales_with_loss = False

    def make_extension(self) -> BackpropExtension:
        """Return a fresh BackPACK extension saving to :attr:`savefield`."""
        extension = super().make_extension()
        mapping = getattr(extension, "_BackpropExtension__module_extensions", {})
        base = mapping.get(nn.MSELoss)
        if base is not None:
            fixed = type(
                f"_Exact{type(base).__name__}", (_MSESumHessian, type(base)), {}
            )
            extension.set_module_extension(nn.MSELoss, fixed(), overwrite=True)
        return extension
