"""A linear probe fit to convergence: multinomial logistic regression on standardised features by full-batch
L-BFGS, its L2 strength chosen on validation, folded back into one Linear layer.

The objective is scikit-learn's ``LogisticRegression(C, class_weight="balanced")`` (mean class-balanced
cross-entropy + ||W||^2 / (2 C n)), chosen over the same C grid by the same rule (balanced validation
cross-entropy) as the evaluation baselines, so ``finetune=frozen`` is as strong a probe as logistic regression on
the same embeddings rather than an SGD head stopped early on a noisy validation split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: inverse L2 strengths tried, as scikit-learn's C
C_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass
class ProbeFit:
    weight: torch.Tensor  # (classes x features), acting on the raw (unstandardised) features
    bias: torch.Tensor
    C: float
    val_loss: float


def balanced_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """scikit-learn's ``class_weight="balanced"``: n / (classes present * n_c); 0 for absent classes."""
    counts = torch.bincount(y, minlength=n_classes).double()
    present = int((counts > 0).sum())
    return torch.where(counts > 0, len(y) / (present * counts.clamp_min(1)), torch.zeros_like(counts))


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, class_weight: torch.Tensor, C: float,
         max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    W = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    l2 = 1.0 / (C * len(y))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, y, weight=class_weight) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def fit_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                     n_classes: int, C_grid: tuple[float, ...] = C_GRID, max_iter: int = 1000) -> ProbeFit:
    """Fit on ``x_train``, pick C by class-balanced cross-entropy on ``x_val``; weights act on raw features."""
    x_train, x_val = x_train.double(), x_val.double()
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
    xs, xv = (x_train - mu) / sd, (x_val - mu) / sd
    w_train = balanced_weights(y_train, n_classes)
    w_val = balanced_weights(y_val, n_classes)
    best: ProbeFit | None = None
    for C in C_grid:
        W, b = _fit(xs, y_train, n_classes, w_train, C, max_iter)
        with torch.no_grad():
            val_loss = float(F.cross_entropy(xv @ W.T + b, y_val, weight=w_val))
        if best is None or val_loss < best.val_loss:
            folded = W / sd  # W (x - mu) / sd + b  ==  (W / sd) x + (b - (W / sd) mu)
            best = ProbeFit(folded.float(), (b - folded @ mu).float(), C, val_loss)
    return best
