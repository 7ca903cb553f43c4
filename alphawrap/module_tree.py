"""Walking a model's module tree on every probed step, without ``named_modules``.

``nn.Module.modules()`` goes through ``named_modules``: a recursive generator
that builds a dotted name for every submodule. The probe only needs the modules
themselves, on every probed step (the recording hooks' leaf modules, the check
for compiled submodules), so it walks the ``_modules`` dictionaries directly:
the same modules, each once, for a fraction of the cost.
"""

from __future__ import annotations

from torch import nn

__all__ = ["leaf_modules", "unique_modules"]


def unique_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model``'s tree once, ``model`` first (like ``modules()``).

    The order differs from ``modules()`` for trees more than one level deep;
    callers use the modules as a set.

    Example:
        >>> inner = nn.Linear(2, 2)
        >>> model = nn.Sequential(inner, nn.Sequential(inner, nn.ReLU()))
        >>> {id(m) for m in unique_modules(model)} == {id(m) for m in model.modules()}
        True
        >>> len(unique_modules(model))
        4
    """
    return _walk(model)[0]


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model``'s tree without child modules (``None`` slots aside).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
        >>> [type(m).__name__ for m in leaf_modules(model)]
        ['Linear', 'ReLU']
    """
    return _walk(model)[1]


def _walk(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """All modules once (breadth first) and the leaves among them."""
    found, leaves = [model], []
    seen = {id(model)}
    for module in found:  # grows while it is walked
        leaf = True
        for child in module._modules.values():
            if child is not None:
                leaf = False
                if id(child) not in seen:
                    seen.add(id(child))
                    found.append(child)
        if leaf:
            leaves.append(module)
    return found, leaves
