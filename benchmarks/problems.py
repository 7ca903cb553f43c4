"""The benchmark problems of the background note, as data (digits-sized inputs)."""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from backpack import extend
from torch import Tensor, nn


@dataclass(frozen=True)
class BenchProblem:
    name: str
    build: Callable[[], nn.Module]
    image: bool = False

    def make(self, batch: int = 128, seed: int = 0, extended: bool = True):
        torch.manual_seed(seed)
        model = self.build()
        loss_fn = nn.CrossEntropyLoss()
        if extended:
            model, loss_fn = extend(model), extend(loss_fn)
        shape = (batch, 1, 8, 8) if self.image else (batch, 64)
        x: Tensor = torch.randn(*shape)
        y: Tensor = torch.randint(0, 10, (batch,))
        return model, loss_fn, x, y


def relu_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def tanh_mlp(depth: int = 9, width: int = 64) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


PROBLEMS = [
    BenchProblem("relu-mlp", relu_mlp),
    BenchProblem("tanh-mlp-9", tanh_mlp),
    BenchProblem("cnn", small_cnn, image=True),
]


def write_results(path: str | Path, fields: dict[str, Any]) -> None:
    """Write a timing benchmark's results as JSON, with the machine and torch."""
    result = {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        **fields,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def shuffled_ratios(
    steps: dict[str, Callable[[], Any]],
    rounds: int,
    seed: int = 0,
    warmup: int = 3,
    prepare: dict[str, Callable[[], Any]] | None = None,
    sync: Callable[[], Any] = lambda: None,
) -> dict[str, float]:
    """Median over rounds of each step's time over the ``"plain"`` step's.

    Each round runs every step once, in a random order: a fixed order biases such
    comparisons by a few percent (a step pays for the cache misses of the step
    before it). The first ``warmup`` rounds are not counted. ``prepare[name]``
    runs, untimed, right before ``steps[name]`` (e.g. the probed step before a
    step between probes); ``sync`` waits for the device before each clock read.
    """
    order = list(steps)
    rng = random.Random(seed)
    prepare = prepare or {}
    ratios: dict[str, list[float]] = {k: [] for k in steps if k != "plain"}
    for round_ in range(rounds + warmup):
        rng.shuffle(order)
        times = {}
        for name in order:
            if name in prepare:
                prepare[name]()
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            times[name] = time.perf_counter() - t0
        if round_ >= warmup:
            for k in ratios:
                ratios[k].append(times[k] / times["plain"])
    return {k: statistics.median(r) for k, r in ratios.items()}
