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

            def out_of(
                v: Tensor,
                pname: str = pname,
                module: nn.Module = module,
                own: dict[str, Tensor] = own,
                x_in: Tensor = x_in,
            ) -> Tensor:
                return functional_call(module, {**own, pname: v}, (x_in,))

            jd = jacobian(out_of, p).reshape(-1, p.numel()) @ _flat(directions[full])
            out[full] = jd @ h @ jd
        if index == 0:
            break

        def through(inp: Tensor, module: nn.Module = module) -> Tensor:
            return module(inp)

        j_x = jacobian(through, x_in).reshape(-1, x_in.numel())
        delta_fixed = delta.detach()

        def pairing(inp: Tensor, delta_fixed: Tensor = delta_fixed) -> Tensor:
            return _flat(through(inp)) @ delta_fixed

        r = hessian(pairing, x_in)
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


# --------------------------------------------------------------------------
# Diagonal, Kronecker-factored and per-sample references (issue 3).
# --------------------------------------------------------------------------


def _dense_block(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, name: str, kind: str
) -> Tensor:
    """The dense diagonal block of the Hessian (``kind="hessian"``) or GGN."""
    params = _params(model)
    n = params[name].numel()
    if kind == "hessian":
        f = loss_of_params(model, loss_fn, x, y)
        return hessian(lambda v: f({**params, name: v}), params[name]).reshape(n, n)
    output = functional_call(model, params, (x,))
    jac = _output_jacobian(model, x, params, name)
    return jac.T @ _loss_hessian_wrt_output(loss_fn, output, y) @ jac


def diagonal_quadratics(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    directions: dict[str, Tensor],
    kind: str,
) -> dict[str, Tensor]:
    r""":math:`\sum_i C_{ii} d_i^2` per parameter, ``kind`` ``"hessian"`` or ``"ggn"``.

    The diagonal of the full matrix equals that of its diagonal blocks, built
    densely here.
    """
    out = {}
    for name, d in directions.items():
        diag = torch.diagonal(_dense_block(model, loss_fn, x, y, name, kind))
        out[name] = torch.sum(diag * _flat(d) ** 2)
    return out


def _layer_inputs(model: nn.Sequential, x: Tensor) -> list[Tensor]:
    inputs = [x.detach()]
    for module in model:
        inputs.append(module(inputs[-1]).detach())
    return inputs


def _input_factor(module: nn.Module, x_in: Tensor) -> Tensor:
    r""":math:`A = \frac1N \sum_n x_n x_n^\top`; Conv2d: over unfolded patches."""
    n = x_in.shape[0]
    if isinstance(module, nn.Conv2d):
        patches = torch.nn.functional.unfold(
            x_in,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return torch.einsum("nit,njt->ij", patches, patches) / n
    flat = x_in.reshape(n, -1)
    return flat.T @ flat / n


def _output_factor(module: nn.Module, per_output: Tensor) -> Tensor:
    """Sum a ``[C·T, C·T]`` output-curvature matrix over a Conv2d's positions."""
    if isinstance(module, nn.Conv2d):
        c = module.out_channels
        t = per_output.shape[0] // c
        return per_output.reshape(c, t, c, t).sum((1, 3))
    return per_output


def _sample_blocks(matrix: Tensor, n: int) -> Tensor:
    """``[n·P, n·Q]`` → the ``n`` diagonal blocks ``[n, P, Q]``."""
    p, q = matrix.shape[0] // n, matrix.shape[1] // n
    blocks = matrix.reshape(n, p, n, q)
    return torch.stack([blocks[i, :, i, :] for i in range(n)])


def kronecker_factors(
    model: nn.Sequential, loss_fn: LossFn, x: Tensor, y: Tensor, kind: str
) -> dict[str, list[Tensor]]:
    r"""KFLR or KFRA factors from their definitions, densely (BackPACK's convention).

    For a parametrised module (``Linear``, ``Conv2d``) with output :math:`z` and
    input :math:`x`, weight factors ``[B, A]`` and bias factors ``[B]``:

    * :math:`A = \frac1N \sum_n x_n x_n^\top` (Conv2d: unfolded patches, summed
      over positions);
    * KFLR: :math:`B = \sum_n J_n^\top H_n J_n` with :math:`J_n = \partial f_n /
      \partial z_n` the per-sample Jacobian of the network's output and
      :math:`H_n` the per-sample block of the loss Hessian (the :math:`1/N` of a
      mean loss included), built from the full dense :math:`J^\top H J`;
    * KFRA: :math:`\bar G_L = \sum_n H_n` at the output, then backwards through
      every module :math:`\bar G_{in} = \frac1N \sum_n J_n^\top \bar G_{out} J_n`
      with per-sample module Jacobians, and :math:`B = \bar G` at the module's
      output;

    summed over a Conv2d's output positions for :math:`B`.

    Args:
        model: A ``Sequential`` without coupling between samples.
        loss_fn: A loss whose Hessian does not couple samples.
        x: Inputs.
        y: Targets.
        kind: ``"kflr"`` or ``"kfra"``.

    Returns:
        Factors by parameter name, in BackPACK's order.
    """
    if kind not in ("kflr", "kfra"):
        raise ValueError("kind must be 'kflr' or 'kfra'")
    n = x.shape[0]
    inputs = _layer_inputs(model, x)
    output = inputs[-1]
    h_out = _loss_hessian_wrt_output(loss_fn, output, y)
    factors: dict[str, list[Tensor]] = {}
    g_bar = _sample_blocks(h_out, n).sum(0)
    for index in reversed(range(len(model))):
        module, x_in, z = model[index], inputs[index], inputs[index + 1]
        own = [pname for pname, _ in module.named_parameters()]
        if own:
            if kind == "kflr":
                tail = model[index + 1 :]
                jac = jacobian(lambda v, t=tail: t(v), z)
                jac = jac.reshape(output.numel(), z.numel())
                per_output = _sample_blocks(jac.T @ h_out @ jac, n).sum(0)
            else:
                per_output = g_bar
            b = _output_factor(module, per_output)
            for pname in own:
                factors[f"{index}.{pname}"] = (
                    [b, _input_factor(module, x_in)] if pname == "weight" else [b]
                )
        if kind == "kfra" and index > 0:
            jac = jacobian(lambda v, m=module: m(v), x_in)
            blocks = _sample_blocks(jac.reshape(z.numel(), x_in.numel()), n)
            g_bar = torch.einsum("npi,pq,nqj->ij", blocks, g_bar, blocks) / n
    return factors


def kronecker_dense_quadratic(factors: Sequence[Tensor], d: Tensor) -> Tensor:
    r""":math:`v^\top (F_1 \otimes F_2 \otimes \cdots) v`, :math:`v = \mathrm{vec}(d)`.

    Forms the Kronecker product with ``torch.kron`` (row-major ``vec``).
    """
    product = factors[0]
    for factor in factors[1:]:
        product = torch.kron(product, factor)
    return _flat(d) @ product @ _flat(d)


def per_sample_gradients(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    r"""Each sample's contribution :math:`g_n` to the gradient, :math:`\sum_n g_n = g`.

    Differentiates the batch loss through one sample's output at a time (the
    other outputs held fixed), so the loss's reduction (mean or sum) is included
    as in BackPACK's ``BatchGrad``. Needs a model without coupling between
    samples.
    """
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    for i in range(x.shape[0]):
        out = functional_call(model, params, (x,))
        mask = torch.zeros_like(out)
        mask[i] = 1
        mixed = out.detach() + mask * (out - out.detach())
        grads = torch.autograd.grad(
            loss_fn(mixed, y), list(params.values()), allow_unused=True
        )
        for (name, p), g in zip(params.items(), grads):
            rows[name].append(torch.zeros_like(p) if g is None else g)
    return {name: torch.stack(r) for name, r in rows.items()}


def slope_standard_error(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    directions: dict[str, Tensor],
) -> Tensor:
    r"""Standard error of :math:`d^\top g` over the samples (see ``alphawrap.noise``).

    :math:`\sqrt{\frac{N}{N-1} \sum_n (s_n - \bar s)^2}` with
    :math:`s_n = d^\top g_n` from :func:`per_sample_gradients`.
    """
    grads = per_sample_gradients(model, loss_fn, x, y)
    s = sum(
        grads[name].reshape(x.shape[0], -1) @ _flat(d) for name, d in directions.items()
    )
    n = x.shape[0]
    return torch.sqrt(torch.sum((s - s.mean()) ** 2) * n / (n - 1))


__all__: Sequence[str] = [
    "RESIDUAL_MODES",
    "block_ggn_quadratics",
    "block_hessian_quadratics",
    "diagonal_quadratics",
    "exact_minimiser_along",
    "full_ggn_quadratic",
    "full_hessian_quadratic",
    "kronecker_dense_quadratic",
    "kronecker_factors",
    "loss_of_params",
    "per_sample_gradients",
    "recursive_block_quadratics",
    "slope_standard_error",
]
