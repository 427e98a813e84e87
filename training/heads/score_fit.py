"""Fit heads that answer a number: regression (a value) and ordinal (one of ordered classes).

Same optimiser, early stopping, determinism and standardisation folding as ``trainer.fit``.

- Regression: mean squared error on standardised targets; the target scale is folded back
  into the last layer, so the exported head outputs the value itself.
- Ordinal: CORAL (Cao, Mirjalili and Raschka, "Rank consistent ordinal regression for neural
  networks", 2020): one shared score f(x) and K-1 cut points b_k; the K-1 binary tasks
  "class > k" are trained with a sigmoid each. A mistake by one class gets one task wrong, by
  three classes three, so neighbouring mistakes cost less; and with shared weights and
  ordered cut points the probabilities never contradict each other (rank consistency).
"""

from __future__ import annotations

import numpy as np

from headmaster.errors import TrainingError
from headmaster.export.heads import HeadWeights
from headmaster.training.heads.trainer import TrainConfig, _deterministic, _train


def _trunk(dim: int, out: int, config: TrainConfig, bias: bool = True):
    import torch

    if config.kind == "linear":
        return torch.nn.Linear(dim, out, bias=bias)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, config.hidden), torch.nn.ReLU(), torch.nn.Linear(config.hidden, out, bias=bias)
    )


def _layers(trunk) -> list[tuple[np.ndarray, np.ndarray]]:
    import torch

    linears = [
        m for m in (trunk if isinstance(trunk, torch.nn.Sequential) else [trunk]) if isinstance(m, torch.nn.Linear)
    ]
    return [
        (
            m.weight.detach().numpy().astype(np.float64),
            (m.bias.detach().numpy() if m.bias is not None else np.zeros(m.out_features)).astype(np.float64),
        )
        for m in linears
    ]


def _fold_input(layers, mean: np.ndarray, std: np.ndarray):
    # (x - mean) / std folded into the first layer: W' = W / std, b' = b - W' @ mean.
    w, b = layers[0]
    w = w / std
    layers[0] = (w, b - w @ mean)
    return tuple((lw.astype(np.float32), lb.astype(np.float32)) for lw, lb in layers)


def _standardise(x_train: np.ndarray, x_val: np.ndarray):
    import torch

    mean = x_train.mean(axis=0)
    std = np.maximum(x_train.std(axis=0), 1e-6)
    as_tensor = lambda x: torch.from_numpy(((x - mean) / std).astype(np.float32))  # noqa: E731
    return as_tensor(x_train), as_tensor(x_val), mean, std


def fit_regression(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, config: TrainConfig
) -> tuple[HeadWeights, dict]:
    """y: float values [n]. The head outputs the value (SCORES [n, 1], no activation)."""
    import torch

    y_mean, y_std = float(y_train.mean()), float(max(y_train.std(), 1e-6))
    with _deterministic(config.seed):
        xt, xv, mean, std = _standardise(x_train, x_val)
        yt = torch.from_numpy(((y_train - y_mean) / y_std).astype(np.float32)[:, None])
        yv = torch.from_numpy(((y_val - y_mean) / y_std).astype(np.float32)[:, None])
        model = _trunk(xt.shape[1], 1, config)
        best, history = _train(model, torch.nn.MSELoss(), xt, yt, xv, yv, config)
        layers = _layers(model)
    w, b = layers[-1]
    layers[-1] = (w * y_std, b * y_std + y_mean)  # the standardised target back in its own units
    head = HeadWeights(_fold_input(layers, mean, std), multi_label=False, activation="identity")
    return head, {
        "epochs_run": len(history),
        "best_epoch": best[2] + 1,
        "best_val_loss": best[0],
        "loss": "mean squared error (standardised target)",
    }


def _coral(dim: int, classes: int, config: TrainConfig):
    """f(x) (no bias) + K-1 cut points: the logits of "class > k"."""
    import torch

    class Coral(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = _trunk(dim, 1, config, bias=False)
            self.cuts = torch.nn.Parameter(torch.zeros(classes - 1))

        def forward(self, x):
            return self.trunk(x) + self.cuts

    return Coral()


def fit_ordinal(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, classes: int, config: TrainConfig
) -> tuple[HeadWeights, dict]:
    """y: class indices [n] in 0..classes-1 (their order is the order of the classes)."""
    import torch

    if classes < 2:
        raise TrainingError("an ordinal head needs two classes or more", option="order")
    levels = np.arange(classes - 1)
    with _deterministic(config.seed):
        xt, xv, mean, std = _standardise(x_train, x_val)
        yt = torch.from_numpy((y_train[:, None] > levels[None, :]).astype(np.float32))
        yv = torch.from_numpy((y_val[:, None] > levels[None, :]).astype(np.float32))
        model = _coral(xt.shape[1], classes, config)
        best, history = _train(model, torch.nn.BCEWithLogitsLoss(), xt, yt, xv, yv, config)
        layers = _layers(model.trunk)
        cuts = model.cuts.detach().numpy().astype(np.float64)
    # Every task shares f(x): the last layer is its one row repeated, with the cut points as
    # biases. CORAL's cut points come out non-increasing; the running minimum makes sure, so
    # that P(class > k) never rises with k and every class probability is >= 0.
    w, b = layers[-1]
    cuts = np.minimum.accumulate(cuts + b[0])
    layers[-1] = (np.repeat(w, classes - 1, axis=0), cuts)
    head = HeadWeights(_fold_input(layers, mean, std), multi_label=False, activation="ordinal")
    return head, {
        "epochs_run": len(history),
        "best_epoch": best[2] + 1,
        "best_val_loss": best[0],
        "loss": "CORAL: binary cross-entropy on the K-1 tasks 'class > k' (shared weights)",
    }
