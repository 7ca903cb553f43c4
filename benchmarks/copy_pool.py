"""Do kept copy buffers make a probe step cheaper? Larger MLPs, side by side.

A probed step copies θ₀, the optimizer state, the gradients and the packed
``d``/``g``, and forms ``d``. The probe copies them into buffers kept from the
step before (:class:`alphawrap.direction.CopyPool`) for tensors of at least
``POOL_MIN`` elements, and from ``POOL_SMALL`` up once the parameters hold
``POOL_TOTAL`` elements in all; below ``POOL_MIN`` parameter elements in all it
uses no pool (the two smallest models here: both columns are then clones, and
their difference is the noise). This script times, in shuffled rounds on the same
batch, a plain Adam step, the probe, and the probe with fresh clones every step
(its pool switched off), and reports the median over rounds of each probe step's
time over the plain step's, for MLPs from the issue's ReLU MLP up to 1.1 M
parameters. ::

    python benchmarks/copy_pool.py --rounds 61
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS, BenchProblem, shuffled_ratios, tanh_mlp, write_results
from step_cost import _plain, _probe


def relu_mlp(width: int, hidden: int) -> nn.Module:
    """64 → width, ``hidden`` width → width layers, → 10; ReLU between."""
    layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
    for _ in range(hidden):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


CASES = [
    PROBLEMS[0],
    BenchProblem("relu-1x256", lambda: relu_mlp(256, 1)),
    BenchProblem("relu-4x256", lambda: relu_mlp(256, 4)),
    BenchProblem("relu-1x512", lambda: relu_mlp(512, 1)),
    BenchProblem("relu-12x256", lambda: relu_mlp(256, 12)),
    BenchProblem("tanh-6x512", lambda: tanh_mlp(6, 512)),
]


def compare(problem: BenchProblem, curvature: str, rounds: int) -> dict:
    """Probe with kept buffers and with fresh clones, each over plain Adam."""
    plain, plain_closure, x, y = _plain(problem, "cpu", 128)
    probe, closure = _probe(problem, (curvature,), "cpu", x, y)
    cloning, cloning_closure = _probe(problem, (curvature,), "cpu", x, y)
    cloning._copy_pool = lambda: None  # fresh clones every step
    steps = {
        "plain": lambda: plain.step(plain_closure),
        "kept buffers": lambda: probe.step(closure),
        "clones": lambda: cloning.step(cloning_closure),
    }
    row = {
        "problem": problem.name,
        "parameters": sum(p.numel() for p in probe._params()),
        "curvature": curvature,
        **{k: round(v, 3) for k, v in shuffled_ratios(steps, rounds).items()},
    }
    row["buffers kept"] = len(probe._pool._slots)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--out", default="benchmarks/results/copy_pool_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for problem in CASES:
        for curvature in ("ggn-exact", "hessian-exact"):
            rows.append(compare(problem, curvature, args.rounds))
            print(rows[-1], flush=True)
    write_results(args.out, {"rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
