r"""``AlphaProbe``: the optimizer wrapper, its contract and the step orchestration.

Replace ``optim.Adam(...)`` with ``AlphaProbe(optim.Adam(...))`` and keep
training. Each probed ``step(closure)``

1. runs the closure once, inside a BackPACK context that collects every requested
   curvature in the same backward pass (gradients are restored if it fails);
2. lets the inner optimizer take its real step and measures its update
   :math:`d = \theta_1 - \theta_0`;
3. swaps :math:`\theta_0` back in (no copy) and evaluates :math:`d^\top g` and
   :math:`d^\top C d` for each curvature, with a single device-to-host transfer;
4. observe mode keeps :math:`\theta_1`; apply mode writes
   :math:`\theta_0 + \alpha^* d` (or a documented fallback);
5. appends a :class:`~alphawrap.history.ProbeRecord` to :attr:`AlphaProbe.history`.

Any exception during 1–5 restores parameters, gradients, inner state and history.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from backpack import backpack
from torch import Tensor, nn
from torch.optim import Optimizer

from alphawrap import curvature as curvature_registry
from alphawrap.curvature import Curvature, EvaluationContext
from alphawrap.curvature.blockdiag import translate_backpack_error
from alphawrap.direction import BackwardMonitor, GradBackup, StepTransaction
from alphawrap.distributed import DistributedReducer
from alphawrap.errors import ClosureError, ProbeError
from alphawrap.history import History, ProbeRecord
from alphawrap.quadratic import Status, clip_to_bounds, optimal_step

Mode = Literal["observe", "apply"]
MODES: tuple[str, ...] = ("observe", "apply")
FALLBACKS: tuple[str, ...] = ("inner", "skip")
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "inner")
STATE_KEY = "alphawrap"
STATE_FORMAT = 1

_CLOSURE_FREE_HELP = (
    "Either pass a closure that zeroes the gradients, computes the loss, calls "
    "loss.backward() and returns the loss:\n"
    "    probe.step(closure)\n"
    "or run your own backward inside the probe's capture context, then step:\n"
    "    with probe.capture() as cap:\n"
    "        loss = loss_fn(model(x), y)\n"
    "        loss.backward()\n"
    "        cap.loss = loss  # optional, recorded in the history\n"
    "    probe.step()"
)


def _validate_fallback(fallback: str | float) -> str | float:
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


def _validate_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
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


@dataclass
class _Pending:
    """Result of a closure (or a capture) that the step consumes."""

    loss: Tensor | None
    reached: set[int]
    backup: GradBackup
    loss_scale: Any = None


class Capture:
    """Context manager returned by :meth:`AlphaProbe.capture`.

    Attributes:
        loss: Set it to the loss tensor inside the block to record the loss.
    """

    def __init__(self, probe: AlphaProbe, loss_scale: Any) -> None:
        self._probe = probe
        self._loss_scale = loss_scale
        self.loss: Tensor | None = None

    def __enter__(self) -> Capture:
        self._probe._pending = None
        self._session = self._probe._closure_session()
        self._session.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        pending = self._session.finish(exc, self.loss, require_loss=False)
        pending.loss_scale = self._loss_scale
        self._probe._pending = pending
        return False


class _ClosureSession:
    """Runs user code that calls backward, inside the probe's BackPACK context."""

    def __init__(self, probe: AlphaProbe) -> None:
        self.probe = probe
        self.params = probe._params()
        self.probing = probe._will_probe()

    def __enter__(self) -> _ClosureSession:
        self.backup = GradBackup(self.params)
        self.probe._cleanup(self.params)
        self.monitor = BackwardMonitor(self.params).__enter__()
        extensions = (
            [ext for c in self.probe._curvatures for ext in c.backpack_extensions()]
            if self.probing
            else []
        )
        self._backpack = backpack(*extensions)
        self._backpack.__enter__()
        return self

    def _close(self) -> None:
        self._backpack.__exit__(None, None, None)
        self.monitor.__exit__(None, None, None)

    def fail(self, error: BaseException) -> BaseException:
        """Undo what the user code did and return the error to raise."""
        self.backup.restore()
        self.probe._cleanup(self.params)
        translated = (
            translate_backpack_error(
                error, self.probe._curvatures, self.probe._alternatives()
            )
            if isinstance(error, Exception)
            else None
        )
        if translated is not None:
            translated.__cause__ = error
            return translated
        if hasattr(error, "add_note") and not isinstance(error, ProbeError):
            error.add_note(
                "alphawrap: raised inside the closure of a probe step; parameters, "
                "gradients, optimizer state and history are unchanged."
            )
        return error

    def finish(
        self, exc: BaseException | None, loss: Any, *, require_loss: bool
    ) -> _Pending:
        """Close the context, validate what happened, return the pending step."""
        self._close()
        if exc is not None:
            raise self.fail(exc)
        try:
            loss_tensor = self.probe._check_loss(
                loss, require_loss, backward_ran=bool(self.monitor.reached)
            )
            if not self.monitor.reached:
                raise ClosureError(
                    "The closure did not call backward(): no parameter received a "
                    "gradient. " + _CLOSURE_FREE_HELP
                )
            for i in self.monitor.reached:
                if self.params[i].grad is not None and self.params[i].grad.is_sparse:
                    raise ProbeError(
                        f"Parameter {self.probe._names()[i]} has a sparse gradient; "
                        "BackPACK and AlphaProbe need dense gradients (use "
                        "nn.Embedding(sparse=False))."
                    )
            if self.probing:
                ctx = self.probe._context(self.params, [], self.monitor.reached)
                for c in self.probe._curvatures:
                    c.check_backward(ctx)
        except BaseException as error:
            if self.probing and self.monitor.reached:
                # Backward ran (and DDP's gradient all_reduce with it): the other
                # processes are heading for the probe's collective; tell them.
                self.probe._distributed.start_step()
                self.probe._distributed.abort(error)
            raise self.fail(error) from None
        return _Pending(loss_tensor, set(self.monitor.reached), self.backup)


class AlphaProbe(Optimizer):
    r"""Measure, and optionally apply, the optimal step length along any update.

    Wraps an inner ``torch.optim`` optimizer. On each probed step it computes,
    for the update :math:`d` the inner optimizer makes and the mini-batch
    gradient :math:`g` at :math:`\theta_0`,

    .. math:: \alpha^* = -\frac{d^\top g}{d^\top C d}

    for every requested curvature :math:`C`, from a single backward pass.

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
            takes ``θ₀ + c·d``.
        on_nonfinite: What apply mode does when loss, gradient, direction or
            curvature is NaN/inf: ``"skip"`` (default; no step, inner state
            restored) or ``"inner"`` (take the inner step anyway). Observe mode
            always takes the inner step, exactly as the unwrapped optimizer.
        bounds: Optional ``(low, high)`` clipping of the applied ``α``.
        interval: Probe every ``interval``-th step (1: every step). Steps in
            between run the closure without BackPACK and take the plain inner
            step; they are counted in :attr:`step_count` but not recorded.
        history_size: Keep at most this many records (``None``: all).
        model: Optional model whose ``named_parameters()`` name the parameters in
            error messages.
        distributed: Under ``torch.distributed`` (DDP), combine the per-process
            loss and curvature with one ``all_reduce`` per probed step so every
            process gets the same ``α*`` (see :mod:`alphawrap.distributed`).
            ``None`` (default): whenever a process group with more than one
            process is initialised; ``False``: never; ``True``: require it; or a
            :class:`~alphawrap.distributed.DistributedReducer` for more options.
        process_group: The process group to reduce over (``None``: the default).

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
    ) -> None:
        _check_inner(optimizer)
        self._curvatures: list[Curvature] = curvature_registry.resolve(curvature)
        self.inner = optimizer
        self.mode = mode
        self.fallback = _validate_fallback(fallback)
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid on_nonfinite {on_nonfinite!r}: use one of {NONFINITE_POLICIES}."
            )
        self.on_nonfinite = on_nonfinite
        self.bounds = _validate_bounds(bounds)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Invalid interval {interval!r}: need an int >= 1.")
        self.interval = interval
        self._distributed = DistributedReducer.from_option(distributed, process_group)
        self.history = History(maxlen=history_size)
        self._param_names: dict[int, str] = (
            {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        )
        self._step_count = 0
        self._pending: _Pending | None = None
        self._record_callbacks: list[Callable[[ProbeRecord], None]] = []
        # What Optimizer.__init__ would set up; calling it would assign over the
        # param_groups/state/defaults properties that forward to the inner optimizer.
        self._optimizer_step_pre_hooks: dict[int, Callable] = {}
        self._optimizer_step_post_hooks: dict[int, Callable] = {}
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = {}
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = {}
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = {}
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = {}
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
        self._mode = value

    @property
    def curvatures(self) -> tuple[str, ...]:
        """Names of the requested curvatures; the first is the primary one."""
        return tuple(c.name for c in self._curvatures)

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
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
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
            warnings.warn(
                "Loading a plain optimizer state dict into AlphaProbe: the inner "
                "optimizer resumes, the probe's history and step count start empty.",
                stacklevel=2,
            )
            history, step, mode = History(maxlen=self.history.maxlen), 0, self.mode
        else:
            history, step, mode = self._parse_section(section)
        self.inner.load_state_dict(inner_state)
        self.history, self._step_count, self.mode = history, step, mode
        self._pending = None
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _parse_section(self, section: Any) -> tuple[History, int, str]:
        try:
            if section["format"] != STATE_FORMAT:
                raise ValueError(f"unknown format {section['format']!r}")
            saved = section["optimizer"]
            step, mode = int(section["step"]), section["mode"]
            history = History.from_state_dict(section["history"])
        except (KeyError, TypeError, ValueError) as error:
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
        if list(section.get("curvature", self.curvatures)) != list(self.curvatures):
            warnings.warn(
                f"The state dict was saved with curvature {section.get('curvature')}; "
                f"this probe uses {list(self.curvatures)}. Continuing with the latter.",
                stacklevel=3,
            )
        if history.maxlen != self.history.maxlen:
            history = History(history, maxlen=self.history.maxlen)
        return history, step, mode

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
                backward; ``step()`` was called with neither closure nor capture.
            CurvatureError: A curvature cannot serve this model or loss.
            ProbeError: Other invalid input (mixed maximize, sparse gradients...).
            Nothing is changed when any of them is raised.
        """
        self._check_groups()
        if closure is None:
            pending, self._pending = self._pending, None
            if pending is None:
                raise ClosureError(
                    "step() needs a closure or a preceding capture() block.\n"
                    + _CLOSURE_FREE_HELP
                )
            result = None
        else:
            if not callable(closure):
                raise TypeError(
                    f"closure must be callable, got {type(closure).__name__}."
                )
            self._pending = None
            if not self._will_probe():
                # Between probes (interval > 1) the probe is the inner optimizer:
                # no BackPACK, no snapshots, no record.
                with torch.enable_grad():
                    result = closure()
                self.inner.step()
                self._step_count += 1
                return result
            session = self._closure_session().__enter__()
            try:
                result = closure()
            except BaseException as error:
                session._close()
                raise session.fail(error) from None
            pending = session.finish(None, result, require_loss=True)
        if not self._will_probe():
            self.inner.step()
            self._step_count += 1
            return result
        self._probe_step(pending)
        return result

    def _probe_step(self, pending: _Pending) -> None:
        self._distributed.start_step()
        params = self._params()
        transaction = StepTransaction(self.inner, params)
        try:
            transaction.take_inner_step()
            transaction.swap()  # parameters now hold θ₀ (BackPACK reads live weights)
            with torch.no_grad():
                numbers = self._evaluate(params, transaction.directions, pending)
            record, multiplier = self._decide(numbers, pending)
            if multiplier is None:
                transaction.commit_inner()
            elif multiplier == 0.0 and record.action == "skip":
                transaction.rollback()
            else:
                transaction.commit_scaled(multiplier)
            self.history.append(record)
            self._step_count += 1
        except BaseException as error:
            self._distributed.abort(error)  # other processes must not wait for us
            transaction.rollback()
            pending.backup.restore()
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
        self, params: list[Tensor], directions: list[Tensor], pending: _Pending
    ) -> list[float]:
        """All scalars of the step with one device-to-host transfer.

        Returns ``[loss, dᵀg, ‖d‖², ‖g‖², dᵀC₁d, dᵀC₂d, ...]``.
        """
        acc = self._accumulate_dtype(params)
        device = directions[0].device
        zero = torch.zeros((), dtype=acc, device=device)
        slope, dd, gg = zero, zero, zero
        for i, (p, d) in enumerate(zip(params, directions)):
            d = d.to(acc)
            dd = dd + torch.sum(d * d)
            if i in pending.reached and p.grad is not None:
                g = p.grad.to(acc)
                slope = slope + torch.sum(d * g)
                gg = gg + torch.sum(g * g)
        ctx = self._context(params, directions, pending.reached)
        curv = [c.quadratic(ctx).sum() for c in self._curvatures]
        scale = pending.loss_scale
        if scale is not None:
            scale = scale.get_scale() if hasattr(scale, "get_scale") else scale
            curv = [q / scale for q in curv]
        loss = (
            pending.loss.detach().to(device=device, dtype=acc).reshape(())
            if pending.loss is not None
            else torch.full((), math.nan, dtype=acc, device=device)
        )
        packed = torch.stack([loss, slope, dd, gg, *curv])
        # Under torch.distributed: one all_reduce that averages the local entries
        # (loss, curvature) and takes dᵀg, ‖d‖², ‖g‖² (already global) from rank 0.
        packed = self._distributed.reduce(packed, shared=(1, 2, 3))
        return self._distributed.unpack(packed.tolist())

    def _decide(
        self, numbers: list[float], pending: _Pending
    ) -> tuple[ProbeRecord, float | None]:
        """Turn the step's scalars into a record and the multiplier to apply.

        Returns:
            The record and the multiplier of ``d`` to take (``None``: keep the
            inner step bit for bit; ``0.0`` with action ``"skip"``: roll back).
        """
        loss, slope, dd, gg, *curv = numbers
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
        if self.mode == "apply":
            status = statuses[primary]
            if status == Status.OK:
                applied = clip_to_bounds(alphas[primary], self.bounds)  # type: ignore[arg-type]
                multiplier, action = applied, "alpha"
            else:
                policy = (
                    self.on_nonfinite if status == Status.NONFINITE else self.fallback
                )
                if policy == "skip":
                    multiplier, action, applied = 0.0, "skip", 0.0
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
        )
        return record, multiplier

    # ----------------------------------------------------------------- helpers
    def _closure_session(self) -> _ClosureSession:
        return _ClosureSession(self)

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
        self, params: list[Tensor], directions: list[Tensor], reached: set[int]
    ) -> EvaluationContext:
        return EvaluationContext(
            params=params,
            directions=directions,
            reached=reached,
            names=self._names(),
            accumulate_dtype=self._accumulate_dtype(params),
        )

    @staticmethod
    def _accumulate_dtype(params: Iterable[Tensor]) -> torch.dtype:
        dtype = torch.float32
        for p in params:
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
                f"The parameters live on several devices ({sorted(map(str, devices))}); "
                "AlphaProbe needs all parameters of the wrapped optimizer on one "
                "device. Move the model with model.to(device) before creating the "
                "optimizer."
            )

    def _check_loss(
        self, loss: Any, require: bool, backward_ran: bool = False
    ) -> Tensor | None:
        if loss is None:
            if require:
                raise ClosureError(
                    "The closure returned None; it must return the loss tensor. "
                    + _CLOSURE_FREE_HELP
                )
            return None
        if not isinstance(loss, Tensor):
            raise ClosureError(
                f"The closure returned a {type(loss).__name__}; it must return the "
                "loss as a scalar tensor (return loss, not loss.item())."
            )
        if loss.numel() != 1:
            raise ClosureError(
                f"The closure returned a tensor of shape {tuple(loss.shape)}; it must "
                "return the scalar loss (reduce it with .mean() or .sum())."
            )
        # A detached copy is fine once backward ran (PyTorch Lightning's closure
        # returns loss.detach()); without backward it signals a no_grad mistake.
        if not loss.requires_grad and not backward_ran:
            raise ClosureError(
                "The closure returned a loss that does not require grad (detached or "
                "computed under torch.no_grad()); return the loss you called "
                "backward() on."
            )
        return loss


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)


def _check_inner(optimizer: Any) -> None:
    if isinstance(optimizer, type):
        raise TypeError(
            f"AlphaProbe wraps an optimizer instance, got the class "
            f"{optimizer.__name__}: use AlphaProbe({optimizer.__name__}(model.parameters(), ...))."
        )
    if isinstance(optimizer, AlphaProbe):
        raise TypeError(
            "AlphaProbe cannot wrap another AlphaProbe: request several curvatures "
            "from one probe instead, e.g. AlphaProbe(opt, curvature=('hessian', 'ggn'))."
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
