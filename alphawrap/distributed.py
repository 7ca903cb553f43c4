r"""Combine the probe's numbers across processes under ``torch.distributed``.

Usage: wrap the BackPACK-extended model in DDP and the optimizer in the probe as
usual; the probe notices the process group and communicates by itself::

    model = backpack.extend(make_model())          # extend the inner model
    ddp = DistributedDataParallel(model)
    probe = AlphaProbe(torch.optim.Adam(ddp.parameters()), model=model)
    # closure: loss_fn(ddp(x_shard), y_shard).backward(), as without the probe

Under :class:`~torch.nn.parallel.DistributedDataParallel` (DDP) every process
computes the loss on its own shard of the batch, and DDP *averages* the
gradients during ``backward()``. So:

* :math:`d^\top g`, :math:`\|d\|^2`, :math:`\|g\|^2` are built from ``p.grad`` and
  the update ``d``, which are already global and identical on every process:
  they must not be summed again. The reducer takes rank 0's values (the others
  contribute zero), which keeps them bitwise equal everywhere, and warns once if
  they differ across processes (gradients not synchronised: no DDP?).
* The loss and every curvature quadratic :math:`d^\top C_r d` are built from the
  process's own activations: they belong to the local loss :math:`L_r`. DDP's
  gradient is that of :math:`\frac1W \sum_r L_r` (``W`` processes), so the
  curvature of the same objective is :math:`\frac1W \sum_r d^\top C_r d`.

:meth:`DistributedReducer.reduce` does both with **one** ``all_reduce(SUM)`` of
**one** packed tensor per probed step: the probe's ``[loss, dᵀg, ‖d‖², ‖g‖²,
dᵀC₁d, ...]`` (local entries multiplied by ``1/W``, shared entries zero on ranks
other than 0), then ``dᵀg, ‖d‖², ‖g‖²`` divided by ``W`` (the agreement check)
and a failure counter. Every process receives the same sum, so all take the same
decision in apply mode and their parameters stay bitwise equal. Cost per probed
step: ``k + 8`` numbers for ``k`` curvatures in the accumulation dtype (float32
parameters: 4 bytes each, 48 bytes for 4 curvatures), one collective, and still
one device-to-host transfer. Unprobed steps (``interval``) communicate nothing.

What the numbers mean:

* Mean-reduced loss, equal batch sizes ``b``: loss, ``dᵀg``, ``dᵀCd`` and
  ``α*`` equal those of one process on the concatenated batch of ``W·b`` (up to
  rounding; the test suite checks it in float64).
* Sum-reduced loss: DDP still averages the gradients, so the processes descend
  :math:`\frac1W` times the sum over the whole batch, and the probe measures
  that objective: along the same ``d``, loss, ``dᵀg`` and ``dᵀCd`` are ``1/W`` of
  one process's values on the concatenated batch and ``α*`` is the same. (The
  inner optimizer's ``d`` itself follows the averaged gradient: SGD steps
  ``W`` times shorter than one process with the summed loss would.)
* Unequal batch sizes ``b_r`` with a mean-reduced loss: DDP descends the plain
  average of the per-process means, not the mean over the concatenated batch;
  the probe measures ``α*`` for that same objective (consistent with the
  gradient the optimizer uses). For the concatenated-batch objective in both,
  scale each process's loss by ``W·b_r / Σb`` in the closure: curvature follows
  the loss that is backpropagated, so nothing else changes.
* Gradient synchronisation other than DDP's average (e.g. a communication hook
  that sums): pass ``DistributedReducer(weight=...)``, this process's coefficient
  in the synchronised objective (DDP: ``1/W``, the default).
* Curvatures linear in the batch (block-diagonal, diagonal, exact GGN/Hessian)
  average exactly. Kronecker-factored ones (``kfac``, ``kflr``, ``kfra``) are
  not linear: the mean of per-process ``A_r ⊗ B_r`` is not the K-FAC of the
  whole batch (that would need the factors all-reduced); the Monte-Carlo ones
  draw different samples per process.

New entries in the packed tensor must be linear in the per-process loss (means
or sums of per-sample quantities, raw moments), or listed in ``shared``
(already global) or ``squared`` (variances of local means, combined with the
squared weights); other derived statistics (standard errors, ratios) must be
computed after the reduction.

Failure handling (a process must never wait forever in a collective):

* A process that fails inside a probed step *after its backward pass* (inner
  optimizer step, curvature evaluation, the checks after the closure) still
  joins the step's collective with its failure counter set; every other process
  then raises :class:`~alphawrap.errors.DistributedProbeError` at once and rolls
  the step back, as the failed one does, so collectives stay aligned and
  replicas stay equal. The packet size is learnt from the first reduced step: a
  failure before that cannot be announced.
* Everything else (a process that raises in its closure before backward, fails
  before the first collective, dies or hangs): the others wait in DDP's or the
  probe's collective until the process group's timeout,
  ``init_process_group(..., timeout=datetime.timedelta(seconds=...))`` (default
  10 minutes for NCCL, 30 for gloo; :func:`launch_from_env` uses 5), or until
  the transport notices that the peer exited (gloo: at once), and then raise
  with a note that names the likely cause. ``DistributedReducer(timeout=...)``
  bounds the probe's own collective separately. torchrun stops the remaining
  workers when one exits with an error.

Requirements and limitations: every process must make the same sequence of
probed ``step()`` calls with the same probe settings (DDP's ``join()`` for uneven
inputs is not supported); the model's parameters are the same tensors in DDP and
in the optimizer; pass the inner model (``ddp.module``) as ``model=``, never the
DDP wrapper, for curvatures that re-run the model.

:func:`launch_from_env` and :class:`Launch` give the command-line tool (and
scripts) what ``torchrun --nproc-per-node N -m alphawrap ...`` needs: the process
group from the environment, the DDP wrapper, a shard of each batch, and rank 0
as the only process that prints and writes.
"""

from __future__ import annotations

import datetime
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from alphawrap.errors import DistributedProbeError, ProbeError

_SHARED_RTOL = 1e-5


def is_distributed(process_group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return torch.distributed.get_world_size(process_group) > 1


class DistributedReducer:
    """Sum the probe's packed numbers over the processes of a group, once a step.

    Args:
        process_group: The group to reduce over (``None``: the default group).
        enabled: ``None`` (default): reduce whenever ``torch.distributed`` is
            initialised with more than one process; ``True``: require it (the
            step raises otherwise); ``False``: never communicate.
        weight: This process's coefficient of its loss in the objective whose
            gradient the gradient synchronisation computes, a number or a
            function called each step. ``None``: ``1/world_size`` (DDP).
        timeout: Seconds to wait for the probe's collective (``None``: the
            process group's timeout).
    """

    def __init__(
        self,
        process_group: Any = None,
        *,
        enabled: bool | None = None,
        weight: float | Callable[[], float] | None = None,
        timeout: float | None = None,
    ) -> None:
        if enabled not in (None, True, False):
            raise TypeError(f"enabled must be None, True or False, got {enabled!r}.")
        if timeout is not None and not (
            isinstance(timeout, (int, float)) and timeout > 0
        ):
            raise ValueError(f"Invalid timeout {timeout!r}: need seconds > 0 or None.")
        self.process_group = process_group
        self.enabled = enabled
        self.weight = weight
        self.timeout = timeout
        self._joined = True
        self._layout: tuple[int, int, torch.dtype, torch.device] | None = None
        self._last: tuple[int, list[int]] | None = None
        self._warned = False

    @classmethod
    def from_option(
        cls, distributed: bool | DistributedReducer | None, process_group: Any = None
    ) -> DistributedReducer:
        """Build the reducer for ``AlphaProbe(distributed=..., process_group=...)``."""
        if isinstance(distributed, DistributedReducer):
            if process_group is not None:
                raise ValueError(
                    "Pass process_group to the DistributedReducer, not to AlphaProbe, "
                    "when distributed= is a DistributedReducer."
                )
            return distributed
        if distributed not in (None, True, False):
            raise TypeError(
                "distributed must be None, True, False or a DistributedReducer, got "
                f"{distributed!r}."
            )
        return cls(process_group, enabled=distributed)

    # ----------------------------------------------------------------- status
    @property
    def active(self) -> bool:
        """Whether :meth:`reduce` communicates (checked at every step)."""
        if self.enabled is False:
            return False
        if is_distributed(self.process_group):
            return True
        if self.enabled and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise ProbeError(
                "AlphaProbe(distributed=True) but torch.distributed is not "
                "initialised: call torch.distributed.init_process_group(...) before "
                "the first step (torchrun sets the environment it needs)."
            )
        return False

    @staticmethod
    def bytes_per_step(entries: int, shared: int = 3, itemsize: int = 4) -> int:
        """Size of one step's collective buffer, in bytes.

        Args:
            entries: Length of the probe's packed tensor (4 + curvatures).
            shared: How many of them are already global (3: dᵀg, ‖d‖², ‖g‖²).
            itemsize: Bytes per number: 4 for float32 parameters, 8 for float64.
        """
        return (entries + shared + 1) * itemsize

    def __deepcopy__(self, memo: dict[int, Any]) -> DistributedReducer:
        copy = DistributedReducer.__new__(DistributedReducer)
        copy.__dict__.update(self.__dict__)  # a process group is a shared handle
        return copy

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["process_group"] = None  # process groups cannot be pickled
        return state

    def __repr__(self) -> str:
        return (
            f"DistributedReducer(process_group={self.process_group!r}, "
            f"enabled={self.enabled}, weight={self.weight!r}, timeout={self.timeout})"
        )

    # ------------------------------------------------------------------ steps
    def start_step(self) -> None:
        """Mark the start of a probed step (its collective has not run yet)."""
        self._joined = False
        self._last = None

    def reduce(
        self, packed: Tensor, shared: Sequence[int] = (), squared: Sequence[int] = ()
    ) -> Tensor:
        """Run the step's collective on the packed tensor.

        Args:
            packed: 1-d tensor of the step's numbers on the parameters' device.
            shared: Indices of entries that are already identical on all
                processes (built from DDP-averaged gradients and the update);
                all other entries are local and are averaged (times ``weight``).
            squared: Indices of local entries that are variances of local means
                (e.g. the squared standard error of ``dᵀg``): the variance of
                ``Σ_r w_r m_r`` is ``Σ_r w_r² v_r``, so they get ``weight²``.

        Returns:
            ``packed`` unchanged when not distributed; else the reduced buffer,
            to be passed (as ``.tolist()``, the one host transfer) to
            :meth:`unpack`.
        """
        self._joined = True
        self._last = None
        if not self.active:
            return packed
        dist = torch.distributed
        group = self.process_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n, shared = packed.numel(), sorted(shared)
        local = torch.ones(n, dtype=torch.bool, device=packed.device)
        local[shared] = False
        weight = self.weight() if callable(self.weight) else self.weight
        weight = 1.0 / world if weight is None else float(weight)
        weights = torch.full_like(packed, weight)
        weights[list(squared)] = weight * weight
        own = packed if rank == 0 else torch.zeros_like(packed)
        buffer = torch.cat(
            [
                torch.where(local, packed * weights, own),
                packed[shared] / world,
                torch.zeros(1, dtype=packed.dtype, device=packed.device),
            ]
        )
        self._layout = (n, len(shared), packed.dtype, packed.device)
        self._last = (n, shared)
        self._all_reduce(buffer, world, rank)
        return buffer

    def unpack(self, values: list[float]) -> list[float]:
        """Check the reduced numbers on the host and return the packed entries.

        Raises:
            DistributedProbeError: Another process failed in this step.
        """
        if self._last is None:
            return values
        (n, shared), self._last = self._last, None
        failed = round(values[-1])
        if failed:
            world = torch.distributed.get_world_size(self.process_group)
            raise DistributedProbeError(
                f"{failed} of {world} processes failed in this probe step (see "
                "their traceback); this process "
                f"(rank {torch.distributed.get_rank(self.process_group)}) rolled "
                "the step back, as they did, so the replicas stay equal."
            )
        own = values[:n]
        self._check_shared(own, shared, values[n : n + len(shared)])
        return own

    def abort(self, error: BaseException) -> None:
        """Join this step's collective with a failure flag, if not done yet.

        Call it when the step fails after this process's backward pass, so the
        other processes do not wait for a collective that never comes.
        """
        if self._joined:
            return
        self._joined = True
        try:
            active = self.active
        except ProbeError:
            return
        if not active:
            return
        if self._layout is None:
            _note(
                error,
                "alphawrap: this process failed before the probe's first collective "
                "(its size is not known yet), so it could not tell the other "
                "processes; those that did not fail too wait in the probe's "
                "collective until it times out (DistributedReducer(timeout=...) or "
                "init_process_group(timeout=...)) or this process exits.",
            )
            return
        n, n_shared, dtype, device = self._layout
        buffer = torch.zeros(n + n_shared + 1, dtype=dtype, device=device)
        buffer[-1] = 1.0
        dist = torch.distributed
        group = self.process_group
        try:
            self._all_reduce(buffer, dist.get_world_size(group), dist.get_rank(group))
        except DistributedProbeError:
            return
        _note(
            error,
            "alphawrap: the other processes were told through this step's "
            "collective and raise DistributedProbeError.",
        )

    def explain(self, error: BaseException) -> None:
        """Add a note to an error that a collective raised during a probed step.

        DDP's gradient all_reduce runs inside the closure's ``backward()``; when a
        process fails before it, the others fail there (at the process group's
        timeout) with the backend's terse message.
        """
        try:
            active = self.active
        except ProbeError:
            return
        if not (active and _is_collective_error(error)):
            return
        _note(
            error,
            "alphawrap: a collective failed during this step. Under "
            "torch.distributed this usually means another process failed or "
            "stopped before reaching the same collective (see its traceback); the "
            "wait is bounded by the process group's timeout "
            "(init_process_group(timeout=...)).",
        )

    # ---------------------------------------------------------------- helpers
    def _all_reduce(self, buffer: Tensor, world: int, rank: int) -> None:
        dist = torch.distributed
        try:
            if self.timeout is None:
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.process_group)
            else:
                work = dist.all_reduce(
                    buffer,
                    op=dist.ReduceOp.SUM,
                    group=self.process_group,
                    async_op=True,
                )
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as error:
            raise DistributedProbeError(
                f"The probe's all_reduce failed on rank {rank} of {world}: {error}\n"
                "Another process most likely failed or stopped before reaching "
                "this step's probe collective (see its traceback), or the "
                "processes call step() a different number of times."
            ) from error

    def _check_shared(
        self, own: list[float], shared: Sequence[int], means: list[float]
    ) -> None:
        """Warn once if rank 0's shared entries differ from their mean over ranks."""
        if self._warned:
            return
        for i, mean in zip(shared, means):
            value = own[i]
            if not (math.isfinite(mean) and math.isfinite(value)):
                continue
            if abs(mean - value) > _SHARED_RTOL * max(abs(mean), abs(value)):
                self._warned = True
                warnings.warn(
                    "dᵀg, ‖d‖ or ‖g‖ differ across processes: the gradients or the "
                    "parameters are not synchronised (wrap the model in "
                    "DistributedDataParallel). The probe uses rank 0's values.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return


_COLLECTIVE_MARKERS = ("gloo", "nccl", "timed out", "connection closed", "c10d")


def _is_collective_error(error: BaseException) -> bool:
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in _COLLECTIVE_MARKERS
    )


def _note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(text)


# ------------------------------------------------------------------ launching
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Launch:
    """This process's place in a ``torchrun`` job (a single process: rank 0 of 1).

    Attributes:
        rank: Rank of this process.
        world: Number of processes.
        device: The device this process trains on (``cuda:LOCAL_RANK`` on GPUs).
        owns_group: Whether :func:`launch_from_env` created the process group
            (and :meth:`close` destroys it).
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Whether this process prints and writes files (rank 0)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """Wrap in ``DistributedDataParallel`` when there are several processes.

        Buffers are not synchronised in forward, so rank 0 alone can evaluate the
        model afterwards without a collective.
        """
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        accepted = inspect.signature(DistributedDataParallel).parameters
        no_sync = (  # torch >= 2.14 renamed the option
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in accepted
            else {"broadcast_buffers": False}
        )
        return DistributedDataParallel(model, device_ids=ids, **no_sync)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The model inside a ``DistributedDataParallel`` wrapper (or ``model``)."""
        from torch.nn.parallel import DistributedDataParallel

        return model.module if isinstance(model, DistributedDataParallel) else model

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ``ValueError`` unless the global batch splits evenly over ranks."""
        if batch_size % self.world:
            raise ValueError(
                f"the batch size {batch_size} does not split evenly over "
                f"{self.world} processes; use a multiple of {self.world}, so that "
                "every process's mean loss has the same weight."
            )

    def shard(self, index: Tensor) -> Tensor:
        """This process's equal share of a global batch (contiguous slice)."""
        if self.world == 1:
            return index
        size = len(index) // self.world
        return index[self.rank * size : (self.rank + 1) * size]

    def close(self) -> None:
        """Destroy the process group if this launch created it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.owns_group = False


def launch_from_env(
    device: torch.device | str = "cpu", timeout: float = 300.0
) -> Launch:
    """Join the ``torchrun`` job described by the environment, if any.

    With ``WORLD_SIZE`` > 1 (set by ``torchrun``) and no process group yet,
    initialise one (``nccl`` on CUDA, else ``gloo``) with a timeout of
    ``timeout`` seconds, so that a failed process makes the others fail within
    that time instead of waiting forever. On CUDA each process takes
    ``cuda:LOCAL_RANK``. Without ``WORLD_SIZE`` this is a single process.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = torch.distributed
    already = dist.is_available() and dist.is_initialized()
    if world <= 1 and not already:
        return Launch(device=device)
    if not dist.is_available():
        raise RuntimeError(
            "WORLD_SIZE > 1 but this torch build has no torch.distributed."
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = False
    if not already:
        missing = [k for k in _LAUNCH_ENV if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the "
                "processes with torchrun, e.g. torchrun --nproc-per-node 2 -m "
                "alphawrap ..."
            )
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout),
        )
        owns = True
    return Launch(dist.get_rank(), dist.get_world_size(), device, owns)
