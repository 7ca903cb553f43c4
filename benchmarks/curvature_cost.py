"""Cost of each curvature relative to a plain Adam step; exact-Hessian methods.

The models of ``/work/shared/notes/background.md``: the ReLU MLP 64-128-128-10, a
9-layer Tanh MLP (64 wide) and a small CNN (2 conv, pool, 2 linear) on 8x8
"digits-like" random data (pixels in [0, 1], 10 classes), batch 128, float32,
single thread. Times are medians over ``--steps`` steps after 3 warm-up steps.

Usage::

    python benchmarks/curvature_cost.py                   # every curvature, ReLU MLP
    python benchmarks/curvature_cost.py --model all       # all three models
    python benchmarks/curvature_cost.py --methods         # exact-Hessian methods

``--methods`` times one evaluation of ``dᵀHd`` (and ``dᵀGd``) by each method of
:class:`~alphawrap.curvature.exact.ExactHessian` after a backward pass, relative
to a plain Adam step. Ratios are medians over pairs (plain step, measured step)
run alternately, which keeps them meaningful on a loaded machine. The plain step
uses a model without BackPACK hooks; probed steps extend the model only when a
requested backend needs BackPACK.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from backpack import extend
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import relu_mlp, small_cnn, tanh_mlp

from alphawrap import AlphaProbe, available_curvatures
from alphawrap.batch import RecordedBatch
from alphawrap.curvature import EvaluationContext
from alphawrap.curvature.exact import ExactGGN, ExactHessian

warnings.filterwarnings("ignore", message="Full backward hook is firing")


MODELS = {"relu-mlp": relu_mlp, "tanh-mlp": tanh_mlp, "cnn": small_cnn}


def data(model_name: str, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (batch, 64), generator=g).float() / 16
    if model_name == "cnn":
        x = x.reshape(batch, 1, 8, 8)
    return x, torch.randint(0, 10, (batch,), generator=g)


def _setup(
    model_name: str, extended: bool = True
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model, loss_fn = MODELS[model_name](), nn.CrossEntropyLoss()
    if extended:  # BackPACK's hooks cost time even when no extension is active
        model, loss_fn = extend(model), extend(loss_fn)
    return model, loss_fn, *data(model_name)


def _median_time(step, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _paired(step, baseline, steps: int) -> tuple[float, float]:
    """Median time of ``step`` and median ratio to ``baseline``, run alternately.

    Interleaving makes the ratio robust to load drift on a shared machine.
    """
    for _ in range(3):
        step()
        baseline()
    times, ratios = [], []
    for _ in range(steps):
        start = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        step()
        end = time.perf_counter()
        times.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return statistics.median(times), statistics.median(ratios)


def _plain_step(model_name: str):
    model, loss_fn, x, y = _setup(model_name, extended=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def plain_step_time(model_name: str, steps: int) -> float:
    return _median_time(_plain_step(model_name), steps)


def probe_step_time(
    model_name: str, names: tuple[str, ...], steps: int, **kw
) -> tuple[float, float]:
    """A probed step (time, ratio to a plain Adam step run alternately).

    The model is extended with BackPACK only if a backend needs it.
    """
    from alphawrap.curvature import REGISTRY

    needs_backpack = kw.get("noise") or any(
        REGISTRY[n].needs_backpack_modules for n in names
    )
    model, loss_fn, x, y = _setup(model_name, extended=needs_backpack)
    probe = AlphaProbe(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        curvature=names,
        model=model,
        loss_fn=loss_fn,
        **kw,
    )

    def closure() -> torch.Tensor:
        probe.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return _paired(lambda: probe.step(closure), _plain_step(model_name), steps)


def method_time(model_name: str, curvature, steps: int) -> float:
    """One evaluation of ``curvature`` after a backward pass (no probe)."""
    model, loss_fn, x, y = _setup(model_name, extended=False)
    params = list(model.parameters())
    loss_fn(model(x), y).backward()
    directions = [1e-3 * torch.randn_like(p) for p in params]
    batch = RecordedBatch.from_call(model, loss_fn, x, y)

    def evaluate() -> None:
        ctx = EvaluationContext(
            params=params,
            directions=directions,
            reached=set(range(len(params))),
            names=[str(i) for i in range(len(params))],
            accumulate_dtype=torch.float32,
            batch=batch,
            curvatures=[curvature],
        )
        with torch.no_grad():
            curvature.quadratic(ctx).item()

    return _paired(evaluate, _plain_step(model_name), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="relu-mlp", choices=[*MODELS, "all"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--methods", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = list(MODELS) if args.model == "all" else [args.model]
    for model_name in models:
        plain = plain_step_time(model_name, args.steps)
        print(f"\n{model_name}: plain Adam step {plain * 1e3:.2f} ms (median)")
        print(f"  {'':32s} {'time':>8s} {'x plain step (paired median)':>30s}")
        if args.methods:
            for label, curvature in [
                ("ggn-exact forward (dual numbers)", ExactGGN("forward")),
                ("ggn-exact double-backward", ExactGGN("double-backward")),
                ("hessian forward-over-reverse", ExactHessian("forward-over-reverse")),
                ("hessian double-backward", ExactHessian("double-backward")),
                ("hessian forward-over-forward", ExactHessian("forward-over-forward")),
            ]:
                t, ratio = method_time(model_name, curvature, args.steps)
                print(f"  {label:32s} {t * 1e3:6.2f}ms {ratio:8.2f}x")
            continue
        runs = [((name,), {}) for name in available_curvatures()]
        runs += [
            (("ggn-exact", "hessian-exact"), {}),
            (("ggn",), {"per_block": True}),
            (("ggn",), {"noise": True}),
            (tuple(available_curvatures()), {}),
        ]
        for names, kw in runs:
            label = "all together" if len(names) > 2 else " + ".join(names)
            label += "".join(f", {k}" for k in kw)
            try:
                t, ratio = probe_step_time(model_name, names, args.steps, **kw)
            except Exception as error:
                print(f"  {label:32s} failed: {type(error).__name__}: {error}"[:120])
                continue
            print(f"  {label:32s} {t * 1e3:6.2f}ms {ratio:8.2f}x")


if __name__ == "__main__":
    main()
