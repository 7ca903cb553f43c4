r"""``AlphaProbe``: the optimizer wrapper, its contract and the step orchestration.

Replace ``optim.Adam(...)`` with ``AlphaProbe(optim.Adam(...))`` and keep
training. Each probed ``step(closure)``

1. runs the closure once while recording what every requested curvature needs
   from that one backward pass (plain hooks when ``model=``/``loss_fn=`` are
   given, else a BackPACK context; gradients are restored if it fails);
2. lets the inner optimizer take its real step and measures its update
   :math:`d = \theta_1 - \theta_0`;
3. swaps :math:`\theta_0` back in (no copy) and evaluates :math:`d^\top g` and
   :math:`d^\top C d` for each curvature, all scalars in one device-to-host
   transfer (apply mode adds one finiteness check of the new parameters);
4. observe mode keeps :math:`\theta_1`; apply mode writes
   :math:`\theta_0 + \alpha^* d` (or a documented fallback);
5. appends a :class:`~alphawrap.history.ProbeRecord` to :attr:`AlphaProbe.history`.

Any exception during 1–5 restores parameters, gradients, inner state and history.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from alphawrap import curvature as curvature_registry
from alphawrap.batch import BatchRecorder, RecordingLoss
from alphawrap.blocks import BlockBreakdown
from alphawrap.closure import (
    CLOSURE_FREE_HELP,
    Capture,
    ClosureSession,
    Pending,
    note,
    noted,
)
from alphawrap.curvature import Curvature, EvaluationContext
from alphawrap.curvature.blockdiag import translate_backpack_error
from alphawrap.direction import (
    POOL_MIN,
    POOL_TOTAL,
    BackwardMonitor,
    CopyPool,
    StepTransaction,
    step_products,
)
from alphawrap.distributed import DistributedReducer
from alphawrap.errors import ClosureError, CurvatureError, ProbeError
from alphawrap.history import History, ProbeRecord
from alphawrap.noise import GradientNoise
from alphawrap.options import (
    EXACT_CURVATURES,
    MODES,
    NONFINITE_POLICIES,
    ApplyOptions,
    ApplyState,
    Mode,
    check_model_and_loss,
    validate_bounds,
    validate_fallback,
)
from alphawrap.quadratic import (
    Status,
    adapt_damping,
    clip_to_bounds,
    damped_curvature,
    optimal_step,
    predicted_change,
    reduction_ratio,
    secant_curvature,
    smooth_log_alpha,
)
from alphawrap.truth import BatchObjective, line_search

STATE_KEY = "alphawrap"
STATE_FORMAT = 1


class AlphaProbe(Optimizer):
    r"""Measure, and optionally apply, the optimal step length along any update.

    Wraps an inner ``torch.optim`` optimizer. On each probed step it computes,
    for the update :math:`d` the inner optimizer makes and the mini-batch
    gradient :math:`g` at :math:`\theta_0`,

    .. math:: \alpha^* = -\frac{d^\top g}{d^\top C d}

    for every requested curvature :math:`C`, from a single backward pass.

    A probed step is all or nothing: if anything in it raises (the closure, the
    inner optimizer's step, a curvature, writing the record; ``KeyboardInterrupt``
    too), parameters, gradients, the inner optimizer's state and the history are
    restored bit for bit, and the exception propagates with its own type and a
    note (``add_note``) that names the stage that failed. Parameters may mix
    floating dtypes (the step's scalars accumulate in the promoted dtype, at
    least float32); they must all live on one device.

    Args:
        optimizer: The inner optimizer instance (any ``torch.optim.Optimizer``
            that takes a plain ``step()``; LBFGS and SparseAdam are refused).
        curvature: A curvature name or a sequence of names; the first is the
            primary one (apply mode, :attr:`ProbeRecord.alpha`). See
            :func:`alphawrap.curvature.available`.
        mode: ``"observe"`` (record ``α*``, take the inner step unchanged) or
            ``"apply"`` (take ``θ₀ + α* d``). Can be changed between steps.
        fallback: What apply mode does when the primary ``α*`` is undefined
            (not a descent direction, non-positive curvature, ``d = 0``):
            ``"inner"`` (default) takes the inner step unchanged, ``"skip"`` takes
            no step (parameters and inner state stay as before), a number ``c``
            takes ``θ₀ + c·d``, ``"last"`` takes the last multiplier applied
            from a defined ``α`` (the inner step while there is none).
        on_nonfinite: What apply mode does when loss, gradient, direction or
            curvature is NaN/inf, or when ``θ₀ + α d`` would overflow the
            parameters' dtype: ``"skip"`` (default; no step, parameters and inner
            state restored) or ``"inner"`` (take the inner step anyway). Either
            way the record's status is ``"non-finite"``, and apply mode writes
            NaN or inf into a parameter only where the inner step itself does
            (``"inner"``). Observe mode always takes the inner step, exactly as
            the unwrapped optimizer.
        bounds: Optional ``(low, high)`` clipping of the applied ``α``.
        interval: Probe every ``interval``-th step (1: every step). Steps in
            between run the closure without BackPACK and take the plain inner
            step; they are counted in :attr:`step_count` but not recorded.
            They take no snapshot, so unlike probed steps an exception in them
            is not rolled back (exactly as with the unwrapped optimizer).
        history_size: Keep at most this many records (``None``: all).
        model: Optional model whose ``named_parameters()`` name the parameters in
            error messages and records. With ``loss_fn`` an ``nn.CrossEntropyLoss``
            or ``nn.MSELoss``, the block and exact curvatures record what they need
            with plain forward hooks that exist only while a probed closure runs
            (:class:`~alphawrap.curvature.sweep.HookRecorder`): no
            ``backpack.extend`` is needed and steps between probes cost nothing.
            Required (with ``loss_fn``) by the exact curvatures ``"ggn-exact"``
            and ``"hessian-exact"``: on a chain of supported modules they come
            from the stored forward; otherwise the probe records the arguments of
            the closure's one call of ``model`` and of ``loss_fn`` and replays
            ``loss_fn(model(...))`` at ``θ₀`` along ``d`` (see
            :mod:`alphawrap.batch`). Pass the module itself, not a DDP wrapper.
        distributed: Under ``torch.distributed`` (DDP), combine the per-process
            loss and curvature with one ``all_reduce`` per probed step so every
            process gets the same ``α*`` (see :mod:`alphawrap.distributed`).
            ``None`` (default): whenever a process group with more than one
            process is initialised; ``False``: never; ``True``: require it; or a
            :class:`~alphawrap.distributed.DistributedReducer` for more options.
        process_group: The process group to reduce over (``None``: the default).
        loss_fn: The loss the closure applies to the model's output: an
            ``nn.Module`` (e.g. ``nn.CrossEntropyLoss()``), a ``torch`` /
            ``torch.nn.functional`` function (e.g. ``F.cross_entropy``; its calls
            are seen however the closure refers to it) or any callable the
            closure then calls as ``probe.loss_fn(output, target)``. Needed by
            the exact curvatures and the truth check; with ``model`` it replaces
            ``backpack.extend`` for the block curvatures (see ``model``).
        per_block: Also record ``dᵀg``, ``dᵀCd`` and ``α*`` per parameter and
            per parameter group, for every block curvature, in
            ``record.extra["blocks"]`` and ``record.extra["groups"]`` (see
            :mod:`alphawrap.blocks`).
        noise: Also record the mini-batch standard error of ``dᵀg`` and ``α*``
            from BackPACK's per-sample gradients in ``record.extra["noise"]``
            (see :mod:`alphawrap.noise`); needs a BackPACK-extended model.
        truth_every: Line-search truth (default ``None``: off). On probed steps
            whose index is a multiple of ``truth_every``, find the minimiser
            ``α_line`` of ``h(α) = L(θ₀ + α d)`` on the step's own batch
            (bracketing on a log₂ grid, golden-section search to 0.1 % in
            ``α``, one parabolic step: :func:`alphawrap.truth.line_search`,
            about 20-35 forward passes) and record ``extra["alpha_line"]``,
            ``"loss_line"`` (``h(α_line)``), ``"loss_line0"`` (``h(0)``),
            ``"line_status"`` (``"ok"``, ``"no-decrease"``, ``"unbounded"``,
            ``"non-finite"``) and ``"line_evaluations"``. Needs ``model=`` and
            ``loss_fn=``. Evaluated with ``torch.func.functional_call`` under
            ``torch.no_grad()``: parameters, gradients, optimizer state,
            BatchNorm statistics, random state and BackPACK's stored quantities
            stay as they were (observe mode stays bitwise identical to the
            unwrapped optimizer).
        track_rho: Model quality after the fact (default ``False``): one forward
            pass at the parameters taken, ``θ₀ + t d``, gives
            ``extra["rho"]`` = actual / predicted change of the loss (the
            quadratic model of the primary curvature, undamped, for the ``t``
            taken; ``None`` where it predicts no decrease), ``"loss_new"``,
            ``"loss_change"``, ``"predicted_change"``, the secant curvature
            ``"curvature_secant"`` = ``2 (L(θ₀+td) − L(θ₀) − t dᵀg) / t²`` and
            its ``"alpha_secant"``. Needs ``model=`` and ``loss_fn=``; ``L(θ₀)``
            is the closure's loss, so the closure should return
            ``loss_fn(model(x), y)`` itself.
        smoothing: Apply mode: factor ``β`` of an exponential moving average
            of ``ln α`` over the probed steps where ``α`` is defined; the
            multiplier applied is ``exp`` of it, recorded as
            ``extra["alpha_smoothed"]`` (default ``0.0``: no smoothing).
        damping: Apply mode: ``λ`` in ``α = −dᵀg / (dᵀCd + λ‖d‖²)``, the
            Levenberg-Marquardt damping of the primary curvature (default
            ``0.0``); the initial value when ``adaptive_damping``. Recorded as
            ``extra["damping"]``, the damped ``α`` as ``"alpha_damped"``.
        adaptive_damping: Apply mode: adapt ``λ`` after every probed step from
            ``ρ`` (K-FAC's rule: ``λ ← ω λ`` if ``ρ < 1/4``, ``λ ← λ / ω`` if
            ``ρ > 3/4``, within ``[1e-8, 1e8]``); computes ``ρ`` (one forward
            pass) even without ``track_rho``; needs ``model=`` and ``loss_fn=``
            (default ``False``).
        damping_factor: ``ω > 1`` of the adaptive rule (default ``1.5``).
        reuse_alpha: Apply mode with ``interval > 1``: the steps between probes
            take ``θ₀ + α_last d``, the last multiplier applied from a defined
            ``α``; ``False`` (default): the plain inner step.

        Order in apply mode: damping, then smoothing, then ``bounds``; an
        undefined result takes ``fallback``. :attr:`apply_state` holds ``λ``,
        the smoothed and the last ``α``; :meth:`state_dict` saves them.

        Why these defaults (all off): ``python benchmarks/training.py
        --ablation`` (digits and regression MLPs, Adam and SGD+momentum, lr
        1e-4..1e-1, 3 seeds, ``curvature="ggn-exact"``; see the README). With
        an exact curvature the plain ``α*`` trained best or as well as any
        option: smoothing 0.5 helped Adam on digits but hurt SGD and the
        regression, smoothing 0.9 diverged with SGD+momentum, fixed or adaptive
        damping changed nothing consistently (and ``adaptive_damping`` costs a
        forward pass), and ``reuse_alpha=True`` with ``interval=4`` trained
        Adam well but diverged with SGD+momentum (the momentum lengthens
        ``d`` while the reused ``α`` is stale). Apply mode needs an accurate
        curvature: with the block-diagonal ``"hessian"`` (``α*`` about 3×
        too long, ``benchmarks/accuracy.py``) every classification run
        diverged, damping included; use ``curvature="ggn-exact"``.

    Example:
        >>> import torch
        >>> from backpack import extend
        >>> model = extend(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        >>> loss_fn = extend(torch.nn.MSELoss())
        >>> probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> def closure():
        ...     probe.zero_grad()
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = probe.step(closure)
        >>> probe.history[-1].status
        'ok'
    """

    def __init__(
        self,
        optimizer: Optimizer,
        curvature: str | Sequence[str] = "hessian",
        mode: Mode = "observe",
        *,
        fallback: str | float = "inner",
        on_nonfinite: str = "skip",
        bounds: tuple[float, float] | None = None,
        interval: int = 1,
        history_size: int | None = None,
        model: nn.Module | None = None,
        distributed: bool | DistributedReducer | None = None,
        process_group: Any = None,
        loss_fn: Callable[..., Tensor] | None = None,
        per_block: bool = False,
        noise: bool = False,
        truth_every: int | None = None,
        track_rho: bool = False,
        smoothing: float = 0.0,
        damping: float = 0.0,
        adaptive_damping: bool = False,
        damping_factor: float = 1.5,
        reuse_alpha: bool = False,
    ) -> None:
        _check_inner(optimizer)
        self._curvatures: list[Curvature] = curvature_registry.resolve(curvature)
        self._model, self._loss_fn = check_model_and_loss(
            self._curvatures, model, loss_fn
        )
        for c in self._curvatures:
            c.bind(self._model, self._loss_fn)
        self.per_block = bool(per_block)
        self._noise = GradientNoise(model) if noise else None
        self.inner = optimizer
        self.mode = mode
        self.fallback = validate_fallback(fallback)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid on_nonfinite {on_nonfinite!r}: use one of "
                f"{NONFINITE_POLICIES}."
            )
        self.on_nonfinite = on_nonfinite
        self.bounds = validate_bounds(bounds)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Invalid interval {interval!r}: need an int >= 1.")
        self.interval = interval
        self._distributed = DistributedReducer.from_option(distributed, process_group)
        if history_size is not None and (
            isinstance(history_size, bool)
            or not isinstance(history_size, int)
            or history_size < 1
        ):
            raise ValueError(
                f"Invalid history_size {history_size!r}: need an int >= 1 or None "
                "(keep every record)."
            )
        self.history = History(maxlen=history_size)
        self._param_names: dict[int, str] = (
            {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        )
        self._step_count = 0
        self._pending: Pending | None = None
        self._monitor: BackwardMonitor | None = None
        self._pool = CopyPool()
        self._record_callbacks: list[Callable[[ProbeRecord], None]] = []
        self._options = ApplyOptions.validate(
            truth_every=truth_every,
            track_rho=track_rho,
            smoothing=smoothing,
            damping=damping,
            adaptive_damping=adaptive_damping,
            damping_factor=damping_factor,
            reuse_alpha=reuse_alpha,
            model=self._model,
            loss_fn=self._loss_fn,
        )
        self._apply_state = ApplyState(damping=self._options.damping)
        self._next_state: ApplyState | None = None
        # What Optimizer.__init__ would set up; calling it would assign over the
        # param_groups/state/defaults properties that forward to the inner optimizer.
        # OrderedDict as there: torch's RemovableHandle keeps a weak reference to it.
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    # ------------------------------------------------------------------ contract
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimizer's parameter groups (the live list)."""
        return self.inner.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's state (the live mapping)."""
        return self.inner.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's defaults."""
        return self.inner.defaults

    @property
    def mode(self) -> str:
        """``"observe"`` or ``"apply"``; may be changed between steps."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"Invalid mode {value!r}: use one of {MODES}.")
        primary = self._curvatures[0].name
        if (
            value == "apply"
            and getattr(self, "_mode", None) != "apply"
            and (primary not in EXACT_CURVATURES)
        ):
            warnings.warn(
                f"Apply mode with the primary curvature {primary!r}: approximate "
                "curvatures drop (mostly positive) cross-block terms, so their α* "
                "overshoots the line minimum (about 3x for the block-diagonal ones, "
                "100x for the diagonal ones, benchmarks/accuracy.py) and apply mode "
                "diverged with them in benchmarks/training.py. Use "
                "curvature='ggn-exact' (with model= and loss_fn=) for apply mode, "
                "or bounds=... to cap the step.",
                UserWarning,
                stacklevel=2,
            )
        self._mode = value

    @property
    def curvatures(self) -> tuple[str, ...]:
        """Names of the requested curvatures; the first is the primary one."""
        return tuple(c.name for c in self._curvatures)

    @property
    def loss_fn(self) -> Callable[..., Tensor] | None:
        """The loss passed as ``loss_fn=``, in a form whose calls the probe records.

        For a plain Python function this is a recording wrapper: call
        ``probe.loss_fn(output, target)`` in the closure. Modules and ``torch``
        functions are returned as they are (their calls are recorded anyway).
        """
        return self._loss_fn

    @property
    def distributed(self) -> DistributedReducer:
        """How the probe combines its numbers across processes (DDP)."""
        return self._distributed

    @property
    def step_count(self) -> int:
        """Number of completed ``step()`` calls (probed or not)."""
        return self._step_count

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters (delegates to the inner optimizer)."""
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer."""
        self.inner.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # An LR scheduler sets ``step`` on the instance, a wrapper holding a weak
        # reference to *this* probe: a copy stepping through it would step the
        # original. A pending capture holds this probe's gradients.
        state.pop("step", None)
        state.pop("_pending", None)
        state.pop("_monitor", None)  # hooks on the original's parameters
        state.pop("_pool", None)  # scratch buffers, refilled every step
        # Like torch.optim.Optimizer, a copy carries no hooks and no record
        # callbacks (they close over the original: a TensorBoard writer, a
        # lambda that does not pickle); register them on the copy.
        for name in _HOOK_DICTS:
            state.pop(name, None)
        state["_record_callbacks"] = []
        # Curvature backends hold BackPACK extensions that do not pickle; they
        # carry no state between steps, so rebuild them from their names.
        state["_curvatures"] = list(self.curvatures)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        curvatures = state.pop("_curvatures")
        self.__dict__.update(state)
        if all(isinstance(c, str) for c in curvatures):
            curvatures = curvature_registry.resolve(
                curvatures, self._model, self._loss_fn
            )
        self._curvatures = curvatures
        if self._model is not None:  # parameters are new objects after a copy
            self._param_names = {id(p): n for n, p in self._model.named_parameters()}
        self._pending = None
        self._monitor = None
        self._pool = CopyPool()
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.inner).splitlines())
        return (
            f"{type(self).__name__}(curvature={list(self.curvatures)}, "
            f"mode={self.mode!r}, fallback={self.fallback!r}, bounds={self.bounds}, "
            f"interval={self.interval}, steps={self._step_count},\n{inner}\n)"
        )

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Return the inner optimizer's state dict plus an ``"alphawrap"`` section.

        The result loads into a plain inner optimizer too (it ignores the extra
        key) and round-trips through ``torch.load(weights_only=True)``.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = dict(self.inner.state_dict())
        state[STATE_KEY] = {
            "format": STATE_FORMAT,
            "optimizer": type(self.inner).__qualname__,
            "step": self._step_count,
            "mode": self.mode,
            "curvature": list(self.curvatures),
            "history": self.history.state_dict(),
            "apply": self._apply_state.to_dict(),
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain inner one).

        A plain inner optimizer's state dict loads with a warning; history and
        step count then start empty. Everything is validated before anything is
        changed.

        Raises:
            ValueError: If the state dict is malformed, comes from a probe around
                another optimizer class, or does not match the parameter groups.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(
            state_dict
        ):
            raise ValueError(
                "Not an optimizer state dict: expected the keys 'state' and "
                "'param_groups' (from AlphaProbe.state_dict() or the inner "
                "optimizer's state_dict())."
            )
        section = state_dict.get(STATE_KEY)
        inner_state = {k: v for k, v in state_dict.items() if k != STATE_KEY}
        if section is None:
            self._check_plain_groups(inner_state)
            warnings.warn(
                "Loading a plain optimizer state dict into AlphaProbe: the inner "
                "optimizer resumes, the probe's history and step count start empty.",
                stacklevel=2,
            )
            history, step, mode = History(maxlen=self.history.maxlen), 0, self.mode
            apply_state = ApplyState(damping=self._options.damping)
        else:
            history, step, mode = self._parse_section(section)
            apply_state = self._parse_apply_state(section)
        self.inner.load_state_dict(inner_state)
        self.history, self._step_count, self.mode = history, step, mode
        self._apply_state = apply_state
        self._discard_pending()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _parse_apply_state(self, section: Any) -> ApplyState:
        """Apply-mode state of a state dict (absent in older ones: start afresh)."""
        if "apply" not in section:
            return ApplyState(damping=self._options.damping)
        try:
            return ApplyState.from_dict(section["apply"])
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"The state dict's {STATE_KEY!r} section has a corrupted 'apply' "
                f"entry ({error})."
            ) from error

    def _parse_section(self, section: Any) -> tuple[History, int, str]:
        try:
            if section["format"] != STATE_FORMAT:
                raise ValueError(f"unknown format {section['format']!r}")
            saved = section["optimizer"]
            step, mode = int(section["step"]), section["mode"]
            curvature = list(section.get("curvature", self.curvatures))
            history = History.from_state_dict(section["history"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(
                f"The state dict's {STATE_KEY!r} section is corrupted ({error}). Load "
                "the inner optimizer alone with probe.inner.load_state_dict(...) if "
                "the probe's history is not needed."
            ) from error
        if saved != type(self.inner).__qualname__:
            raise ValueError(
                f"The state dict was saved by an AlphaProbe around {saved}, but this "
                f"probe wraps {type(self.inner).__qualname__}."
            )
        if mode not in MODES:
            raise ValueError(f"The state dict's mode {mode!r} is not one of {MODES}.")
        if curvature != list(self.curvatures):
            warnings.warn(
                f"The state dict was saved with curvature {section.get('curvature')}; "
                f"this probe uses {list(self.curvatures)}. Continuing with the latter.",
                stacklevel=3,
            )
        if history.maxlen != self.history.maxlen:
            history = History(history, maxlen=self.history.maxlen)
        return history, step, mode

    def _check_plain_groups(self, inner_state: dict[str, Any]) -> None:
        """Refuse a plain state dict whose groups lack this optimizer's settings.

        ``torch.optim`` loads any state dict with matching group sizes, so one from
        another optimizer class (SGD's into Adam) would only fail at the next step,
        after the load. Numeric hyperparameters (``lr``, ``betas``, ``momentum``...)
        exist in every version of a class; flags that newer versions add are
        filled in by ``torch.optim`` and are not required here.
        """
        required = {
            k
            for k, v in self.inner.defaults.items()
            if not isinstance(v, bool) and isinstance(v, (int, float, tuple, Tensor))
        }
        groups = inner_state.get("param_groups")
        if not isinstance(groups, list):
            return  # the inner optimizer's own load reports it
        for i, group in enumerate(groups):
            missing = sorted(required - set(group)) if isinstance(group, dict) else []
            if missing:
                raise ValueError(
                    f"The state dict's parameter group {i} lacks {missing}, "
                    f"hyperparameters of {type(self.inner).__name__}: it comes from "
                    "another optimizer class. Load a state dict saved by the same "
                    "inner optimizer class."
                )

    # ------------------------------------------------------------------- steps
    def capture(self, loss_scale: float | Any | None = None) -> Capture:
        """Context manager for loops that call ``backward()`` themselves.

        Run the forward and ``loss.backward()`` inside it, then call ``step()``
        without a closure (``GradScaler.step(probe)`` does). If the loss was
        scaled (mixed precision), pass the scale, or the ``GradScaler``, as
        ``loss_scale`` so the curvature is unscaled like the gradients.

        Example:
            >>> import torch
            >>> from backpack import extend
            >>> model = extend(torch.nn.Linear(3, 1))
            >>> probe = AlphaProbe(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> with probe.capture() as cap:
            ...     cap.loss = extend(torch.nn.MSELoss())(
            ...         model(torch.randn(4, 3)), torch.zeros(4, 1))
            ...     cap.loss.backward()
            >>> _ = probe.step()
            >>> len(probe.history)
            1
        """
        return Capture(self, loss_scale)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run the closure, probe ``α*`` and take the (rescaled) inner step.

        Args:
            closure: Zeroes gradients, computes the loss, calls ``backward()`` and
                returns the loss. Omit it after a :meth:`capture` block.

        Returns:
            The closure's return value (``None`` for a closure-free step).

        Raises:
            ClosureError: The closure returned no scalar loss or did not call
                backward; ``step()`` was called with neither closure nor capture,
                or inside this probe's own closure or capture block.
            CurvatureError: A curvature cannot serve this model or loss.
            ProbeError: Other invalid input (mixed maximize, sparse gradients...).
            Nothing is changed when any of them is raised.
        """
        try:
            return self._step(closure)
        finally:
            self._release_monitor()

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        if self._will_probe():  # between probes the inner optimizer decides
            self._check_groups()
        if closure is None:
            pending, self._pending = self._pending, None
            if pending is None:
                raise ClosureError(
                    "step() needs a closure or a preceding capture() block.\n"
                    + CLOSURE_FREE_HELP
                )
            pending.release()
            if self._will_probe():  # unprobed steps use the gradients as they are
                try:
                    pending.check_fresh()
                except ClosureError:
                    self._cleanup(self._params())  # drop the stale recording
                    raise
            result = None
        else:
            if not callable(closure):
                raise TypeError(
                    f"closure must be callable, got {type(closure).__name__}."
                )
            self._discard_pending()
            if not self._will_probe():
                # Between probes (interval > 1) the probe is the inner optimizer:
                # no BackPACK, no snapshots, no record.
                stage = "the closure raised"
                try:
                    with torch.enable_grad():
                        result = closure()
                    stage = ""  # the inner step (the message is built on failure)
                    self._unprobed_step()
                except BaseException as error:
                    stage = stage or self._inner_stage()
                    note(error, f"{stage} on an unprobed step", undone=False)
                    raise
                self._step_count += 1
                return result
            session = self._closure_session().__enter__()
            try:
                with torch.enable_grad():  # the torch.optim convention
                    result = closure()
            except BaseException as error:
                session._close()
                raise session.fail(error) from None
            pending = session.finish(None, result, require_loss=True)
        if not self._will_probe():
            self._unprobed_step()
            self._step_count += 1
            return result
        self._probe_step(pending)
        return result

    def _probe_step(self, pending: Pending) -> None:
        self._distributed.start_step()
        params = self._params()
        transaction: StepTransaction | None = None
        stage = "taking the snapshot of parameters and optimizer state raised"
        pool = self._copy_pool()  # decided once for the step's copies
        try:
            transaction = StepTransaction(self.inner, params, pool)
            stage = self._inner_stage()
            transaction.take_inner_step()
            transaction.swap()  # parameters now hold θ₀ (BackPACK reads live weights)
            stage = "evaluating the step's slope and curvatures raised"
            with torch.no_grad():
                numbers = self._evaluate(params, transaction.directions, pending, pool)
            stage = "deciding the step raised"
            self._next_state = self._apply_state  # apply-mode state, committed below
            record, multiplier = self._decide(numbers, pending)
            if multiplier is not None and record.action != "skip":
                if not _update_is_finite(params, transaction.directions, multiplier):
                    record, multiplier = self._overflowing(record)
            stage = "re-evaluating the loss along d (truth_every/track_rho) raised"
            record = self._measure_along(
                record, multiplier, pending, params, transaction
            )
            stage = "writing the parameters raised"
            if multiplier is None:
                transaction.commit_inner()
            elif multiplier == 0.0 and record.action == "skip":
                transaction.rollback()
            else:
                transaction.commit_scaled(multiplier)
            stage = "recording the step in the history raised"
            self.history.append(record)
            self._apply_state = self._next_state
            self._step_count += 1
        except BaseException as error:
            # Undo first: an interrupt while waiting in abort's collective must not
            # leave the parameters pointed at θ₀'s (possibly kept) buffer.
            try:
                if transaction is not None:
                    transaction.rollback()
                pending.backup.restore()
            finally:
                self._distributed.abort(error)  # other processes must not wait
            if not noted(error):
                note(error, stage)
            translated = (
                translate_backpack_error(error, self._curvatures, self._alternatives())
                if isinstance(error, Exception)
                else None
            )
            if translated is not None:
                raise translated from error
            raise
        finally:
            self._cleanup(params)
            self._pool.release_unused()
        for callback in self._record_callbacks:
            callback(record)

    def add_record_callback(
        self, callback: Callable[[ProbeRecord], None]
    ) -> Callable[[], None]:
        """Call ``callback(record)`` after each probed step has completed.

        Callbacks run after the step is committed; an exception in one propagates
        but does not undo the step. Returns a function that removes the callback.
        """
        self._record_callbacks.append(callback)
        return lambda: self._record_callbacks.remove(callback)

    def _evaluate(
        self,
        params: list[Tensor],
        directions: list[Tensor],
        pending: Pending,
        pool: CopyPool | None,
    ) -> list[float]:
        """All scalars of the step with one device-to-host transfer.

        Returns ``[loss, dᵀg, ‖d‖², ‖g‖², dᵀC₁d, dᵀC₂d, ...]``.
        """
        acc = self._accumulate_dtype(params)
        device = directions[0].device
        grads = [p.grad if i in pending.reached else None for i, p in enumerate(params)]
        slope, dd, gg = step_products(directions, grads, acc, pool)
        ctx = self._context(params, directions, pending.reached, batch=pending.batch)
        quads = []  # one value per block for blockwise curvatures, else a scalar
        for c in self._curvatures:
            try:
                quads.append(c.quadratic(ctx))
            except BaseException as error:
                note(error, f"computing curvature {c.name!r} ({c.description}) raised")
                raise
        scale = pending.loss_scale
        if scale is not None:
            scale = scale.get_scale() if hasattr(scale, "get_scale") else scale
            quads = [
                q / scale if c.scales_with_loss else q
                for c, q in zip(self._curvatures, quads)
            ]
        curv = [q if q.dim() == 0 else q.sum() for q in quads]
        loss = (
            pending.loss.detach().to(device=device, dtype=acc).reshape(())
            if pending.loss is not None
            else torch.full((), math.nan, dtype=acc, device=device)
        )
        packed = torch.stack([loss, slope, dd, gg, *curv])
        shared = [1, 2, 3]
        squared = []  # variances of local means: weight² under DDP
        if self.per_block or self._noise is not None:  # opt-in extras, same tensor
            extra, extra_shared = self._extra_tensors(ctx, quads, scale)
            shared += [packed.numel() + k for k in extra_shared]
            if "noise" in self._extra_layout:
                squared.append(packed.numel() + self._extra_layout["noise"][0])
            packed = torch.cat([packed, *extra])
        # Checks of the batch that need the device's answer ride along: any flag
        # set on any process refuses the step (the mean is then nonzero).
        refusals = [r for c in self._curvatures if (r := c.deferred_refusal())]
        if refusals:
            flags = torch.stack(
                [flag.to(device=device, dtype=acc) for flag, _ in refusals]
            )
            packed = torch.cat([packed, flags])
        # Under torch.distributed: one all_reduce that averages the local entries
        # (loss, curvature) and takes dᵀg, ‖d‖², ‖g‖² (already global) from rank 0.
        packed = self._distributed.reduce(packed, shared=shared, squared=squared)
        numbers = self._distributed.unpack(packed.tolist())
        if refusals:
            numbers, flags = numbers[: -len(refusals)], numbers[-len(refusals) :]
            for value, (_, message) in zip(flags, refusals):
                if value:
                    raise CurvatureError(message)
        return numbers

    def _decide(
        self, numbers: list[float], pending: Pending
    ) -> tuple[ProbeRecord, float | None]:
        """Turn the step's scalars into a record and the multiplier to apply.

        Returns:
            The record and the multiplier of ``d`` to take (``None``: keep the
            inner step bit for bit; ``0.0`` with action ``"skip"``: roll back).
        """
        head = 4 + len(self._curvatures)
        loss, slope, dd, gg = numbers[:4]
        curv, rest = numbers[4:head], numbers[head:]
        maximize = self._maximize()
        finite = all(math.isfinite(v) for v in (slope, dd, gg)) and (
            pending.loss is None or math.isfinite(loss)
        )
        alphas: dict[str, float | None] = {}
        statuses: dict[str, str] = {}
        for c, q in zip(self._curvatures, curv):
            if not finite:
                alpha, status = None, Status.NONFINITE
            elif dd == 0.0:
                alpha, status = None, Status.ZERO_DIRECTION
            else:
                alpha, status = optimal_step(slope, q, maximize=maximize)
            alphas[c.name], statuses[c.name] = alpha, status.value
        primary = self._curvatures[0].name
        multiplier: float | None = None
        action, applied = "inner", 1.0
        apply_extra: dict[str, Any] = {}
        if self.mode == "apply":
            status, proposed, apply_extra = self._propose(
                statuses[primary], alphas[primary], slope, curv[0], dd
            )
            if status == Status.OK:
                applied = clip_to_bounds(proposed, self.bounds)  # type: ignore[arg-type]
                multiplier, action = applied, "alpha"
            else:
                policy = (
                    self.on_nonfinite if status == Status.NONFINITE else self.fallback
                )
                last = self._next_state.last_alpha if self._next_state else None
                if policy == "skip":
                    multiplier, action, applied = 0.0, "skip", 0.0
                elif policy == "last" and last is not None:
                    multiplier, action, applied = last, "fallback", last
                elif isinstance(policy, float):
                    multiplier, action, applied = policy, "fallback", policy
        record = ProbeRecord(
            step=self._step_count,
            loss=loss if pending.loss is not None else None,
            mode=self.mode,
            slope=slope,
            direction_norm=math.sqrt(dd) if dd >= 0 else math.nan,
            grad_norm=math.sqrt(gg) if gg >= 0 else math.nan,
            curvatures={c.name: q for c, q in zip(self._curvatures, curv)},
            alphas=alphas,
            statuses=statuses,
            primary=primary,
            applied=applied,
            action=action,
            lrs=tuple(_as_float(g.get("lr")) for g in self.param_groups),
            extra=self._extra_entries(rest, curv, statuses) if rest else {},
        )
        record.extra.update(apply_extra)
        return record, multiplier

    def _overflowing(self, record: ProbeRecord) -> tuple[ProbeRecord, float | None]:
        """Record and multiplier when ``θ₀ + α d`` would not be finite."""
        statuses = {**record.statuses, record.primary: Status.NONFINITE.value}
        if self.on_nonfinite == "inner":
            action, applied, multiplier = "inner", 1.0, None
        else:
            action, applied, multiplier = "skip", 0.0, 0.0
        record = dataclasses.replace(
            record, statuses=statuses, action=action, applied=applied
        )
        return record, multiplier

    # ------------------------------------------ apply-mode options, truth and ρ
    @property
    def apply_state(self) -> dict[str, float | None]:
        """What apply mode carries between steps (saved by :meth:`state_dict`).

        ``damping``: the current λ (adapted by ``adaptive_damping``);
        ``smoothed_alpha``: :math:`e^s`, the EMA of ``ln α`` (``smoothing``),
        ``None`` before the first defined ``α``; ``last_alpha``: the last
        multiplier applied from a defined ``α`` (reused between probes and by
        ``fallback="last"``).
        """
        state = self._apply_state
        return {
            "damping": state.damping,
            "smoothed_alpha": None
            if state.log_alpha is None
            else math.exp(state.log_alpha),
            "last_alpha": state.last_alpha,
        }

    def _replays_loss(self) -> bool:
        """Whether this (probed) step re-evaluates the loss along ``d``."""
        return self._rho_due() or self._options.truth_due(self._step_count)

    def _rho_due(self) -> bool:
        """ρ is measured when asked for, or when it drives damping (apply mode)."""
        options = self._options
        return options.track_rho or (options.adaptive_damping and self.mode == "apply")

    def _propose(
        self,
        status: str,
        alpha: float | None,
        slope: float,
        curvature: float,
        dd: float,
    ) -> tuple[str, float | None, dict[str, Any]]:
        """The apply-mode ``α`` before bounds: damped, then smoothed.

        Returns its status, the value and the record entries. Updates the step's
        pending state (the EMA) that :meth:`_probe_step` commits on success.
        """
        options, state = self._options, self._next_state or self._apply_state
        extra: dict[str, Any] = {}
        damped = options.damping > 0 or options.adaptive_damping
        if damped:
            extra["damping"] = state.damping
            if status not in (Status.NONFINITE, Status.ZERO_DIRECTION):
                maximize = self._maximize()
                alpha, result = optimal_step(
                    slope,
                    damped_curvature(curvature, dd, state.damping, maximize=maximize),
                    maximize=maximize,
                )
                status = result.value
            extra["alpha_damped"] = alpha
        if options.smoothing > 0:
            if status == Status.OK:
                log_alpha = smooth_log_alpha(state.log_alpha, alpha, options.smoothing)  # type: ignore[arg-type]
                state = dataclasses.replace(state, log_alpha=log_alpha)
                alpha = math.exp(log_alpha)
            extra["alpha_smoothed"] = alpha if status == Status.OK else None
        self._next_state = state
        return status, alpha, extra

    def _measure_along(
        self,
        record: ProbeRecord,
        multiplier: float | None,
        pending: Pending,
        params: list[Tensor],
        transaction: StepTransaction,
    ) -> ProbeRecord:
        """Line-search truth and ρ from the loss along ``d`` (parameters hold ``θ₀``).

        Also records the last applied ``α`` and adapts λ, in the step's pending
        state.
        """
        options = self._options
        state = self._next_state or self._apply_state
        if record.mode == "apply" and record.action == "alpha":
            state = dataclasses.replace(state, last_alpha=record.applied)
        extra: dict[str, Any] = {}
        if pending.batch is not None and self._replays_loss():
            objective = BatchObjective(
                pending.batch, params, params, transaction.directions
            )
            h = self._reduced(objective, params)
            maximize = self._maximize()
            if options.truth_due(record.step):
                found = line_search(h, maximize=maximize)
                extra.update(
                    alpha_line=found.alpha,
                    loss_line=found.loss,
                    loss_line0=found.loss0,
                    line_status=found.status,
                    line_evaluations=found.evaluations,
                )
            if self._rho_due():
                t = 1.0 if multiplier is None else multiplier
                if record.action == "skip":
                    t = 0.0
                rho = change = predicted = secant = alpha_secant = new = None
                if t != 0.0:
                    loss0 = record.loss
                    if loss0 is None or not math.isfinite(loss0):
                        loss0 = h(0.0)
                    new = h(t)
                    change = new - loss0
                    predicted = predicted_change(
                        t, record.slope, record.curvatures[record.primary]
                    )
                    rho = reduction_ratio(change, predicted, maximize=maximize)
                    secant = secant_curvature(change, t, record.slope)
                    if secant is not None:
                        alpha_secant = optimal_step(
                            record.slope, secant, maximize=maximize
                        )[0]
                extra.update(
                    rho=rho,
                    loss_new=new,
                    loss_change=change,
                    predicted_change=predicted,
                    curvature_secant=secant,
                    alpha_secant=alpha_secant,
                )
                if record.mode == "apply" and options.adaptive_damping:
                    damping = adapt_damping(
                        state.damping,
                        rho,
                        factor=options.damping_factor,
                        bounds=options.DAMPING_BOUNDS,
                    )
                    state = dataclasses.replace(state, damping=damping)
        self._next_state = state
        if extra:
            record = dataclasses.replace(record, extra={**record.extra, **extra})
        return record

    def _reduced(
        self, objective: BatchObjective, params: list[Tensor]
    ) -> Callable[[float], float]:
        """``h(α)`` as a float, averaged over processes under torch.distributed.

        Every process evaluates the same ``α`` sequence (the reduced values are
        equal everywhere), one collective per evaluation.
        """
        acc = self._accumulate_dtype(params)

        reducer = self._distributed

        def h(alpha: float) -> float:
            value = objective(alpha).to(acc).reshape(1)
            # Keep the layout of the step's main collective, which a later
            # failure (DistributedReducer.abort) must match.
            layout = getattr(reducer, "_layout", None)
            packed = reducer.reduce(value)
            result = float(reducer.unpack(packed.tolist())[0])
            if hasattr(reducer, "_layout"):
                reducer._layout = layout
            return result

        return h

    def _unprobed_step(self) -> None:
        """The inner step between probes; in apply mode rescaled by the last ``α``.

        With ``reuse_alpha`` (apply mode, after a first applied ``α``): takes
        ``θ₀ + α_last·d`` with the same arithmetic as a probed step, or the inner
        step if that would not be finite.
        """
        alpha = self._apply_state.last_alpha
        if (
            self.mode != "apply"
            or not self._options.reuse_alpha
            or alpha is None
            or alpha == 1.0
        ):
            self.inner.step()
            return
        params = self._params()
        with torch.no_grad():
            theta0 = [p.detach().clone() for p in params]
        self.inner.step()
        with torch.no_grad():
            directions = torch._foreach_sub([p.detach() for p in params], theta0)
            if _update_is_finite(theta0, directions, alpha):
                for p, t0, d in zip(params, theta0, directions):
                    torch.add(t0, d, alpha=alpha, out=p.data)

    def _discard_pending(self) -> None:
        """Forget an unconsumed capture (and stop watching its gradients)."""
        if self._pending is not None:
            self._pending.release()
            self._pending = None

    def _inner_stage(self) -> str:
        return f"the inner optimizer {type(self.inner).__name__} raised during its step"

    # ----------------------------------------------------------------- helpers
    def _closure_session(self) -> ClosureSession:
        if self._monitor is not None and self._monitor.active:
            # The recordings (hooks, BackPACK's quantities, the batch) belong to
            # the session already running; a second one would overwrite them.
            raise ClosureError(
                "step() or capture() was called inside this probe's own closure or "
                "capture() block. Run one backward pass per step: the closure (or "
                "the capture block) must not step or capture with the same probe."
            )
        return ClosureSession(self)

    def _backward_monitor(self, params: list[Tensor]) -> BackwardMonitor:
        """The monitor of which parameters a backward reached, kept across steps."""
        monitor = self._monitor
        if monitor is None or not monitor.serves(params):
            if monitor is not None:
                monitor.close()
            monitor = self._monitor = BackwardMonitor(params)
        return monitor

    def _release_monitor(self) -> None:
        """Between probes (``interval > 1``) no hook of the probe stays behind."""
        if self.interval > 1 and self._monitor is not None and not self._monitor.active:
            self._monitor.close()
            self._monitor = None

    def _copy_pool(self) -> CopyPool | None:
        """The step copies' buffers, kept while every step is probed.

        Between probes (``interval > 1``) they would only hold memory. Below
        :data:`POOL_MIN` parameter elements in all, no copy of the step (θ₀, d,
        the gradients, the packed ``d`` and ``g``, an optimizer state shaped
        like the parameters) is large enough to keep, and the pool's per-tensor
        checks would only cost time: plain clones (also for a state tensor
        larger than the parameters, which only costs speed).
        """
        if self.interval > 1:
            self._pool.clear()
            return None
        total = sum(p.numel() for g in self.param_groups for p in g["params"])
        if total < POOL_MIN:  # (the step's end releases any unused buffer)
            return None
        self._pool.small = total >= POOL_TOTAL
        return self._pool

    def _will_probe(self) -> bool:
        return self._step_count % self.interval == 0

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _names(self) -> list[str]:
        names = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                names.append(self._param_names.get(id(p), f"group{gi}.param{pi}"))
        return names

    def _context(
        self,
        params: list[Tensor],
        directions: list[Tensor],
        reached: set[int],
        batch: Any = None,
    ) -> EvaluationContext:
        return EvaluationContext(
            params=params,
            directions=directions,
            reached=reached,
            names=_LazyNames(self._names),
            accumulate_dtype=self._accumulate_dtype(params),
            batch=batch,
            curvatures=self._curvatures,
        )

    def _batch_recorder(self) -> BatchRecorder | None:
        """Records the closure's model and loss calls, if an exact curvature needs them.

        Also on steps that re-evaluate the loss (``truth_every``, ``track_rho``,
        ``adaptive_damping``).
        """
        if not any(c.needs_batch for c in self._curvatures) and not (
            self._replays_loss()
        ):
            return None
        loss_fn = self._loss_fn
        wrapper = loss_fn if isinstance(loss_fn, RecordingLoss) else None
        return BatchRecorder(
            self._model,  # type: ignore[arg-type]
            wrapper.fn if wrapper is not None else loss_fn,  # type: ignore[arg-type]
            wrapper=wrapper,
            intercept=wrapper is None and not isinstance(loss_fn, nn.Module),
        )

    def _extra_tensors(
        self, ctx: EvaluationContext, quads: list[Tensor], scale: Any
    ) -> tuple[list[Tensor], list[int]]:
        """Per-block and noise numbers, appended to the step's packed tensor.

        Returns the 1-d tensors and the offsets (among them) of the entries that
        are already global under DDP. Sets the layout :meth:`_extra_entries` reads.
        """
        tensors: list[Tensor] = []
        shared: list[int] = []
        layout: dict[str, Any] = {}
        offset = 0
        if self.per_block:
            global_, local = BlockBreakdown().tensors(ctx, self._curvatures, quads)
            for t in global_:
                shared += range(offset, offset + t.numel())
                offset += t.numel()
            size = sum(t.numel() for t in global_)
            layout["blocks"] = (0, size, size + sum(t.numel() for t in local))
            offset += sum(t.numel() for t in local)
            tensors += [*global_, *local]
        if self._noise is not None:
            noise, batch_size = self._noise.tensors(ctx, scale)
            layout["noise"] = (offset, offset + 1, batch_size)
            offset += 1
            tensors += noise
        self._extra_layout = layout
        return tensors, shared

    def _extra_entries(
        self, rest: list[float], curv: list[float], statuses: dict[str, str]
    ) -> dict[str, Any]:
        """``record.extra`` from the extra entries of the packed numbers."""
        layout = self._extra_layout
        extra: dict[str, Any] = {}
        if "blocks" in layout:
            start, mid, end = layout["blocks"]
            extra.update(
                BlockBreakdown.extra(
                    rest[start:mid],
                    rest[mid:end],
                    names=self._names(),
                    group_sizes=[len(g["params"]) for g in self.param_groups],
                    curvature_names=[c.name for c in self._curvatures if c.blockwise],
                    maximize=self._maximize(),
                )
            )
        if "noise" in layout:
            start, end, batch_size = layout["noise"]
            names = [c.name for c in self._curvatures]
            extra["noise"] = GradientNoise.extra(
                rest[start:end], batch_size, dict(zip(names, curv)), statuses
            )
        return extra

    @staticmethod
    def _accumulate_dtype(params: Iterable[Tensor]) -> torch.dtype:
        dtype = torch.float32
        for p in params:
            if p.dtype is not dtype:
                dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _alternatives(self) -> list[str]:
        return [
            name
            for name, cls in curvature_registry.REGISTRY.items()
            if not cls.needs_backpack_modules
        ]

    def _cleanup(self, params: Sequence[Tensor]) -> None:
        for c in self._curvatures:
            c.cleanup(params)
        if self._noise is not None:
            self._noise.cleanup(params)

    def _maximize(self) -> bool:
        return bool(self.param_groups[0].get("maximize", False))

    def _check_groups(self) -> None:
        flags = {bool(g.get("maximize", False)) for g in self.param_groups}
        if len(flags) > 1:
            raise ProbeError(
                "Parameter groups disagree on 'maximize': the probe models one "
                "objective, so all groups must minimise or all must maximise."
            )
        devices = {p.device for p in self._params()}
        if len(devices) > 1:
            raise ProbeError(
                "The parameters live on several devices "
                f"({sorted(map(str, devices))}); "
                "AlphaProbe needs all parameters of the wrapped optimizer on one "
                "device. Move the model with model.to(device) before creating the "
                "optimizer."
            )


_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
"""The hook registries of the Optimizer contract (OrderedDict, as torch uses)."""


class _LazyNames(Sequence[str]):
    """The parameters' display names, built on first use.

    Only error messages and the per-block breakdown read them; most probed steps
    never do, and building them costs a walk over every parameter group.
    """

    def __init__(self, build: Callable[[], list[str]]) -> None:
        self._build = build
        self._names: list[str] | None = None

    def _get(self) -> list[str]:
        if self._names is None:
            self._names = self._build()
        return self._names

    def __getitem__(self, index: Any) -> Any:
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())


def _update_is_finite(
    theta0: Sequence[Tensor], directions: Sequence[Tensor], alpha: float
) -> bool:
    """Whether ``θ₀ + α d`` is finite in the parameters' own dtype."""
    if any(abs(alpha) > torch.finfo(t.dtype).max for t in theta0):
        return False  # α itself does not fit (torch.add would refuse it)
    with torch.no_grad():
        checks = [
            torch.isfinite(torch.add(t, d, alpha=alpha)).all()
            for t, d in zip(theta0, directions)
        ]
    return bool(torch.stack(checks).all())


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)


def _check_inner(optimizer: Any) -> None:
    if isinstance(optimizer, type):
        raise TypeError(
            f"AlphaProbe wraps an optimizer instance, got the class "
            f"{optimizer.__name__}: use "
            f"AlphaProbe({optimizer.__name__}(model.parameters(), ...))."
        )
    if isinstance(optimizer, AlphaProbe):
        raise TypeError(
            "AlphaProbe cannot wrap another AlphaProbe: request several curvatures "
            "from one probe instead, e.g. "
            "AlphaProbe(opt, curvature=('hessian', 'ggn'))."
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"AlphaProbe wraps a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            "LBFGS is not supported: it re-evaluates the closure several times per "
            "step at other parameters, so its update has no single gradient and "
            "curvature at θ₀. Use it unwrapped."
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError(
            "SparseAdam is not supported: it needs sparse gradients, which BackPACK "
            "cannot propagate curvature through. Use Adam with dense gradients."
        )
    if not any(len(g["params"]) for g in optimizer.param_groups):
        raise ValueError("The inner optimizer has no parameters.")
