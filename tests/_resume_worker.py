"""A training run that stops, saves, and resumes in a fresh process.

Used by ``tests/test_resume.py``: the test imports this module to run the first
``k`` steps and the uninterrupted reference, and runs it as a script in a new
Python process to load the checkpoint with ``torch.load(weights_only=True)`` and
finish the run::

    python tests/_resume_worker.py CHECKPOINT_DIR CONFIG [CONFIG ...]

Without arguments it reads that line from stdin, so a test can start the process
(and its imports) before the checkpoints exist.

Each config's checkpoint is ``CHECKPOINT_DIR/CONFIG.pt``; the result (parameters,
inner state, history) is written to ``CHECKPOINT_DIR/CONFIG.out.pt``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from backpack import extend
from torch import nn

from alphawrap import AlphaProbe

TOTAL_STEPS = 8
STOP_AFTER = 3

CONFIGS: dict[str, dict[str, Any]] = {
    "observe-adam-steplr": {"mode": "observe", "inner": "adam", "scheduler": True},
    "apply-adam": {"mode": "apply", "inner": "adam", "scheduler": False},
    "apply-sgd-steplr": {
        "mode": "apply",
        "inner": "sgd",
        "scheduler": True,
        "probe": {"interval": 2, "history_size": 3, "curvature": ("ggn", "hessian")},
    },
}


@dataclass
class Training:
    model: nn.Module
    probe: AlphaProbe
    scheduler: Any
    loss_fn: nn.Module


def build(name: str) -> Training:
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)))
    if config["inner"] == "adam":
        inner = torch.optim.Adam(model.parameters(), lr=0.05)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    probe = AlphaProbe(inner, mode=config["mode"], **config.get("probe", {}))
    scheduler = (
        torch.optim.lr_scheduler.StepLR(probe, step_size=2, gamma=0.5)
        if config["scheduler"]
        else None
    )
    return Training(model, probe, scheduler, extend(nn.CrossEntropyLoss()))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mini-batch of a step: a function of the step index alone."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train(t: Training, start: int, stop: int) -> None:
    for step in range(start, stop):
        x, y = batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            t.probe.zero_grad()
            loss = t.loss_fn(t.model(x), y)
            loss.backward()
            return loss

        t.probe.step(closure)
        if t.scheduler is not None:
            t.scheduler.step()


def save(t: Training, path: Path) -> None:
    torch.save(
        {
            "model": t.model.state_dict(),
            "probe": t.probe.state_dict(),
            "scheduler": t.scheduler.state_dict() if t.scheduler else None,
        },
        path,
    )


def load(t: Training, path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    t.model.load_state_dict(checkpoint["model"])
    t.probe.load_state_dict(checkpoint["probe"])
    if t.scheduler is not None:
        t.scheduler.load_state_dict(checkpoint["scheduler"])


def result(t: Training) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in t.model.parameters()],
        "probe": t.probe.state_dict(),
        "lrs": [g["lr"] for g in t.probe.param_groups],
    }


def main(argv: list[str]) -> None:
    if not argv:
        # Pay torch's one-off costs (the first optimizer imports torch._dynamo)
        # while the test is still writing the checkpoints.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        argv = sys.stdin.readline().split()
    directory, names = Path(argv[0]), argv[1:]
    for name in names:
        t = build(name)
        load(t, directory / f"{name}.pt")
        train(t, STOP_AFTER, TOTAL_STEPS)
        torch.save(result(t), directory / f"{name}.out.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
