"""The ``alphawrap`` command: train a small model with a probed optimizer.

Runs as ``python -m alphawrap`` or through the ``alphawrap`` console script.
It trains a model on a built-in problem (:mod:`alphawrap.data`) with a
``torch.optim`` optimizer wrapped in :class:`~alphawrap.AlphaProbe`, shows the
running loss and ``α*`` while it trains, prints the history's summary and the
held-out result, and writes ``history.csv``, ``history.json`` and ``alpha.png``
to the output folder. Every option is checked before training starts.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from alphawrap import curvature as curvature_registry
from alphawrap.data import ACTIVATIONS, DATASETS, MODELS
from alphawrap.distributed import launch_from_env
from alphawrap.errors import ProbeError
from alphawrap.probe import AlphaProbe

PROG = "alphawrap"
DEFAULT_CURVATURES = ("hessian", "ggn", "pch-clip", "pch-abs")
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3, "adagrad": 1e-2}
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}
MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
FILES = ("history.csv", "history.json", "alpha.png")
#: Name of the ``AlphaProbe`` argument for line-search truth every k steps.
TRUTH_ARGUMENT = "truth_every"


def _truth_supported() -> bool:
    """Whether this AlphaProbe can run a line search for the true ``α``."""
    return TRUTH_ARGUMENT in inspect.signature(AlphaProbe.__init__).parameters or (
        hasattr(AlphaProbe, TRUTH_ARGUMENT)
    )


# ------------------------------------------------------------------ argument types
def _int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number, got {text!r}"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _float(low: float, *, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"greater than {low:g}" if strict else f"at least {low:g}"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {bound}, got {text}"
            )
        return value

    parse.__name__ = "float"
    return parse


def _fallback(text: str) -> str | float:
    if text in ("inner", "skip"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'inner', 'skip' or a multiplier >= 0, got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"multiplier must be finite and >= 0, got {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser (used by :func:`main` and the docs)."""
    truth = (
        "Run a line search for the true α along d every K-th probed step and "
        "record it beside α* (0: never; it costs extra forward passes)."
        if _truth_supported()
        else "Line-search truth every K-th step (reserved: this version of "
        "AlphaProbe has no line search yet, so only 0 is accepted)."
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train a small model on a built-in problem with a torch.optim optimizer "
            "wrapped in AlphaProbe, which measures on every step the optimal step "
            "length α* = -dᵀg / dᵀCd along the optimizer's update d for each "
            "curvature C. Shows the running loss and α* while training, prints a "
            "summary and the held-out result, and writes history.csv, history.json "
            "and alpha.png to the output folder."
        ),
        epilog=(
            "Examples:\n"
            "  alphawrap                        # digits, MLP, SGD, 200 steps\n"
            "  alphawrap --optimizer adam --lr 3e-3 --mode apply\n"
            "  alphawrap --dataset regression --curvature ggn --steps 500\n"
            "  alphawrap --model cnn --curvature hessian --curvature ggn --out runs/cnn"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("problem")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits: scikit-learn's 8x8 handwritten digits, 10 classes, 75%% "
        "training / 25%% held out (needs scikit-learn); regression: synthetic "
        "8-dimensional regression generated from --seed. Default: %(default)s.",
    )
    data.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="mlp: two hidden layers of --hidden units; cnn: two Conv2d+MaxPool "
        "blocks and a Linear layer (digits only). Default: %(default)s.",
    )
    data.add_argument(
        "--activation",
        choices=tuple(ACTIVATIONS),
        default="tanh",
        help="Activation of the hidden layers. With relu the block-diagonal "
        "Hessian, GGN and PCH coincide; tanh tells them apart. Default: %(default)s.",
    )
    data.add_argument(
        "--hidden",
        type=_int(1),
        default=64,
        metavar="N",
        help="Width of the MLP's hidden layers. Default: %(default)s.",
    )
    opt = parser.add_argument_group("optimizer")
    opt.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        default="sgd",
        help="The inner torch.optim optimizer. Default: %(default)s.",
    )
    opt.add_argument(
        "--lr",
        type=_float(0.0, strict=True),
        default=None,
        help="Learning rate (> 0). Default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
        + ".",
    )
    opt.add_argument(
        "--momentum",
        type=_float(0.0, strict=False),
        default=None,
        help="Momentum in [0, 1), for sgd and rmsprop only. Default: 0.9 for sgd, "
        "0 for rmsprop.",
    )
    opt.add_argument(
        "--weight-decay",
        type=_float(0.0, strict=False),
        default=0.0,
        help="Weight decay (>= 0). Default: %(default)s.",
    )
    opt.add_argument(
        "--batch-size",
        type=_int(1),
        default=64,
        metavar="B",
        help="Mini-batch size, at most the training set size. Default: %(default)s.",
    )
    opt.add_argument(
        "--steps",
        type=_int(1),
        default=200,
        metavar="N",
        help="Number of optimizer steps. Default: %(default)s.",
    )
    probe = parser.add_argument_group("probe")
    probe.add_argument(
        "--curvature",
        action="append",
        metavar="NAME[,NAME...]",
        help="Curvature(s) C for α*; repeat the option or give a comma list. The "
        "first is the primary one (apply mode, progress display). Choices: "
        + ", ".join(curvature_registry.available())
        + ". Default: "
        + ",".join(DEFAULT_CURVATURES)
        + ".",
    )
    probe.add_argument(
        "--mode",
        choices=("observe", "apply"),
        default="observe",
        help="observe: record α* and take the optimizer's step unchanged; apply: "
        "take θ + α*·d with the primary curvature's α*. Default: %(default)s.",
    )
    probe.add_argument(
        "--fallback",
        type=_fallback,
        default="inner",
        metavar="{inner,skip,C}",
        help="Apply mode, when α* is undefined: inner takes the optimizer's step, "
        "skip takes none, a number C takes C·d. Default: %(default)s.",
    )
    probe.add_argument(
        "--bounds",
        type=_float(0.0, strict=False),
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="Apply mode: clip the applied α* into [LOW, HIGH]. Default: no clipping.",
    )
    probe.add_argument(
        "--interval",
        type=_int(1),
        default=1,
        metavar="K",
        help="Probe every K-th step; the others take the plain step. Default: "
        "%(default)s.",
    )
    probe.add_argument(
        "--truth-every",
        type=_int(0),
        default=0,
        metavar="K",
        help=truth + " Default: %(default)s.",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--seed",
        type=_int(0),
        default=0,
        help="Seed of the data split, the initial weights and the batch order. "
        "Default: %(default)s.",
    )
    run.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N (an error if CUDA is not available). "
        "Default: %(default)s.",
    )
    run.add_argument(
        "--threads",
        type=_int(1),
        default=1,
        metavar="N",
        help="CPU threads for torch (torch.set_num_threads). The built-in models are "
        "small; more threads rarely help them. Default: %(default)s.",
    )
    run.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="Floating-point type of the model and data. Default: %(default)s.",
    )
    run.add_argument(
        "--out",
        default="alphawrap-out",
        metavar="DIR",
        help="Output folder for history.csv, history.json and alpha.png (created; "
        "existing files are overwritten). Default: %(default)s.",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="Show no progress and no summary; print only the held-out result and "
        "the files written.",
    )
    return parser


# ------------------------------------------------------------------- validation
class UsageError(ValueError):
    """A bad option value, found before training."""


def _curvatures(values: Sequence[str] | None) -> list[str]:
    if not values:
        return list(DEFAULT_CURVATURES)
    names = [n.strip() for v in values for n in v.split(",")]
    if any(not n for n in names):
        raise UsageError(f"--curvature has an empty name in {','.join(values)!r}.")
    try:
        curvature_registry.resolve(names)
    except ValueError as error:
        raise UsageError(f"--curvature: {error}") from None
    return names


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device: {text!r} is not a device; use cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {text}: CUDA is not available here (torch "
                f"{torch.__version__}, built with CUDA {torch.version.cuda}). Use "
                "--device cpu."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {text}: only {count} CUDA device(s) are visible "
                f"(cuda:0 to cuda:{count - 1})."
            )
    elif device.type != "cpu":
        raise UsageError(f"--device: use cpu, cuda or cuda:N, got {text!r}.")
    return device


def _output_folder(text: str) -> Path:
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {text}: exists and is not a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {text}: cannot create the folder ({error}).") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"--out {text}: the folder is not writable.")
    return out


def _optimizer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "lr": args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    }
    if args.momentum is not None:
        if args.optimizer not in MOMENTUM_OPTIMIZERS:
            raise UsageError(
                f"--momentum applies to {' and '.join(MOMENTUM_OPTIMIZERS)} only; "
                f"{args.optimizer} has its own moment estimates (betas)."
            )
        if args.momentum >= 1:
            raise UsageError(f"--momentum must be in [0, 1), got {args.momentum:g}.")
    if args.optimizer == "sgd":
        kwargs["momentum"] = 0.9 if args.momentum is None else args.momentum
    elif args.optimizer == "rmsprop" and args.momentum is not None:
        kwargs["momentum"] = args.momentum
    if args.weight_decay:
        kwargs["weight_decay"] = args.weight_decay
    return kwargs


def _check_truth(args: argparse.Namespace) -> dict[str, Any]:
    if args.truth_every == 0:
        return {}
    if not _truth_supported():
        raise UsageError(
            f"--truth-every {args.truth_every}: this version of AlphaProbe has no "
            "line search yet; the option is reserved and only 0 is accepted."
        )
    return {TRUTH_ARGUMENT: args.truth_every}


def _accepts(name: str) -> bool:
    """Whether ``AlphaProbe(...)`` takes the keyword argument ``name``."""
    return name in inspect.signature(AlphaProbe.__init__).parameters


def _preflight(
    build: Callable[[], tuple[torch.nn.Module, torch.nn.Module, AlphaProbe]],
    problem: Any,
    curvatures: Sequence[str],
) -> None:
    """One probed step on a throw-away copy of the setup, before training.

    Finds what only a step can tell (a curvature that cannot handle a module of
    the model, a device or dtype problem) and reports it as a usage error. Runs
    under a forked random state, so the training run is not affected.
    """
    devices = [problem.x_train.device] if problem.x_train.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        model, loss_fn, probe = build()
        x, y = problem.x_train[:4], problem.y_train[:4]

        def closure() -> torch.Tensor:
            probe.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        try:
            probe.step(closure)
        except (ProbeError, RuntimeError, NotImplementedError) as error:
            raise UsageError(
                f"a trial step with --curvature {','.join(curvatures)} failed: {error}"
            ) from None


# --------------------------------------------------------------------- progress
class _Progress:
    """tqdm bar on a terminal (when installed), else a line every ~10 % of the run."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.bar = None
        self.every = max(1, total // 10)
        self.started = time.perf_counter()
        if enabled and stream.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(
                    total=total, file=stream, unit="step", dynamic_ncols=True
                )

    def update(self, step: int, loss: float, alpha: str) -> None:
        if not self.enabled:
            return
        text = f"loss {loss:.4g}  {alpha}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.started
            width = len(str(self.total))
            print(
                f"step {step + 1:>{width}}/{self.total}  {text}  ({elapsed:.1f} s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _alpha_text(probe: AlphaProbe) -> str:
    if not probe.history:
        return ""
    record = probe.history[-1]
    if record.alpha is None:
        return f"α*[{record.primary}] undefined ({record.status})"
    return f"α*[{record.primary}] {record.alpha:.3g}"


# ------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line tool.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 for bad options (nothing was trained),
        1 when training failed, 130 when interrupted (what was recorded so far
        is still written).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return (
            exit_.code
            if isinstance(exit_.code, int)
            else (0 if exit_.code is None else 2)
        )
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            # BackPACK's hooks on the first layer, whose input needs no gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            return _run(args)
    except UsageError as error:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # in-process callers keep their setting


def _run(args: argparse.Namespace) -> int:
    from alphawrap import data

    out = sys.stdout
    # ---- everything is checked before training starts
    curvatures = _curvatures(args.curvature)
    device = _device(args.device)
    launch = launch_from_env(device)  # under torchrun (WORLD_SIZE > 1): DDP
    device = launch.device
    if not launch.main:  # only rank 0 prints and writes files
        args.quiet, out = True, open(os.devnull, "w")
    optimizer_kwargs = _optimizer_kwargs(args)
    truth_kwargs = _check_truth(args)
    if args.model == "cnn" and args.dataset != "digits":
        raise UsageError(
            f"--model cnn needs image data; the {args.dataset} problem has vectors. "
            "Use --model mlp or --dataset digits."
        )
    if args.bounds is not None and args.bounds[0] > args.bounds[1]:
        raise UsageError(f"--bounds: LOW must not exceed HIGH, got {args.bounds}.")
    try:
        problem = data.load_problem(args.dataset, seed=args.seed)
    except ImportError as error:
        raise UsageError(str(error)) from None
    n_train = len(problem.y_train)
    if args.batch_size > n_train:
        raise UsageError(
            f"--batch-size {args.batch_size} exceeds the {n_train} training examples "
            f"of {args.dataset}."
        )
    try:
        launch.check_batch_size(args.batch_size)
    except ValueError as error:
        raise UsageError(f"--batch-size: {error}") from None
    try:
        import matplotlib  # noqa: F401

        plot = True
    except ImportError:
        plot = False
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    problem = problem.to(device, dtype)

    def build() -> tuple[torch.nn.Module, torch.nn.Module, AlphaProbe]:
        model = data.build_model(args.model, problem, args.activation, args.hidden)
        model = model.to(device=device, dtype=dtype)
        loss_fn = problem.loss_function()
        extra = dict(truth_kwargs)
        if truth_kwargs and _accepts("loss_fn"):  # the line search re-evaluates it
            extra["loss_fn"] = loss_fn
        try:
            inner = OPTIMIZERS[args.optimizer](model.parameters(), **optimizer_kwargs)
            probe = AlphaProbe(
                inner,
                curvature=curvatures,
                mode=args.mode,
                fallback=args.fallback,
                bounds=tuple(args.bounds) if args.bounds is not None else None,
                interval=args.interval,
                model=model,
                **extra,
            )
        except (ValueError, TypeError) as error:
            raise UsageError(str(error)) from None
        return launch.wrap(model), loss_fn, probe

    _preflight(build, problem, curvatures)
    folder = _output_folder(args.out)
    torch.manual_seed(args.seed)
    model, loss_fn, probe = build()
    if not plot:
        print(
            f"{PROG}: matplotlib is not installed, alpha.png will not be written "
            "(pip install alphawrap[plot]).",
            file=sys.stderr,
        )

    n_params = sum(p.numel() for p in model.parameters())
    settings = ", ".join(f"{k}={v:g}" for k, v in optimizer_kwargs.items())
    if not args.quiet:
        print(
            f"{PROG}: {args.dataset} ({n_train} training / {len(problem.y_test)} "
            f"held-out examples), {args.model} ({args.activation}, {n_params:,} "
            f"parameters), {OPTIMIZERS[args.optimizer].__name__}({settings})\n"
            f"probe: curvature {', '.join(curvatures)}; {args.mode} mode; "
            f"{args.steps} steps of batch {args.batch_size}; seed {args.seed}; "
            f"{device}, {args.dtype}",
            file=out,
            flush=True,
        )

    # ---- training
    generator = torch.Generator().manual_seed(args.seed)
    order = data.batches(n_train, args.batch_size, generator)
    progress = _Progress(args.steps, sys.stderr, enabled=not args.quiet)
    running, weight = 0.0, 0.0
    status = 0
    started = time.perf_counter()
    try:
        for step in range(args.steps):
            index = launch.shard(next(order)).to(device)
            x, y = problem.x_train[index], problem.y_train[index]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                probe.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss = float(probe.step(closure).detach())
            if math.isfinite(loss):
                running, weight = 0.9 * running + 0.1 * loss, 0.9 * weight + 0.1
            progress.update(
                step, running / weight if weight else loss, _alpha_text(probe)
            )
    except KeyboardInterrupt:
        progress.close()
        print(
            f"\n{PROG}: interrupted after {probe.step_count} steps; writing what was "
            "recorded.",
            file=sys.stderr,
        )
        status = 130
    except (ProbeError, RuntimeError, ValueError) as error:
        progress.close()
        print(
            f"{PROG}: training failed at step {probe.step_count}: {error}",
            file=sys.stderr,
        )
        status = 1
    else:
        progress.close()
    seconds = time.perf_counter() - started
    if not launch.main:
        launch.close()
        return status

    # ---- results
    history = probe.history
    if not args.quiet:
        print("", file=out)
        print(history.summary(), file=out)
        print("", file=out)
    result = data.evaluate(launch.unwrap(model), problem)
    speed = f"{probe.step_count} steps in {seconds:.1f} s"
    if problem.classification:
        print(
            f"Held-out accuracy: {100 * result['accuracy']:.1f}% (loss "
            f"{result['loss']:.4g}); {speed}",
            file=out,
        )
    else:
        print(f"Held-out loss (MSE): {result['loss']:.4g}; {speed}", file=out)
    paths = [folder / "history.csv", folder / "history.json"]
    history.to_csv(paths[0])
    history.to_json(paths[1])
    if plot and len(history):
        from alphawrap.report import plot_history, pyplot

        figure = plot_history(
            history,
            folder / "alpha.png",
            title=f"α* along {OPTIMIZERS[args.optimizer].__name__}'s update: "
            f"{args.dataset}, {args.model}, {settings}",
        )
        pyplot().close(figure)
        paths.append(folder / "alpha.png")
    print("Wrote:", file=out)
    for path in paths:
        print(f"  {path}", file=out)
    out.flush()
    launch.close()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
