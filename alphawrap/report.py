"""Figures of a probe's history (matplotlib, an optional extra: ``alphawrap[plot]``).

:func:`plot_history` draws, against the optimizer step,

* ``α*`` of each curvature on a log scale, with the steps where it is undefined
  marked along the bottom edge of the panel (never silently dropped);
* the multiplier actually applied in apply mode, and the line-search truth
  ``α_line`` when the records carry it (``record.extra["alpha_line"]``);
* a dotted reference line at ``1``: the inner optimizer's step as proposed;
* the mini-batch loss in a second panel.

``History.plot(...)`` is the same function.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from alphawrap.history import ALPHA_LINE_KEY, ProbeRecord

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["plot_history", "pyplot"]

DEFAULT_TITLE = "AlphaProbe: optimal step length α* = −dᵀg / dᵀCd along the update d"


def pyplot() -> Any:
    """Import ``matplotlib.pyplot``, choosing the Agg backend when headless.

    Agg is selected only when pyplot was not imported yet, no backend was chosen
    through ``MPLBACKEND`` and, on Linux, there is no display; otherwise
    matplotlib's own choice stands.

    Raises:
        ImportError: If matplotlib is not installed (``pip install
            alphawrap[plot]``).
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib: pip install alphawrap[plot] (or pip install "
            "matplotlib)."
        ) from error
    if (
        "matplotlib.pyplot" not in sys.modules
        and not os.environ.get("MPLBACKEND")
        and sys.platform.startswith("linux")
        and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _make_room_below(ax: Any, fraction: float) -> None:
    """Lower a log axis' bottom so the lowest ``fraction`` of it holds no data.

    The markers of undefined steps sit in that band, below every plotted value.
    """
    low, high = ax.get_ylim()
    if not (low > 0 and high > low):
        return
    log_low, log_high = math.log10(low), math.log10(high)
    target = (log_low - fraction * log_high) / (1.0 - fraction)
    ax.set_ylim(10.0**target, high)


def plot_history(
    history: Iterable[ProbeRecord] | Any,
    path: str | os.PathLike[str] | None = None,
    *,
    curvatures: Sequence[str] | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (11.0, 6.5),
    dpi: int = 120,
) -> Figure:
    """Plot ``α*`` per curvature (log scale) and the loss against the step.

    Args:
        history: A :class:`~alphawrap.history.History`, any iterable of
            :class:`~alphawrap.history.ProbeRecord`, or an ``AlphaProbe`` (its
            ``history`` is plotted).
        path: Save the figure there when given (format from the suffix, e.g.
            ``.png``, ``.pdf``, ``.svg``); the folder must exist.
        curvatures: Names of the curvatures to draw (default: all, in the order
            the records list them).
        title: Title of the upper panel.
        figsize: Figure size in inches.
        dpi: Resolution of the saved file.

    Returns:
        The matplotlib figure; ``fig.axes[0]`` is the ``α*`` panel,
        ``fig.axes[1]`` the loss panel. Close it with
        ``matplotlib.pyplot.close(fig)`` when plotting many.

    Raises:
        ValueError: If there are no records, or ``curvatures`` names one the
            records do not have.
        ImportError: If matplotlib is not installed.

    Example:
        >>> fig = probe.history.plot("alpha.png")  # doctest: +SKIP
    """
    records = list(getattr(history, "history", history))
    if not records:
        raise ValueError(
            "The history has no records to plot: the probe has not taken a probed "
            "step yet."
        )
    known: dict[str, None] = {}
    for record in records:
        known.update(dict.fromkeys(record.alphas))
    if curvatures is None:
        names = list(known)
    else:
        names = [curvatures] if isinstance(curvatures, str) else list(curvatures)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"The records have no curvature {unknown}; they have {list(known)}."
            )
    plt = pyplot()
    from matplotlib.patches import Rectangle

    fig, (ax, ax_loss) = plt.subplots(
        2,
        1,
        sharex=True,
        figsize=figsize,
        gridspec_kw={"height_ratios": [2.3, 1.0]},
        layout="constrained",
    )
    steps = [r.step for r in records]
    marker_size = 3.0 if len(records) <= 400 else 0.0
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    bottom = ax.get_xaxis_transform()  # x in data, y in axes coordinates
    lane = 0

    ax.axhline(1.0, color="0.55", linestyle=":", linewidth=1.0, label="1: inner step d")
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        values = [r.alphas.get(name) for r in records]
        ys = [v if _positive(v) else math.nan for v in values]
        ax.plot(
            steps,
            ys,
            color=color,
            linewidth=1.1,
            marker="." if marker_size else None,
            markersize=marker_size,
            label=f"α* {name}",
        )
        undefined = [
            s
            for s, r, v in zip(steps, records, values)
            if name in r.alphas and not _positive(v)
        ]
        if undefined:
            ax.plot(
                undefined,
                [0.02 + 0.03 * lane] * len(undefined),
                transform=bottom,
                linestyle="none",
                marker="v",
                markersize=4,
                color=color,
                clip_on=False,
                label=f"undefined α* {name}: {len(undefined)}/"
                f"{sum(name in r.alphas for r in records)} steps",
            )
            lane += 1

    applied = [(r.step, r.applied) for r in records if r.mode == "apply"]
    if applied:
        taken = [(s, a if _positive(a) else math.nan) for s, a in applied]
        ax.plot(
            [s for s, _ in taken],
            [a for _, a in taken],
            color="black",
            linewidth=1.0,
            drawstyle="steps-mid",
            label="applied multiplier",
        )
        skipped = [s for s, a in applied if not _positive(a)]
        if skipped:
            ax.plot(
                skipped,
                [0.02 + 0.03 * lane] * len(skipped),
                transform=bottom,
                linestyle="none",
                marker="x",
                markersize=5,
                color="black",
                clip_on=False,
                label=f"no step taken: {len(skipped)} steps",
            )
            lane += 1

    line = [
        (r.step, r.extra[ALPHA_LINE_KEY])
        for r in records
        if _positive(r.extra.get(ALPHA_LINE_KEY))
    ]
    if line:
        ax.plot(
            [s for s, _ in line],
            [a for _, a in line],
            linestyle="none",
            marker="x",
            markersize=5,
            color="0.25",
            label="α line search (truth)",
        )

    ax.set_yscale("log")
    if lane:
        band = 0.03 * lane + 0.01
        _make_room_below(ax, band + 0.02)
        ax.add_patch(
            Rectangle(
                (0.0, 0.0),
                1.0,
                band,
                transform=ax.transAxes,
                facecolor="0.93",
                edgecolor="none",
                zorder=0,
            )
        )
    ax.set_ylabel("α*  (multiplier of the update d)")
    ax.set_title(title if title is not None else DEFAULT_TITLE, fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False
    )

    losses = [(r.step, r.loss) for r in records if r.loss is not None]
    finite = [(s, v) for s, v in losses if math.isfinite(v)]
    if finite:
        ax_loss.plot(
            [s for s, _ in finite],
            [v for _, v in finite],
            color="C3",
            linewidth=1.0,
            label="mini-batch loss",
        )
        low, high = min(v for _, v in finite), max(v for _, v in finite)
        if low > 0 and high / low > 20:
            ax_loss.set_yscale("log")
    nonfinite = [s for s, v in losses if not math.isfinite(v)]
    if nonfinite:
        ax_loss.plot(
            nonfinite,
            [0.04] * len(nonfinite),
            transform=ax_loss.get_xaxis_transform(),
            linestyle="none",
            marker="x",
            color="C3",
            clip_on=False,
            label=f"non-finite loss: {len(nonfinite)} steps",
        )
    if not losses:
        ax_loss.text(
            0.5,
            0.5,
            "loss not recorded",
            transform=ax_loss.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
    else:
        ax_loss.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            frameon=False,
        )
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("mini-batch loss")
    ax_loss.grid(True, alpha=0.3)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
