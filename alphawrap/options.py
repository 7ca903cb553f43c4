"""Validated settings of a probe: modes, fallbacks, bounds, apply-mode options.

Pure validation with messages that say what to pass; no tensors, no autograd.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from alphawrap.batch import RecordingLoss, is_overridable
from alphawrap.curvature import Curvature
from alphawrap.curvature.sweep import EXACT_KINDS

Mode = Literal["observe", "apply"]
MODES: tuple[str, ...] = ("observe", "apply")
FALLBACKS: tuple[str, ...] = ("inner", "skip", "last")
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "inner")
EXACT_CURVATURES: tuple[str, ...] = EXACT_KINDS
"""The curvatures accurate enough for apply mode (see the README's accuracy table)."""


def validate_fallback(fallback: str | float) -> str | float:
    """Check ``fallback=``: one of :data:`FALLBACKS` or a finite multiplier >= 0."""
    if isinstance(fallback, str):
        if fallback not in FALLBACKS:
            raise ValueError(
                f"Invalid fallback {fallback!r}: use one of {FALLBACKS} or a finite "
                "multiplier >= 0 (e.g. 1.0 takes the inner step)."
            )
        return fallback
    if isinstance(fallback, bool) or not isinstance(fallback, (int, float)):
        raise TypeError(
            f"fallback must be one of {FALLBACKS} or a float, got {fallback!r}."
        )
    if not math.isfinite(fallback) or fallback < 0:
        raise ValueError(
            f"Invalid fallback multiplier {fallback}: need a finite value >= 0."
        )
    return float(fallback)


def validate_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    """Check ``bounds=``: ``None`` or ``(low, high)`` with ``0 <= low <= high``."""
    if bounds is None:
        return None
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"bounds must be None or a pair (low, high) of numbers, got {bounds!r}."
        ) from error
    if not (math.isfinite(low) and 0.0 <= low <= high) or math.isnan(high):
        raise ValueError(
            f"Invalid bounds {bounds!r}: need 0 <= low <= high, low finite "
            "(high may be math.inf)."
        )
    return low, high


@dataclass(frozen=True)
class ApplyOptions:
    """The truth check, ρ and the apply-mode options, validated (see AlphaProbe)."""

    truth_every: int | None = None
    track_rho: bool = False
    smoothing: float = 0.0
    damping: float = 0.0
    adaptive_damping: bool = False
    damping_factor: float = 1.5
    reuse_alpha: bool = False

    DAMPING_BOUNDS = (1e-8, 1e8)  # ClassVar: range of the adaptive λ

    @classmethod
    def validate(cls, *, model: Any, loss_fn: Any, **options: Any) -> ApplyOptions:
        every = options["truth_every"]
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, int) or every < 1
        ):
            raise ValueError(
                f"Invalid truth_every {every!r}: need None (off) or an int >= 1 "
                "(run the line search on probed steps whose index is a multiple)."
            )
        for name in ("track_rho", "adaptive_damping", "reuse_alpha"):
            if not isinstance(options[name], bool):
                raise TypeError(f"{name} must be True or False, got {options[name]!r}.")
        smoothing = options["smoothing"]
        if isinstance(smoothing, bool) or not (
            isinstance(smoothing, (int, float)) and 0.0 <= smoothing < 1.0
        ):
            raise ValueError(
                f"Invalid smoothing {smoothing!r}: need a number in [0, 1) (the EMA "
                "factor β of ln α; 0: no smoothing)."
            )
        damping = options["damping"]
        if isinstance(damping, bool) or not (
            isinstance(damping, (int, float))
            and math.isfinite(damping)
            and damping >= 0
        ):
            raise ValueError(
                f"Invalid damping {damping!r}: need a finite number >= 0 (λ in "
                "dᵀCd + λ‖d‖²)."
            )
        factor = options["damping_factor"]
        if isinstance(factor, bool) or not (
            isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1
        ):
            raise ValueError(
                f"Invalid damping_factor {factor!r}: need a finite number > 1 (ω of "
                "the Levenberg-Marquardt rule)."
            )
        wanted = [
            name
            for name, on in (
                (f"truth_every={every}", every is not None),
                ("track_rho=True", options["track_rho"]),
                ("adaptive_damping=True", options["adaptive_damping"]),
            )
            if on
        ]
        require_model_and_loss(", ".join(wanted), model, loss_fn)
        if options["adaptive_damping"]:
            damping = max(float(damping), cls.DAMPING_BOUNDS[0])
        return cls(
            truth_every=every,
            track_rho=options["track_rho"],
            smoothing=float(smoothing),
            damping=float(damping),
            adaptive_damping=options["adaptive_damping"],
            damping_factor=float(factor),
            reuse_alpha=options["reuse_alpha"],
        )

    def truth_due(self, step: int) -> bool:
        return self.truth_every is not None and step % self.truth_every == 0


@dataclass(frozen=True)
class ApplyState:
    """What apply mode carries from step to step (saved in the state dict)."""

    damping: float = 0.0
    log_alpha: float | None = None  # EMA of ln α (smoothing)
    last_alpha: float | None = None  # last multiplier applied from a defined α

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ApplyState:
        if not isinstance(data, dict):
            raise ValueError(f"apply state must be a dict, got {type(data).__name__}")
        values = {}
        for key in ("damping", "log_alpha", "last_alpha"):
            value = data.get(key)
            if value is not None:
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"apply state {key}={value} is not finite")
            values[key] = value
        if values["damping"] is None or values["damping"] < 0:
            raise ValueError(f"apply state damping={values['damping']} is not >= 0")
        return cls(**values)


def require_model_and_loss(what: str, model: Any, loss_fn: Any) -> None:
    """Raise if ``what`` (a feature that replays the loss) lacks model/loss_fn.

    Raises:
        TypeError: Naming what is missing and how to pass it.
    """
    if not what or (model is not None and loss_fn is not None):
        return
    missing = " and ".join(
        name
        for name, value in (("model=", model), ("loss_fn=", loss_fn))
        if value is None
    )
    raise TypeError(
        f"{what} re-evaluates the mini-batch loss along the update, so AlphaProbe "
        f"needs {missing}: AlphaProbe(optimizer, ..., model=model, loss_fn=loss_fn), "
        "where the closure computes loss_fn(model(inputs), targets) once (loss_fn: "
        "a loss module, a torch.nn.functional function such as F.cross_entropy, "
        "or any callable that the closure then calls as probe.loss_fn(output, "
        "targets))."
    )


def check_model_and_loss(
    curvatures: Sequence[Curvature], model: Any, loss_fn: Any
) -> tuple[nn.Module | None, Any]:
    """Validate ``model=``/``loss_fn=``; wrap a plain-Python loss for recording."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    needing = [c.name for c in curvatures if c.needs_batch]
    if needing:
        names = ", ".join(map(repr, needing))
        require_model_and_loss(f"Curvature {names}", model, loss_fn)
    if (
        loss_fn is not None
        and not isinstance(loss_fn, nn.Module)
        and not is_overridable(loss_fn)
    ):
        loss_fn = RecordingLoss(loss_fn)
    return model, loss_fn
