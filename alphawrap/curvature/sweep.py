r"""Fast path: all block quadratics from one forward sweep of stacked tangents.

Summing BackPACK's ``HMP``/``GGNMP``/``PCHMP`` closures over the parameters
re-propagates through every later layer once per block, so its cost grows with
the square of the depth and it repeats the work for each curvature. This module
computes the same numbers from shared work:

1. During the closure's backward pass a lightweight BackPACK extension only
   *records* each module's stored input/output and its output gradient
   :math:`\delta` (no closures are built).
2. After the inner step, with :math:`\theta_0` swapped back in, one forward sweep
   carries a stack of tangents, one per parameter block :math:`b`:
   :math:`\dot z_b = J_{\theta_b} d_b` enters at the block's module and is
   pushed through every later module's Jacobian (BackPACK's
   ``jac_mat_prod``), all blocks in one batched product.
3. Each block's quadratic splits into a Gauss-Newton part at the loss and
   residual parts at the nonlinear modules it passes,

   .. math::

       d_b^\top C_{bb} d_b = \dot f_b^\top \nabla^2_f \ell\, \dot f_b
       + \sum_{\text{modules } m} \dot x_{m,b}^\top\,
         \operatorname{modify}(R_m)\, \dot x_{m,b},
       \qquad R_m = \nabla^2_x \langle \delta_m, m(x) \rangle,

   where ``modify`` keeps :math:`R_m` (Hessian), drops it (GGN), clips it at
   zero (PCH-clip) or takes its absolute value (PCH-abs). For element-wise
   activations :math:`R_m = \operatorname{diag}(f''(x) \odot \delta_m)`, so all
   four curvatures come from the same tangents, split by sign.

The results equal BackPACK's extensions (the tests keep those as the reference),
except for ``Sigmoid``/``Tanh`` under PCH where BackPACK 1.7.1 is wrong (see
:mod:`alphawrap.curvature.blockdiag`).

The sweep needs the modules to form a chain (each module's input is the previous
module's output): a functional operation or a branch in between is detected and
refused with a clear error rather than giving silently wrong numbers.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from backpack.extensions import HMP
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)

from alphawrap.curvature.base import Curvature, EvaluationContext
from alphawrap.curvature.blockdiag import supported_modules
from alphawrap.curvature.rules import (
    CROSS_TERM_MODULES,
    FAST_RULES,
    UNSEEN_TARGET,
    BackpackRule,
    per_slot,
    rule_for,
)
from alphawrap.errors import CurvatureError
from alphawrap.module_tree import leaf_modules

BLOCK_KINDS: tuple[str, ...] = ("hessian", "ggn", "pch-clip", "pch-abs")
EXACT_KINDS: tuple[str, ...] = ("ggn-exact", "hessian-exact")
SAVEFIELD = "_alphawrap_sweep"


@dataclass
class _Trace:
    """What the backward pass recorded for one module."""

    module: nn.Module
    derivatives: Any
    inputs: tuple[Tensor, ...]
    output: Tensor
    g_inp: tuple[Tensor | None, ...]
    g_out: tuple[Tensor | None, ...]
    versions: tuple[int, int] | None = None
    """``(input version before forward, output version after)``; hooks only."""


class _RecordModule(ModuleExtension):
    """Record a module's stored tensors and gradients; compute nothing."""

    def __init__(self, derivatives: Any) -> None:
        super().__init__(params=None)
        self.derivatives = derivatives

    def __call__(
        self, extension: BackpropExtension, module: nn.Module, g_inp: Any, g_out: Any
    ) -> None:
        inputs = []
        i = 0
        while hasattr(module, f"input{i}"):
            inputs.append(getattr(module, f"input{i}"))
            i += 1
        extension.trace.append(  # type: ignore[attr-defined]
            _Trace(module, self.derivatives, tuple(inputs), module.output, g_inp, g_out)
        )


def _derivatives_by_module() -> dict[type[nn.Module], Any]:
    mapping = HMP()._BackpropExtension__module_extensions  # type: ignore[attr-defined]
    return {cls: ext.derivatives for cls, ext in mapping.items()}


class Recorder(BackpropExtension):
    """BackPACK extension that records the backward pass for :class:`TangentSweep`.

    Args:
        fail_mode: BackPACK's behaviour on a module it does not know: ``"ERROR"``
            (the block curvatures need every module) or ``"SILENT"`` (the exact
            curvatures only use the sweep opportunistically).
    """

    def __init__(self, fail_mode: str = "ERROR") -> None:
        super().__init__(
            savefield=SAVEFIELD,
            module_exts={
                cls: _RecordModule(derivs)
                for cls, derivs in _derivatives_by_module().items()
            },
            fail_mode=fail_mode,
        )
        self.trace: list[_Trace] = []

    def expects_backpropagation_quantities(self) -> bool:
        return False


class HookRecorder:
    """Record the same trace with plain PyTorch hooks: no ``backpack.extend``.

    Used when the probe knows the model and an ``nn.CrossEntropyLoss`` /
    ``nn.MSELoss`` loss module (``AlphaProbe(..., model=, loss_fn=)``). Global
    forward hooks, filtered to the model's leaf modules and the loss, keep each
    module's input and output, and a tensor hook on the output keeps its gradient
    ``δ``. The hooks exist only while a probed closure runs, so the steps in
    between cost exactly a plain step (BackPACK's own hooks, installed by
    ``extend``, slow *every* step down). Keyword arguments of a module call are
    put in place (``loss_fn(input=out, target=y)`` records ``(out, y)``).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.entries: list[_Trace] = []
        self._input_versions: dict[int, int] = {}
        self._derivatives = _derivatives_by_module()
        self._handles: list[Any] = []
        self._watched: set[int] = set()
        self.cross_terms = False
        """Whether the exact Hessian's cross terms need ``δ`` at Linear/Conv."""
        self._needs_delta: dict[tuple[type, bool], bool] = {}
        _run_hooks_eagerly()

    @property
    def trace(self) -> list[_Trace]:
        """The recorded modules in backward order (loss first), like BackPACK's."""
        return self.entries[::-1]

    def clear(self) -> None:
        self.entries.clear()

    def __enter__(self) -> HookRecorder:
        self.__exit__()  # entered again without exit: never leave hooks behind
        self.entries.clear()
        self._input_versions.clear()
        self._watched = {id(m) for m in leaf_modules(self.model)}
        self._watched.add(id(self.loss_fn))
        # Two global hooks (filtered by module) cost less to install per step than
        # two hooks on every leaf module.
        self._handles = [
            register_module_forward_pre_hook(self._before),
            register_module_forward_hook(self._record, with_kwargs=True),
        ]
        return self

    def _before(self, module: nn.Module, inputs: tuple) -> None:
        if id(module) not in self._watched:
            return
        first = _first_input(inputs)  # global pre-hooks see no keyword arguments
        if first is not None:
            self._input_versions[id(module)] = first._version

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
    ) -> None:
        if id(module) not in self._watched:
            return
        before = self._input_versions.pop(id(module), None)  # this call's, always
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        inputs = _call_inputs(module, args, kwargs)
        first = _first_input(inputs)
        if before is None:
            # No positional tensor before the call (none at all, or a keyword
            # call such as loss_fn(input=..., target=...)): the version now.
            before = -1 if first is None else first._version
        elif (
            first is not None
            and first._version != before
            and not _same_tensor(first, output)
        ):
            # The input changed in place after the global pre-hook saw it (a
            # module pre-hook of the user's, or the forward itself) without being
            # the output: what the previous module passed on is not what this one
            # used, so the chain check must refuse.
            before = -2
        entry = _Trace(
            module,
            self._derivatives.get(type(module)),
            tuple(inputs),
            output,
            (None,),
            [None],  # type: ignore[arg-type]
            (before, output._version),
        )
        # δ is read only where a tangent arrives: not at modules whose input no
        # parameter influences (the first layer), except at the loss (its scale).
        if (
            output.requires_grad
            and self.needs_delta(module)
            and (first is None or first.requires_grad or _is_loss_module(module))
        ):
            # A weak reference: the hook lives in the output's autograd node, which
            # the entry keeps alive through the output. A strong one would close a
            # cycle through C++ that Python's garbage collector cannot see, and
            # every step's activations would leak.
            ref = weakref.ref(entry)

            def keep(grad: Tensor, ref: weakref.ref[_Trace] = ref) -> None:
                alive = ref()
                if alive is not None:
                    alive.g_out[0] = grad  # type: ignore[index]

            output.register_hook(keep)
        self.entries.append(entry)

    def needs_delta(self, module: nn.Module) -> bool:
        """Whether the sweep reads this module's output gradient ``δ``.

        The loss (its scale) and every module with a second derivative do; of the
        modules linear in their input (direct rules), only the bilinear layers
        and only for the exact Hessian's cross terms. A missing ``δ`` is never
        read silently: the rules that use it fail on ``None``.
        """
        key = (type(module), self.cross_terms)
        if key not in self._needs_delta:  # per module class, not per call
            rule = FAST_RULES.get(type(module))
            self._needs_delta[key] = (
                rule is None
                or _is_loss_module(module)
                or not rule(None).residual_is_zero(None)
                or (self.cross_terms and type(module) in CROSS_TERM_MODULES)
            )
        return self._needs_delta[key]


_EAGER = False


def _run_hooks_eagerly() -> None:
    """Keep ``torch.compile`` from tracing the recording hooks (once per process).

    Traced, the hooks would read the tensors' versions at trace time (and refuse
    an in-place activation that a functionalizing backend rewrites) and be
    recompiled for every module. Marked as skipped, they run as plain Python at
    a graph break. Dynamo's ``skip`` marks the functions themselves; the public
    ``torch.compiler.disable`` wraps them instead, and its wrapper costs 2-3 % of
    a small model's probe step on every call, compiled or not.
    """
    global _EAGER
    if _EAGER:
        return
    _EAGER = True
    try:
        from torch._dynamo.decorators import skip
    except ImportError:  # a private API: without it the hooks are traced, as before
        return
    for hook in (HookRecorder._before, HookRecorder._record):
        skip(hook)


def _first_input(inputs: tuple) -> Tensor | None:
    return inputs[0] if inputs and isinstance(inputs[0], Tensor) else None


_FORWARD_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def _call_inputs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """A module call's arguments by position, keyword ones moved into place.

    The rules read a module's inputs by position, as BackPACK does (``input0``,
    ``input1``); ``loss_fn(input=out, target=y)`` becomes ``(out, y)``. Keyword
    arguments after a gap (a parameter left at its default) are not needed by
    any rule and are left out.
    """
    if not kwargs:
        return args
    cls = type(module)
    names = _FORWARD_PARAMETERS.get(cls)
    if names is None:
        try:
            parameters = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):  # no signature: keep the positional ones
            parameters = {}
        names = _FORWARD_PARAMETERS[cls] = tuple(
            name
            for name, parameter in parameters.items()
            if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
    inputs = list(args)
    for name in names[len(args) :]:
        if name not in kwargs:
            break
        inputs.append(kwargs[name])
    return tuple(inputs)


def _is_loss_module(module: Any) -> bool:
    # Exact classes, like BackPACK: a subclass may compute something else.
    return type(module) in (nn.MSELoss, nn.CrossEntropyLoss)


def _is_loss(trace: _Trace) -> bool:
    return _is_loss_module(trace.module)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` is ``b`` as passed on by a module (hooks re-wrap tensors)."""
    return (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
    )


class TangentSweep:
    """Shared engine: computes the requested block quadratics once per step."""

    def __init__(self, fast: bool = True) -> None:
        self.kinds: list[str] = []
        self.fast = fast
        self.recorder = Recorder()
        self.hooks: HookRecorder | None = None
        self.users: list[Curvature] = []
        self._result: dict[str, Tensor] | None = None
        self._chain: tuple[_Trace, list[_Trace]] | None = None
        self._exact_ok: bool | None = None
        self._bilinear = False

    def bind(self, model: nn.Module | None, loss_fn: Any) -> None:
        """Record with plain hooks on ``model`` if it and a loss module are known."""
        if model is not None and _is_loss_module(loss_fn):
            bound = self.hooks
            if bound is None or (bound.model, bound.loss_fn) != (model, loss_fn):
                self.hooks = HookRecorder(model, loss_fn)

    @property
    def source(self) -> Recorder | HookRecorder:
        """Where the trace comes from: plain hooks if bound, else BackPACK."""
        return self.hooks if self.hooks is not None else self.recorder

    def extensions_for(self, curvature: Curvature) -> list[Any]:
        """The BackPACK recorder, for the first block curvature only (no hooks)."""
        blocks = [c for c in self.users if isinstance(c, SweepCurvature)]
        if self.hooks is None and blocks and blocks[0] is curvature:
            return [self.recorder]
        return []

    def recording_for(self, curvature: Curvature) -> AbstractContextManager[Any]:
        """The hook recorder, for the engine's first user only."""
        if self.hooks is not None and self.users and self.users[0] is curvature:
            self.hooks.cross_terms = "hessian-exact" in self.kinds
            return self.hooks
        return nullcontext()

    def add(self, kind: str) -> None:
        """Request ``kind``; the recorder fails on unknown modules only for blocks."""
        if kind not in self.kinds:
            self.kinds.append(kind)
        strict = any(k in BLOCK_KINDS for k in self.kinds)
        if self.recorder._fail_mode != ("ERROR" if strict else "SILENT"):
            self.recorder = Recorder("ERROR" if strict else "SILENT")

    def supports_exact(self, ctx: EvaluationContext) -> bool:
        """Whether the recorded pass can serve the exact curvatures (else: func).

        True for a chain of recorded modules that owns every reached parameter,
        where every parametrised module is bilinear in input and weight (Linear,
        Conv) if the exact Hessian is requested.
        """
        if self._exact_ok is None:
            self._exact_ok = self._exact_supported(ctx)
        return self._exact_ok

    def _exact_supported(self, ctx: EvaluationContext) -> bool:
        if not any(k in EXACT_KINDS for k in self.kinds):
            return False
        try:
            self.chain(ctx)
        except CurvatureError:
            return False
        # The chain check found whether the modules holding reached parameters
        # are all bilinear in input and weight (the exact Hessian's cross terms).
        return "hessian-exact" not in self.kinds or self._bilinear

    def reset(self) -> None:
        """Forget the recorded pass and the cached result."""
        self.recorder.trace.clear()
        if self.hooks is not None:
            self.hooks.clear()
        self._result = None
        self._chain = None
        self._exact_ok = None

    # ------------------------------------------------------------ structure
    def chain(self, ctx: EvaluationContext) -> tuple[_Trace, list[_Trace]]:
        """Return the loss record and the modules in forward order, validated.

        Validated once per step (cached until :meth:`reset`).

        Raises:
            CurvatureError: If the loss was not recorded, the modules do not form
                a chain, or a reached parameter belongs to no recorded module.
        """
        if self._chain is None:
            self._chain = self._validated_chain(ctx)
        return self._chain

    def _validated_chain(self, ctx: EvaluationContext) -> tuple[_Trace, list[_Trace]]:
        trace = self.source.trace
        names = ", ".join(repr(k) for k in self.kinds)
        if not trace:
            if self.hooks is not None:
                raise CurvatureError(
                    f"Curvatures {names}: the closure did not call model= and "
                    "loss_fn= with gradients enabled; call both in the closure."
                )
            raise CurvatureError(
                f"BackPACK recorded nothing for {names}: neither the model nor the "
                "loss function is extended. Use `model = backpack.extend(model)` "
                "before creating the optimizer and `loss_fn = backpack.extend("
                "torch.nn.CrossEntropyLoss())` (or MSELoss), or pass model= and "
                "loss_fn= to AlphaProbe (then no extend is needed)."
            )
        if not _is_loss(trace[0]):
            raise CurvatureError(
                f"BackPACK recorded no loss module for {names}: the loss function is "
                "not extended or is computed functionally. Use a loss module extended "
                "with BackPACK, e.g. `loss_fn = backpack.extend(torch.nn."
                "CrossEntropyLoss())` (MSELoss and CrossEntropyLoss are supported), "
                "as the last operation of the closure, or pass model= and such a "
                "loss module as loss_fn= to AlphaProbe."
            )
        # One loss, called last: a loss module among the layers (a criterion
        # inside the model applied to the loss) has no Jacobian rule, and its
        # parameters would pass for the model's.
        inner = next((t for t in trace[1:] if _is_loss(t)), None)
        if inner is not None:
            raise CurvatureError(
                f"Curvatures {names}: a second loss module "
                f"({type(inner.module).__name__}) ran in the closure (a criterion "
                "inside the model, or a loss applied to the loss); the tangent sweep "
                "needs the model's output to go into one loss module, called last. "
                "The exact curvatures 'ggn-exact' and 'hessian-exact' replay "
                "loss_fn(model(...)) alone."
            )
        unknown = [t for t in trace[1:] if t.derivatives is None]
        if unknown:
            module = type(unknown[0].module).__name__
            raise CurvatureError(
                f"Curvatures {names} (tangent sweep) cannot handle module {module}. "
                f"Supported modules: {', '.join(supported_modules(self.recorder))}. "
                "Curvatures that work on any differentiable model: 'ggn-exact', "
                "'hessian-exact'."
            )
        # BackPACK's records (and the hooks' global pre-hook) hold positional
        # arguments only; the probe's own recording puts keyword ones in place.
        own_recording = (
            " Or pass model= and loss_fn= to AlphaProbe, whose own recording sees "
            "keyword arguments."
            if self.hooks is None
            else ""
        )
        keywords = next((t for t in trace if not t.inputs), None)
        if keywords is not None:
            module = type(keywords.module).__name__
            raise CurvatureError(
                f"Curvatures {names}: {module} was called with keyword arguments "
                "only (such as `loss_fn(input=output, target=y)`), and BackPACK "
                f"records a module's positional arguments only, so {module} has no "
                "recorded input. Call it positionally: `loss_fn(output, y)`."
                + own_recording
            )
        if type(trace[0].module) is nn.CrossEntropyLoss and len(trace[0].inputs) < 2:
            raise CurvatureError(f"Curvatures {names}: {UNSEEN_TARGET}{own_recording}")
        if len({id(t.module) for t in trace}) != len(trace):
            raise CurvatureError(
                f"Curvatures {names}: a module ran more than once in the closure "
                "(weight sharing or several forward passes); the tangent sweep needs "
                "each module once. Use an exact curvature."
            )
        loss, layers = trace[0], trace[:0:-1]  # layers in forward order
        # One pass over the modules' own parameter dicts (what
        # parameters(recurse=False) walks, without its generator machinery: this
        # runs on every probed step): the parameters they hold, those the sweep
        # gives a slot to (module.weight / module.bias), and which modules hold a
        # reached parameter.
        reached = {id(ctx.params[i]) for i in ctx.reached}
        held: list[Tensor] = []
        slots: list[Tensor] = []
        holds_reached: list[bool] = []
        for t in layers:
            own = [p for p in t.module._parameters.values() if p is not None]
            held += own
            if own:  # else no slot; a reached parameter it uses is an orphan
                for n in ("weight", "bias"):
                    value = getattr(t.module, n, None)
                    if isinstance(value, Tensor):
                        slots.append(value)
            holds_reached.append(any(id(p) in reached for p in own))
        upstream = False  # whether a reached parameter feeds the modules so far
        for k, (earlier, later) in enumerate(itertools.pairwise([*layers, loss])):
            if (
                earlier.versions
                and later.versions
                and (later.versions[0] != earlier.versions[1])
            ):
                raise CurvatureError(
                    f"Curvatures {names}: the output of "
                    f"{type(earlier.module).__name__} was modified in place before "
                    f"{type(later.module).__name__} used it; the recorded forward "
                    "no longer describes the model. Avoid in-place operations "
                    "between modules."
                )
            # A .detach() between modules is harmless while no reached parameter
            # lies before it (a frozen backbone cut off from its head): no tangent
            # crosses it. After one, the sweep would carry a tangent the model
            # does not have.
            upstream = upstream or holds_reached[k]
            if (
                upstream
                and earlier.output.requires_grad
                and not later.inputs[0].requires_grad
            ):
                raise CurvatureError(
                    f"Curvatures {names}: the input of "
                    f"{type(later.module).__name__} is detached from the output of "
                    f"{type(earlier.module).__name__} (.detach() or torch.no_grad() "
                    "in between) although parameters before it are optimized and "
                    "reached (e.g. through another term of the loss): the stored "
                    "forward is not the model's derivative. Remove the detach, or "
                    "use 'ggn-exact' / 'hessian-exact' (with model= and loss_fn=), "
                    "which replay the model as it is."
                )
        for earlier, later in itertools.pairwise(layers):
            if not _same_tensor(later.inputs[0], earlier.output):
                raise CurvatureError(
                    f"Curvatures {names} need the model to be a chain of BackPACK "
                    f"modules, but the input of {type(later.module).__name__} is not "
                    f"the output of {type(earlier.module).__name__} (a functional "
                    "operation, a residual connection or a branch in between). "
                    "Use modules for every operation, or an exact curvature."
                )
        if layers and not _same_tensor(loss.inputs[0], layers[-1].output):
            raise CurvatureError(
                f"Curvatures {names}: the loss's input is not the output of the last "
                f"module ({type(layers[-1].module).__name__}); an operation between "
                "model and loss is invisible to BackPACK."
            )
        orphans = ctx.reached_except(held)
        if orphans and self.hooks is not None:
            raise CurvatureError(
                f"Curvatures {names}: the recording hooks saw no module call for "
                f"parameter(s) {', '.join(orphans)}, although the backward pass "
                "reached them: they are used outside a module call of model= (a "
                "functional call, a parameter of a custom module), or the closure "
                "calls a torch.compile wrapper of model= whose graph hides the "
                "modules (pass the compiled model itself as model=). Supported "
                "modules: "
                f"{', '.join(supported_modules(self.recorder))}. The exact "
                "curvatures 'ggn-exact' and 'hessian-exact' replay any model."
            )
        if orphans:
            raise CurvatureError(
                f"Curvatures {names} got no BackPACK record for parameter(s) "
                f"{', '.join(orphans)}, although the backward pass reached them. "
                "Either the model is not extended (use `model = backpack.extend("
                "model)` before creating the optimizer) or these parameters are used "
                "outside a module BackPACK sees. Supported modules: "
                f"{', '.join(supported_modules(self.recorder))}."
            )
        # The sweep gives a slot to module.weight / module.bias only; a parameter
        # the module computes them from (torch.nn.utils.prune's weight_orig, a
        # weight-norm g/v pair) would silently get no curvature.
        hidden = ctx.reached_except(slots)
        if hidden:
            raise CurvatureError(
                f"Curvatures {names}: parameter(s) {', '.join(hidden)} are not the "
                "weight or bias their module computes with (a reparametrisation "
                "such as torch.nn.utils.prune or weight_norm derives the weight from "
                "them), so the tangent sweep cannot follow them. Use 'ggn-exact' or "
                "'hessian-exact' (with model= and loss_fn=), which replay the model."
            )
        # Whether every module holding a reached parameter is bilinear in input
        # and weight (the exact Hessian's cross terms).
        self._bilinear = all(
            type(t.module) in CROSS_TERM_MODULES
            for t, holds in zip(layers, holds_reached)
            if holds
        )
        return loss, layers

    # ----------------------------------------------------------------- sweep
    def quadratics(self, ctx: EvaluationContext) -> dict[str, Tensor]:
        """Block quadratics ``[len(params)]`` for every requested kind (cached)."""
        if self._result is None:
            loss, layers = self.chain(ctx)
            self._result = self._sweep(ctx, loss, layers)
        return self._result

    def _sweep(
        self, ctx: EvaluationContext, loss: _Trace, layers: list[_Trace]
    ) -> dict[str, Tensor]:
        acc = ctx.accumulate_dtype
        index = {id(p): i for i, p in enumerate(ctx.params)}
        device = ctx.directions[0].device if ctx.directions else None
        blocks = [k for k in self.kinds if k in BLOCK_KINDS]
        per_block = bool(blocks)  # else one slot: the total tangent J d
        residual_kinds = [k for k in blocks if k != "ggn"]
        exact = (
            [k for k in self.kinds if k in EXACT_KINDS]
            if self.supports_exact(ctx)
            else []
        )
        exact_hessian = "hessian-exact" in exact
        parts: dict[str, list[tuple[int, Tensor]]] = {k: [] for k in residual_kinds}
        extra: list[Tensor] = []  # second-order terms of dᵀHd beyond the GGN
        crosses: list[Tensor] = []  # δᵀ(ΔW ẋ) of the bilinear layers (counted twice)
        tangents: Tensor | None = None
        slots: list[int] = []
        for trace in layers:
            rule = rule_for(trace.module, trace.derivatives, self.fast)
            total_in = None
            if tangents is not None:
                if exact_hessian:
                    total_in = tangents.sum(0, keepdim=True) if per_block else tangents
                if (residual_kinds or exact_hessian) and not rule.residual_is_zero(
                    trace
                ):
                    self._residuals(
                        trace,
                        rule,
                        tangents,
                        total_in,
                        parts,
                        extra,
                        exact_hessian,
                        acc,
                    )
                if per_block:
                    tangents = rule.jac(trace, tangents)
            owned: dict[str, Tensor] = {}
            # A module without parameters of its own has no slot (the chain check
            # refuses a reached parameter it would get from elsewhere).
            for pname in ("weight", "bias") if trace.module._parameters else ():
                p = getattr(trace.module, pname, None)
                i = index.get(id(p)) if isinstance(p, Tensor) else None
                if i is None or i not in ctx.reached:
                    continue
                owned[pname] = ctx.directions[i]
                slots.append(i)
            if exact_hessian and total_in is not None and "weight" in owned:
                # 2 δᵀ (ΔW ẋ): the layer is bilinear in its input and weight.
                cross = rule.param_cross(trace, owned["weight"], total_in)
                crosses.append(_dot(trace.g_out[0], cross, acc))
            if not per_block:  # one slot: the total tangent J d
                tangents = rule.push(trace, tangents, owned)
            elif owned:
                new = [rule.param_jac(trace, n, d) for n, d in owned.items()]
                tangents = torch.cat(new if tangents is None else [tangents, *new])
        result = {
            k: torch.zeros(len(ctx.params), dtype=acc, device=device) for k in blocks
        }
        if tangents is None:
            result.update({k: torch.zeros((), dtype=acc, device=device) for k in exact})
            return result
        loss_rule = rule_for(loss.module, loss.derivatives, self.fast)
        # BackPACK's loss Hessian assumes the loss is the last operation; a scaled
        # loss (GradScaler: (s * loss).backward()) scales the residuals through δ,
        # so scale the Gauss-Newton part by the gradient flowing into the loss too.
        scale = (
            loss.g_out[0].detach().to(acc).reshape(())
            if loss.g_out and loss.g_out[0] is not None
            else 1.0
        )
        if blocks:
            gauss_newton = loss_rule.loss_quadratic(loss, tangents, acc) * scale
            slot_index = torch.tensor(slots, device=device)
            for k in blocks:
                result[k].index_add_(0, slot_index, gauss_newton)
            for k, contributions in parts.items():
                for count, values in contributions:
                    result[k].index_add_(0, slot_index[:count], values)
        if exact:
            # The exact kinds are reported for the unscaled loss (they stand in for
            # a replay of loss_fn, which never sees a loss scale): the residual and
            # cross terms carry the scale through δ, so divide it out.
            total = tangents.sum(0, keepdim=True) if per_block else tangents
            ggn_exact = loss_rule.loss_quadratic(loss, total, acc)[0]
            if "ggn-exact" in exact:
                result["ggn-exact"] = ggn_exact
            if exact_hessian:
                second: Tensor | float = 0.0
                if crosses:
                    second = 2 * torch.stack(crosses).sum()
                if extra:
                    second = second + torch.stack(extra).sum()
                result["hessian-exact"] = ggn_exact + second / scale
        return result

    @staticmethod
    def _residuals(
        trace: _Trace,
        rule: BackpackRule,
        tangents: Tensor,
        total: Tensor | None,
        parts: dict[str, list[tuple[int, Tensor]]],
        extra: list[Tensor],
        exact_hessian: bool,
        acc: torch.dtype,
    ) -> None:
        """Add ``ẋᵀ modify(R) ẋ`` of one module for every slot alive there.

        For the exact Hessian, ``ẋ`` is the total tangent ``total``.
        """
        count = tangents.shape[0]
        r = rule.residual_diagonal(trace)
        if r is not None:
            if parts:
                # Split by sign: with s = ẋ², Σ s·r (Hessian) and Σ s·r⁺ (clip)
                # give Σ s·|r| = 2 Σ s·r⁺ − Σ s·r (abs): two reductions at most.
                squares = (tangents * tangents).reshape(count, -1).to(acc)
                full = positive = None
                if "hessian" in parts or "pch-abs" in parts:
                    full = squares @ r.reshape(-1).to(acc)  # one matrix-vector product
                if "pch-clip" in parts or "pch-abs" in parts:
                    positive = squares @ r.clamp(min=0).reshape(-1).to(acc)
                values = {"hessian": full, "pch-clip": positive}
                if "pch-abs" in parts:
                    values["pch-abs"] = 2 * positive - full
                for k in parts:
                    parts[k].append((count, values[k]))
            if exact_hessian:
                extra.append(_dot(total * total, r.expand_as(total), acc))
            return
        if any(k != "hessian" for k in parts):
            raise CurvatureError(
                "The positive-curvature Hessian needs linear or element-wise "
                f"modules; {type(trace.module).__name__} has a non-diagonal second "
                "derivative. Use 'hessian' or 'ggn' for this model."
            )
        if parts:
            product = rule.residual_mat_prod(trace, tangents)
            parts["hessian"].append((count, per_slot(tangents * product, acc)))
        if exact_hessian:
            extra.append(_dot(total, rule.residual_mat_prod(trace, total), acc))


def _dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``Σ a ⊙ b`` over all entries, accumulated in ``acc`` (one kernel)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype != acc or b.dtype != acc:
        a, b = a.to(acc), b.to(acc)
    return torch.dot(a, b)


class SweepCurvature(Curvature):
    """Template: one block curvature served by a (shared) :class:`TangentSweep`.

    :func:`alphawrap.curvature.resolve` gives all sweep curvatures of a probe one
    engine, so requesting several costs one recording and one sweep.
    """

    blockwise = True
    needs_backpack_modules = True

    def supported_modules(self) -> list[str]:
        return supported_modules(self.engine.recorder)

    def __init__(self, engine: TangentSweep | None = None) -> None:
        self.engine = engine if engine is not None else TangentSweep()
        self.engine.users.append(self)
        self.engine.add(self.name)

    def backpack_extensions(self) -> list[Any]:
        return self.engine.extensions_for(self)

    def recording(self) -> AbstractContextManager[Any]:
        return self.engine.recording_for(self)

    def bind(self, model: nn.Module | None, loss_fn: Any) -> None:
        self.engine.bind(model, loss_fn)

    def check_backward(self, ctx: EvaluationContext) -> None:
        self.engine.chain(ctx)

    def quadratic(self, ctx: EvaluationContext) -> Tensor:
        return self.engine.quadratics(ctx)[self.name]

    def cleanup(self, params: Sequence[Tensor]) -> None:
        self.engine.reset()


class SweepHessian(SweepCurvature):
    """Block-diagonal Hessian (fast path; reference: BackPACK ``HMP``)."""

    name = "hessian"
    description = "block-diagonal Hessian (BackPACK HMP, tangent sweep)"


class SweepGGN(SweepCurvature):
    """Block-diagonal GGN (fast path; reference: BackPACK ``GGNMP``)."""

    name = "ggn"
    description = (
        "block-diagonal generalized Gauss-Newton (BackPACK GGNMP, tangent sweep)"
    )


class SweepPCHClip(SweepCurvature):
    """Positive-curvature Hessian, clip (fast path; reference: fixed ``PCHMP``)."""

    name = "pch-clip"
    description = "block-diagonal positive-curvature Hessian, clip (tangent sweep)"


class SweepPCHAbs(SweepCurvature):
    """Positive-curvature Hessian, abs (fast path; reference: fixed ``PCHMP``)."""

    name = "pch-abs"
    description = "block-diagonal positive-curvature Hessian, abs (tangent sweep)"


def share_engine(curvatures: Sequence[Curvature], fast: bool = True) -> None:
    """Give the curvatures of one probe one common :class:`TangentSweep`.

    The block curvatures (:class:`SweepCurvature`) always use it; the exact ones
    (anything with a ``sweep`` attribute, see :mod:`alphawrap.curvature.exact`)
    use it when the recorded model is a chain it supports.

    Args:
        curvatures: Backends of one probe.
        fast: Use the direct rules of :data:`~alphawrap.curvature.rules.FAST_RULES`
            (``False``: BackPACK's derivatives for every module, for testing).
    """
    users = [
        c for c in curvatures if isinstance(c, SweepCurvature) or hasattr(c, "sweep")
    ]
    if not users:
        return
    engine = TangentSweep(fast=fast)
    for c in users:
        if isinstance(c, SweepCurvature):
            c.engine = engine
        else:
            c.sweep = engine  # type: ignore[attr-defined]
        engine.users.append(c)
        engine.add(c.name)
