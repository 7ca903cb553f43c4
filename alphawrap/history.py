"""Records of probe steps and the sequence that holds them.

A :class:`ProbeRecord` holds plain Python numbers only (never tensors), so
keeping a long history does not keep graphs or device memory alive, and the
history round-trips through ``torch.save`` / ``torch.load(weights_only=True)``
as a list of dictionaries.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload


@dataclass(frozen=True)
class ProbeRecord:
    """What the probe measured and did on one optimizer step.

    Attributes:
        step: Index of the optimizer step (0-based, counts every ``step()`` call).
        loss: Mini-batch loss at ``θ₀`` as returned by the closure (``None`` when
            it is unknown, e.g. a closure-free step without a recorded loss).
        mode: ``"observe"`` or ``"apply"``: the mode the step ran in.
        slope: Directional derivative ``dᵀg`` of the loss at ``θ₀``.
        direction_norm: ``‖d‖``, the Euclidean norm of the inner update.
        grad_norm: ``‖g‖``, the Euclidean norm of the mini-batch gradient.
        curvatures: ``dᵀCd`` for each requested curvature, by name.
        alphas: ``α* = -dᵀg / dᵀCd`` for each curvature, ``None`` where undefined.
        statuses: Status of each curvature's ``α*`` (see
            :class:`~alphawrap.quadratic.Status`).
        primary: Name of the primary curvature (the first one requested).
        applied: Multiplier of ``d`` that was actually taken: ``1.0`` for the
            inner step, ``0.0`` for a skipped step, ``α`` in apply mode.
        action: What the step did: ``"inner"`` (inner update unchanged),
            ``"alpha"`` (rescaled by ``α*``), ``"fallback"`` (a fixed multiplier)
            or ``"skip"`` (no update; parameters and inner state left as before).
        lrs: Learning rate of each parameter group at this step (``None`` for a
            group without an ``"lr"`` entry).
    """

    step: int
    loss: float | None
    mode: str
    slope: float
    direction_norm: float
    grad_norm: float
    curvatures: dict[str, float]
    alphas: dict[str, float | None]
    statuses: dict[str, str]
    primary: str
    applied: float
    action: str
    lrs: tuple[float | None, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def alpha(self) -> float | None:
        """``α*`` of the primary curvature (``None`` where undefined)."""
        return self.alphas[self.primary]

    @property
    def status(self) -> str:
        """Status of the primary curvature's ``α*``."""
        return self.statuses[self.primary]

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dictionary of plain Python values."""
        out = dataclasses.asdict(self)
        out["lrs"] = list(self.lrs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeRecord:
        """Rebuild a record from :meth:`to_dict`'s output.

        Raises:
            ValueError: If ``data`` is not a record dictionary.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        }
        if not isinstance(data, dict) or not required <= data.keys():
            missing = sorted(required - set(data)) if isinstance(data, dict) else []
            raise ValueError(f"Not a ProbeRecord dictionary; missing keys {missing}.")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["lrs"] = tuple(kwargs.get("lrs", ()))
        return cls(**kwargs)


class History(Sequence[ProbeRecord]):
    """The records of a probe, oldest first.

    Behaves like a read-only list: ``len``, indexing, slicing and iteration.

    Args:
        records: Initial records.
        maxlen: Keep at most this many of the newest records (``None``: keep all).
            When the cap is reached the oldest record is dropped;
            :attr:`dropped` counts how many were.
    """

    def __init__(
        self, records: Iterable[ProbeRecord] = (), maxlen: int | None = None
    ) -> None:
        if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 1):
            raise ValueError(
                f"history maxlen must be a positive int or None, got {maxlen!r}."
            )
        self._records: deque[ProbeRecord] = deque(records, maxlen=maxlen)
        self.dropped = 0

    @property
    def maxlen(self) -> int | None:
        """The cap on the number of records kept (``None``: unlimited)."""
        return self._records.maxlen

    def append(self, record: ProbeRecord) -> None:
        """Add a record, dropping the oldest one if the cap is reached."""
        if self.maxlen is not None and len(self._records) == self.maxlen:
            self.dropped += 1
        self._records.append(record)

    def clear(self) -> None:
        """Remove all records."""
        self._records.clear()
        self.dropped = 0

    @overload
    def __getitem__(self, index: int) -> ProbeRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[ProbeRecord]: ...

    def __getitem__(self, index: int | slice) -> ProbeRecord | list[ProbeRecord]:
        if isinstance(index, slice):
            return list(self._records)[index]
        if index < 0:
            index += len(self._records)
        if not 0 <= index < len(self._records):
            raise IndexError("history index out of range")
        return self._records[index]

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[ProbeRecord]:
        return iter(self._records)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"History({len(self)} records, maxlen={self.maxlen})"

    def to_dicts(self) -> list[dict[str, Any]]:
        """Return all records as dictionaries of plain Python values."""
        return [r.to_dict() for r in self._records]

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (safe for ``torch.load(weights_only=True)``)."""
        return {
            "records": self.to_dicts(),
            "maxlen": self.maxlen,
            "dropped": self.dropped,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> History:
        """Rebuild a history from :meth:`state_dict`'s output."""
        history = cls(
            (ProbeRecord.from_dict(r) for r in state["records"]), state.get("maxlen")
        )
        history.dropped = int(state.get("dropped", 0))
        return history
