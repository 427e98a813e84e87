"""Fit a linear head or a small MLP on embeddings: deterministic for a given seed.

Inputs are standardised with the training split's mean and std for well-conditioned
optimisation, and the standardisation is folded into the first layer afterwards, so the
exported head reads raw embeddings. Class weights offset imbalance; training stops when the
validation loss has not improved for ``patience`` epochs and keeps the best epoch's weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numpy as np

from headmaster.errors import TrainingError
from headmaster.export.heads import HeadWeights

KINDS = ("linear", "mlp")


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "linear"  # linear | mlp (Linear -> ReLU -> Linear)
    hidden: int = 512  # MLP hidden width
    epochs: int = 300  # upper bound; early stopping usually ends sooner
    batch_size: int = 256
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    patience: int = 20  # epochs without a better validation loss before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TrainingError(f"the head kind must be one of {', '.join(KINDS)}, not {self.kind!r}", option="kind")
        if min(self.hidden, self.epochs, self.batch_size, self.patience) < 1 or self.learning_rate <= 0:
            raise TrainingError("hidden, epochs, batch size and patience must be >= 1, learning rate > 0")

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _deterministic(seed: int):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order, run after run
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, multi_label: bool,
        class_weights: np.ndarray, config: TrainConfig) -> tuple[HeadWeights, dict]:
    """y: label indices (single-label) or a 0/1 matrix [n, L] (multi-label)."""
    import torch

    num_labels = y_train.shape[1] if multi_label else int(class_weights.shape[0])
    mean = x_train.mean(axis=0)
    std = np.maximum(x_train.std(axis=0), 1e-6)
    with _deterministic(config.seed):
        xt = torch.from_numpy(((x_train - mean) / std).astype(np.float32))
        xv = torch.from_numpy(((x_val - mean) / std).astype(np.float32))
        yt = torch.from_numpy(y_train.astype(np.float32 if multi_label else np.int64))
        yv = torch.from_numpy(y_val.astype(np.float32 if multi_label else np.int64))
        dim = xt.shape[1]
        model = torch.nn.Linear(dim, num_labels) if config.kind == "linear" else torch.nn.Sequential(
            torch.nn.Linear(dim, config.hidden), torch.nn.ReLU(), torch.nn.Linear(config.hidden, num_labels))
        weights = torch.from_numpy(class_weights.astype(np.float32))
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=weights) if multi_label else torch.nn.CrossEntropyLoss(weight=weights)
        best, history = _train(model, loss_fn, xt, yt, xv, yv, config)
        linears = [m for m in (model if config.kind == "mlp" else [model]) if isinstance(m, torch.nn.Linear)]
        layers = [(m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64)) for m in linears]
    # Fold (x - mean) / std into the first layer: W' = W / std, b' = b - W' @ mean.
    w, b = layers[0]
    w = w / std
    layers[0] = (w, b - w @ mean)
    head = HeadWeights(tuple((lw.astype(np.float32), lb.astype(np.float32)) for lw, lb in layers), multi_label)
    return head, {"epochs_run": len(history), "best_epoch": best[2] + 1, "best_val_loss": best[0]}


def _train(model, loss_fn, xt, yt, xv, yv, config: TrainConfig):
    """AdamW with early stopping on the validation loss; leaves the best epoch's weights in
    ``model``. Returns (best val loss, its state, its epoch) and the loss history."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(config.seed)
    best = (float("inf"), None, 0)
    history = []
    for epoch in range(config.epochs):
        model.train()
        for batch in torch.randperm(len(xt), generator=order).split(config.batch_size):
            optimizer.zero_grad()
            loss_fn(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(model(xv), yv))
        history.append(val_loss)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
        elif epoch - best[2] >= config.patience:
            break
    model.load_state_dict(best[1])
    return best, history
