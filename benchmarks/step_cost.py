"""Cost of a probe step relative to a plain inner step, measured side by side.

For every problem and curvature selection, plain Adam steps and probe steps on
the same batch are interleaved (plain, probe, plain, probe, ...) and the median of
the per-pair time ratios is reported; absolute times are not comparable across
runs on a shared machine, ratios measured side by side are. Also measured:

* ``interval=10``: the steps *between* probes (the probe is then a plain step);
* scaling of the ratio with depth (3-24 Tanh layers; the default curvature and
  ``ggn-exact``), and with width and batch size (the default, ``ggn-exact`` and
  ``hessian-exact``);
* peak memory of a probe step and of a plain step: ``torch.cuda.max_memory_allocated``
  on CUDA; on CPU the allocations and frees recorded by ``torch.profiler``,
  replayed in time order (CPU tensors have no allocator statistics).

    python benchmarks/step_cost.py --pairs 25
    python benchmarks/step_cost.py --device cuda \
        --out benchmarks/results/step_cost_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import PROBLEMS, BenchProblem, tanh_mlp, write_results

from alphawrap import AlphaProbe
from alphawrap.curvature import available

warnings.filterwarnings("ignore")

SELECTIONS: dict[str, tuple[str, ...]] = {
    "hessian": ("hessian",),
    "four block-diagonal": ("hessian", "ggn", "pch-clip", "pch-abs"),
    "ggn-exact": ("ggn-exact",),
    "hessian-exact": ("hessian-exact",),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _closure(opt, model, loss_fn, x, y):
    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def _pair(problem: BenchProblem, names, device, batch, interval=1, extended=False):
    """A plain Adam and a probe, each on its own copy of the same model.

    The plain step runs on the unextended model: the user's training loop before
    the probe. The probe gets ``model=``/``loss_fn=`` (no ``extend`` needed), or,
    with ``extended=True``, an ``extend``-ed model and no ``model=``.
    """
    model, loss_fn, x, y = problem.make(batch=batch, extended=False)
    model, x, y = model.to(device), x.to(device), y.to(device)
    twin, twin_loss, _, _ = problem.make(batch=batch, extended=extended)
    twin = twin.to(device)
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    kwargs = {} if extended else {"model": twin, "loss_fn": twin_loss}
    probe = AlphaProbe(
        torch.optim.Adam(twin.parameters(), lr=1e-3),
        curvature=names,
        interval=interval,
        **kwargs,
    )
    return (plain, _closure(plain, model, loss_fn, x, y)), (
        probe,
        _closure(probe, twin, twin_loss, x, y),
    )


def time_ratio(
    problem, names, pairs, device="cpu", batch=128, interval=1, extended=False
):
    """Median over interleaved pairs of (probe step time) / (plain step time).

    With ``interval > 1`` only the steps between probes are timed.
    """
    (plain, c_plain), (probe, c_probe) = _pair(
        problem, names, device, batch, interval, extended
    )
    for _ in range(3):
        plain.step(c_plain)
        probe.step(c_probe)
    ratios = []
    while len(ratios) < pairs:
        probing = probe.step_count % probe.interval == 0
        _sync(device)
        t0 = time.perf_counter()
        plain.step(c_plain)
        _sync(device)
        t1 = time.perf_counter()
        probe.step(c_probe)
        _sync(device)
        t2 = time.perf_counter()
        if interval == 1 or not probing:
            ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def _cpu_peak(fn) -> int:
    """Peak of the tensor bytes alive while ``fn`` runs on CPU, above the start.

    CPU tensors have no allocator statistics; ``torch.profiler``'s memory
    timeline (``profile_memory=True``) tracks every tensor's creation and
    destruction, so its maximum over the step minus its first point is the peak.
    """
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(
        activities=[ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(by_category) for by_category in sizes]
    return max(totals) - totals[0] if totals else 0


def _peak(device, fn) -> int:
    if not device.startswith("cuda"):
        return _cpu_peak(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory(problem, names, device, batch=128):
    """Peak memory of a probe step and of a plain step (bytes), and the sizes of
    parameters and optimizer state to read them against."""
    (plain, c_plain), (probe, c_probe) = _pair(problem, names, device, batch)
    for _ in range(2):
        plain.step(c_plain)
        probe.step(c_probe)
    params = [p for g in probe.param_groups for p in g["params"]]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in probe.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    plain_peak = _peak(device, lambda: plain.step(c_plain))
    probe_peak = _peak(device, lambda: probe.step(c_probe))
    return {
        "param_bytes": param_bytes,
        "state_bytes": state_bytes,
        "plain_peak_bytes": plain_peak,
        "probe_peak_bytes": probe_peak,
        "peak_ratio": round(probe_peak / max(plain_peak, 1), 3),
        "extra_over_params": round((probe_peak - plain_peak) / param_bytes, 3),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=35)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="skip the scaling sweeps")
    parser.add_argument("--out", default="benchmarks/results/step_cost_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names_known = set(available())
    selections = {
        k: v for k, v in SELECTIONS.items() if all(n in names_known for n in v)
    }
    rows, scaling, mem = [], [], []

    def report(kind, **row):
        row["ratio"] = round(row["ratio"], 3)
        (rows if kind == "rows" else scaling).append(row)
        print(kind, row, flush=True)

    for problem in PROBLEMS:
        for label, names in selections.items():
            ratio = time_ratio(problem, names, args.pairs, args.device)
            report("rows", problem=problem.name, curvature=label, ratio=ratio)
        ratio = time_ratio(problem, ("hessian",), args.pairs, args.device, interval=10)
        report(
            "rows",
            problem=problem.name,
            curvature="between probes (interval=10)",
            ratio=ratio,
        )
        ratio = time_ratio(
            problem, ("hessian",), args.pairs, args.device, extended=True
        )
        report(
            "rows",
            problem=problem.name,
            curvature="hessian via backpack.extend",
            ratio=ratio,
        )
        for label, names in selections.items():
            mem.append(
                {
                    "problem": problem.name,
                    "curvature": label,
                    **memory(problem, names, args.device),
                }
            )
            print("memory", mem[-1], flush=True)
    if not args.quick:
        pairs = max(args.pairs // 2, 7)
        for depth in (3, 6, 12, 24):
            problem = BenchProblem(f"tanh-depth-{depth}", lambda d=depth: tanh_mlp(d))
            for label in ("hessian", "ggn-exact"):
                if label in selections:
                    report(
                        "scaling",
                        axis="depth",
                        value=depth,
                        curvature=label,
                        ratio=time_ratio(
                            problem, selections[label], pairs, args.device
                        ),
                    )
        scaled = [
            k for k in ("hessian", "ggn-exact", "hessian-exact") if k in selections
        ]
        for width in (32, 128, 512):
            problem = BenchProblem(
                f"tanh-width-{width}", lambda w=width: tanh_mlp(6, w)
            )
            for label in scaled:
                report(
                    "scaling",
                    axis="width",
                    value=width,
                    curvature=label,
                    ratio=time_ratio(problem, selections[label], pairs, args.device),
                )
        for batch in (32, 128, 512):
            for label in scaled:
                report(
                    "scaling",
                    axis="batch",
                    value=batch,
                    curvature=label,
                    ratio=time_ratio(
                        PROBLEMS[1], selections[label], pairs, args.device, batch
                    ),
                )
    write_results(
        args.out,
        {
            "device": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else "cpu",
            "threads": args.threads,
            "pairs": args.pairs,
            "rows": rows,
            "scaling": scaling,
            "memory": mem,
        },
    )


if __name__ == "__main__":
    main()
