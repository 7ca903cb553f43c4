"""Records of probe steps and the sequence that holds them.

A :class:`ProbeRecord` holds plain Python numbers only (never tensors), so
keeping a long history does not keep graphs or device memory alive, and the
history round-trips through ``torch.save`` / ``torch.load(weights_only=True)``
as a list of dictionaries.

:class:`History` exports its records as a tidy table (:meth:`History.to_pandas`,
:meth:`History.to_csv`) or as JSON (:meth:`History.to_json`), reads both back
(:meth:`History.read_csv`, :meth:`History.read_json`), summarises them as text
(:meth:`History.summary`) and plots them (:meth:`History.plot`). pandas and
matplotlib are optional: they are imported only by the methods that need them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    from matplotlib.figure import Figure


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

    @property
    def cockpit_alphas(self) -> dict[str, float | None]:
        """``α*`` of each curvature on Cockpit's scale, ``1/α* − 1``.

        Cockpit (Schneider et al., 2021) places the end of the step on the
        one-dimensional quadratic, scaled so that ``-1`` is the start, ``0`` the
        minimiser and ``1`` the point opposite the start: positive values mean the
        inner step overshoots the minimiser (``α* < 1``), negative that it falls
        short (``α* > 1``). ``None`` where ``α*`` is undefined.
        """
        return {name: _cockpit(alpha) for name, alpha in self.alphas.items()}

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

    Behaves like a read-only list: ``len``, indexing, slicing (a slice is a plain
    ``list``) and iteration. Two histories are equal when their records are,
    field by field, with NaN equal to NaN.

    Long runs: pass ``maxlen`` (``AlphaProbe(..., history_size=N)``) to keep only
    the ``N`` newest records. Each record costs a few hundred bytes (more with many
    curvatures or parameter groups), so the cap matters only for runs of millions
    of steps. When the cap is reached, every new record drops the oldest one;
    :attr:`dropped` counts the records dropped so far, and :meth:`summary`,
    :meth:`to_json` and :meth:`state_dict` report it. Exports and plots cover
    the records kept, nothing else.

    Args:
        records: Initial records.
        maxlen: Keep at most this many of the newest records (``None``: keep all).

    Attributes:
        dropped: Number of old records dropped because of ``maxlen`` (``0`` when
            nothing was dropped).
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
            return len(self) == len(other) and all(
                a == b or _same(a.to_dict(), b.to_dict()) for a, b in zip(self, other)
            )
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

    # ---------------------------------------------------------------- exports
    def columns(self) -> list[str]:
        """Column names of :meth:`to_pandas` and :meth:`to_csv`, in order.

        ``step, loss, mode, slope, direction_norm, grad_norm, primary, alpha,
        status, applied, action``, then for each curvature ``alpha[<name>]``,
        ``cockpit_alpha[<name>]`` (``1/α* − 1``), ``curvature[<name>]``
        (``dᵀCd``) and ``status[<name>]``, then ``lr[<group>]`` for each
        parameter group and ``extra[<key>]`` for each key of the records' ``extra``
        dictionaries. ``alpha`` and ``status`` repeat the primary curvature's.
        """
        names, groups, extras = self._layout()
        return _columns(names, groups, extras)

    def to_pandas(self) -> pandas.DataFrame:
        """Return the records as a tidy ``pandas.DataFrame``, one row per step.

        Columns are listed in :meth:`columns`. Numbers are ``float64`` (``step``
        is an integer); an undefined ``α*``, an unknown loss, a curvature or a
        parameter group that a record does not have are ``NaN``; the ``status``
        columns say why an ``α*`` is undefined.

        Raises:
            ImportError: If pandas is not installed (``pip install
                alphawrap[export]``).

        Example:
            >>> df = probe.history.to_pandas()  # doctest: +SKIP
            >>> df[["alpha[hessian]", "alpha[ggn]"]].median()  # doctest: +SKIP
        """
        try:
            import pandas as pd
        except ImportError as error:  # pragma: no cover - exercised without pandas
            raise ImportError(
                "History.to_pandas() needs pandas: pip install alphawrap[export] "
                "(or pip install pandas). to_csv() and to_json() work without it."
            ) from error
        names, groups, extras = self._layout()
        columns = _columns(names, groups, extras)
        rows = [_row(r) for r in self._records]
        frame = pd.DataFrame(
            [[row.get(c) for c in columns] for row in rows], columns=columns
        )
        for column in columns:
            kind = _column_kind(column)
            if column == "step":
                frame[column] = frame[column].astype("int64")
            elif kind == "float":
                frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(
                    "float64"
                )
        return frame

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the records as CSV, one row per step, columns as :meth:`columns`.

        Numbers are written with ``repr`` precision, so :meth:`read_csv` gives back
        exactly the same floats. An empty cell means "not part of this record" (a
        curvature or parameter group the record does not have); ``None`` means an
        undefined value (undefined ``α*``, unknown loss); ``nan``/``inf`` are
        non-finite numbers. pandas reads both ``None`` and empty cells as NaN.
        ``extra[<key>]`` cells hold JSON. The cap (``maxlen``) and :attr:`dropped`
        are not part of the table; :meth:`to_json` keeps them.

        Args:
            path: File to write (overwritten).
        """
        names, groups, extras = self._layout()
        columns = _columns(names, groups, extras)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for record in self._records:
                row = _row(record)
                writer.writerow(
                    [_encode_cell(c, row[c]) if c in row else "" for c in columns]
                )

    @classmethod
    def read_csv(
        cls, path: str | os.PathLike[str], maxlen: int | None = None
    ) -> History:
        """Read a history written by :meth:`to_csv`.

        Derived columns (``alpha``, ``status``, ``cockpit_alpha[...]``) are
        recomputed, not read.

        Args:
            path: CSV file written by :meth:`to_csv`.
            maxlen: Cap of the returned history (the CSV does not store one).

        Raises:
            ValueError: If the file is not such a CSV; the message names the
                problem and the line.
        """
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{os.fspath(path)!r} is empty, not a history CSV.")
            missing = [c for c in _REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ValueError(
                    f"{os.fspath(path)!r} is not a history CSV written by "
                    f"History.to_csv(): missing column(s) {missing}."
                )
            records = []
            for line, cells in enumerate(reader, start=2):
                if not cells:
                    continue
                try:
                    records.append(_parse_row(dict(zip(header, cells, strict=True))))
                except (ValueError, TypeError, KeyError) as error:
                    raise ValueError(
                        f"{os.fspath(path)!r}, line {line}: cannot read the record "
                        f"({error})."
                    ) from error
        return cls(records, maxlen=maxlen)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the history as JSON: its records, ``maxlen`` and ``dropped``.

        One record per line, as :meth:`ProbeRecord.to_dict` gives it. Floats are
        written exactly; non-finite ones as ``NaN``/``Infinity`` (Python's and
        JavaScript's JSON parsers accept them, strict ones may not). Tuples in
        ``extra`` come back as lists.

        Args:
            path: File to write (overwritten).

        Raises:
            TypeError: If a record's ``extra`` holds a value JSON cannot encode.
        """
        records = ",\n".join(json.dumps(r, allow_nan=True) for r in self.to_dicts())
        head = json.dumps(
            {
                "format": _JSON_FORMAT,
                "version": _JSON_VERSION,
                "maxlen": self.maxlen,
                "dropped": self.dropped,
            }
        )
        text = head[:-1] + ', "records": [\n' + records + "\n]}\n"
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> History:
        """Read a history written by :meth:`to_json` (records, cap and ``dropped``).

        Raises:
            ValueError: If the file is not such a JSON document.
        """
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{os.fspath(path)!r} is not valid JSON: {error}."
                ) from error
        if isinstance(data, list):
            data = {"records": data}
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ValueError(
                f"{os.fspath(path)!r} is not a history written by History.to_json(): "
                "expected an object with a 'records' list."
            )
        version = data.get("version", _JSON_VERSION)
        if data.get("format", _JSON_FORMAT) != _JSON_FORMAT or not (
            isinstance(version, int) and version <= _JSON_VERSION
        ):
            raise ValueError(
                f"{os.fspath(path)!r} has format {data.get('format')!r} version "
                f"{version!r}; this alphawrap reads {_JSON_FORMAT!r} up to version "
                f"{_JSON_VERSION}."
            )
        try:
            return cls.from_state_dict(data)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(
                f"{os.fspath(path)!r}: cannot read the records ({error})."
            ) from error

    # ---------------------------------------------------------------- summary
    def summary(self) -> str:
        """Summarise the history as text.

        Per curvature: the quartiles (25 %, median, 75 %) of ``α*`` over the steps
        where it is defined, and the share of steps where it is undefined, with the
        reasons. Then the line-search ``α`` when records carry it
        (``extra["alpha_line"]``, see :data:`ALPHA_LINE_KEY`), the applied
        multiplier and the actions in apply mode, the loss, and the history's cap
        with the number of records dropped.

        Returns:
            Several lines of text, ready to print.
        """
        lines = []
        n = len(self._records)
        if n == 0:
            lines.append("AlphaProbe history: no records.")
        else:
            first, last = self._records[0], self._records[-1]
            modes = Counter(r.mode for r in self._records)
            mode_text = ", ".join(f"{m} {c}" for m, c in modes.items())
            lines.append(
                f"AlphaProbe history: {n} probed step{'s' if n != 1 else ''} "
                f"(steps {first.step}–{last.step}), mode: {mode_text}, primary "
                f"curvature: {last.primary}"
            )
        if self.maxlen is None:
            lines.append("Cap: none (every probed step is kept).")
        else:
            lines.append(
                f"Cap: the newest {self.maxlen} records are kept; {self.dropped} "
                f"older record{'s were' if self.dropped != 1 else ' was'} dropped"
                + (" and are not summarised here." if self.dropped else ".")
            )
        if n == 0:
            return "\n".join(lines)
        names, _, _ = self._layout()
        table = [("curvature", "q25", "median", "q75", "undefined")]
        for name in names:
            present = [r for r in self._records if name in r.alphas]
            values = sorted(
                a for r in present if (a := r.alphas[name]) is not None and a == a
            )
            reasons = Counter(
                r.statuses.get(name, "?") for r in present if r.alphas[name] is None
            )
            table.append((name, *_quartiles(values), _undefined(len(present), reasons)))
        line_alphas = sorted(
            a
            for r in self._records
            if isinstance(a := r.extra.get(ALPHA_LINE_KEY), (int, float))
            and math.isfinite(a)
        )
        if line_alphas:
            table.append(
                ("line search", *_quartiles(line_alphas), f"{len(line_alphas)} steps")
            )
        lines.append("")
        lines.append("α* per curvature (quartiles over the steps where it is defined):")
        lines.extend(_format_table(table))
        applied = [r for r in self._records if r.mode == "apply"]
        if applied:
            multipliers = sorted(r.applied for r in applied)
            q25, med, q75 = _quartiles(multipliers)
            actions = Counter(r.action for r in applied)
            lines.append("")
            lines.append(
                f"Applied multiplier of d ({len(applied)} apply-mode steps): "
                f"q25 {q25}, median {med}, q75 {q75}, min {_fmt(multipliers[0])}, "
                f"max {_fmt(multipliers[-1])}"
            )
            lines.append(
                "Actions: "
                + ", ".join(f"{a} {c}" for a, c in sorted(actions.items()))
                + "  (alpha: took α*·d; inner: took d; fallback: fixed multiplier; "
                "skip: no step)"
            )
        losses = [
            r.loss
            for r in self._records
            if r.loss is not None and math.isfinite(r.loss)
        ]
        if losses:
            tail = sorted(losses[-10:])
            lines.append("")
            lines.append(
                f"Mini-batch loss: first {_fmt(losses[0])}, last {_fmt(losses[-1])}, "
                f"median of the last {len(tail)} {_fmt(_quantile(tail, 0.5))}"
            )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Figure:
        """Plot ``α*`` per curvature and the loss (see :mod:`alphawrap.report`).

        Args:
            path: Save the figure there when given (format from the suffix).
            **kwargs: Passed on to :func:`~alphawrap.report.plot_history`.

        Returns:
            The matplotlib figure.
        """
        from alphawrap.report import plot_history

        return plot_history(self, path, **kwargs)

    def _layout(self) -> tuple[list[str], int, list[str]]:
        """Curvature names, number of parameter groups and extra keys, in order."""
        names: dict[str, None] = {}
        extras: dict[str, None] = {}
        groups = 0
        for record in self._records:
            names.update(dict.fromkeys(record.alphas))
            extras.update(dict.fromkeys(record.extra))
            groups = max(groups, len(record.lrs))
        return list(names), groups, list(extras)


ALPHA_LINE_KEY = "alpha_line"
"""Key of ``ProbeRecord.extra`` holding the line-search truth ``α_line`` (plots,
summary and TensorBoard show it when present)."""
_JSON_FORMAT = "alphawrap.history"
_JSON_VERSION = 1
_BASE_COLUMNS = (
    "step",
    "loss",
    "mode",
    "slope",
    "direction_norm",
    "grad_norm",
    "primary",
    "alpha",
    "status",
    "applied",
    "action",
)
_REQUIRED_COLUMNS = tuple(c for c in _BASE_COLUMNS if c not in ("alpha", "status"))
_FLOAT_FIELDS = {"loss", "slope", "direction_norm", "grad_norm", "applied", "alpha"}
_INDEXED = re.compile(r"^(alpha|cockpit_alpha|curvature|status|lr|extra)\[(.*)\]$")


def _cockpit(alpha: float | None) -> float | None:
    """Cockpit's step-length scale ``1/α − 1`` (``None`` where ``α`` is undefined)."""
    if alpha is None or alpha == 0.0 or math.isnan(alpha):
        return None
    return 1.0 / alpha - 1.0


def _columns(names: Sequence[str], groups: int, extras: Sequence[str]) -> list[str]:
    columns = list(_BASE_COLUMNS)
    for quantity in ("alpha", "cockpit_alpha", "curvature", "status"):
        columns.extend(f"{quantity}[{name}]" for name in names)
    columns.extend(f"lr[{i}]" for i in range(groups))
    columns.extend(f"extra[{key}]" for key in extras)
    return columns


def _column_kind(column: str) -> str:
    """``"float"``, ``"str"``, ``"int"`` or ``"json"``: how a column is typed."""
    if column == "step":
        return "int"
    if column in _FLOAT_FIELDS:
        return "float"
    match = _INDEXED.match(column)
    if match is None:
        return "str"
    quantity = match.group(1)
    if quantity == "status":
        return "str"
    if quantity == "extra":
        return "json"
    return "float"


def _row(record: ProbeRecord) -> dict[str, Any]:
    """One record as ``{column: value}``; columns it does not have are left out."""
    row: dict[str, Any] = {
        "step": record.step,
        "loss": record.loss,
        "mode": record.mode,
        "slope": record.slope,
        "direction_norm": record.direction_norm,
        "grad_norm": record.grad_norm,
        "primary": record.primary,
        "alpha": record.alphas.get(record.primary),
        "status": record.statuses.get(record.primary),
        "applied": record.applied,
        "action": record.action,
    }
    cockpit = record.cockpit_alphas
    for name in record.alphas:
        row[f"alpha[{name}]"] = record.alphas[name]
        row[f"cockpit_alpha[{name}]"] = cockpit[name]
        if name in record.curvatures:
            row[f"curvature[{name}]"] = record.curvatures[name]
        if name in record.statuses:
            row[f"status[{name}]"] = record.statuses[name]
    for i, lr in enumerate(record.lrs):
        row[f"lr[{i}]"] = lr
    for key, value in record.extra.items():
        row[f"extra[{key}]"] = value
    return row


def _encode_cell(column: str, value: Any) -> str:
    kind = _column_kind(column)
    if kind == "json":
        try:
            return json.dumps(value, allow_nan=True)
        except TypeError as error:
            raise TypeError(
                f"Cannot write column {column!r}: {error}. Records' extra values must "
                "be JSON-serialisable plain Python values."
            ) from error
    if value is None:
        return "None"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _decode_float(text: str) -> float | None:
    return None if text == "None" else float(text)


def _parse_row(cells: dict[str, str]) -> ProbeRecord:
    """Inverse of :func:`_row` + :func:`_encode_cell`; derived columns are skipped."""
    alphas: dict[str, float | None] = {}
    curvatures: dict[str, float] = {}
    statuses: dict[str, str] = {}
    lrs: dict[int, float | None] = {}
    extra: dict[str, Any] = {}
    for column, text in cells.items():
        match = _INDEXED.match(column)
        if match is None or text == "":
            continue
        quantity, key = match.groups()
        if quantity == "alpha":
            alphas[key] = _decode_float(text)
        elif quantity == "curvature":
            curvatures[key] = float(text)
        elif quantity == "status":
            statuses[key] = text
        elif quantity == "lr":
            lrs[int(key)] = _decode_float(text)
        elif quantity == "extra":
            extra[key] = json.loads(text)
    if sorted(lrs) != list(range(len(lrs))):
        raise ValueError(f"lr columns have gaps: {sorted(lrs)}")
    return ProbeRecord(
        step=int(cells["step"]),
        loss=_decode_float(cells["loss"]),
        mode=cells["mode"],
        slope=float(cells["slope"]),
        direction_norm=float(cells["direction_norm"]),
        grad_norm=float(cells["grad_norm"]),
        curvatures=curvatures,
        alphas=alphas,
        statuses=statuses,
        primary=cells["primary"],
        applied=float(cells["applied"]),
        action=cells["action"],
        lrs=tuple(lrs[i] for i in range(len(lrs))),
        extra=extra,
    )


def _same(a: Any, b: Any) -> bool:
    """Structural equality of plain values, with NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    return bool(a == b)


def _quantile(values: Sequence[float], q: float) -> float:
    """Quantile of sorted ``values`` with linear interpolation (numpy's default)."""
    position = (len(values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _quartiles(values: Sequence[float]) -> tuple[str, str, str]:
    if not values:
        return ("-", "-", "-")
    return tuple(_fmt(_quantile(values, q)) for q in (0.25, 0.5, 0.75))  # type: ignore[return-value]


def _undefined(total: int, reasons: Counter[str]) -> str:
    count = sum(reasons.values())
    share = 100.0 * count / total if total else 0.0
    text = f"{share:.1f}% ({count}/{total})"
    if reasons:
        text += ": " + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
    return text


def _format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:])]
        cells.append(row[-1])
        out.append("  " + "  ".join(cells))
    return out
