r"""Block-diagonal curvature from BackPACK's matrix-free products.

BackPACK's ``HMP``, ``GGNMP`` and ``PCHMP`` extensions attach to every parameter
a closure that multiplies with that parameter's diagonal block of the Hessian,
the generalized Gauss-Newton or the positive-curvature Hessian. The block
quadratics :math:`d_b^\top C_{bb} d_b` are summed over the blocks; the
cross-block terms of :math:`C` are dropped by construction.

BackPACK's closures read live module state (weights, stored inputs and outputs),
so the probe calls :meth:`BlockDiagonalCurvature.quadratic` with the parameters
swapped back to :math:`\theta_0` and under ``torch.no_grad()``.

The positive-curvature Hessian of BackPACK 1.7.1 is wrong for ``Sigmoid`` and
``Tanh``: its residual is :math:`f''(x)\,\delta^2` where the definition (and
BackPACK's own ``HMP``) uses :math:`f''(x)\,\delta`, with :math:`\delta` the
gradient w.r.t. the activation's output. :class:`PositiveCurvatureHessian`
replaces those two module extensions with corrected ones; the test suite checks
both against a dense reference built from the definition.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from backpack.extensions import GGNMP, HMP, PCHMP
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.curvmatprod.pchmp.activations import (
    PCHMPSigmoid,
    PCHMPTanh,
)
from torch import Tensor, nn

from alphawrap.curvature.base import Curvature
from alphawrap.curvature.extension import (
    BackpackCurvature,
    module_names,
    refuse_ignored_targets,
)
from alphawrap.errors import CurvatureError


class _ResidualFix:
    """Mixin: PCH residual ``modify(f''(x) δ)`` instead of BackPACK's ``f'' δ²``."""

    derivatives: Any
    modifications: dict[str, Any]

    def modified_residual_mat_prod(
        self,
        ext: Any,
        module: nn.Module,
        g_inp: Any,
        g_out: Any,
        mat: Tensor,
        modify: str,
    ) -> Tensor:
        residual = self.derivatives.hessian_diagonal(module, g_inp, g_out)
        residual = self.modifications[modify](residual)
        return torch.einsum("...,v...->v...", residual, mat)


class _FixedPCHMPSigmoid(_ResidualFix, PCHMPSigmoid):
    pass


class _FixedPCHMPTanh(_ResidualFix, PCHMPTanh):
    pass


class _LossOutputScale:
    """Mixin: multiply the loss Hessian by the gradient flowing into the loss.

    BackPACK assumes the loss module is the last operation (output gradient 1)
    and ignores that gradient, while the activations' residual terms use the
    backpropagated gradient. For a scaled loss (``GradScaler``:
    ``(s * loss).backward()``) the two parts would disagree by the factor ``s``;
    with this mixin the whole product is that of the scaled loss, which the probe
    divides by ``s``. For an unscaled loss the factor is exactly 1.
    """

    def backpropagate(
        self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Any
    ) -> Any:
        product = super().backpropagate(ext, module, g_inp, g_out, backproped)  # type: ignore[misc]
        scale = g_out[0].detach()

        def scaled_product(mat: Tensor) -> Tensor:
            return product(mat) * scale

        return scaled_product


def _scale_loss_products(extension: BackpropExtension) -> BackpropExtension:
    """Replace the loss modules' extensions by ones that honour a loss scale."""
    mapping = getattr(extension, "_BackpropExtension__module_extensions", {})
    for module_cls in (nn.MSELoss, nn.CrossEntropyLoss):
        base = mapping.get(module_cls)
        if base is not None and not isinstance(base, _LossOutputScale):
            cls = type(
                f"_Scaled{type(base).__name__}", (_LossOutputScale, type(base)), {}
            )
            extension.set_module_extension(module_cls, cls(), overwrite=True)
    return extension


supported_modules = module_names


class BlockDiagonalCurvature(BackpackCurvature):
    r"""Template: block quadratics from a BackPACK ``*MP`` extension's closures.

    The reference path (the origin notebook's way, :math:`O(\text{depth}^2)`): the
    registered names ``"hessian"``, ``"ggn"``, ``"pch-clip"``, ``"pch-abs"`` use the
    tangent sweep of :mod:`alphawrap.curvature.sweep`, which the tests compare
    with these. Subclasses implement :meth:`make_extension`.
    """

    def backpack_extensions(self) -> list[Any]:
        extension = _scale_loss_products(self.make_extension())
        return [refuse_ignored_targets(extension, self)]

    def block_quadratic(
        self, stored: Any, direction: Tensor, dtype: torch.dtype
    ) -> Tensor:
        product = stored(direction.unsqueeze(0))[0]
        return torch.sum(product.to(dtype) * direction.to(dtype))


class BlockHessian(BlockDiagonalCurvature):
    """Block-diagonal Hessian (BackPACK ``HMP``)."""

    name = "hessian"
    description = "block-diagonal Hessian, BackPACK HMP"
    savefield = "_alphawrap_hmp"

    def make_extension(self) -> BackpropExtension:
        return HMP(savefield=self.savefield)


class BlockGGN(BlockDiagonalCurvature):
    """Block-diagonal generalized Gauss-Newton (BackPACK ``GGNMP``)."""

    name = "ggn"
    description = "block-diagonal generalized Gauss-Newton, BackPACK GGNMP"
    savefield = "_alphawrap_ggnmp"

    def make_extension(self) -> BackpropExtension:
        return GGNMP(savefield=self.savefield)


class _PositiveCurvatureHessian(BlockDiagonalCurvature):
    """Block-diagonal positive-curvature Hessian (BackPACK ``PCHMP``, fixed)."""

    modify: ClassVar[str]

    def make_extension(self) -> BackpropExtension:
        ext = PCHMP(savefield=self.savefield, modify=self.modify)
        ext.set_module_extension(nn.Sigmoid, _FixedPCHMPSigmoid(), overwrite=True)
        ext.set_module_extension(nn.Tanh, _FixedPCHMPTanh(), overwrite=True)
        return ext


class PCHClip(_PositiveCurvatureHessian):
    """Positive-curvature Hessian, negative residuals clipped to zero."""

    name = "pch-clip"
    description = "block-diagonal positive-curvature Hessian (clip), BackPACK PCHMP"
    savefield = "_alphawrap_pchmp_clip"
    modify = "clip"


class PCHAbs(_PositiveCurvatureHessian):
    """Positive-curvature Hessian, residuals replaced by their absolute value."""

    name = "pch-abs"
    description = "block-diagonal positive-curvature Hessian (abs), BackPACK PCHMP"
    savefield = "_alphawrap_pchmp_abs"
    modify = "abs"


_NO_EXTENSION = re.compile(r"does not have an extension for Module <class '([\w.]+)'>")
_NO_BACKPROPED = "expects a backpropagation quantity but it is None"
# BackPACK's forward hook stores positional inputs only (input0, input1, ...).
_NO_INPUT = re.compile(r"'(\w+)' object has no attribute 'input\d+'")
_LOSS_NAMES = ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss")


def _savefield(curvature: Curvature) -> str | None:
    field = getattr(curvature, "savefield", None)
    engine = getattr(curvature, "engine", None)
    return field or getattr(getattr(engine, "recorder", None), "savefield", None)


def translate_backpack_error(
    error: BaseException, curvatures: Sequence[Curvature], alternatives: Sequence[str]
) -> CurvatureError | None:
    """Turn BackPACK's errors from inside backward into an actionable message.

    Args:
        error: What the closure's backward pass raised.
        curvatures: The block curvatures that were active.
        alternatives: Curvature names that do not need BackPACK's module support.

    Returns:
        A :class:`CurvatureError`, or ``None`` if ``error`` is not BackPACK's.
    """
    block = [c for c in curvatures if c.needs_backpack_modules]
    if not block:
        return None
    names = ", ".join(repr(c.name) for c in block)
    other = (
        " Curvatures that do not need BackPACK support: "
        f"{', '.join(map(repr, alternatives))}."
        if alternatives
        else ""
    )
    text = str(error)
    match = _NO_EXTENSION.search(text)
    if isinstance(error, NotImplementedError) and match:
        module = match.group(1).rsplit(".", 1)[-1]
        culprit = next(
            (c for c in block if _savefield(c) and _savefield(c) in text), block[0]
        )
        from alphawrap.curvature.extension import unsupported_module_hint

        return CurvatureError(
            f"Curvature {culprit.name!r} ({culprit.description}) cannot handle "
            f"module {module}. Supported modules: "
            f"{', '.join(culprit.supported_modules())}."
            f"{unsupported_module_hint(match.group(1))}{other}"
        )
    if _NO_BACKPROPED in text:
        at = re.search(r"Module: (.*?), Extension", text, re.S)
        where = (
            f" (BackPACK found nothing to propagate at module {at.group(1)}: an "
            "operation BackPACK cannot see, such as a residual `+` or a functional "
            "call, may also sit between that module and the loss)"
            if at
            else ""
        )
        return CurvatureError(
            f"BackPACK got no curvature from the loss for {names}: the loss function "
            "is not extended or is computed functionally. Use a loss module "
            "extended with BackPACK, e.g. `loss_fn = backpack.extend("
            "torch.nn.CrossEntropyLoss())` (MSELoss and CrossEntropyLoss are "
            f"supported), and make it the last operation of the closure, called "
            "with positional arguments (`loss_fn(output, y)`: BackPACK does not "
            f"see keyword arguments such as `loss_fn(input=..., target=...)`){where}."
            f"{other}"
        )
    keyword = _NO_INPUT.search(text)
    if (
        isinstance(error, AttributeError)
        and keyword
        and keyword.group(1) in _LOSS_NAMES
        and _raised_in_backpack(error)
    ):
        module = keyword.group(1)
        return CurvatureError(
            f"BackPACK found no input of {module} for {names}: it records a "
            "module's positional arguments only, and this one was called with "
            "keyword arguments (such as `loss_fn(input=output, target=y)`). Call "
            f"it positionally, `loss_fn(output, y)`.{other}"
        )
    if isinstance(error, NotImplementedError) and (
        "ignore_index" in text or "weight" in text
    ):
        return CurvatureError(
            f"BackPACK cannot compute {names} for this loss: {text}. Use "
            f"CrossEntropyLoss without class weights or ignore_index.{other}"
        )
    if isinstance(
        error, (NotImplementedError, ValueError, AssertionError)
    ) and _raised_in_backpack(error):
        return CurvatureError(
            f"BackPACK cannot compute {names} for this model: {text}{other}"
        )
    return None


def _raised_in_backpack(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if "/backpack/" in tb.tb_frame.f_code.co_filename.replace("\\", "/"):
            return True
        tb = tb.tb_next
    return False
