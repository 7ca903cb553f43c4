"""Running the user's closure (or capture block) inside the probe's recording.

:class:`ClosureSession` backs the gradients up, activates what the curvatures
need (BackPACK extensions, recording hooks, the batch recorder), runs the user
code, validates what it returned and whether it called ``backward()``, and on any
failure restores the gradients and translates BackPACK's errors. The result is a
:class:`Pending` step that :meth:`AlphaProbe.step` consumes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backpack import backpack
from torch import Tensor

from alphawrap.compiled import eager_if_compiled
from alphawrap.curvature.blockdiag import translate_backpack_error
from alphawrap.curvature.extension import fresh_loss_inputs
from alphawrap.direction import BackwardMonitor, GradBackup
from alphawrap.errors import ClosureError, ProbeError

if TYPE_CHECKING:
    from alphawrap.probe import AlphaProbe

CLOSURE_FREE_HELP = (
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


@dataclass
class Pending:
    """Result of a closure (or a capture) that the step consumes."""

    loss: Tensor | None
    reached: set[int]
    backup: GradBackup
    loss_scale: Any = None
    batch: Any = None  # alphawrap.batch.RecordedBatch, for the exact curvatures
    watch: BackwardMonitor | None = None
    """For a capture(): notices a backward pass between the block and step()."""

    def release(self) -> None:
        """Stop watching for a later backward (the verdict is kept)."""
        if self.watch is not None:
            self.watch.close()

    def check_fresh(self) -> None:
        """Refuse a capture after which another backward pass ran.

        A backward outside the block, e.g. once ``GradScaler`` skipped the step
        that should have consumed the capture, changes the gradients (replaced,
        summed or overwritten): the captured activations and loss no longer
        belong to them. In-place edits that are not a backward (``GradScaler``'s
        unscaling, gradient clipping) are fine.
        """
        if self.watch is not None and self.watch.reached:
            raise ClosureError(
                "Another backward pass ran after the capture() block ended, so the "
                "captured step is stale and was discarded (its activations and loss "
                "do not belong to the gradients any more). Run the backward pass "
                "inside a new capture() block right before step(). " + CLOSURE_FREE_HELP
            )


def check_loss(loss: Any, require: bool, backward_ran: bool = False) -> Tensor | None:
    """Validate what a closure returned: a scalar loss (``None`` if allowed)."""
    if loss is None:
        if require:
            raise ClosureError(
                "The closure returned None; it must return the loss tensor. "
                + CLOSURE_FREE_HELP
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


_NOTE_PREFIX = "alphawrap: "


def noted(error: BaseException) -> bool:
    """Whether :func:`note` already named the failing stage on ``error``."""
    return any(str(n).startswith(_NOTE_PREFIX) for n in getattr(error, "__notes__", ()))


def note(error: BaseException, what: str, *, undone: bool = True) -> None:
    """Say on ``error`` which stage of the step failed (its type is kept)."""
    if not hasattr(error, "add_note"):  # Python 3.10
        return
    if undone:
        tail = (
            "the step was undone: parameters, gradients, optimizer state and "
            "history are unchanged."
        )
    else:
        tail = "steps between probes take no snapshot and are not rolled back."
    error.add_note(f"{_NOTE_PREFIX}{what}; {tail}")


def _checked(check: Any, ctx: Any, what: str) -> None:
    """Run a backend's check of the backward pass, naming it on an unexpected error.

    A :class:`ProbeError` explains itself; anything else is not the closure's
    fault, so the note says which check raised.
    """
    try:
        check(ctx)
    except BaseException as error:
        if not isinstance(error, ProbeError):
            note(error, f"checking {what} after the backward pass raised")
        raise


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
        self._session = self._probe._closure_session()  # refused inside a session
        self._probe._discard_pending()
        self._session.label = "the capture() block"
        self._session.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        pending = self._session.finish(exc, self.loss, require_loss=False)
        pending.loss_scale = self._loss_scale
        # Its own monitor, recording from now on: any backward until step()
        # makes the capture stale (see Pending.check_fresh).
        pending.watch = BackwardMonitor(self._session.params).__enter__()
        self._probe._pending = pending
        return False


class ClosureSession:
    """Runs user code that calls backward, inside the probe's BackPACK context."""

    def __init__(self, probe: AlphaProbe) -> None:
        self.probe = probe
        self.params = probe._params()
        self.probing = probe._will_probe()
        self.label = "the closure"

    def __enter__(self) -> ClosureSession:
        self.backup = GradBackup(self.params, self.probe._copy_pool())
        self.probe._cleanup(self.params)
        # One stack for everything entered, so that a failure while entering
        # (or _close) undoes exactly what was entered, in reverse order.
        self._stack = contextlib.ExitStack()
        try:
            self.monitor = self._stack.enter_context(
                self.probe._backward_monitor(self.params)
            )
            extensions = (
                [ext for c in self.probe._curvatures for ext in c.backpack_extensions()]
                if self.probing
                else []
            )
            if self.probing and self.probe._noise is not None:
                extensions += self.probe._noise.backpack_extensions()
            # No extension (exact curvatures only, unprobed steps): no BackPACK
            # context, so models with modules BackPACK does not know run untouched.
            if extensions:
                self._stack.enter_context(backpack(*extensions))
                self._stack.enter_context(fresh_loss_inputs())
            if self.probing:
                self._stack.enter_context(eager_if_compiled(self.probe._model))
                for c in self.probe._curvatures:
                    c.start_step(self.probe._step_count)
                    self._stack.enter_context(c.recording())
            self.recorder = self.probe._batch_recorder() if self.probing else None
            if self.recorder is not None:
                self._stack.enter_context(self.recorder)
        except BaseException:
            self._close()
            raise
        return self

    def _close(self) -> None:
        self._stack.close()
        self.probe._release_monitor()  # e.g. a capture() no step() consumes

    def fail(self, error: BaseException) -> BaseException:
        """Undo what the user code did and return the error to raise."""
        self.probe._distributed.explain(error)  # e.g. DDP's all_reduce timed out
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
        if not isinstance(error, ProbeError) and not noted(error):
            when = "after" if self.monitor.reached else "before"
            note(error, f"{self.label} raised {when} backward()")
        return error

    def finish(
        self, exc: BaseException | None, loss: Any, *, require_loss: bool
    ) -> Pending:
        """Close the context, validate what happened, return the pending step."""
        self._close()
        if exc is not None:
            raise self.fail(exc)
        batch = None
        try:
            loss_tensor = check_loss(
                loss, require_loss, backward_ran=bool(self.monitor.reached)
            )
            if not self.monitor.reached:
                raise ClosureError(
                    "The closure did not call backward(): no parameter received a "
                    "gradient. " + CLOSURE_FREE_HELP
                )
            for i in self.monitor.reached:
                if self.params[i].grad is not None and self.params[i].grad.is_sparse:
                    raise ProbeError(
                        f"Parameter {self.probe._names()[i]} has a sparse gradient; "
                        "BackPACK and AlphaProbe need dense gradients (use "
                        "nn.Embedding(sparse=False))."
                    )
            if self.probing:
                if self.recorder is not None:
                    batch = self.recorder.batch(loss_tensor)
                ctx = self.probe._context(
                    self.params, [], self.monitor.reached, batch=batch
                )
                for c in self.probe._curvatures:
                    _checked(c.check_backward, ctx, f"curvature {c.name!r}")
                if self.probe._noise is not None:
                    _checked(self.probe._noise.check_backward, ctx, "the noise")
        except BaseException as error:
            if self.probing and self.monitor.reached:
                # Backward ran (and DDP's gradient all_reduce with it): the other
                # processes are heading for the probe's collective; tell them.
                self.probe._distributed.start_step()
                self.probe._distributed.abort(error)
            raise self.fail(error) from None
        return Pending(loss_tensor, set(self.monitor.reached), self.backup, batch=batch)
