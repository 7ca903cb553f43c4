r"""Does applying α* train well? AlphaProbe in apply mode against the plain optimizer.

Problems (:mod:`alphawrap.data`): ``digits-mlp`` (Tanh MLP 64-64-64-10 on
scikit-learn's digits), ``digits-cnn`` (two conv blocks, 8 and 16 channels) and
``regression-mlp`` (Tanh MLP 8-64-64-1 on the synthetic teacher data, MSE).
Optimizers: Adam and SGD with momentum 0.9 over the learning-rate grid
1e-4, 1e-3, 1e-2, 1e-1. Methods:

* ``plain``: the optimizer alone;
* ``apply``: ``AlphaProbe(optimizer, mode="apply", model=..., loss_fn=...)`` with
  the library's defaults for the apply-mode options and the primary curvature
  ``--curvature`` (default ``ggn-exact``);
* ``apply-hessian``: the same with the library's default curvature, the
  block-diagonal Hessian;
* ``apply-every-4-reuse``: probing every 4th step and reusing the last α in
  between (``interval=4, reuse_alpha=True``): a quarter of the probing cost.

``--ablation`` runs the variants that chose the defaults instead (see
:data:`ABLATION`).

Every run starts from the same initial weights and batch order for a given
seed. Every ``--eval-every`` steps the full training set and the held-out set
are evaluated (eval time excluded from the clock). Reported, mean over seeds:

* at the **step budget** (``--steps``): final training loss and held-out
  accuracy (classification) or held-out MSE (regression);
* at the **wall-time budget**: the same numbers at the last evaluation whose
  training time is within the median time the plain optimizer needs for the
  step budget on that problem (measured in this run: the probe's extra cost per
  step is paid in steps).

A run whose loss becomes NaN/inf counts as diverged (reported as ``div``; its
losses as ``inf``). Writes ``benchmarks/results/training.json`` (or
``training_ablation.json``) and prints Markdown tables::

    nice -n 10 python benchmarks/training.py             # about 15-20 min
    nice -n 10 python benchmarks/training.py --ablation  # the defaults' evidence
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from alphawrap import AlphaProbe
from alphawrap.data import batches, build_model, evaluate, load_problem

warnings.filterwarnings("ignore")

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEMS = {
    "digits-mlp": ("digits", "mlp"),
    "digits-cnn": ("digits", "cnn"),
    "regression-mlp": ("regression", "mlp"),
}
OPTIMIZERS = ("adam", "sgd")
LRS = (1e-4, 1e-3, 1e-2, 1e-1)
RAW = {"smoothing": 0.0, "damping": 0.0, "adaptive_damping": False}

METHODS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "apply": {},
    "apply-hessian": {"curvature": "hessian"},
    "apply-every-4-reuse": {"interval": 4, "reuse_alpha": True},
}
"""The methods of the main run: ``None`` is the plain optimizer, a dict the
AlphaProbe options on top of ``mode="apply"`` and the library defaults."""

ABLATION: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "raw": dict(RAW),
    "raw-hessian": {**RAW, "curvature": "hessian"},
    "smooth-0.5": {**RAW, "smoothing": 0.5},
    "smooth-0.9": {**RAW, "smoothing": 0.9},
    "damp-1e-3": {**RAW, "damping": 1e-3},
    "lm-1e-3": {**RAW, "adaptive_damping": True, "damping": 1e-3},
    "lm-1": {**RAW, "adaptive_damping": True, "damping": 1.0},
    "lm-1e-3+smooth-0.5": {"smoothing": 0.5, "adaptive_damping": True, "damping": 1e-3},
    "lm-1e-3+smooth-0.9": {"smoothing": 0.9, "adaptive_damping": True, "damping": 1e-3},
    "lm-1e-3-hessian": {
        **RAW,
        "adaptive_damping": True,
        "damping": 1e-3,
        "curvature": "hessian",
    },
    "every-4-reuse": {**RAW, "interval": 4, "reuse_alpha": True},
    "every-4-no-reuse": {**RAW, "interval": 4, "reuse_alpha": False},
    "fallback-last": {**RAW, "fallback": "last"},
    "hessian-bounds-10": {**RAW, "curvature": "hessian", "bounds": (0.0, 10.0)},
}
"""Variants compared to choose the defaults: one option changed at a time."""


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(kind)


def _finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


@torch.no_grad()
def _train_loss(model, loss_fn_eval, problem) -> float:
    model.eval()
    out = model(problem.x_train)
    value = float(loss_fn_eval(out, problem.y_train))
    model.train()
    return value


def run(
    problem_name: str,
    optimizer: str,
    lr: float,
    method: str,
    options: dict[str, Any] | None,
    seed: int,
    args: argparse.Namespace,
    data_cache: dict,
) -> dict[str, Any]:
    dataset, kind = PROBLEMS[problem_name]
    if dataset not in data_cache:
        data_cache[dataset] = load_problem(dataset, seed=0)
    problem = data_cache[dataset]
    torch.manual_seed(seed)
    model = build_model(kind, problem, "tanh")
    loss_fn = problem.loss_function()
    loss_eval = (
        torch.nn.CrossEntropyLoss() if problem.classification else torch.nn.MSELoss()
    )
    opt = make_optimizer(optimizer, model.parameters(), lr)
    probe = None
    if options is not None:
        kwargs = {"curvature": args.curvature, **options}
        probe = AlphaProbe(opt, mode="apply", model=model, loss_fn=loss_fn, **kwargs)
        opt = probe
    order = batches(
        len(problem.y_train), args.batch, torch.Generator().manual_seed(seed)
    )
    checkpoints: list[dict[str, float]] = []
    elapsed = 0.0
    diverged = False

    def checkpoint(step: int) -> None:
        nonlocal diverged
        held = evaluate(model, problem)
        train = _train_loss(model, loss_eval, problem)
        if not (math.isfinite(train) and math.isfinite(held["loss"])):
            diverged = True
        checkpoints.append(
            {
                "step": step,
                "seconds": elapsed,
                "train_loss": train if math.isfinite(train) else math.inf,
                "test_loss": held["loss"] if math.isfinite(held["loss"]) else math.inf,
                "test_accuracy": held.get("accuracy", math.nan),
            }
        )

    checkpoint(0)
    for step in range(1, args.steps + 1):
        index = next(order)
        x, y = problem.x_train[index], problem.y_train[index]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        start = time.perf_counter()
        loss = opt.step(closure)
        elapsed += time.perf_counter() - start
        if not math.isfinite(float(loss)):
            diverged = True
        if step % args.eval_every == 0 or step == args.steps or diverged:
            checkpoint(step)
        if diverged:
            break
    result: dict[str, Any] = {
        "problem": problem_name,
        "optimizer": optimizer,
        "lr": lr,
        "method": method,
        "seed": seed,
        "diverged": diverged,
        "seconds": elapsed,
        "steps": checkpoints[-1]["step"],
        "checkpoints": checkpoints,
    }
    if probe is not None:
        records = list(probe.history)
        applied = [r.applied for r in records if r.action == "alpha"]
        result["probe"] = {
            "records": len(records),
            "actions": {
                a: sum(r.action == a for r in records)
                for a in {r.action for r in records}
            },
            "median_applied": statistics.median(applied) if applied else None,
            "final_damping": probe.apply_state["damping"],
            "median_rho": _median([r.extra.get("rho") for r in records]),
        }
    return result


def _median(values) -> float | None:
    values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return statistics.median(values) if values else None


def at_budget(run_: dict[str, Any], seconds: float | None) -> dict[str, float]:
    """The run's numbers at the step budget (``None``) or a wall-time budget."""
    points = run_["checkpoints"]
    if run_["diverged"]:
        return {"train_loss": math.inf, "test_loss": math.inf, "test_accuracy": 0.0}
    if seconds is None:
        return points[-1]
    within = [p for p in points if p["seconds"] <= seconds]
    return within[-1] if within else points[0]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds per (problem, optimizer, method, lr), both budgets."""
    budgets: dict[str, float] = {}
    for problem in {r["problem"] for r in runs}:
        plain = [
            r["seconds"] * r["steps_budget"] / max(r["steps"], 1)
            for r in runs
            if r["problem"] == problem and r["method"] == "plain" and r["steps"]
        ]
        if plain:
            budgets[problem] = statistics.median(plain)
    cells: dict[str, Any] = {}
    for r in runs:
        key = f"{r['problem']}|{r['optimizer']}|{r['method']}|{r['lr']:g}"
        cell = cells.setdefault(
            key,
            {
                "problem": r["problem"],
                "optimizer": r["optimizer"],
                "method": r["method"],
                "lr": r["lr"],
                "steps": {"train_loss": [], "test_loss": [], "test_accuracy": []},
                "time": {"train_loss": [], "test_loss": [], "test_accuracy": []},
                "steps_at_time": [],
                "ms_per_step": [],
                "diverged": 0,
            },
        )
        for budget, seconds in (("steps", None), ("time", budgets.get(r["problem"]))):
            point = at_budget(r, seconds)
            for k in ("train_loss", "test_loss", "test_accuracy"):
                cell[budget][k].append(point[k])
        cell["steps_at_time"].append(
            at_budget(r, budgets.get(r["problem"])).get("step", 0)
        )
        cell["ms_per_step"].append(1000 * r["seconds"] / max(r["steps"], 1))
        cell["diverged"] += r["diverged"]
    for cell in cells.values():
        for budget in ("steps", "time"):
            cell[budget] = {k: _mean(v) for k, v in cell[budget].items()}
        cell["steps_at_time"] = statistics.median(cell["steps_at_time"])
        cell["ms_per_step"] = statistics.median(cell["ms_per_step"])
    return {"time_budget_s": budgets, "cells": cells}


def _mean(values: list[float]) -> float:
    if any(math.isinf(v) for v in values):
        return math.inf
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _cell_text(cell: dict[str, Any], budget: str, classification: bool) -> str:
    numbers = cell[budget]
    if math.isinf(numbers["train_loss"]):
        return f"div {cell['diverged']}/{cell.get('n', '?')}"
    text = f"{numbers['train_loss']:.3g}"
    if classification:
        text += f" · {100 * numbers['test_accuracy']:.1f}%"
    else:
        text += f" · {numbers['test_loss']:.3g}"
    return text


def table(
    summary: dict[str, Any], budget: str, lrs, methods, problems, optimizers
) -> str:
    lines = [
        "| problem | optimizer | method | "
        + " | ".join(f"lr {lr:g}" for lr in lrs)
        + " | ms/step |"
        + (" steps at T |" if budget == "time" else ""),
        "|" + "---|" * (len(lrs) + 4 + (budget == "time")),
    ]
    cells = summary["cells"]
    for problem in problems:
        classification = not problem.startswith("regression")
        for optimizer in optimizers:
            for method in methods:
                row = [
                    cells.get(f"{problem}|{optimizer}|{method}|{lr:g}") for lr in lrs
                ]
                if not any(row):
                    continue
                texts = [
                    "–" if c is None else _cell_text(c, budget, classification)
                    for c in row
                ]
                ms = statistics.median(c["ms_per_step"] for c in row if c)
                extra = ""
                if budget == "time":
                    extra = (
                        " "
                        + "/".join(
                            f"{c['steps_at_time']:.0f}" if c else "–" for c in row
                        )
                        + " |"
                    )
                lines.append(
                    f"| {problem} | {optimizer} | {method} | "
                    + " | ".join(texts)
                    + f" | {ms:.1f} |"
                    + extra
                )
    return "\n".join(lines)


def robustness_table(runs: list[dict[str, Any]], methods, problems, optimizers) -> str:
    """Final training loss over the lr grid: geometric mean and worst lr.

    Per (problem, optimizer, method, lr) the median over seeds is taken first.
    """
    per_lr: dict[tuple, list[float]] = {}
    for r in runs:
        loss = math.inf if r["diverged"] else r["checkpoints"][-1]["train_loss"]
        key = (r["problem"], r["optimizer"], r["method"], r["lr"])
        per_lr.setdefault(key, []).append(loss)
    lines = [
        "| problem | optimizer | " + " | ".join(methods) + " |",
        "|" + "---|" * (len(methods) + 2),
    ]
    for problem in problems:
        for optimizer in optimizers:
            cells = []
            for method in methods:
                values = [
                    statistics.median(v)
                    for (p, o, m, _), v in per_lr.items()
                    if (p, o, m) == (problem, optimizer, method)
                ]
                if not values:
                    cells.append("–")
                    continue
                worst = max(values)
                mean = (
                    math.exp(statistics.fmean(math.log(v) for v in values))
                    if all(0 < v < math.inf for v in values)
                    else math.inf
                )
                cells.append(f"{mean:.3g} (worst {worst:.2g})")
            if any(c != "–" for c in cells):
                lines.append(f"| {problem} | {optimizer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument(
        "--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS
    )
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS
    )
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--curvature", default="ggn-exact")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--table-only",
        type=Path,
        nargs="+",
        default=None,
        help="print the lr-grid summary of existing results JSONs (merged) and exit",
    )
    args = parser.parse_args(argv)
    if args.table_only:
        runs = [r for f in args.table_only for r in json.loads(f.read_text())["runs"]]
        methods = list(dict.fromkeys(r["method"] for r in runs))
        if args.methods:
            methods = [m for m in methods if m in args.methods]
        problems = [p for p in PROBLEMS if any(r["problem"] == p for r in runs)]
        text = robustness_table(runs, methods, problems, OPTIMIZERS)
        print(text)
        return {"table": text}
    torch.set_num_threads(args.threads)
    catalogue = ABLATION if args.ablation else METHODS
    names = args.methods or list(catalogue)
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(catalogue)}")
    out = args.out or RESULTS / (
        "training_ablation.json" if args.ablation else "training.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    data_cache: dict = {}
    start = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for problem in args.problems:
            for optimizer in args.optimizers:
                for lr in args.lrs:
                    for method in names:  # interleaved: load changes hit all alike
                        result = run(
                            problem,
                            optimizer,
                            lr,
                            method,
                            catalogue[method],
                            seed,
                            args,
                            data_cache,
                        )
                        result["steps_budget"] = args.steps
                        runs.append(result)
                    last = runs[-len(names) :]
                    print(
                        f"seed {seed} {problem:>14} {optimizer:>4} lr={lr:<6g} "
                        + "  ".join(
                            f"{r['method']}:"
                            + (
                                "div"
                                if r["diverged"]
                                else f"{r['checkpoints'][-1]['train_loss']:.3g}"
                            )
                            for r in last
                        )
                        + f"  [{time.perf_counter() - start:.0f}s]",
                        flush=True,
                    )
    summary = summarise(runs)
    for cell in summary["cells"].values():
        cell["n"] = args.seeds
    tables = {
        budget: table(summary, budget, args.lrs, names, args.problems, args.optimizers)
        for budget in ("steps", "time")
    }
    result = {
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "methods": {n: catalogue[n] for n in names},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": args.threads,
        },
        "seconds": time.perf_counter() - start,
        "summary": summary,
        "tables": tables,
        "runs": runs,
    }
    out.write_text(json.dumps(result, indent=1, default=str))
    print()
    print(
        f"Step budget ({args.steps} steps, batch {args.batch}): final training loss · "
        "held-out accuracy (digits) or MSE (regression), mean of "
        f"{args.seeds} seeds"
    )
    print()
    print(tables["steps"])
    print()
    budgets = ", ".join(f"{p} {s:.2f} s" for p, s in summary["time_budget_s"].items())
    print(
        f"Wall-time budget (median time of the plain optimizer for {args.steps} "
        f"steps: {budgets}): same numbers at the last evaluation within it; "
        "'steps at T' per lr"
    )
    print()
    print(tables["time"])
    print()
    print(
        "Over the lr grid: final training loss, geometric mean over the lrs of the "
        "median over seeds (worst lr in brackets)"
    )
    print()
    print(robustness_table(runs, names, args.problems, args.optimizers))
    print(f"\nresults: {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
