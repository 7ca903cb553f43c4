"""Write probe records to TensorBoard as they are made.

One call enables it::

    from torch.utils.tensorboard import SummaryWriter
    from alphawrap.tensorboard import log_to_tensorboard

    writer = SummaryWriter("runs/alpha")
    remove = log_to_tensorboard(probe, writer)
    ...  # train; every probed step writes its scalars
    remove()  # stop writing

Tags (with the default prefix ``alphawrap``), at ``global_step = record.step``:

* ``alphawrap/alpha/<curvature>``: ``α*`` of each curvature (only where defined);
* ``alphawrap/undefined/<curvature>``: ``1`` where ``α*`` is undefined, else ``0``;
* ``alphawrap/curvature/<curvature>``: ``dᵀCd``;
* ``alphawrap/slope``: ``dᵀg``;
* ``alphawrap/applied``: the multiplier of ``d`` taken (1 in observe mode);
* ``alphawrap/loss``: the mini-batch loss (when recorded);
* ``alphawrap/direction_norm``, ``alphawrap/grad_norm``: ``‖d‖``, ``‖g‖``;
* ``alphawrap/lr/<group>``: the learning rate of each parameter group;
* ``alphawrap/extra/<key>``: numbers in ``record.extra`` (e.g. ``alpha_line``,
  the line-search truth).

Non-finite values are not written (TensorBoard draws them badly); the
``undefined`` tags and the history say where they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from alphawrap.history import ProbeRecord

__all__ = ["log_to_tensorboard", "record_scalars", "write_record"]


def record_scalars(record: ProbeRecord, prefix: str = "alphawrap") -> dict[str, float]:
    """The scalars of one record, by TensorBoard tag (finite values only).

    Args:
        record: A probe record.
        prefix: First component of every tag.

    Returns:
        ``{tag: value}`` as listed in the module documentation.
    """
    prefix = prefix.rstrip("/")
    scalars: dict[str, Any] = {}
    for name, alpha in record.alphas.items():
        scalars[f"{prefix}/alpha/{name}"] = alpha
        scalars[f"{prefix}/undefined/{name}"] = 0.0 if alpha is not None else 1.0
    for name, value in record.curvatures.items():
        scalars[f"{prefix}/curvature/{name}"] = value
    scalars[f"{prefix}/slope"] = record.slope
    scalars[f"{prefix}/applied"] = record.applied
    scalars[f"{prefix}/loss"] = record.loss
    scalars[f"{prefix}/direction_norm"] = record.direction_norm
    scalars[f"{prefix}/grad_norm"] = record.grad_norm
    for group, lr in enumerate(record.lrs):
        scalars[f"{prefix}/lr/{group}"] = lr
    for key, value in record.extra.items():  # e.g. the line-search truth
        scalars[f"{prefix}/extra/{key}"] = value
    return {
        tag: float(value)
        for tag, value in scalars.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def write_record(writer: Any, record: ProbeRecord, prefix: str = "alphawrap") -> None:
    """Write one record's scalars to ``writer`` at ``global_step=record.step``.

    Use it to write records made before :func:`log_to_tensorboard` was called::

        for record in probe.history:
            write_record(writer, record)
    """
    for tag, value in record_scalars(record, prefix).items():
        writer.add_scalar(tag, value, global_step=record.step)


def log_to_tensorboard(
    probe: Any, writer: Any, prefix: str = "alphawrap"
) -> Callable[[], None]:
    """Write every new record of ``probe`` to ``writer`` as TensorBoard scalars.

    Registers a record callback (:meth:`AlphaProbe.add_record_callback`); each
    probed step then writes its scalars, under the tags listed in the module
    documentation, right after it completes. The writer's own buffering applies:
    call ``writer.flush()`` to see the values in TensorBoard at once.

    Args:
        probe: The :class:`~alphawrap.AlphaProbe`.
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar(tag, value, global_step=...)``).
        prefix: First component of every tag.

    Returns:
        A function that stops the logging (removes the callback).

    Raises:
        TypeError: If ``probe`` does not take record callbacks or ``writer`` has
            no ``add_scalar``.
    """
    if not callable(getattr(probe, "add_record_callback", None)):
        raise TypeError(
            f"log_to_tensorboard needs an AlphaProbe, got {type(probe).__name__}."
        )
    if not callable(getattr(writer, "add_scalar", None)):
        raise TypeError(
            "log_to_tensorboard needs a torch.utils.tensorboard.SummaryWriter (or "
            f"an object with add_scalar), got {type(writer).__name__}."
        )
    if not isinstance(prefix, str) or not prefix.strip("/"):
        raise ValueError(f"prefix must be a non-empty string, got {prefix!r}.")

    def callback(record: ProbeRecord) -> None:
        write_record(writer, record, prefix)

    return probe.add_record_callback(callback)
