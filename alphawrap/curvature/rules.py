r"""Per-module local derivatives used by the tangent sweep.

For a module :math:`z = m(x; \theta)` the sweep needs three local operations:

- the input Jacobian applied to stacked tangents, :math:`J_x \dot X`;
- the parameter Jacobian applied to a direction, :math:`J_\theta d`;
- the residual :math:`R = \nabla_x^2 \langle \delta, m(x) \rangle` (zero for
  modules linear in their input, diagonal for element-wise activations).

:class:`BackpackRule` takes them from BackPACK's ``core.derivatives`` classes, so
every module BackPACK's ``HMP`` supports is supported. For the most common
modules, direct tensor expressions avoid BackPACK's generic ``einsum`` and shape
checks on the hot path (:data:`FAST_RULES`); the tests check both against each
other and against dense brute force.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from alphawrap.errors import CurvatureError


def per_slot(values: Tensor, acc: torch.dtype) -> Tensor:
    """Sum a ``[V, ...]`` tensor over everything but the leading (slot) dimension."""
    return values.reshape(values.shape[0], -1).sum(1, dtype=acc)


class BackpackRule:
    """Local derivatives from a BackPACK derivatives object (any supported module).

    BackPACK's derivatives read ``module.input0``/``module.output``; the rule puts
    the recorded tensors back on the module for the duration of each call.
    """

    def __init__(self, derivatives: Any) -> None:
        self.derivatives = derivatives

    @staticmethod
    @contextmanager
    def stored(trace: Any) -> Iterator[None]:
        """Put the recorded input/output back on the module while BackPACK reads."""
        module = trace.module
        for i, x in enumerate(trace.inputs):
            setattr(module, f"input{i}", x)
        module.output = trace.output
        try:
            yield
        finally:
            for i in range(len(trace.inputs)):
                delattr(module, f"input{i}")
            delattr(module, "output")

    def _call(self, trace: Any, method: str, *args: Any) -> Any:
        with self.stored(trace):
            return getattr(self.derivatives, method)(
                trace.module, trace.g_inp, trace.g_out, *args
            )

    def residual_is_zero(self, trace: Any) -> bool:
        return bool(self.derivatives.hessian_is_zero(trace.module))

    def residual_diagonal(self, trace: Any) -> Tensor | None:
        """Diagonal of ``R`` shaped like the input, or ``None`` if not diagonal."""
        if not self.derivatives.hessian_is_diagonal(trace.module):
            return None
        return self._call(trace, "hessian_diagonal")

    def residual_mat_prod(self, trace: Any, tangents: Tensor) -> Tensor:
        return self._call(trace, "residual_mat_prod", tangents)

    def jac(self, trace: Any, tangents: Tensor) -> Tensor:
        return self._call(trace, "jac_mat_prod", tangents)

    def param_jac(self, trace: Any, name: str, direction: Tensor) -> Tensor:
        return self._call(trace, f"{name}_jac_mat_prod", direction[None])

    def push(
        self, trace: Any, tangents: Tensor | None, directions: dict[str, Tensor]
    ) -> Tensor | None:
        """One slot: ``J_x ṫ + Σ_θ J_θ d_θ``, the total output tangent.

        ``tangents`` is ``[1, *input]`` (``None`` before the first parameter);
        ``directions`` maps ``"weight"``/``"bias"`` to the reached blocks' ``d``.
        """
        out = None if tangents is None else self.jac(trace, tangents)
        for name, direction in directions.items():
            step = self.param_jac(trace, name, direction)
            out = step if out is None else out + step
        return out

    def param_cross(self, trace: Any, direction: Tensor, tangent_in: Tensor) -> Tensor:
        """Mixed second derivative ``∂²z/∂x∂W [ẋ, ΔW]`` of a bilinear layer.

        For modules linear in input and weight separately (Linear, Conv) it is the
        weight Jacobian applied with the input replaced by its tangent.
        """
        inputs = (tangent_in[0], *trace.inputs[1:])
        swapped = type(trace)(**{**vars(trace), "inputs": inputs})
        return self._call(swapped, "weight_jac_mat_prod", direction[None])

    def loss_hessian_prod(self, trace: Any) -> Callable[[Tensor], Tensor]:
        """``mat ↦ ∇²ℓ mat`` for a loss module (stacked ``[V, *output]``)."""
        product = self._call(trace, "make_hessian_mat_prod")

        def hessian_mat_prod(mat: Tensor) -> Tensor:
            with self.stored(trace):
                return product(mat)

        return hessian_mat_prod

    def loss_quadratic(self, trace: Any, tangents: Tensor, acc: torch.dtype) -> Tensor:
        """``[V]``: ``ṫᵀ ∇²ℓ ṫ`` for each stacked tangent ``ṫ`` of the loss input."""
        return per_slot(tangents * self.loss_hessian_prod(trace)(tangents), acc)


class _Linear(BackpackRule):
    def residual_is_zero(self, trace: Any) -> bool:
        return True

    def jac(self, trace: Any, tangents: Tensor) -> Tensor:
        return F.linear(tangents, trace.module.weight)

    def param_cross(self, trace: Any, direction: Tensor, tangent_in: Tensor) -> Tensor:
        return F.linear(tangent_in, direction)

    def param_jac(self, trace: Any, name: str, direction: Tensor) -> Tensor:
        if name == "weight":
            return F.linear(trace.inputs[0], direction)[None]
        return direction.expand(trace.output.shape)[None]

    def push(
        self, trace: Any, tangents: Tensor | None, directions: dict[str, Tensor]
    ) -> Tensor | None:
        # ẋWᵀ + xΔWᵀ + Δb: two fused linear kernels instead of five operations.
        weight, bias = directions.get("weight"), directions.get("bias")
        if weight is not None:
            step: Tensor | None = F.linear(trace.inputs[0], weight, bias)
        elif bias is not None:
            step = bias.expand(trace.output.shape)
        else:
            step = None
        if tangents is None:
            return None if step is None else step[None]
        out = F.linear(tangents, trace.module.weight)
        return out if step is None else out.add_(step)


class _Flatten(BackpackRule):
    def residual_is_zero(self, trace: Any) -> bool:
        return True

    def jac(self, trace: Any, tangents: Tensor) -> Tensor:
        return tangents.reshape(tangents.shape[0], *trace.output.shape)


class _ReLU(BackpackRule):
    def residual_is_zero(self, trace: Any) -> bool:
        return True

    def jac(self, trace: Any, tangents: Tensor) -> Tensor:
        # ReLU's own backward kernel: one fused, broadcasting pass (a bool mask
        # would cost a comparison, a conversion and a multiplication).
        return torch.ops.aten.threshold_backward(tangents, trace.output, 0.0)


def _require_batch(trace: Any, spatial: int) -> None:
    """Refuse an unbatched input: the rules put the batch in dimension 0."""
    if trace.inputs[0].dim() != spatial + 2:
        raise CurvatureError(
            f"{type(trace.module).__name__} got an input of shape "
            f"{tuple(trace.inputs[0].shape)}; the tangent sweep needs a batch "
            f"dimension ({spatial + 2}-d input). Add one (x.unsqueeze(0)) or use "
            "an exact curvature."
        )


_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}


class _ConvNd(BackpackRule):
    """``Conv1d/2d/3d``: the layer is linear in its input and in its weight.

    Every product is one convolution: ``J_x ẋ = conv(ẋ, W)``, ``J_W ΔW =
    conv(x, ΔW)`` (the module's own ``_conv_forward``, so any padding mode).
    """

    def residual_is_zero(self, trace: Any) -> bool:
        return True

    @staticmethod
    def _conv(trace: Any, x: Tensor, weight: Tensor) -> Tensor:
        _require_batch(trace, trace.module.weight.dim() - 2)
        if not x.is_cuda:
            return trace.module._conv_forward(x, weight, None)
        # cuDNN convolutions default to TF32 on Ampere and newer; BackPACK's
        # unfold + einsum reference (matmul) does not: keep full float32.
        cudnn = torch.backends.cudnn
        allowed, cudnn.allow_tf32 = cudnn.allow_tf32, False
        try:
            return trace.module._conv_forward(x, weight, None)
        finally:
            cudnn.allow_tf32 = allowed

    def jac(self, trace: Any, tangents: Tensor) -> Tensor:
        out = self._conv(trace, tangents.flatten(0, 1), trace.module.weight)
        return out.reshape(tangents.shape[0], *trace.output.shape)

    def param_jac(self, trace: Any, name: str, direction: Tensor) -> Tensor:
        if name == "weight":
            return self._conv(trace, trace.inputs[0], direction)[None]
        spatial = trace.output.dim() - 2
        bias = direction.reshape(-1, *([1] * spatial))
        return bias.expand(trace.output.shape)[None]

    def param_cross(self, trace: Any, direction: Tensor, tangent_in: Tensor) -> Tensor:
        return self._conv(trace, tangent_in[0], direction)[None]


class _MaxPoolNd(BackpackRule):
    """``MaxPool1d/2d/3d``: the Jacobian picks the arg-max of each window."""

    def residual_is_zero(self, trace: Any) -> bool:
        return True

    def jac(self, trace: Any, tangents: Tensor) -> Tensor:
        m, x = trace.module, trace.inputs[0]
        spatial = _POOL_DIMS[type(m)]
        _require_batch(trace, spatial)
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        _, index = pool(
            x,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            ceil_mode=m.ceil_mode,
            return_indices=True,
        )
        flat = tangents.flatten(start_dim=3)  # [V, N, C, spatial in]
        index = index.flatten(start_dim=2).expand(tangents.shape[0], -1, -1, -1)
        return flat.gather(3, index).reshape(tangents.shape[0], *trace.output.shape)


class _Elementwise(BackpackRule):
    """Smooth element-wise activation: ``f'`` and ``f''`` from the output.

    A rule serves one module of one sweep, so ``f'`` is computed once and shared
    by the Jacobian and the residual (``f''`` is built from it).
    """

    _df: tuple[Any, Tensor] | None = None

    def df(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def d2f(self, y: Tensor, df: Tensor) -> Tensor:
        """``f''`` from the output ``y`` and ``f'(y)``."""
        raise NotImplementedError

    def _first(self, trace: Any) -> Tensor:
        cached = self._df
        if cached is None or cached[0] is not trace:
            cached = self._df = (trace, self.df(trace.output))
        return cached[1]

    def residual_is_zero(self, trace: Any) -> bool:
        return False

    def residual_diagonal(self, trace: Any) -> Tensor | None:
        curvature = self.d2f(trace.output, self._first(trace))
        return curvature.mul_(trace.g_out[0])

    def jac(self, trace: Any, tangents: Tensor) -> Tensor:
        return tangents * self._first(trace)


class _Tanh(_Elementwise):
    def df(self, y: Tensor) -> Tensor:
        return 1.0 - y * y

    def d2f(self, y: Tensor, df: Tensor) -> Tensor:
        return (-2.0 * y).mul_(df)  # -2 y (1 - y²)


class _Sigmoid(_Elementwise):
    def df(self, y: Tensor) -> Tensor:
        return y * (1.0 - y)

    def d2f(self, y: Tensor, df: Tensor) -> Tensor:
        return (1.0 - 2.0 * y).mul_(df)  # y (1 - y) (1 - 2y)


UNSEEN_TARGET = (
    "BackPACK recorded no target for CrossEntropyLoss: it records positional "
    "arguments only, and the target was passed as a keyword. Without it the "
    "curvature cannot leave out the positions whose target is ignore_index. Pass "
    "it positionally: `loss_fn(output, y)`."
)


class _CrossEntropyLoss(BackpackRule):
    r"""``∇²ℓ = c (diag(p) − ppᵀ)`` per position: ``ṫᵀ∇²ℓṫ = c (Σ p ṫ² − (Σ p ṫ)²)``.

    The loss of one position is ``−Σ_c w_c y_c log p_c`` with the (smoothed)
    target ``y``, so its Hessian in the logits is ``(Σ_c w_c y_c)(diag(p) − ppᵀ)``:
    the factor ``c`` is the class-weighted mass of the target. For a class index
    ``k`` it is ``(1 − ε) w_k + (ε / C) Σ_c w_c`` (``w = 1`` without weights, ``ε``
    the label smoothing), and 0 for ``k = ignore_index``; the mean divides by
    ``Σ w_k`` over the positions not ignored, as ``nn.CrossEntropyLoss`` does. For
    class probabilities ``c = Σ_c w_c ((1 − ε) y_c + ε / C)`` and the mean divides
    by the number of positions. BackPACK's product assumes ``c = 1`` everywhere
    (and refuses class weights).
    """

    def loss_quadratic(self, trace: Any, tangents: Tensor, acc: torch.dtype) -> Tensor:
        module, x = trace.module, trace.inputs[0]
        target = trace.inputs[1] if len(trace.inputs) > 1 else None
        if not isinstance(target, Tensor):
            raise CurvatureError(UNSEEN_TARGET)
        weighted = tangents * torch.softmax(x, dim=1)
        mean = weighted.sum(2, dtype=acc)  # over classes: [V, N, ...]
        per_position = (weighted * tangents).sum(2, dtype=acc) - mean * mean
        factor, count = self._factor(module, x, target, acc)
        values = (per_position * factor).flatten(1).sum(1)
        return values / count if module.reduction == "mean" else values

    @staticmethod
    def _factor(
        module: nn.CrossEntropyLoss, x: Tensor, target: Tensor, acc: torch.dtype
    ) -> tuple[Tensor, Tensor | int]:
        """The per-position factor ``c`` and the mean's denominator."""
        eps, classes = module.label_smoothing, x.shape[1]
        weight = None if module.weight is None else module.weight.to(acc)
        if target.is_floating_point():  # class probabilities, shaped like x
            y = target.to(acc)
            if weight is not None:
                y = y * weight.reshape(-1, *([1] * (x.dim() - 2)))
                smooth = weight.sum() / classes
            else:
                smooth = 1.0
            factor = y.sum(1) * (1 - eps) + eps * smooth
            return factor, x.numel() // classes
        kept = target != module.ignore_index
        if weight is None:
            factor = kept.to(acc)
            return factor, factor.sum()
        # The class weight of each kept target (ignored ones index class 0).
        w_target = weight[torch.where(kept, target, 0)] * kept
        factor = w_target * (1 - eps) + kept * (eps * weight.sum() / classes)
        return factor, w_target.sum()


class _MSELoss(BackpackRule):
    """``∇²ℓ = 2I`` (divided by the number of entries for ``reduction="mean"``)."""

    def loss_quadratic(self, trace: Any, tangents: Tensor, acc: torch.dtype) -> Tensor:
        module, x = trace.module, trace.inputs[0]
        if x.dim() != 2:
            return super().loss_quadratic(trace, tangents, acc)  # BackPACK refuses
        values = 2 * per_slot(tangents * tangents, acc)
        return values / x.numel() if module.reduction == "mean" else values


CROSS_TERM_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)
"""Parametrised modules bilinear in (input, weight): the exact Hessian's sweep
supports these (others fall back to the model-replay path)."""

FAST_RULES: dict[type[nn.Module], type[BackpackRule]] = {
    nn.Linear: _Linear,
    nn.Conv2d: _ConvNd,
    nn.MaxPool2d: _MaxPoolNd,
    nn.Flatten: _Flatten,
    nn.ReLU: _ReLU,
    nn.Tanh: _Tanh,
    nn.Sigmoid: _Sigmoid,
    nn.CrossEntropyLoss: _CrossEntropyLoss,
    nn.MSELoss: _MSELoss,
}
"""Modules with direct expressions; all others use :class:`BackpackRule`.

Only modules BackPACK's ``HMP`` knows are recorded, so of the convolutions and
poolings only the 2-d ones appear here (the rules themselves are dimension-free).
"""


def rule_for(module: nn.Module, derivatives: Any, fast: bool = True) -> BackpackRule:
    """The local-derivative rule for ``module`` (exact class match, like BackPACK)."""
    cls = FAST_RULES.get(type(module)) if fast else None
    return (cls or BackpackRule)(derivatives)
