"""Bitwise snapshots of everything a probe step may change, for the reliability tests.

A :class:`Snapshot` holds parameters, gradients, every tensor of the inner
optimizer's state, the parameter groups' settings, the history and the step
count. :meth:`Snapshot.assert_same` compares bit for bit (NaN equals NaN, -0.0
differs from 0.0): "exactly as before" means exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor


def hook_counts(params: Any) -> list[int]:
    """Post-accumulate-grad hooks on each of ``params`` (the backward monitors)."""
    return [len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in params]


def same_bits(a: Any, b: Any) -> bool:
    """Whether two values are identical, tensors compared bit for bit, recursively."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout:
            return False
        if a.device.type == "meta" or b.device.type == "meta":
            return a.device == b.device  # no data to compare
        if a.is_sparse:
            a, b = a.coalesce(), b.coalesce()
            return same_bits(a.indices(), b.indices()) and same_bits(
                a.values(), b.values()
            )
        return torch.equal(
            a.detach().contiguous().reshape(-1).view(torch.uint8),
            b.detach().contiguous().reshape(-1).view(torch.uint8),
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(same_bits(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


class Snapshot:
    """Everything observable about a probe and its parameters, deep-copied."""

    def __init__(self, probe: Any) -> None:
        self.values = self._take(probe)

    @staticmethod
    def _take(probe: Any) -> dict[str, Any]:
        inner = probe.inner
        params = [p for g in inner.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        return {
            "params": [p.detach().clone() for p in params],
            "grads": [None if p.grad is None else _clone(p.grad) for p in params],
            "state": {
                index.get(id(k), repr(k)): _clone(dict(v))
                for k, v in inner.state.items()
            },
            "groups": [
                {k: _clone(v) for k, v in g.items() if k != "params"}
                for g in inner.param_groups
            ],
            "history": probe.history.to_dicts(),
            "dropped": probe.history.dropped,
            "step_count": probe.step_count,
            "mode": probe.mode,
        }

    def differences(self, probe: Any) -> list[str]:
        """Names of the parts that differ from the probe's current state."""
        now = self._take(probe)
        return [k for k in self.values if not same_bits(self.values[k], now[k])]

    def assert_same(self, probe: Any) -> None:
        """Fail with the names of the parts that changed."""
        diff = self.differences(probe)
        assert not diff, f"changed by a failed step: {diff}"
