"""Cost of a probe step relative to a plain inner step, measured side by side.

For every problem, a plain Adam step and one probe step of every curvature
selection, on the same batch, run once per round in a random order (a fixed
order biases the comparison: a step pays for the cache misses of the one before
it); the median over rounds of each probe step's time over the plain step's is
reported. Absolute times are not comparable across runs on a shared machine,
ratios measured side by side are. Also measured:

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
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import (
    PROBLEMS,
    BenchProblem,
    shuffled_ratios,
    tanh_mlp,
    write_results,
)

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


def _plain(problem: BenchProblem, device, batch):
    """Plain Adam on the unextended model (the user's training loop before the
    probe), its closure and the batch."""
    model, loss_fn, x, y = problem.make(batch=batch, extended=False)
    model, x, y = model.to(device), x.to(device), y.to(device)
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    return plain, _closure(plain, model, loss_fn, x, y), x, y


def _probe(problem: BenchProblem, names, device, x, y, interval=1, extended=False):
    """A probe on its own copy of the model, and its closure on the batch ``x, y``.

    It gets ``model=``/``loss_fn=`` (no ``extend`` needed), or, with
    ``extended=True``, an ``extend``-ed model and no ``model=``.
    """
    twin, twin_loss, _, _ = problem.make(batch=len(x), extended=extended)
    twin = twin.to(device)
    kwargs = {} if extended else {"model": twin, "loss_fn": twin_loss}
    probe = AlphaProbe(
        torch.optim.Adam(twin.parameters(), lr=1e-3),
        curvature=names,
        interval=interval,
        **kwargs,
    )
    return probe, _closure(probe, twin, twin_loss, x, y)


def _pair(problem: BenchProblem, names, device, batch):
    """A plain Adam and a probe, each on its own copy of the same model."""
    plain, c_plain, x, y = _plain(problem, device, batch)
    return (plain, c_plain), _probe(problem, names, device, x, y)


def time_ratios(
    problem: BenchProblem,
    variants: dict[str, dict],
    rounds: int,
    device: str = "cpu",
    batch: int = 128,
) -> dict[str, float]:
    """Median over shuffled rounds of (probe step time) / (plain step time).

    ``variants`` maps a label to the probe's settings (``names``, and optionally
    ``interval``, ``extended``). Each round runs the plain step and one step of
    every variant in a random order; with ``interval > 1`` the probed steps run
    untimed right before that variant's timed step, so only steps between
    probes are timed (every tenth of them follows a probed step and pays its
    cache misses; the median over rounds hardly moves).
    """
    plain, c_plain, x, y = _plain(problem, device, batch)
    steps = {"plain": lambda: plain.step(c_plain)}
    prepare = {}
    for label, v in variants.items():
        interval = v.get("interval", 1)
        probe, c_probe = _probe(
            problem, v["names"], device, x, y, interval, v.get("extended", False)
        )
        steps[label] = lambda p=probe, c=c_probe: p.step(c)
        if interval > 1:

            def skip_probed(p=probe, c=c_probe) -> None:
                while p.step_count % p.interval == 0:
                    p.step(c)

            prepare[label] = skip_probed
    return shuffled_ratios(steps, rounds, prepare=prepare, sync=lambda: _sync(device))


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
    parser.add_argument("--pairs", type=int, default=35, help="timed rounds")
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
        variants = {label: {"names": names} for label, names in selections.items()}
        variants["between probes (interval=10)"] = {
            "names": ("hessian",),
            "interval": 10,
        }
        variants["hessian via backpack.extend"] = {
            "names": ("hessian",),
            "extended": True,
        }
        for label, ratio in time_ratios(
            problem, variants, args.pairs, args.device
        ).items():
            report("rows", problem=problem.name, curvature=label, ratio=ratio)
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

        def sweep(axis, value, problem, labels, batch=128):
            variants = {k: {"names": selections[k]} for k in labels if k in selections}
            ratios = time_ratios(problem, variants, pairs, args.device, batch)
            for label, ratio in ratios.items():
                report("scaling", axis=axis, value=value, curvature=label, ratio=ratio)

        for depth in (3, 6, 12, 24):
            problem = BenchProblem(f"tanh-depth-{depth}", lambda d=depth: tanh_mlp(d))
            sweep("depth", depth, problem, ("hessian", "ggn-exact"))
        scaled = ("hessian", "ggn-exact", "hessian-exact")
        for width in (32, 128, 512):
            problem = BenchProblem(
                f"tanh-width-{width}", lambda w=width: tanh_mlp(6, w)
            )
            sweep("width", width, problem, scaled)
        for batch in (32, 128, 512):
            sweep("batch", batch, PROBLEMS[1], scaled, batch)
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
