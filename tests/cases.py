"""Problems as data: tiny models, losses and data for the brute-force checks."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from backpack import extend
from torch import Tensor, nn


@dataclass(frozen=True)
class Problem:
    """A tiny supervised problem; ``make()`` builds it deterministically."""

    name: str
    layers: Callable[[], list[nn.Module]]
    loss: Callable[[], nn.Module]
    in_dim: int
    out_dim: int
    classification: bool
    batch: int = 5
    seed: int = 0
    frozen: tuple[str, ...] = ()
    extras: dict = field(default_factory=dict)
    in_shape: tuple[int, ...] | None = None
    """Shape of one input sample (images); default ``(in_dim,)``."""

    def make(
        self, dtype: torch.dtype = torch.float64
    ) -> tuple[nn.Sequential, nn.Module, Tensor, Tensor]:
        torch.manual_seed(self.seed)
        model = extend(nn.Sequential(*self.layers()).to(dtype))
        for name, p in model.named_parameters():
            if name in self.frozen:
                p.requires_grad_(False)
        loss_fn = extend(self.loss())
        x = torch.randn(self.batch, *(self.in_shape or (self.in_dim,)), dtype=dtype)
        if self.classification:
            y = torch.randint(0, self.out_dim, (self.batch,))
        else:
            y = torch.randn(self.batch, self.out_dim, dtype=dtype)
        return model, loss_fn, x, y


def _mlp(act: type[nn.Module], widths=(4, 5, 3)) -> Callable[[], list[nn.Module]]:
    def build() -> list[nn.Module]:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            if i:
                layers.append(act())
            layers.append(nn.Linear(a, b))
        return layers

    return build


PROBLEMS = [
    Problem("relu-mse", _mlp(nn.ReLU), nn.MSELoss, 4, 3, False),
    Problem("tanh-ce", _mlp(nn.Tanh), nn.CrossEntropyLoss, 4, 3, True),
    Problem("sigmoid-ce", _mlp(nn.Sigmoid), nn.CrossEntropyLoss, 4, 3, True),
    Problem(
        "sigmoid-mse-deep", _mlp(nn.Sigmoid, (3, 4, 4, 2)), nn.MSELoss, 3, 2, False
    ),
    Problem(
        "tanh-mse-sum", _mlp(nn.Tanh), lambda: nn.MSELoss(reduction="sum"), 4, 3, False
    ),
    Problem(
        "relu-ce-frozen-bias",
        _mlp(nn.ReLU),
        nn.CrossEntropyLoss,
        4,
        3,
        True,
        frozen=("0.bias",),
    ),
    Problem(
        "tanh-ce-frozen-weights",  # layers whose bias alone moves
        _mlp(nn.Tanh),
        nn.CrossEntropyLoss,
        4,
        3,
        True,
        frozen=("0.weight", "2.weight"),
    ),
]
PROBLEM_IDS = [p.name for p in PROBLEMS]


CONV_PROBLEMS = [
    Problem(
        "conv2d-relu-maxpool-ce",
        lambda: [
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 3 * 3, 3),
        ],
        nn.CrossEntropyLoss,
        0,
        3,
        True,
        batch=3,
        in_shape=(2, 6, 6),
    ),
    Problem(
        "conv2d-strided-grouped-tanh-mse",
        lambda: [
            nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1),
            nn.Tanh(),
            nn.Conv2d(4, 2, 2, groups=2, dilation=2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 2),
        ],
        nn.MSELoss,
        0,
        2,
        False,
        batch=3,
        in_shape=(2, 7, 7),
    ),
    Problem(
        "conv2d-sigmoid-maxpool-padded-ce-sum",
        lambda: [
            nn.Conv2d(1, 2, 2),
            nn.Sigmoid(),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        ],
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        0,
        3,
        True,
        batch=3,
        in_shape=(1, 6, 6),
    ),
]
"""Convolution and pooling models (the fast conv/pool rules), same checks."""
CONV_IDS = [p.name for p in CONV_PROBLEMS]
