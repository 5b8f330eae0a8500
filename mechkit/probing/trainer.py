"""The batched probe trainer: L2-regularised logistic regression for many cells at once.

Every (model, stream, layer) or (layer, position) cell is an independent binary problem on
the same examples. They are solved together as one convex problem (the sum of the cells'
objectives) with full-batch L-BFGS in float32, features standardised per cell with the
training split's mean and standard deviation. When a cell has fewer than half as many training
examples as features, the problem is solved exactly in the span of its training rows (the
L2-optimal weights lie there), which makes every iteration cheaper. The objective is scikit-learn's
``LogisticRegression(C=C)`` on standardised features: ``C * sum(log-loss) + ||w||^2 / 2``,
intercept unpenalised, optionally with ``class_weight="balanced"`` sample weights; the
scikit-learn fit is the reference it is tested and benchmarked against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.errors import MechkitError


@dataclass
class BatchedProbe:
    """Fitted probes: ``weight`` (cell, d) and ``bias`` (cell,) on standardised features."""

    weight: Float[Tensor, "cell d"]
    bias: Float[Tensor, " cell"]
    mean: Float[Tensor, "cell d"]
    scale: Float[Tensor, "cell d"]
    iterations: int

    def decision(self, X: Float[Tensor, "cell n d"]) -> Float[Tensor, "cell n"]:
        """Logits of each cell's probe on its own features."""
        if X.ndim != 3 or X.shape[0] != self.weight.shape[0] or X.shape[2] != self.weight.shape[1]:
            raise MechkitError(f"features of shape {tuple(X.shape)} do not fit {self.weight.shape[0]} probes of "
                               f"width {self.weight.shape[1]}; pass (cell, example, feature) for every cell")
        Z = (X.float() - self.mean[:, None]) / self.scale[:, None]
        return torch.bmm(Z, self.weight[:, :, None])[..., 0] + self.bias[:, None]

    def direction(self) -> Float[Tensor, "cell d"]:
        """Each probe's normal in the original (unstandardised) feature space."""
        return self.weight / self.scale


def check_features(X: Tensor, y: Tensor) -> None:
    if X.ndim != 3:
        raise MechkitError(f"features must be (cell, example, feature), got shape {tuple(X.shape)}")
    if y.ndim != 1 or y.shape[0] != X.shape[1]:
        raise MechkitError(f"labels must be one per example: {X.shape[1]} examples but labels of shape {tuple(y.shape)}")
    if not torch.isfinite(X).all():
        bad = (~torch.isfinite(X)).any(-1).any(-1).nonzero()[:, 0].tolist()
        raise MechkitError(f"features contain NaN or infinite values (cells {bad[:10]}); check the activations")
    classes = torch.unique(y)
    if classes.numel() != 2 or not set(classes.tolist()) <= {0, 1}:
        raise MechkitError(f"labels must hold both classes 0 and 1, got {classes.tolist()}")


def fit_probes(
    X: Float[Tensor, "cell n d"],
    y: Tensor,
    *,
    C: float = 1.0,
    balanced: bool = False,
    max_iter: int = 500,
    tol: float = 1e-5,
    group_size: int | None = None,
) -> BatchedProbe:
    """Fit one logistic-regression probe per cell, ``group_size`` cells per batched L-BFGS solve.

    A joint solve runs every cell in it until the slowest converges, so on a CPU (where a
    cell's data fits in cache and batching buys little) the default solves one cell at a
    time: measured 3.5 s against 10.2 s for 36 Gemma cells solved jointly. On a GPU the
    default is all cells at once.
    """
    check_features(X, y)
    if group_size is None:
        group_size = X.shape[0] if X.device.type == "cuda" else 1
    if group_size < X.shape[0]:
        parts = [fit_probes(X[s:s + group_size], y, C=C, balanced=balanced, max_iter=max_iter, tol=tol,
                            group_size=group_size) for s in range(0, X.shape[0], group_size)]
        return BatchedProbe(*(torch.cat([getattr(p, f) for p in parts]) for f in ("weight", "bias", "mean", "scale")),
                            max(p.iterations for p in parts))
    X = X.float()
    mean = X.mean(1)
    scale = X.std(1, unbiased=False).clamp_min(1e-12)
    Z = (X - mean[:, None]) / scale[:, None]
    cells, n, d = Z.shape
    basis = None
    if 2 * n < d:  # the optimum lies in the span of the (centred) training rows: solve there, exactly
        basis, _ = torch.linalg.qr(Z.transpose(1, 2))  # (cell, d, n), orthonormal columns
        Z = torch.bmm(Z, basis)
    target = y.float()
    sample_weight = torch.ones_like(target)
    if balanced:
        for c in (0, 1):
            sample_weight[y == c] = len(y) / (2 * int((y == c).sum()))
    width = Z.shape[2]
    params = torch.zeros(cells, width + 1)
    params.grad = torch.zeros_like(params)
    optimiser = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")
    Zt = Z.transpose(1, 2).contiguous()

    def objective():
        # Loss and gradient by hand (two batched matmuls), no autograd graph per evaluation.
        w, b = params[:, :width], params[:, width:]
        logits = torch.bmm(Z, w[:, :, None])[..., 0] + b
        loss = C * (sample_weight * torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target.expand_as(logits), reduction="none")).sum() + 0.5 * (w**2).sum()
        residual = C * sample_weight * (torch.sigmoid(logits) - target)  # (cell, n)
        params.grad[:, :width] = torch.bmm(Zt, residual[:, :, None])[..., 0] + w
        params.grad[:, width] = residual.sum(1)
        return loss

    optimiser.step(objective)
    iterations = optimiser.state[optimiser._params[0]].get("n_iter", 0)
    weight = params[:, :width]
    if basis is not None:
        weight = torch.bmm(basis, weight[:, :, None])[..., 0]
    return BatchedProbe(weight.clone(), params[:, width].clone(), mean, scale, int(iterations))
