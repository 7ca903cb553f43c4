"""The fast module walk finds exactly what ``modules()`` finds, on a table of trees."""

from __future__ import annotations

import pytest
from torch import nn

from alphawrap.module_tree import leaf_modules, unique_modules


def _shared() -> nn.Module:
    block = nn.Linear(2, 2)
    return nn.Sequential(block, nn.ReLU(), nn.Sequential(block, nn.Tanh()))


def _none_slot() -> nn.Module:
    model = nn.Sequential(nn.Linear(2, 2))
    model.register_module("empty", None)  # a child slot holding None
    holder = nn.Module()
    holder.register_module("nothing", None)  # only None children: a leaf
    model.add_module("holder", holder)
    return model


def _cycle() -> nn.Module:
    outer = nn.Sequential(nn.Linear(2, 2))
    inner = nn.Sequential(nn.ReLU())
    outer.add_module("inner", inner)
    inner.add_module("back", outer)  # a module reachable from itself
    return outer


TREES = {
    "leaf": lambda: nn.Linear(2, 2),
    "sequential": lambda: nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)),
    "nested": lambda: nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()),
        nn.ModuleDict({"a": nn.Flatten(), "b": nn.ModuleList([nn.Tanh()])}),
    ),
    "shared": _shared,
    "none slot": _none_slot,
    "cycle": _cycle,
    "empty container": lambda: nn.Sequential(nn.Sequential(), nn.Linear(2, 2)),
}


@pytest.mark.parametrize("build", TREES.values(), ids=TREES.keys())
def test_unique_modules_are_modules(build) -> None:
    model = build()
    found = unique_modules(model)
    assert found[0] is model
    assert len({id(m) for m in found}) == len(found)  # each once
    assert {id(m) for m in found} == {id(m) for m in model.modules()}


@pytest.mark.parametrize("build", TREES.values(), ids=TREES.keys())
def test_leaf_modules_have_no_children(build) -> None:
    model = build()
    expected = {id(m) for m in model.modules() if next(m.children(), None) is None}
    leaves = leaf_modules(model)
    assert len({id(m) for m in leaves}) == len(leaves)
    assert {id(m) for m in leaves} == expected
