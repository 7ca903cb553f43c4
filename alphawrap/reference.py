r"""Dense brute-force references for the curvature quadratics (tiny models only).

These build curvature matrices densely with ``torch.autograd.functional`` and are
meant for validation in float64: the test suite compares every fast path with
them, and the benchmarks reuse them. They scale with the square of the number of
parameters; do not use them on real models.

The block-diagonal Hessian, GGN and positive-curvature Hessian (PCH) all follow
one backward recursion over a ``Sequential`` (Dangel et al., 2020, "Modular
block-diagonal curvature propagation"). With :math:`z = f(x)` a module,
:math:`H_z` the curvature w.r.t. its output and :math:`\delta_z` the gradient of
the loss w.r.t. its output,

.. math::

    H_x = J_x^\top H_z J_x + \operatorname{modify}(R_x), \qquad
    R_x = \nabla_x^2 \langle \delta_z, f(x) \rangle,

and the block of a parameter :math:`\theta` of the module is
:math:`J_\theta^\top H_z J_\theta` (modules linear in their parameters).
``modify`` keeps :math:`R` (Hessian), drops it (GGN), clips its negative
eigenvalues (PCH-clip) or takes their absolute value (PCH-abs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]

RESIDUAL_MODES = ("keep", "drop", "clip", "abs")


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def loss_of_params(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor
) -> Callable[[dict[str, Tensor]], Tensor]:
    """Return ``θ ↦ loss_fn(model_θ(x), y)`` for a dictionary of parameters."""

    def f(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, params, (x,)), y)

    return f


def block_hessian_quadratics(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    directions: dict[str, Tensor],
) -> dict[str, Tensor]:
    r""":math:`d_b^\top H_{bb} d_b` per parameter, from dense block Hessians."""
    params = _params(model)
    f = loss_of_params(model, loss_fn, x, y)
    out = {}
    for name, d in directions.items():

        def f_block(v: Tensor, name: str = name) -> Tensor:
            return f({**params, name: v})

        h = hessian(f_block, params[name])
        h = h.reshape(d.numel(), d.numel())
        out[name] = _flat(d) @ h @ _flat(d)
    return out


def _output_jacobian(
    model: nn.Module, x: Tensor, params: dict[str, Tensor], name: str
) -> Tensor:
    def out_of(v: Tensor) -> Tensor:
        return functional_call(model, {**params, name: v}, (x,))

    jac = jacobian(out_of, params[name])
    return jac.reshape(-1, params[name].numel())


def _loss_hessian_wrt_output(loss_fn: LossFn, output: Tensor, y: Tensor) -> Tensor:
    h = hessian(lambda o: loss_fn(o, y), output.detach())
    return h.reshape(output.numel(), output.numel())


def block_ggn_quadratics(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    directions: dict[str, Tensor],
) -> dict[str, Tensor]:
    r""":math:`(J_b d_b)^\top \nabla^2_f \ell\, (J_b d_b)` per parameter block."""
    params = _params(model)
    output = functional_call(model, params, (x,))
    h_out = _loss_hessian_wrt_output(loss_fn, output, y)
    out = {}
    for name, d in directions.items():
        jd = _output_jacobian(model, x, params, name) @ _flat(d)
        out[name] = jd @ h_out @ jd
    return out


def full_hessian_quadratic(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    directions: dict[str, Tensor],
) -> Tensor:
    r""":math:`d^\top H d` with the full (dense) Hessian over all directions."""
    params = _params(model)
    names = list(directions)
    f = loss_of_params(model, loss_fn, x, y)

    def f_flat(v: Tensor) -> Tensor:
        chunks = torch.split(v, [params[n].numel() for n in names])
        new = {n: c.reshape(params[n].shape) for n, c in zip(names, chunks)}
        return f({**params, **new})

    theta = torch.cat([_flat(params[n]) for n in names])
    d = torch.cat([_flat(directions[n]) for n in names])
    return d @ hessian(f_flat, theta) @ d


def full_ggn_quadratic(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    directions: dict[str, Tensor],
) -> Tensor:
    r""":math:`(Jd)^\top \nabla^2_f \ell\, (Jd)` with the full Jacobian."""
    params = _params(model)
    output = functional_call(model, params, (x,))
    h_out = _loss_hessian_wrt_output(loss_fn, output, y)
    jd = sum(
        _output_jacobian(model, x, params, n) @ _flat(d) for n, d in directions.items()
    )
    return jd @ h_out @ jd


def _modify(residual: Tensor, mode: str) -> Tensor:
    if mode == "keep":
        return residual
    if mode == "drop":
        return torch.zeros_like(residual)
    evals, evecs = torch.linalg.eigh(residual)
    evals = evals.clamp(min=0) if mode == "clip" else evals.abs()
    return evecs @ torch.diag(evals) @ evecs.T


def recursive_block_quadratics(
    model: nn.Sequential,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    directions: dict[str, Tensor],
    residual: str,
) -> dict[str, Tensor]:
    r"""Block quadratics from the backward curvature recursion (see module doc).

    Args:
        model: A ``Sequential`` whose parametrised modules are linear in their
            parameters (``Linear``, ``Conv2d``).
        loss_fn: Loss of the model's output and ``y``.
        x: Input batch.
        y: Targets.
        directions: Direction per parameter, keyed by ``named_parameters`` name.
        residual: ``"keep"`` (block Hessian), ``"drop"`` (block GGN), ``"clip"``
            or ``"abs"`` (the two positive-curvature Hessians).

    Returns:
        :math:`d_b^\top C_{bb} d_b` per named parameter.
    """
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}")
    inputs = [x.detach()]
    for module in model:
        inputs.append(module(inputs[-1]).detach())
    output = inputs[-1]
    h = _loss_hessian_wrt_output(loss_fn, output, y)
    delta = _flat(torch.autograd.functional.jacobian(lambda o: loss_fn(o, y), output))
    out: dict[str, Tensor] = {}
    for index in reversed(range(len(model))):
        module, x_in = model[index], inputs[index]
        own = {n: p.detach() for n, p in module.named_parameters()}
        for pname, p in own.items():
            full = f"{index}.{pname}"
            if full not in directions:
                continue

            def out_of(v: Tensor, pname: str = pname) -> Tensor:
                return functional_call(module, {**own, pname: v}, (x_in,))

            jd = jacobian(out_of, p).reshape(-1, p.numel()) @ _flat(directions[full])
            out[full] = jd @ h @ jd
        if index == 0:
            break

        def through(inp: Tensor, module: nn.Module = module) -> Tensor:
            return module(inp)

        j_x = jacobian(through, x_in).reshape(-1, x_in.numel())
        delta_fixed = delta.detach()
        r = hessian(lambda inp: _flat(through(inp)) @ delta_fixed, x_in)
        r = r.reshape(x_in.numel(), x_in.numel())
        h = j_x.T @ h @ j_x + _modify(r, residual)
        delta = j_x.T @ delta
    return out


def exact_minimiser_along(
    loss: Callable[[Tensor], Tensor], theta0: Tensor, d: Tensor
) -> Tensor:
    r"""Minimiser :math:`-d^\top g / d^\top H d` of a quadratic ``loss`` along ``d``."""
    g = torch.autograd.functional.jacobian(loss, theta0)
    h = hessian(loss, theta0)
    return -(d @ g) / (d @ h @ d)


__all__: Sequence[str] = [
    "RESIDUAL_MODES",
    "block_ggn_quadratics",
    "block_hessian_quadratics",
    "exact_minimiser_along",
    "full_ggn_quadratic",
    "full_hessian_quadratic",
    "loss_of_params",
    "recursive_block_quadratics",
]
