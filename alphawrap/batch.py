r"""How the probe gets the batch for the exact curvatures, without a second forward.

The exact curvatures (``"ggn-exact"``, ``"hessian-exact"``) differentiate
``loss_fn(model(inputs), targets)`` twice along the update :math:`d`, so they need
the model, the loss function and the batch the closure used. The user passes the
first two to :class:`~alphawrap.AlphaProbe` (``model=``, ``loss_fn=``); the batch
is *recorded* while the closure runs, by :class:`BatchRecorder`:

* ``model``: a forward pre-hook and a forward hook (``with_kwargs=True``) record
  the positional and keyword arguments of the model's call and its output, and
  the random-number state just before the call, so that a replay draws the same
  dropout masks. Only calls with gradients enabled count (an evaluation under
  ``torch.no_grad()`` inside the closure is ignored).
* ``loss_fn``:

  - an ``nn.Module`` (``nn.CrossEntropyLoss()``, extended by BackPACK or not, or
    your own): hooks record its arguments and its return value;
  - a function of ``torch.nn.functional`` or ``torch`` (e.g.
    ``F.cross_entropy``): a :class:`~torch.overrides.TorchFunctionMode` active
    only during the closure sees every call of exactly that function, however
    the closure refers to it (``F.cross_entropy``, an imported name, an alias);
  - any other callable (your own Python function): the closure must call it as
    ``probe.loss_fn(output, target)`` (:attr:`AlphaProbe.loss_fn` is a
    recording wrapper around it).

  The argument of the loss call that is the model's output (or one tensor of a
  tuple/dict output, or a ``view``/``reshape`` of it) is located; all other
  arguments (targets, weights, keyword options) are kept as they were.

At evaluation time, with the parameters swapped back to :math:`\theta_0`,
:meth:`RecordedBatch.forward` re-runs the model with
:func:`torch.func.functional_call` (parameters and tangents substituted, buffers
cloned so that BatchNorm's running statistics are not updated twice) and
:meth:`RecordedBatch.loss` re-applies the loss. Nothing is copied while
recording: the tensors the closure used are kept by reference until the step
ends.

Requirements the recorder checks (and explains in a
:class:`~alphawrap.errors.CurvatureError` raised before anything changes):
the closure calls ``model`` exactly once and ``loss_fn`` exactly once with
gradients enabled, and the loss gets the model's output. The closure may add
nothing the curvature should see: terms outside ``loss_fn`` (regularisers)
are not in the exact curvature; a warning says so once when the closure's loss
is not the return value of ``loss_fn``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from alphawrap.compiled import eager_if_compiled
from alphawrap.errors import CurvatureError

__all__ = ["BatchRecorder", "RecordedBatch", "RecordingLoss"]


_LEAVES = (Tensor, int, float, bool, str, type(None))


def _detach(tree: Any) -> Any:
    # Flat tuples/lists/dicts (the usual model and loss arguments) skip pytree.
    if type(tree) in (tuple, list) and all(isinstance(t, _LEAVES) for t in tree):
        return type(tree)(t.detach() if isinstance(t, Tensor) else t for t in tree)
    if type(tree) is dict and all(isinstance(v, _LEAVES) for v in tree.values()):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in tree.items()}
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _rng_state(example: Tensor | None) -> tuple[Tensor, Any] | None:
    cpu = torch.get_rng_state()
    if example is not None and example.is_cuda:
        return cpu, (example.device, torch.cuda.get_rng_state(example.device))
    return cpu, None


def _first_tensor(tree: Any) -> Tensor | None:
    return next((t for t in tree_leaves(tree) if isinstance(t, Tensor)), None)


@dataclass
class RecordedBatch:
    """One forward of ``model`` and one call of ``loss_fn``, ready to be replayed.

    Build it with :meth:`from_call` to evaluate an exact curvature yourself;
    the probe builds it with :class:`BatchRecorder`.

    Attributes:
        model: The model.
        loss_fn: The loss callable.
        model_args: Positional arguments of the model call (detached).
        model_kwargs: Keyword arguments of the model call (detached).
        loss_args: Positional arguments of the loss call; the slot of the model
            output holds ``None``.
        loss_kwargs: Keyword arguments of the loss call.
        loss_slot: Position (``int``) or keyword (``str``) of the model output in
            the loss call.
        output_index: Index of the loss input among the tensors of the model's
            output (``None``: the output is that tensor).
        output_shape: Shape the loss saw, if it reshaped the output (``None``:
            unchanged).
        rng_state: CPU (and CUDA) random state before the model call.
    """

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    model_args: tuple[Any, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_args: tuple[Any, ...] = (None,)
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_slot: int | str = 0
    output_index: int | None = None
    output_shape: torch.Size | None = None
    rng_state: tuple[Tensor, Any] | None = None

    @classmethod
    def from_call(
        cls,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        inputs: Any,
        *targets: Any,
        **loss_kwargs: Any,
    ) -> RecordedBatch:
        """The batch of ``loss_fn(model(inputs), *targets, **loss_kwargs)``.

        ``inputs`` is one argument of the model or a tuple of them.
        """
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        return cls(
            model=model,
            loss_fn=loss_fn,
            model_args=_detach(args),
            loss_args=(None, *_detach(targets)),
            loss_kwargs=_detach(loss_kwargs),
        )

    def select(self, output: Any) -> Tensor:
        """The tensor of the model's ``output`` that the loss takes."""
        if self.output_index is not None:
            output = [t for t in tree_leaves(output) if isinstance(t, Tensor)][
                self.output_index
            ]
        return (
            output if self.output_shape is None else output.reshape(self.output_shape)
        )

    def forward(self, overrides: dict[str, Tensor]) -> Tensor:
        """Re-run the model with parameters/buffers ``overrides`` (by name).

        A compiled model runs eagerly (:mod:`alphawrap.compiled`): compiled with
        aot_autograd, its graph has no double backward for the exact Hessian.
        """
        with eager_if_compiled(self.model):
            output = torch.func.functional_call(
                self.model, overrides, self.model_args, self.model_kwargs, strict=False
            )
        return self.select(output)

    def loss(self, output: Tensor) -> Tensor:
        """Apply the loss to ``output`` in place of the recorded model output."""
        args, kwargs = list(self.loss_args), dict(self.loss_kwargs)
        if isinstance(self.loss_slot, int):
            args[self.loss_slot] = output
        else:
            kwargs[self.loss_slot] = output
        return self.loss_fn(*args, **kwargs)

    @contextlib.contextmanager
    def replay_rng(self) -> Iterator[None]:
        """Restore the random state of the recorded call; restore the caller's after."""
        if self.rng_state is None:
            yield
            return
        cpu, cuda = self.rng_state
        devices = [cuda[0]] if cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda[1], cuda[0])
            yield


class RecordingLoss:
    """Callable wrapper around a loss function that records its calls in a closure.

    :attr:`AlphaProbe.loss_fn` returns one for plain Python loss functions; outside
    a probed closure it just calls the function.
    """

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.recorder: BatchRecorder | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        """Call the loss; record the call while a probed closure runs."""
        recorder = self.recorder
        if recorder is None or not torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        recorder._in_wrapper += 1
        try:
            result = self.fn(*args, **kwargs)
        finally:
            recorder._in_wrapper -= 1
        recorder._on_loss(args, kwargs, result)
        return result

    def __repr__(self) -> str:
        return f"RecordingLoss({self.fn!r})"


class _LossCallMode(TorchFunctionMode):
    """Sees every call of one ``torch``/``torch.nn.functional`` function."""

    def __init__(self, recorder: BatchRecorder, target: Callable[..., Any]) -> None:
        super().__init__()
        self.recorder = recorder
        self.target = target

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if (
            func is self.target
            and not self.recorder._in_wrapper
            and torch.is_grad_enabled()
        ):
            self.recorder._on_loss(args, kwargs, result)
        return result


def is_overridable(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a torch function a ``TorchFunctionMode`` can intercept."""
    table = torch.overrides.get_overridable_functions()
    return any(fn in funcs for funcs in table.values())


class BatchRecorder:
    """Context manager that records the closure's model and loss calls.

    Args:
        model: The model passed as ``model=``.
        loss_fn: The loss passed as ``loss_fn=`` (module or callable).
        wrapper: The :class:`RecordingLoss` exposed as ``probe.loss_fn``.
        intercept: Whether to intercept calls of ``loss_fn`` with a
            ``TorchFunctionMode`` (for ``torch.nn.functional`` functions).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        wrapper: RecordingLoss | None = None,
        intercept: bool = False,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.wrapper = wrapper
        self.intercept = intercept
        self.model_calls: list[tuple[Any, Any, Any, Any]] = []
        self.loss_calls: list[tuple[Any, Any, Any]] = []
        self._pending_rng: Any = None
        self._in_wrapper = 0
        self._handles: list[Any] = []
        self._mode: _LossCallMode | None = None

    # ------------------------------------------------------------------ hooks
    def _model_pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if torch.is_grad_enabled():
            first = (  # the usual model(x) skips the pytree walk
                args[0]
                if args and isinstance(args[0], Tensor)
                else _first_tensor((args, kwargs))
            )
            self._pending_rng = _rng_state(first)

    def _model_post(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            self.model_calls.append((args, kwargs, out, self._pending_rng))

    def _loss_post(self, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if torch.is_grad_enabled():
            self._on_loss(args, kwargs, out)

    def _on_loss(self, args: Any, kwargs: Any, result: Any) -> None:
        self.loss_calls.append((args, kwargs, result))

    # -------------------------------------------------------------- context
    def __enter__(self) -> BatchRecorder:
        self._handles.append(
            self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True)
        )
        self._handles.append(
            self.model.register_forward_hook(self._model_post, with_kwargs=True)
        )
        if isinstance(self.loss_fn, nn.Module):
            self._handles.append(
                self.loss_fn.register_forward_hook(self._loss_post, with_kwargs=True)
            )
        elif self.intercept:
            self._mode = _LossCallMode(self, self.loss_fn)
            self._mode.__enter__()
        if self.wrapper is not None:
            self.wrapper.recorder = self
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if self.wrapper is not None:
            self.wrapper.recorder = None

    # ------------------------------------------------------------ the batch
    def batch(self, closure_loss: Tensor | None = None) -> RecordedBatch:
        """Validate what was recorded and return the batch to replay.

        Raises:
            CurvatureError: The closure did not call ``model`` and ``loss_fn``
                exactly once each (with gradients enabled), or the loss did not
                get the model's output.
        """
        model_name = type(self.model).__name__
        loss_name = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        if len(self.model_calls) != 1:
            raise CurvatureError(
                f"The exact curvatures replay the closure's batch, so the closure must "
                f"call the model passed as model= ({model_name}) exactly once with "
                f"gradients enabled; it was called {len(self.model_calls)} times. "
                "Call the model itself (not a wrapper such as DDP around it, and "
                "not one of its submodules), once per closure."
            )
        if len(self.loss_calls) != 1:
            how = (
                "call the loss module you passed as loss_fn"
                if isinstance(self.loss_fn, nn.Module)
                else (
                    f"call {loss_name} (or probe.loss_fn)"
                    if self.intercept
                    else f"call it as probe.loss_fn(output, target): {loss_name} is "
                    "a Python function the probe cannot see otherwise"
                )
            )
            raise CurvatureError(
                f"The exact curvatures need the closure to {how} exactly once with "
                f"gradients enabled; it was called {len(self.loss_calls)} times."
            )
        args, kwargs, output, rng = self.model_calls[0]
        loss_args, loss_kwargs, result = self.loss_calls[0]
        leaves = [t for t in tree_leaves(output) if isinstance(t, Tensor)]
        slot, index, shape = _locate(loss_args, loss_kwargs, leaves)
        if slot is None:
            raise CurvatureError(
                f"The loss ({loss_name}) did not get the output of the model "
                f"({model_name}) as an argument. The exact curvatures split the loss "
                "at the model's output, so pass it directly (a tensor of a tuple/dict "
                "output and a view or reshape of it are fine); move any other "
                "transformation (slicing, scaling) into the model's forward."
            )
        if closure_loss is not None and not _same_tensor(closure_loss, result):
            warnings.warn(
                "alphawrap: the closure's loss is not the value loss_fn returned (a "
                "regulariser, a scaling or several loss terms?). The exact "
                "curvatures are those of loss_fn(model(...)) alone.",
                stacklevel=4,
            )
        loss_args = tuple(None if i == slot else a for i, a in enumerate(loss_args))
        loss_kwargs = {k: v for k, v in loss_kwargs.items() if k != slot}
        return RecordedBatch(
            model=self.model,
            loss_fn=self.wrapper.fn if self.wrapper is not None else self.loss_fn,
            model_args=_detach(tuple(args)),
            model_kwargs=_detach(dict(kwargs)),
            loss_args=_detach(loss_args),
            loss_kwargs=_detach(loss_kwargs),
            loss_slot=slot,
            output_index=None if isinstance(output, Tensor) else index,
            output_shape=shape,
            rng_state=rng,
        )


def _same_tensor(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.numel() == b.numel() == 1
        and a.data_ptr() == b.data_ptr()
    )


def _locate(
    args: tuple[Any, ...], kwargs: dict[str, Any], leaves: list[Tensor]
) -> tuple[int | str | None, int, torch.Size | None]:
    """Find the loss argument that is (a reshape of) one of the model's outputs."""
    candidates: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    for slot, value in candidates:
        for index, leaf in enumerate(leaves):
            if value is leaf:
                return slot, index, None
    for slot, value in candidates:
        if not isinstance(value, Tensor) or value.numel() == 0:
            continue
        for index, leaf in enumerate(leaves):
            if (
                value.numel() == leaf.numel()
                and value.dtype == leaf.dtype
                and value.is_contiguous()
                and leaf.is_contiguous()
                and value.data_ptr() == leaf.data_ptr()
            ):
                return slot, index, value.shape
    return None, 0, None
