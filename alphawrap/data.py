"""Built-in problems for the command-line tool and examples.

* ``digits``: scikit-learn's handwritten digits (1,797 images of 8×8 pixels,
  10 classes; bundled with scikit-learn, no download), split 75 % / 25 % into
  training and held-out sets, stratified by class; pixels scaled to [0, 1].
  Needs scikit-learn (``pip install alphawrap[data]``).
* ``regression``: a synthetic regression problem generated from the seed:
  inputs ``x ~ N(0, I)`` in 8 dimensions, targets from a random two-layer tanh
  "teacher" network plus Gaussian noise, 1,024 training and 256 held-out points.

Models (``mlp``, ``cnn``) use only modules every BackPACK curvature supports
(``Linear``, ``Conv2d``, ``ReLU``/``Tanh``, ``MaxPool2d``, ``Flatten``) and come
back already extended with :func:`backpack.extend`, as does the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from backpack import extend
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "DATASETS",
    "MODELS",
    "Problem",
    "batches",
    "build_model",
    "evaluate",
    "load_problem",
]

DATASETS: tuple[str, ...] = ("digits", "regression")
MODELS: tuple[str, ...] = ("mlp", "cnn")
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


@dataclass
class Problem:
    """A supervised learning problem with a training and a held-out split.

    Attributes:
        name: ``"digits"`` or ``"regression"``.
        x_train: Training inputs; images are ``[N, 1, 8, 8]``, vectors ``[N, D]``.
        y_train: Training targets (class indices or ``[N, 1]`` values).
        x_test: Held-out inputs.
        y_test: Held-out targets.
        classification: Whether targets are class indices.
        n_outputs: Number of classes, or of regression outputs.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classification: bool
    n_outputs: int

    @property
    def image(self) -> bool:
        """Whether the inputs are images (``[N, C, H, W]``)."""
        return self.x_train.dim() == 4

    def loss_function(self) -> nn.Module:
        """A fresh BackPACK-extended loss: cross-entropy or mean squared error."""
        return extend(nn.CrossEntropyLoss() if self.classification else nn.MSELoss())

    def to(
        self, device: torch.device | str, dtype: torch.dtype | None = None
    ) -> Problem:
        """Return the problem with its tensors on ``device`` (inputs in ``dtype``)."""

        def move(x: Tensor, floating: bool) -> Tensor:
            if floating and dtype is not None:
                return x.to(device=device, dtype=dtype)
            return x.to(device=device)

        targets_float = not self.classification
        return Problem(
            self.name,
            move(self.x_train, True),
            move(self.y_train, targets_float),
            move(self.x_test, True),
            move(self.y_test, targets_float),
            self.classification,
            self.n_outputs,
        )


def _digits(seed: int) -> Problem:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "The digits data set comes with scikit-learn: pip install alphawrap[data] "
            "(or pip install scikit-learn), or use --dataset regression."
        ) from error
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    index = list(range(len(y)))
    train, test = train_test_split(
        index, test_size=0.25, stratify=digits.target, random_state=seed
    )
    train_index, test_index = torch.tensor(train), torch.tensor(test)
    return Problem(
        "digits", x[train_index], y[train_index], x[test_index], y[test_index], True, 10
    )


def _regression(seed: int, n_train: int = 1024, n_test: int = 256) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    dim, hidden = 8, 16
    w1 = torch.randn(dim, hidden, generator=generator) / dim**0.5
    w2 = torch.randn(hidden, 1, generator=generator) / hidden**0.5
    x = torch.randn(n_train + n_test, dim, generator=generator)
    y = torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(
        n_train + n_test, 1, generator=generator
    )
    return Problem(
        "regression", x[:n_train], y[:n_train], x[n_train:], y[n_train:], False, 1
    )


def load_problem(name: str, seed: int = 0) -> Problem:
    """Load a built-in problem on the CPU in float32.

    Args:
        name: One of :data:`DATASETS`.
        seed: Seed of the train/held-out split (digits) or of the generated data
            (regression).

    Raises:
        ValueError: For an unknown name.
        ImportError: For ``digits`` without scikit-learn.
    """
    if name == "digits":
        return _digits(seed)
    if name == "regression":
        return _regression(seed)
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")


def build_model(
    kind: str, problem: Problem, activation: str = "tanh", hidden: int = 64
) -> nn.Sequential:
    """Build a BackPACK-extended model for ``problem``.

    Args:
        kind: ``"mlp"`` (``Flatten`` for images, ``Linear(in, hidden)``,
            activation, ``Linear(hidden, hidden)``, activation,
            ``Linear(hidden, out)``) or ``"cnn"`` (two blocks of ``Conv2d`` 3×3,
            activation and ``MaxPool2d(2)``, 8 and 16 channels, then ``Flatten``
            and ``Linear``; image problems only).
        problem: The problem whose input and output sizes the model takes.
        activation: ``"tanh"`` or ``"relu"``.
        hidden: Width of the MLP's hidden layers.

    Raises:
        ValueError: For an unknown kind or activation, or ``cnn`` on vector inputs.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {activation!r}; choose one of "
            f"{', '.join(ACTIVATIONS)}."
        )
    act = ACTIVATIONS[activation]
    if kind == "mlp":
        n_in = problem.x_train[0].numel()
        layers: list[nn.Module] = [nn.Flatten()] if problem.image else []
        layers += [
            nn.Linear(n_in, hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, problem.n_outputs),
        ]
        return extend(nn.Sequential(*layers))
    if kind == "cnn":
        if not problem.image:
            raise ValueError(
                f"The cnn model needs image inputs; the {problem.name} problem has "
                "vectors. Use --model mlp, or --dataset digits."
            )
        channels, height, width = problem.x_train.shape[1:]
        model = nn.Sequential(
            nn.Conv2d(channels, 8, kernel_size=3, padding=1),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            act(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (height // 4) * (width // 4), problem.n_outputs),
        )
        return extend(model)
    raise ValueError(f"Unknown model {kind!r}; choose one of {', '.join(MODELS)}.")


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless mini-batch indices: reshuffled every epoch, incomplete batches dropped.

    Args:
        n: Number of training examples.
        batch_size: Examples per batch (at most ``n``).
        generator: Random generator that fixes the order.

    Raises:
        ValueError: If ``batch_size`` is not in ``1..n``.
    """
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch size must be between 1 and {n}, got {batch_size}.")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


@torch.no_grad()
def evaluate(
    model: nn.Module, problem: Problem, batch_size: int = 512
) -> dict[str, float]:
    """Held-out loss, and accuracy for classification.

    Returns:
        ``{"loss": ...}`` plus ``{"accuracy": ...}`` for classification.
    """
    was_training = model.training
    model.eval()
    loss_fn = (
        nn.CrossEntropyLoss(reduction="sum")
        if problem.classification
        else (nn.MSELoss(reduction="sum"))
    )
    total, correct = 0.0, 0
    n = len(problem.y_test)
    for start in range(0, n, batch_size):
        x = problem.x_test[start : start + batch_size]
        y = problem.y_test[start : start + batch_size]
        out = model(x)
        total += float(loss_fn(out, y))
        if problem.classification:
            correct += int((out.argmax(dim=1) == y).sum())
    model.train(was_training)
    result = {
        "loss": total / (n * (1 if problem.classification else problem.n_outputs))
    }
    if problem.classification:
        result["accuracy"] = correct / n
    return result
