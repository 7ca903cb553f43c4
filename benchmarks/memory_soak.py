"""Memory soak: 5,000 probed steps, resident memory sampled every 250 steps.

Runs a small MLP under an apply-mode probe (Adam inside, two curvatures) and
writes ``benchmarks/results/memory_soak.json`` with the resident set size every
250 steps, its growth after warm-up, the live tensor count at start and end, and
the history's length and estimated size. By default the history is uncapped so
that the one thing that is meant to grow is measured too; ``--history-size N``
caps it.

    python benchmarks/memory_soak.py [--steps 5000] [--every 250] [--history-size N]
    python benchmarks/memory_soak.py --route model \
        --out benchmarks/results/memory_soak_model.json

``--route model`` gives the probe ``model=``/``loss_fn=`` (its own recording
hooks, which keep output gradients) and the exact curvatures instead of
BackPACK's ``extend``.

``growth_minus_history_mb`` is the RSS growth not explained by the records added
(their in-memory size, measured object by object). With the history capped
(``--history-size 100 --out benchmarks/results/memory_soak_capped.json``) the RSS
itself stays flat.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from backpack import extend
from torch import nn

from alphawrap import AlphaProbe

RESULTS = Path(__file__).resolve().parent / "results" / "memory_soak.json"


def rss_mb() -> float:
    """Current resident set size in MB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() pokes deprecated lazy attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def deep_size(root: object) -> int:
    """Bytes of ``root`` and everything it references (each object once)."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--history-size", type=int, default=None)
    parser.add_argument(
        "--route",
        choices=("extend", "model"),
        default="extend",
        help="BackPACK's extend hooks, or model=/loss_fn= with the exact curvatures",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
    loss_fn = nn.CrossEntropyLoss()
    if args.route == "extend":
        model, loss_fn = extend(model), extend(loss_fn)
        route: dict = {"curvature": ("hessian", "ggn")}
    else:  # the probe's own recording hooks, δ kept for the exact Hessian
        route = {
            "curvature": ("ggn-exact", "hessian", "hessian-exact"),
            "model": model,
            "loss_fn": loss_fn,
        }
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        mode="apply",
        history_size=args.history_size,
        **route,
    )
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(64, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen))
        for _ in range(16)
    ]

    samples = []
    tensors_start = history_len_first = None
    start = time.perf_counter()
    for i in range(args.steps):
        x, y = batches[i % len(batches)]

        def closure(x=x, y=y) -> torch.Tensor:
            probe.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        probe.step(closure)
        if i + 1 == args.every:
            tensors_start = live_tensors()
            history_len_first = len(probe.history)
        if (i + 1) % args.every == 0:
            gc.collect()
            samples.append({"step": i + 1, "rss_mb": round(rss_mb(), 3)})
            print(f"step {i + 1:6d}  rss {samples[-1]['rss_mb']:8.2f} MB", flush=True)
    elapsed = time.perf_counter() - start

    tensors_end = live_tensors()
    history_bytes = len(pickle.dumps(probe.history.to_dicts()))
    history_memory_mb = deep_size(list(probe.history)) / 2**20
    first, last = samples[0]["rss_mb"], samples[-1]["rss_mb"]
    second_half = [s["rss_mb"] for s in samples[len(samples) // 2 :]]
    # Records added after the first sample: what the history may add to RSS.
    added = len(probe.history) - history_len_first
    history_growth_mb = history_memory_mb * added / max(len(probe.history), 1)
    result = {
        "route": args.route,
        "curvatures": list(probe.curvatures),
        "steps": args.steps,
        "every": args.every,
        "rss_mb": samples,
        "growth_mb": round(last - first, 3),
        "history_growth_mb": round(history_growth_mb, 3),
        "growth_minus_history_mb": round(last - first - history_growth_mb, 3),
        "growth_mb_second_half": round(second_half[-1] - second_half[0], 3),
        "max_minus_min_mb": round(
            max(s["rss_mb"] for s in samples) - min(s["rss_mb"] for s in samples), 3
        ),
        "live_tensors": {"after_first_sample": tensors_start, "end": tensors_end},
        "history": {
            "len": len(probe.history),
            "maxlen": probe.history.maxlen,
            "dropped": probe.history.dropped,
            "pickled_bytes": history_bytes,
            "in_memory_mb": round(history_memory_mb, 3),
            "in_memory_bytes_per_record": round(
                history_memory_mb * 2**20 / max(len(probe.history), 1)
            ),
        },
        "seconds": round(elapsed, 1),
        "ms_per_step": round(1e3 * elapsed / args.steps, 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb"}, indent=2))


if __name__ == "__main__":
    main()
