"""The inner optimizer's would-be update, and undoing a step that failed.

The probe obtains the update ``d`` by letting the inner optimizer take its real
step and measuring ``d = θ₁ - θ₀``. This works for any optimizer that follows the
``torch.optim`` contract (it only needs ``step()``), and in observe mode leaves
parameters and optimizer state bitwise identical to the unwrapped optimizer by
construction. Curvature must be evaluated at ``θ₀``: :class:`StepTransaction`
points the parameters at ``θ₀`` or ``θ₁`` without copying, and can
roll the whole step back (parameters and inner state) if anything fails.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

PACK_LIMIT = 1 << 20
"""Largest total number of elements :func:`step_products` packs into one buffer.

Below it the per-block kernel launches cost more than the arithmetic; the
packed copies of ``d`` and ``g`` then hold at most 8 MB (float32)."""


def step_products(
    directions: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    acc: torch.dtype,
    pool: CopyPool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dᵀg, ‖d‖², ‖g‖²)`` over all blocks, as 0-d tensors of dtype ``acc``.

    Blocks whose gradient is ``None`` count in ``‖d‖²`` only.

    Two strategies, chosen by size. Up to :data:`PACK_LIMIT` elements in all (one
    dtype ``acc``, one device), ``d`` and ``g`` are packed into one buffer each
    and the three products are three dot products: on models this small the cost
    is the number of kernel launches, not the arithmetic. Above it, no block is
    copied (a packed copy of ``d`` and ``g`` would cost twice the parameters'
    memory): two fused norms and one dot product per block, with at most one
    block converted to ``acc`` at a time. With a ``pool`` the packed copies go
    into buffers kept across steps (see :class:`CopyPool`).

    Example:
        >>> d = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
        >>> g = [torch.tensor([1.0, 1.0]), None]
        >>> [t.item() for t in step_products(d, g, torch.float32)]
        [3.0, 14.0, 2.0]
    """
    total = _packed_size(directions, grads, acc)
    if total:
        device = directions[0].device
        packed_d = _cat([d.reshape(-1) for d in directions], pool, "d", total, device)
        packed_g = _cat(
            [
                (torch.zeros_like(d) if g is None else g).reshape(-1)
                for d, g in zip(directions, grads)
            ],
            pool,
            "g",
            total,
            device,
        )
        return (
            torch.dot(packed_d, packed_g),
            torch.dot(packed_d, packed_d),
            torch.dot(packed_g, packed_g),
        )
    dd = torch.stack(torch._foreach_norm(list(directions), 2, dtype=acc))
    dd = torch.sum(dd * dd)
    pairs = [(d, g) for d, g in zip(directions, grads) if g is not None]
    if not pairs:
        zero = torch.zeros((), dtype=acc, device=dd.device)
        return zero, dd, zero
    gg = torch.stack(torch._foreach_norm([g for _, g in pairs], 2, dtype=acc))
    slope = torch.stack(
        [torch.dot(d.reshape(-1).to(acc), g.reshape(-1).to(acc)) for d, g in pairs]
    )
    return slope.sum(), dd, torch.sum(gg * gg)


def _packed_size(
    directions: Sequence[Tensor], grads: Sequence[Tensor | None], acc: torch.dtype
) -> int:
    """Size of the packed buffer (one dtype ``acc``, one device), else 0."""
    if not directions:
        return 0
    device = directions[0].device
    total = 0
    for d, g in zip(directions, grads):
        if d.dtype != acc or d.device != device:
            return 0
        if g is not None and (g.dtype != acc or g.device != device):
            return 0
        total += d.numel()
    return total if total <= PACK_LIMIT else 0


def _cat(
    parts: list[Tensor],
    pool: CopyPool | None,
    key: str,
    total: int,
    device: torch.device,
) -> Tensor:
    out = (
        None
        if pool is None
        else pool.scratch(("packed", key), total, parts[0].dtype, device)
    )
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


POOL_MIN = 1 << 18
"""Tensors of at least this many elements (1 MiB in float32): :class:`CopyPool`
keeps their copies' buffers."""

POOL_TOTAL = 1 << 19
"""Parameters of at least this many elements in all: :class:`CopyPool` also keeps
the buffers of tensors from :data:`POOL_SMALL` elements up."""

POOL_SMALL = 1 << 12


class CopyPool:
    """Copy buffers kept from one probed step to the next.

    A probed step copies θ₀, the optimizer state, the gradients (for a rollback)
    and forms ``d``: several copies of the parameters. On CPU, a fresh tensor that
    glibc serves from new memory faults in page by page, which costs several times
    the copy itself. That happens for large tensors, and for many medium ones
    (the step's copies then outgrow what the allocator keeps for reuse);
    otherwise a fresh clone comes from memory the step before just freed, still
    in cache, and a kept buffer is no faster (measured on MLPs of 26 k to 1.1 M
    parameters: ``benchmarks/copy_pool.py``). So the pool keeps one
    buffer per slot for tensors of :data:`POOL_MIN` elements and up, and from
    :data:`POOL_SMALL` up once the parameters hold :data:`POOL_TOTAL` elements in
    all (:attr:`small`, set by the probe; below :data:`POOL_MIN` elements in all
    the probe uses no pool, so an optimizer state tensor larger than all the
    parameters together is cloned there); it copies into the buffer while shape,
    dtype and device stay the same. A buffer handed to the optimizer or the
    parameters (a rollback) must not be reused: :meth:`clear` drops them all. On
    CUDA the caching allocator already hands freed memory back without faults, so
    GPU tensors are cloned and no memory is held between steps.

    Example:
        >>> pool = CopyPool()
        >>> t = torch.ones(POOL_MIN)
        >>> first = pool.copy(("theta", 0), t)
        >>> pool.copy(("theta", 0), 2 * t) is first
        True
        >>> bool(first[0] == 2)
        True
    """

    def __init__(self) -> None:
        self._slots: dict[Any, Tensor] = {}
        self._used: set[Any] = set()
        self.small = False
        """Whether tensors from :data:`POOL_SMALL` elements up are kept too."""

    def _min(self) -> int:
        return POOL_SMALL if self.small else POOL_MIN

    def keeps(self, tensor: Tensor) -> bool:
        """Whether copies of ``tensor`` go into a kept buffer (else: a clone)."""
        return (
            tensor.numel() >= self._min()
            and tensor.device.type == "cpu"  # CUDA's caching allocator reuses memory
            and not tensor.requires_grad
            and tensor.layout == torch.strided
            and tensor.is_contiguous()
        )

    def scratch(
        self, key: Any, numel: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """A kept 1-d buffer of ``numel`` elements to write into, if worth keeping."""
        if numel < self._min() or device.type != "cpu":
            return None
        return self._buffer(key, torch.Size((numel,)), dtype, device)

    def copy(self, key: Any, tensor: Tensor) -> Tensor:
        """An independent copy of ``tensor`` (the slot's buffer if it fits)."""
        if not self.keeps(tensor):
            return tensor.clone()
        buffer = self._buffer(key, tensor.shape, tensor.dtype, tensor.device)
        return buffer.copy_(tensor)

    def _buffer(
        self, key: Any, shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """The slot's contiguous buffer, new if it has none of this shape and type."""
        self._used.add(key)
        buffer = self._slots.get(key)
        if (
            buffer is None
            or buffer.shape != shape
            or buffer.dtype != dtype
            or buffer.device != device
        ):
            buffer = self._slots[key] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def clear(self) -> None:
        """Drop every buffer (before a rollback hands some of them over)."""
        self._slots.clear()
        self._used.clear()

    def release_unused(self) -> None:
        """Drop the buffers no copy used since the last call (end of a step).

        A tensor that stops qualifying (made non-contiguous, moved to a GPU,
        frozen) no longer uses its slots; they would hold memory for nothing.
        """
        for key in [k for k in self._slots if k not in self._used]:
            del self._slots[key]
        self._used.clear()


def _clone(tensor: Tensor, pool: CopyPool | None, key: Any) -> Tensor:
    return tensor.clone() if pool is None else pool.copy(key, tensor)


class GradBackup:
    """Hold the gradients as they were before a closure runs, to restore them.

    Gradients that exist are copied (a closure may zero or accumulate into them
    in place); ``None`` gradients are remembered as ``None``.

    Args:
        params: The parameters.
        pool: Keeps the copies' buffers across steps (see :class:`CopyPool`).
    """

    def __init__(self, params: Sequence[Tensor], pool: CopyPool | None = None) -> None:
        self._params = params
        self._pool = pool
        # Not under no_grad: a gradient made with create_graph=True keeps its graph
        # (the pool copies only gradients that require none).
        self._grads = [
            None if p.grad is None else _clone(p.grad, pool, ("grad", i))
            for i, p in enumerate(params)
        ]

    def restore(self) -> None:
        """Put the backed-up gradients back."""
        if self._pool is not None:
            self._pool.clear()  # the parameters will own those buffers
        for p, g in zip(self._params, self._grads):
            p.grad = g


class BackwardMonitor:
    """Record which parameters a backward pass accumulated a gradient into.

    One ``Tensor.register_post_accumulate_grad_hook`` per parameter that requires
    grad; the hooks record only while the monitor is entered (use it as a context
    manager around a closure). Registering and removing the hooks costs more than
    a small model's whole bookkeeping, so the probe keeps one monitor installed
    while consecutive steps are probed (:meth:`serves` tells whether it still
    fits the parameters). The hooks hold the monitor weakly and are removed by
    :meth:`close` or when it is garbage collected.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._params = list(params)
        self._flags = [p.requires_grad for p in self._params]
        self.reached: set[int] = set()
        self._active = False
        ref = weakref.ref(self)
        handles = [
            p.register_post_accumulate_grad_hook(functools.partial(_mark, ref, i))
            for i, p in enumerate(self._params)
            if p.requires_grad
        ]
        self._remove = weakref.finalize(self, _remove_handles, handles)

    def serves(self, params: Sequence[Tensor]) -> bool:
        """Whether the hooks sit on exactly ``params`` (same ``requires_grad``)."""
        return len(params) == len(self._params) and all(
            p is q and p.requires_grad == flag
            for p, q, flag in zip(params, self._params, self._flags)
        )

    def __enter__(self) -> BackwardMonitor:
        self.reached = set()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False

    @property
    def active(self) -> bool:
        """Whether a session is recording with this monitor now."""
        return self._active

    def close(self) -> None:
        """Remove the hooks (at most once)."""
        self._remove()


def _mark(ref: weakref.ref[BackwardMonitor], index: int, _param: Tensor) -> None:
    monitor = ref()
    if monitor is not None and monitor._active:
        monitor.reached.add(index)


def _remove_handles(handles: list[Any]) -> None:
    """Remove hook handles (a ``weakref.finalize`` callback: holds no owner)."""
    for handle in handles:
        handle.remove()
    handles.clear()


_IMMUTABLE = (int, float, bool, str, bytes, type(None))
_IMMUTABLE_TYPES = frozenset(_IMMUTABLE)


def _copy(value: Any) -> Any:
    """An independent copy: tensors cloned, immutable scalars shared, rest deep."""
    if type(value) in _IMMUTABLE_TYPES:  # most optimizer settings: no isinstance
        return value
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, _IMMUTABLE) or (
        type(value) is tuple and all(isinstance(v, _IMMUTABLE) for v in value)
    ):
        return value
    return copy.deepcopy(value)


def _clone_state(
    state: dict[str, Any], pool: CopyPool | None = None, index: int = 0
) -> dict[str, Any]:
    if pool is None:
        return {k: _copy(v) for k, v in state.items()}
    return {
        k: pool.copy(("state", index, k), v)
        if type(v) is Tensor  # not a subclass: those keep their own copy semantics
        else _copy(v)
        for k, v in state.items()
    }


class StepTransaction:
    """Snapshot of ``θ₀`` and of the inner optimizer, taken before its step.

    After :meth:`take_inner_step`, :attr:`directions` holds ``d = θ₁ - θ₀`` and the
    parameters hold ``θ₁``. :meth:`swap` temporarily swaps ``θ₀`` in (no
    copy), :meth:`commit_scaled` writes ``θ₀ + α d``, :meth:`rollback` restores
    parameters and inner state exactly as they were before the step.

    Args:
        optimizer: The inner optimizer.
        params: All parameters of its groups, in order.
        pool: Keeps the copies' buffers across steps (see :class:`CopyPool`).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[Tensor],
        pool: CopyPool | None = None,
    ) -> None:
        self._optimizer = optimizer
        self.params = params
        self._pool = pool
        with torch.no_grad():
            self.theta0 = [
                _clone(p.detach(), pool, ("theta", i)) for i, p in enumerate(params)
            ]
        self._had_state = [p in optimizer.state for p in params]
        self._state = [  # state that requires grad keeps it (cloned, not pooled)
            _clone_state(optimizer.state[p], pool, i) if had else None
            for i, (p, had) in enumerate(zip(params, self._had_state))
        ]
        self._group_settings = [
            {k: _copy(v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups
        ]
        self.directions: list[Tensor] = []
        self._theta1: list[Tensor] = []
        self._swapped = False

    def take_inner_step(self) -> None:
        """Run the inner optimizer's step and measure ``d = θ₁ - θ₀``."""
        self._optimizer.step()
        with torch.no_grad():
            # Aliases of the storage that holds θ₁ (the parameters' own).
            self._theta1 = [p.detach() for p in self.params]
            pool = self._pool
            if pool is None or not any(pool.keeps(t) for t in self._theta1):
                self.directions = torch._foreach_sub(self._theta1, self.theta0)
            else:  # θ₁ copied into kept buffers, θ₀ subtracted: the same numbers
                self.directions = [
                    pool.copy(("d", i), t) for i, t in enumerate(self._theta1)
                ]
                torch._foreach_sub_(self.directions, self.theta0)

    def swap(self) -> None:
        """Point the parameters at ``θ₀`` or back at ``θ₁`` (no copy)."""
        targets = self._theta1 if self._swapped else self.theta0
        for p, target in zip(self.params, targets):
            p.data = target
        self._swapped = not self._swapped

    def commit_inner(self) -> None:
        """Keep the inner step: parameters hold ``θ₁``."""
        if self._swapped:
            self.swap()

    def commit_scaled(self, alpha: float) -> None:
        """Set the parameters to ``θ₀ + α d`` (in their own storage)."""
        if self._swapped:
            self.swap()
        with torch.no_grad():
            for p, t0, d in zip(self.params, self.theta0, self.directions):
                # Through .data, like the rollback: no version bump of its own.
                torch.add(t0, d, alpha=alpha, out=p.data)

    def rollback(self) -> None:
        """Restore parameters and inner optimizer state as before the step."""
        if self._pool is not None:
            self._pool.clear()  # the optimizer will own the state's buffers
        if self._swapped:
            self.swap()
        with torch.no_grad():
            for p, t0 in zip(self.params, self.theta0):
                # Through .data: the version counter is left as it was, so a graph
                # that saved the parameter before the failed step stays usable.
                p.data.copy_(t0)
        state = self._optimizer.state
        for p, had, saved in zip(self.params, self._had_state, self._state):
            if had:
                state[p] = saved
            else:
                state.pop(p, None)
        for g, saved in zip(self._optimizer.param_groups, self._group_settings):
            for key in [k for k in g if k != "params" and k not in saved]:
                del g[key]  # a key the failed step added
            g.update(saved)
