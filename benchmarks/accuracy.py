r"""How close is each curvature's α* to the true minimiser along the update?

For every problem × optimizer × learning rate, a short observe-mode training run
(the trajectory is the plain optimizer's) probes every ``--every``-th step with
*all* curvatures of :func:`alphawrap.curvature.available` and the line-search
truth (``truth_every``): α_line = argmin_α L(θ₀ + α d) on the step's own batch,
bracketed on a log₂ grid and refined by golden-section search to 0.1 % in α
(then one parabolic step), see :func:`alphawrap.truth.line_search`. The
secant over the inner step (``track_rho``: the parabola through L(θ₀), dᵀg and
L(θ₀ + d)) is reported as one more "curvature".

Per setting and curvature:

* ``median_abs_log``: median over probed steps of |ln(α*/α_line)| (0: exact,
  0.69: off by 2×), on the steps where both are defined;
* ``undefined``: share of probed steps where α* is undefined (not a descent
  direction, non-positive curvature);
* ``corr``: Pearson correlation of ln α* with ln α_line over the run;
* ``bias``: median of ln(α*/α_line) (> 0: α* too long).

Problems: ``relu-mlp``, ``tanh-mlp-9`` and ``cnn`` of :mod:`problems` on
scikit-learn's digits (MLPs get the flattened 8×8 images), and ``regression``
(the tanh MLP of :func:`alphawrap.data.build_model` on the synthetic regression
data, MSE). Optimizers: SGD with momentum 0.9, Adam, AdamW (weight decay 0.01),
each at a low, a good and a high learning rate (good / 10, good, good × 10; good:
0.03 for SGD, 1e-3 for Adam/AdamW).

Writes ``benchmarks/results/accuracy.json`` and ``accuracy.png`` (α* of every
curvature and α_line against the step for ``--figure-setting``) and prints a
Markdown table. Default run (about 5-10 minutes on 2 shared CPU cores)::

    nice -n 10 python benchmarks/accuracy.py

Scale up with ``--steps 300 --every 3`` and ``--slow`` (which adds ``kfra`` on the
CNN, 2-3 s per step on its own).
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

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import relu_mlp, small_cnn, tanh_mlp

from alphawrap import AlphaProbe
from alphawrap.curvature import available
from alphawrap.data import batches, build_model, load_problem

warnings.filterwarnings("ignore")

RESULTS = Path(__file__).resolve().parent / "results"
PROBLEMS = ("relu-mlp", "tanh-mlp-9", "cnn", "regression")
OPTIMIZERS = ("sgd", "adam", "adamw")
GOOD_LR = {"sgd": 0.03, "adam": 1e-3, "adamw": 1e-3}
LR_LEVELS = {"low": 0.1, "good": 1.0, "high": 10.0}
SLOW = {"cnn": ("kfra",)}  # left out unless --slow: seconds per step
SECANT = "secant"


def make_problem(name: str, seed: int):
    """Model, loss, training inputs and targets of a problem (extended)."""
    from backpack import extend

    if name == "regression":
        data = load_problem("regression", seed=seed)
        torch.manual_seed(seed)
        return build_model("mlp", data, "tanh"), data.loss_function(), data
    data = load_problem("digits", seed=seed)
    torch.manual_seed(seed)
    build = {"relu-mlp": relu_mlp, "tanh-mlp-9": tanh_mlp, "cnn": small_cnn}[name]
    model = extend(build())
    if name != "cnn":
        data.x_train = data.x_train.flatten(1)
        data.x_test = data.x_test.flatten(1)
    return model, extend(nn.CrossEntropyLoss()), data


def make_optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    raise ValueError(kind)


def run_setting(
    problem: str, optimizer: str, level: str, args: argparse.Namespace
) -> tuple[list[dict], list[str], float, object]:
    model, loss_fn, data = make_problem(problem, args.seed)
    lr = GOOD_LR[optimizer] * LR_LEVELS[level]
    curvatures = [c for c in available() if args.slow or c not in SLOW.get(problem, ())]
    probe = AlphaProbe(
        make_optimizer(optimizer, model.parameters(), lr),
        curvature=curvatures,
        model=model,
        loss_fn=loss_fn,
        interval=args.every,
        truth_every=args.every,
        track_rho=True,
    )
    generator = torch.Generator().manual_seed(args.seed)
    order = batches(len(data.y_train), args.batch, generator)
    start = time.perf_counter()
    for _ in range(args.steps):
        index = next(order)
        x, y = data.x_train[index], data.y_train[index]

        def closure(x=x, y=y):
            probe.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        probe.step(closure)
    seconds = time.perf_counter() - start
    records = []
    for r in probe.history:
        alphas = dict(r.alphas)
        alphas[SECANT] = r.extra.get("alpha_secant")
        records.append(
            {
                "step": r.step,
                "loss": r.loss,
                "alphas": alphas,
                "alpha_line": r.extra.get("alpha_line"),
                "loss_line": r.extra.get("loss_line"),
                "line_status": r.extra.get("line_status"),
                "rho": r.extra.get("rho"),
            }
        )
    return records, [*curvatures, SECANT], seconds, probe.history


def _defined(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def metrics(records: list[dict], curvature: str) -> dict:
    errors, xs, ys, undefined = [], [], [], 0
    for r in records:
        alpha, line = r["alphas"].get(curvature), r["alpha_line"]
        if not _defined(alpha):
            undefined += 1
            continue
        if _defined(line):
            errors.append(math.log(alpha / line))
            xs.append(math.log(alpha))
            ys.append(math.log(line))
    n = len(records)
    return {
        "n": n,
        "n_compared": len(errors),
        "median_abs_log": statistics.median(abs(e) for e in errors) if errors else None,
        "bias": statistics.median(errors) if errors else None,
        "undefined": undefined / n if n else None,
        "corr": _pearson(xs, ys),
        "abs_log": [abs(e) for e in errors],
    }


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_table(results: dict, curvatures: list[str], problems: list[str]) -> str:
    """Median |ln(α*/α_line)| pooled over optimizers and learning rates."""
    head = (
        "| curvature | "
        + " | ".join(problems)
        + " | all: median abs ln | median ln | undefined | corr |"
    )
    lines = [head, "|" + "---|" * (len(problems) + 5)]
    for c in curvatures:
        cells, pooled, undefined, n, corrs = [], [], 0, 0, []
        signed = [
            math.log(r["alphas"][c] / r["alpha_line"])
            for s in results["settings"]
            for r in s["records"]
            if _defined(r["alphas"].get(c)) and _defined(r["alpha_line"])
        ]
        for p in problems:
            errs, und, tot = [], 0, 0
            for s in results["settings"]:
                if s["problem"] != p or c not in s["metrics"]:
                    continue
                m = s["metrics"][c]
                errs += m["abs_log"]
                und += round(m["undefined"] * m["n"])
                tot += m["n"]
                if m["corr"] is not None:
                    corrs.append(m["corr"])
            pooled += errs
            undefined += und
            n += tot
            cell = _fmt(statistics.median(errs)) if errs else "–"
            if tot:
                cell += f" ({100 * und / tot:.0f} %)"
            cells.append(cell if tot else "n/a")
        lines.append(
            f"| {c} | "
            + " | ".join(cells)
            + f" | {_fmt(statistics.median(pooled)) if pooled else '–'}"
            + f" | {statistics.median(signed):+.2f}"
            + f" | {100 * undefined / n:.0f} %"
            + f" | {_fmt(statistics.median(corrs)) if corrs else '–'} |"
        )
    return "\n".join(lines)


def setting_table(results: dict, curvatures: list[str]) -> str:
    lines = [
        "| problem | optimizer | lr | " + " | ".join(curvatures) + " |",
        "|" + "---|" * (len(curvatures) + 3),
    ]
    for s in results["settings"]:
        cells = []
        for c in curvatures:
            m = s["metrics"].get(c)
            cells.append(
                "n/a"
                if m is None
                else f"{_fmt(m['median_abs_log'])} / {100 * m['undefined']:.0f}% / "
                f"{_fmt(m['corr'])}"
            )
        lines.append(
            f"| {s['problem']} | {s['optimizer']} | {s['lr']:g} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per setting")
    parser.add_argument("--every", type=int, default=3, help="probe every k-th step")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS
    )
    parser.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS
    )
    parser.add_argument(
        "--levels", nargs="+", default=list(LR_LEVELS), choices=LR_LEVELS
    )
    parser.add_argument("--slow", action="store_true", help="also kfra on the CNN")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--figure-setting",
        default="relu-mlp,adam,good",
        help="problem,optimizer,level of the figure",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--figure", type=Path, default=RESULTS / "accuracy.png")
    parser.add_argument("--full", action="store_true", help="also print per setting")
    parser.add_argument(
        "--table-only",
        type=Path,
        default=None,
        help="print the tables of an existing results JSON and exit",
    )
    args = parser.parse_args(argv)
    if args.table_only is not None:
        results = json.loads(args.table_only.read_text())
        names: list[str] = []
        for setting in results["settings"]:
            names += [c for c in setting["metrics"] if c not in names]
        problems = list(dict.fromkeys(s["problem"] for s in results["settings"]))
        print(summary_table(results, names, problems))
        if args.full:
            print()
            print(setting_table(results, names))
        return results
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    results: dict = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "threads": args.threads,
        },
        "settings": [],
    }
    all_curvatures: list[str] = []
    figure_history = None
    total = time.perf_counter()
    for problem in args.problems:
        for optimizer in args.optimizers:
            for level in args.levels:
                records, curvatures, seconds, history = run_setting(
                    problem, optimizer, level, args
                )
                for c in curvatures:
                    if c not in all_curvatures:
                        all_curvatures.append(c)
                lr = GOOD_LR[optimizer] * LR_LEVELS[level]
                setting = {
                    "problem": problem,
                    "optimizer": optimizer,
                    "level": level,
                    "lr": lr,
                    "seconds": seconds,
                    "line_status": {
                        s: sum(r["line_status"] == s for r in records)
                        for s in {r["line_status"] for r in records}
                    },
                    "metrics": {c: metrics(records, c) for c in curvatures},
                    "records": records,
                }
                results["settings"].append(setting)
                if f"{problem},{optimizer},{level}" == args.figure_setting:
                    figure_history = history
                m = setting["metrics"]
                print(
                    f"{problem:>10} {optimizer:>5} lr={lr:<7g} {seconds:6.1f}s  "
                    f"ggn-exact {_fmt(m['ggn-exact']['median_abs_log'])}  "
                    f"hessian {_fmt(m['hessian']['median_abs_log'])}",
                    flush=True,
                )
    results["seconds"] = time.perf_counter() - total
    table = summary_table(results, all_curvatures, args.problems)
    results["table"] = table
    args.out.write_text(json.dumps(results, indent=1))
    print()
    print(
        "Median |ln(α*/α_line)| per problem, pooled over SGD+momentum/Adam/AdamW at "
        "low/good/high lr (share of steps with α* undefined); median ln(α*/α_line) "
        "(> 0: α* too long); median correlation of ln α* with ln α_line over a run:"
    )
    print()
    print(table)
    if args.full:
        print()
        print("Per setting: median |ln(α*/α_line)| / undefined / corr")
        print(setting_table(results, all_curvatures))
    if figure_history is not None:
        from alphawrap.report import plot_history

        problem, optimizer, level = args.figure_setting.split(",")
        fig = plot_history(
            figure_history,
            args.figure,
            title=f"α* per curvature and the line-search truth α_line: {problem}, "
            f"{optimizer}, lr={GOOD_LR[optimizer] * LR_LEVELS[level]:g}",
            figsize=(12.0, 7.0),
        )
        import matplotlib.pyplot as plt

        plt.close(fig)
        print(f"\nfigure: {args.figure}")
    print(f"results: {args.out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
