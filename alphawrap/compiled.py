"""How the probe treats ``torch.compile``d models: eagerly, while it records.

The probe's recordings (its hooks, BackPACK's) must see every module call, which
a compiled graph hides, and a model first compiled while those hooks are present
falls back to eager for good. So while the probe records a closure or replays
the model, a compiled model runs eagerly (``torch.compiler.set_stance(
"force_eager")``), and it is compiled on a step without the hooks: the steps
between probes (``interval > 1``) run the compiled graph.

The stance is process-wide: compiled code that other threads run during a probed
closure runs eagerly too.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from alphawrap.module_tree import unique_modules

__all__ = ["eager_if_compiled", "is_compiled"]


def _compiled_itself(module: nn.Module) -> bool:
    return (
        "_orig_mod" in module._modules  # a torch.compile(module) wrapper
        or getattr(module, "_compiled_call_impl", None) is not None  # .compile()
    )


def is_compiled(model: Any) -> bool:
    """Whether ``model`` or one of its submodules is compiled.

    Example:
        >>> body = torch.nn.Linear(2, 2)
        >>> model = torch.nn.Sequential(torch.compile(body, backend="eager"))
        >>> is_compiled(model), is_compiled(body)
        (True, False)
    """
    return isinstance(model, nn.Module) and any(
        _compiled_itself(m) for m in unique_modules(model)
    )


def eager_if_compiled(model: Any) -> contextlib.AbstractContextManager[Any]:
    """Run ``model`` eagerly inside the block if it (or a submodule) is compiled.

    Only then: switching the stance costs a few percent of a small model's probe
    step.
    """
    if not is_compiled(model):
        return contextlib.nullcontext()
    try:
        return torch.compiler.set_stance("force_eager")
    except RuntimeError:  # already inside a compiled region: leave it alone
        return contextlib.nullcontext()
