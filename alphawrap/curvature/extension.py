r"""Template for curvatures that a BackPACK extension stores on each parameter.

The diagonal (:mod:`alphawrap.curvature.diagonal`) and Kronecker-factored
(:mod:`alphawrap.curvature.kronecker`) curvatures follow one pattern: activate a
BackPACK extension during the closure's backward pass, find its result on every
parameter under a private attribute (:attr:`BackpackCurvature.savefield`), turn
it into the block quadratic :math:`d_b^\top C_{bb} d_b`, and delete it.

They need what BackPACK supports: an ``extend``-ed model made of the modules the
extension knows, with a BackPACK loss module as the last operation. Unknown
modules fail inside the backward pass; the probe turns that into a
:class:`~alphawrap.errors.CurvatureError` and changes nothing.

The Monte-Carlo extensions (``DiagGGNMC``, ``KFAC``) draw random numbers in the
loss module's backward. :func:`private_randomness` makes them draw from a
seeded stream of their own (``torch.random.fork_rng``), so that probing does not
shift the training's random stream (dropout masks, data order): observe mode
stays bitwise identical to the unwrapped optimizer.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from backpack import disable as backpack_disable
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_pre_hook

from alphawrap.curvature.base import Curvature, EvaluationContext
from alphawrap.curvature.rules import UNSEEN_TARGET
from alphawrap.errors import CurvatureError

_LOSS_MODULES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


def module_names(extension: BackpropExtension) -> list[str]:
    """Names of the module classes a BackPACK extension handles."""
    mapping = getattr(extension, "_BackpropExtension__module_extensions", {})
    return sorted(cls.__name__ for cls in mapping)


class _SeededModuleExtension:
    """Runs a loss module's extension under a private, seeded random stream."""

    def __init__(self, inner: Any, next_seed: Callable[[], int]) -> None:
        self.inner = inner
        self.next_seed = next_seed

    def __call__(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        device = module.input0.device
        devices = [device] if device.type == "cuda" else []
        validate = torch.distributions.Distribution._validate_args
        with torch.random.fork_rng(devices=devices):
            seed = self.next_seed()
            torch.random.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.default_generators[device.index or 0].manual_seed(seed)
            # BackPACK samples from a Categorical of softmax probabilities; their
            # validation would cost device syncs for nothing.
            torch.distributions.Distribution.set_default_validate_args(False)
            try:
                self.inner(ext, module, g_inp, g_out)
            finally:
                torch.distributions.Distribution.set_default_validate_args(validate)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def private_randomness(
    extension: BackpropExtension, next_seed: Callable[[], int]
) -> BackpropExtension:
    """Make the loss modules of a Monte-Carlo extension draw from seeded streams."""
    mapping = getattr(extension, "_BackpropExtension__module_extensions", {})
    for module_cls in _LOSS_MODULES:
        inner = mapping.get(module_cls)
        if inner is not None:
            extension.set_module_extension(
                module_cls, _SeededModuleExtension(inner, next_seed), overwrite=True
            )
    return extension


def _drop_stale_inputs(module: nn.Module, args: Any) -> None:
    if (
        type(module) in _LOSS_MODULES
        and torch.is_grad_enabled()
        and backpack_disable.should_store_io()  # else BackPACK stores nothing new
    ):
        # BackPACK stores a call's positional inputs as input0, input1, ... and
        # deletes them only in its backward: a target left by an earlier forward
        # without backward (a logged validation loss) would pass for this call's
        # when the target comes as a keyword.
        for name in [
            k for k in module.__dict__ if k[5:].isdigit() and k[:5] == "input"
        ]:
            del module.__dict__[name]


@contextmanager
def fresh_loss_inputs() -> Iterator[None]:
    """While active, a loss module's BackPACK inputs are those of its last call."""
    handle = register_module_forward_pre_hook(_drop_stale_inputs)
    try:
        yield
    finally:
        handle.remove()


class _IgnoredTargetGuard:
    """Refuses ignored class targets before BackPACK's cross-entropy extension runs.

    ``nn.CrossEntropyLoss`` skips the positions whose target is ``ignore_index``
    (and divides the mean by the others); BackPACK's loss Hessian, its square
    root and its samples count every position, so its curvature would be wrong.
    """

    def __init__(self, inner: Any, owner: BackpackCurvature) -> None:
        self.inner = inner
        self.owner = owner

    def __call__(self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        target = getattr(module, "input1", None)
        name = self.owner.name
        if not isinstance(target, Tensor):  # a keyword target: BackPACK misses it
            raise CurvatureError(f"Curvature {name!r}: {UNSEEN_TARGET}")
        if not target.is_floating_point():
            # Read with the step's numbers (one transfer), not synchronised here.
            self.owner.refusal = (
                (target == module.ignore_index).any(),
                f"Curvature {name!r} cannot weigh ignored targets: some targets "
                f"equal ignore_index ({module.ignore_index}), and BackPACK's "
                "cross-entropy Hessian counts those positions (and divides the "
                "mean by all of them), so the number would be wrong. Use "
                "'hessian', 'ggn', 'pch-clip' or 'pch-abs' (the tangent sweep "
                "weighs ignored targets), 'ggn-exact' or 'hessian-exact', or "
                "leave the ignored positions out of the batch.",
            )
        self.inner(ext, module, g_inp, g_out)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def refuse_ignored_targets(
    extension: BackpropExtension, owner: BackpackCurvature
) -> BackpropExtension:
    """Guard the extension's cross-entropy loss against ignored class targets.

    A target passed as a keyword (BackPACK does not record it) is refused at
    once; whether a class target equals ``ignore_index`` becomes ``owner``'s
    :meth:`~BackpackCurvature.deferred_refusal`.
    """
    mapping = getattr(extension, "_BackpropExtension__module_extensions", {})
    inner = mapping.get(nn.CrossEntropyLoss)
    if inner is not None:
        extension.set_module_extension(
            nn.CrossEntropyLoss, _IgnoredTargetGuard(inner, owner), overwrite=True
        )
    return extension


class BackpackCurvature(Curvature):
    """Template: block quadratics from a quantity a BackPACK extension stores.

    Subclasses set :attr:`savefield` (a private attribute name, not a prefix of
    another backend's), implement :meth:`make_extension` (return the extension
    saving there) and :meth:`block_quadratic`.
    """

    blockwise = True
    needs_backpack_modules = True
    savefield: ClassVar[str]

    extension_class: ClassVar[type[BackpropExtension]]

    def make_extension(self) -> BackpropExtension:
        """Return a fresh BackPACK extension saving to :attr:`savefield`."""
        extension = self.extension_class()
        extension.savefield = self.savefield
        return extension

    @abstractmethod
    def block_quadratic(
        self, stored: Any, direction: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """``d_bᵀ C_bb d_b`` from what the extension stored on the parameter."""

    def supported_modules(self) -> list[str]:
        """Module classes the BackPACK extension handles."""
        return module_names(self.make_extension())

    def backpack_extensions(self) -> list[Any]:
        """BackPACK extensions to activate during the closure's backward pass."""
        return [refuse_ignored_targets(self.make_extension(), self)]

    def check_backward(self, ctx: EvaluationContext) -> None:
        """Fail right after the backward pass if evaluation cannot work."""
        missing = [
            ctx.names[i]
            for i in sorted(ctx.reached)
            if not hasattr(ctx.params[i], self.savefield)
        ]
        if missing:
            raise CurvatureError(
                f"Curvature {self.name!r} ({self.description}) got no BackPACK "
                f"quantity for parameter(s) {', '.join(missing)}, although the "
                "backward pass reached them. Either the model is not extended "
                "(use `model = backpack.extend(model)` before creating the "
                "optimizer) or these parameters are used outside a module BackPACK "
                "sees (functional calls, parameters of a custom module). Supported "
                f"modules: {', '.join(self.supported_modules())}. The exact "
                "curvatures 'ggn-exact' and 'hessian-exact' work on any model."
            )

    def quadratic(self, ctx: EvaluationContext) -> Tensor:
        """Return ``dᵀCd`` (see :class:`~alphawrap.curvature.base.Curvature`)."""
        acc = ctx.accumulate_dtype
        values = []
        for i, (p, d) in enumerate(zip(ctx.params, ctx.directions)):
            if i not in ctx.reached:
                # The loss does not depend on this block: its curvature is zero.
                values.append(torch.zeros((), dtype=acc, device=d.device))
                continue
            values.append(self.block_quadratic(getattr(p, self.savefield), d, acc))
        return torch.stack(values)

    refusal: tuple[Tensor, str] | None = None
    """Whether this step's batch has targets BackPACK would count wrongly."""

    def deferred_refusal(self) -> tuple[Tensor, str] | None:
        return self.refusal

    def cleanup(self, params: Sequence[Tensor]) -> None:
        """Drop what the backward pass stored on the parameters."""
        self.refusal = None
        for p in params:
            if hasattr(p, self.savefield):
                delattr(p, self.savefield)


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every platform and Python.

    ``hash()`` of a tuple is CPython's (other for PyPy and 32-bit builds) and
    maps -1 and -2 to the same value; BLAKE2b of the integers does neither.

    Example:
        >>> mixed_seed(0, 0, 5, 0) == mixed_seed(0, 0, 5, 0) != mixed_seed(0, 1, 5, 0)
        True
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def process_rank() -> int:
    """This process's rank under ``torch.distributed`` (0 without a group)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SeededMixin:
    """Monte-Carlo backends: sampled labels from a private seeded stream.

    Draw ``k`` of probed step ``t`` (its ``k``-th backward pass) on process
    ``r`` (the ``torch.distributed`` rank, 0 without a process group) uses the
    seed :func:`mixed_seed` ``(seed, r, t, k)``. Probing does not consume the
    training's random numbers, and the draws of a step depend on nothing but its
    step count: a step that is refused or undone, or a capture that is discarded,
    changes no later draw, and a probe loaded from a checkpoint draws what the
    saved one would have. Each process draws its own labels, independent of the
    others'. Used without a probe (no step count), the draws go on
    ``k = 0, 1, ...`` under step ``-1``.

    Args:
        mc_samples: Sampled labels per example.
        seed: Seed of the private random stream.
    """

    savefield: str
    extension_class: Any

    def __init__(self, mc_samples: int = 1, seed: int = 0) -> None:
        self.mc_samples = mc_samples
        self.seed = int(seed)
        self.rank = 0
        self.step = -1
        self.draws = 0

    def start_step(self, step: int) -> None:
        """Seed this step's draws by its count (the first is draw 0)."""
        self.rank = process_rank()
        self.step = int(step)
        self.draws = 0

    def make_extension(self) -> BackpropExtension:
        """Return a fresh extension whose loss modules sample privately."""
        extension = self.extension_class(mc_samples=self.mc_samples)
        extension.savefield = self.savefield
        return private_randomness(extension, self.next_seed)

    def next_seed(self) -> int:
        """Seed of the next draw."""
        seed = mixed_seed(self.seed, self.rank, self.step, self.draws)
        self.draws += 1
        return seed


def unsupported_module_hint(qualified: str) -> str:
    """Extra sentences for "BackPACK cannot handle module ``qualified``".

    Says what kind of module it is (a custom container's forward, a residual
    branch) and which registered curvatures can handle that module class.
    """
    from alphawrap.curvature import REGISTRY  # late: the registry imports us

    module = qualified.rsplit(".", 1)[-1]
    hint = ""
    if module == "SumModule":
        hint = (
            f" {module} is a residual connection (a branch `x + f(x)` that "
            "use_converter=True turned into a module)."
        )
    elif not qualified.startswith(("torch.", "backpack.")):
        hint = (
            f" {module} is a custom module: BackPACK only sees its known submodules "
            "applied one after the other, not what its forward does in between "
            "(residual additions, functional calls such as F.gelu or "
            "F.layer_norm)."
        )
    handling = []
    for name, cls in REGISTRY.items():
        if not cls.needs_backpack_modules:
            continue
        try:
            if module in cls().supported_modules():
                handling.append(name)
        except Exception:
            continue
    if handling:
        hint += (
            f" Curvatures whose BackPACK extension handles {module}: "
            + ", ".join(map(repr, handling))
            + "."
        )
    return hint
