"""Fit a linear head or a small MLP on embeddings: deterministic for a given seed.

Inputs are centred on the training split's mean and divided by one scale (the RMS of a
centred coordinate), and that is folded into the first layer afterwards, so the exported head
reads raw embeddings. One scale, not a std per coordinate: a foundation model's embedding puts
little signal in its low-variance coordinates, and dividing each by its own std blows their
noise up to the level of the informative ones (on EfficientNet-Lite0 MNIST embeddings that cost
a linear probe 1 to 1.5 points). Class weights offset imbalance.

A linear head is the linear probe: full-batch L-BFGS on the (class-weighted) loss plus an L2
penalty, the penalty chosen on the validation split from L2_GRID (the CLIP paper's protocol,
which a LogisticRegression with its C swept on validation follows), so it matches that
baseline in seconds with no learning rate or epoch count to guess. An MLP trains with AdamW;
it stops when the validation loss has not improved for ``patience`` epochs and keeps the best
epoch's weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import numpy as np

from headmaster.errors import TrainingError
from headmaster.export.heads import HeadWeights

KINDS = ("linear", "mlp")
SOLVERS = ("auto", "adamw")  # auto: L-BFGS with the L2 chosen on validation for a linear head, AdamW for an MLP
# L2 strengths tried for a linear head, strongest first (each fit warm-starts from the last).
L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
LBFGS_ITERATIONS = 50  # per L2 strength; a warm start converges well within it


@dataclass(frozen=True)
class TrainConfig:
    kind: str = "linear"  # linear | mlp (Linear -> ReLU -> Linear)
    hidden: int = 512  # MLP hidden width
    epochs: int = 300  # MLP: upper bound; early stopping usually ends sooner
    batch_size: int = 256
    learning_rate: float = 5e-3  # MLP, regression, ordinal (AdamW); a linear head is fitted by L-BFGS
    weight_decay: float = 1e-4  # MLP; a linear head chooses its L2 from L2_GRID on validation
    patience: int = 20  # epochs without a better validation loss before stopping
    seed: int = 0
    solver: str = "auto"  # adamw: a linear head too (minibatches, early stopping), like the ordinal head's

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TrainingError(f"the head kind must be one of {', '.join(KINDS)}, not {self.kind!r}", option="kind")
        if self.solver not in SOLVERS:
            raise TrainingError(f"the solver must be one of {', '.join(SOLVERS)}, not {self.solver!r}", option="solver")
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


def fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    multi_label: bool,
    class_weights: np.ndarray,
    config: TrainConfig,
) -> tuple[HeadWeights, dict]:
    """y: label indices (single-label) or a 0/1 matrix [n, L] (multi-label)."""
    import torch

    num_labels = y_train.shape[1] if multi_label else int(class_weights.shape[0])
    mean = x_train.mean(axis=0)
    # One scale for every coordinate (see the module docstring), kept as a vector for the fold.
    std = np.full(x_train.shape[1], max(float(np.sqrt(((x_train - mean) ** 2).mean())), 1e-6))
    with _deterministic(config.seed):
        xt = torch.from_numpy(((x_train - mean) / std).astype(np.float32))
        xv = torch.from_numpy(((x_val - mean) / std).astype(np.float32))
        yt = torch.from_numpy(y_train.astype(np.float32 if multi_label else np.int64))
        yv = torch.from_numpy(y_val.astype(np.float32 if multi_label else np.int64))
        dim = xt.shape[1]
        model = (
            torch.nn.Linear(dim, num_labels)
            if config.kind == "linear"
            else torch.nn.Sequential(
                torch.nn.Linear(dim, config.hidden), torch.nn.ReLU(), torch.nn.Linear(config.hidden, num_labels)
            )
        )
        weights = torch.from_numpy(class_weights.astype(np.float32))
        loss_fn = (
            torch.nn.BCEWithLogitsLoss(pos_weight=weights) if multi_label else torch.nn.CrossEntropyLoss(weight=weights)
        )
        if config.kind == "linear" and config.solver == "auto":
            info = _fit_linear(model, loss_fn, xt, yt, xv, yv)
        else:
            best, history = _train(model, loss_fn, xt, yt, xv, yv, config)
            info = {"epochs_run": len(history), "best_epoch": best[2] + 1, "best_val_loss": best[0]}
        linears = [m for m in (model if config.kind == "mlp" else [model]) if isinstance(m, torch.nn.Linear)]
        layers = [
            (m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64)) for m in linears
        ]
    # Fold (x - mean) / std into the first layer: W' = W / std, b' = b - W' @ mean.
    w, b = layers[0]
    w = w / std
    layers[0] = (w, b - w @ mean)
    head = HeadWeights(tuple((lw.astype(np.float32), lb.astype(np.float32)) for lw, lb in layers), multi_label)
    return head, info


def _fit_linear(model, loss_fn, xt, yt, xv, yv) -> dict:
    """Full-batch L-BFGS for each L2 strength in L2_GRID (strongest first, warm-started), keeping
    the weights with the lowest validation loss. Returns what was chosen and the sweep."""
    import torch

    torch.nn.init.zeros_(model.weight)  # a convex problem: start from the same point every run
    torch.nn.init.zeros_(model.bias)
    best, sweep = (float("inf"), None, None), {}
    for l2 in L2_GRID:
        optimizer = torch.optim.LBFGS(
            model.parameters(),
            lr=1,
            max_iter=LBFGS_ITERATIONS,
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )

        def closure(optimizer=optimizer, l2=l2):  # bound now: step() calls it within this iteration
            optimizer.zero_grad()
            # The bias is not penalised, as in LogisticRegression.
            loss = loss_fn(model(xt), yt) + 0.5 * l2 * (model.weight**2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            val_loss = float(loss_fn(model(xv), yv))
        sweep[l2] = val_loss
        if val_loss < best[0] - 1e-6:
            best = (val_loss, {k: v.clone() for k, v in model.state_dict().items()}, l2)
    model.load_state_dict(best[1])
    return {
        "solver": "lbfgs",
        "l2": best[2],
        "best_val_loss": best[0],
        "l2_sweep": {str(k): v for k, v in sweep.items()},
    }


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
