"""The batched probe trainer: L2-regularised logistic regression for many cells at once.

Every (model, stream, layer) or (layer, position) cell is an independent binary problem on
the same examples. They are solved together by a batched full-batch L-BFGS in float32
(:mod:`mechkit.probing.lbfgs`: one L-BFGS per cell, stepping together, each cell leaving the
batch when it converges), features standardised per cell with the training split's mean and
standard deviation. When a cell has fewer than half as many training
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
from mechkit.probing.lbfgs import batched_lbfgs


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
    if not torch.isfinite(X.sum(dtype=torch.float64)):  # one pass; a NaN or inf anywhere makes the sum non-finite
        bad = (~torch.isfinite(X)).any(-1).any(-1).nonzero()[:, 0].tolist()
        raise MechkitError(f"features contain NaN or infinite values (cells {bad[:10]}); check the activations")
    classes = torch.unique(y)
    if classes.numel() != 2 or not set(classes.tolist()) <= {0, 1}:
        raise MechkitError(f"labels must hold both classes 0 and 1, got {classes.tolist()}")


FTOL = 1e-10  # relative loss change at which a cell's solve stops
HISTORY = 100  # L-BFGS pairs kept (on 36 Gemma cells: 20 pairs 228 iterations at most, 100 pairs about 130)
# Cells per solve on the CPU: their standardised features (and a transposed copy) in about this many
# bytes, so that the matrix-vector products of each iteration read from cache (measured on 36 Gemma
# cells of 780 x 640: 1.9 s at 4-6 cells a solve, 2.5 s all at once, 3.1 s one at a time).
CPU_GROUP_BYTES = 16 << 20


class _LogisticObjective:
    """Per-cell ``C * sum(w_i * log-loss_i) + ||w||^2 / 2`` and its gradient, for the cells still running."""

    def __init__(self, Z: Tensor, target: Tensor, sample_weight: Tensor, C: float):
        # Both products are row-vector x matrix (``w^T Z^T`` and ``r^T Z``): on the CPU a batched
        # matrix x column-vector product is up to 15x slower (measured, torch 2.13, batch 4-36).
        self.Z, self.Zt = Z, Z.transpose(1, 2).contiguous()
        self.target, self.C = target, C
        self.weight = None if bool((sample_weight == 1).all()) else sample_weight

    def compact(self, keep: Tensor) -> None:
        self.Z, self.Zt = self.Z[keep], self.Zt[keep]

    def __call__(self, params: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        Z, Zt = (self.Z, self.Zt) if rows is None else (self.Z[rows], self.Zt[rows])
        width = Z.shape[2]
        w, b = params[:, :width], params[:, width:]
        logits = torch.baddbmm(b[:, :, None], w[:, None, :], Zt)[:, 0]
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, self.target.expand_as(logits),
                                                                      weight=self.weight, reduction="none")
        loss = self.C * losses.sum(1) + 0.5 * (w * w).sum(1)
        residual = torch.sigmoid(logits).sub_(self.target)
        if self.weight is not None:
            residual.mul_(self.weight)
        if self.C != 1.0:
            residual.mul_(self.C)
        grad = torch.empty_like(params)
        torch.baddbmm(w[:, None, :], residual[:, None, :], Z, out=grad[:, None, :width])
        torch.sum(residual, 1, out=grad[:, width])
        return loss, grad


def _solve(Z: Tensor, target: Tensor, sample_weight: Tensor, C: float, *, solver: str, max_iter: int,
           tol: float) -> tuple[Tensor, int]:
    """Parameters ``(cell, width + 1)`` (weights, then bias) and the iterations of the slowest cell."""
    objective = _LogisticObjective(Z, target, sample_weight, C)
    x0 = Z.new_zeros(Z.shape[0], Z.shape[2] + 1)
    if solver == "batched":
        params, iterations = batched_lbfgs(objective, x0, compact=objective.compact, max_iter=max_iter, tol=tol,
                                           ftol=FTOL, history=HISTORY)
        return params, int(iterations.max())
    params = x0
    params.grad = torch.zeros_like(params)
    optimiser = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")

    def summed():  # the sum of the cells' objectives: one problem for torch.optim
        loss, grad = objective(params, None)
        params.grad.copy_(grad)
        return loss.sum()

    optimiser.step(summed)
    return params, int(optimiser.state[optimiser._params[0]].get("n_iter", 0))


def fit_probes(
    X: Float[Tensor, "cell n d"],
    y: Tensor,
    *,
    C: float = 1.0,
    balanced: bool = False,
    max_iter: int = 500,
    tol: float = 1e-5,
    group_size: int | None = None,
    solver: str = "batched",
) -> BatchedProbe:
    """Fit one logistic-regression probe per cell, ``group_size`` cells per solve (default: all cells
    on a GPU; on the CPU as many as :data:`CPU_GROUP_BYTES` holds).

    ``solver="batched"`` (default) runs :func:`~mechkit.probing.lbfgs.batched_lbfgs`: one L-BFGS
    per cell, all stepping together, each cell leaving the batch when it converges.
    ``solver="torch"`` is ``torch.optim.LBFGS`` on the summed objective (every cell in a solve
    runs until the slowest converges; kept for the benchmark's comparison).
    """
    check_features(X, y)
    if solver not in ("batched", "torch"):
        raise MechkitError(f"solver must be 'batched' or 'torch', got {solver!r}")
    if group_size is None:  # GPU: every cell at once; CPU: as many cells as keep their data in cache
        n, d = X.shape[1], X.shape[2]
        width = n if _solve_in_row_span(n, d) else d
        group_size = X.shape[0] if X.device.type == "cuda" else max(1, CPU_GROUP_BYTES // (8 * n * width))
    parts = [_fit_group(X[s:s + group_size], y, C=C, balanced=balanced, max_iter=max_iter, tol=tol, solver=solver)
             for s in range(0, X.shape[0], group_size)]
    if len(parts) == 1:
        return parts[0]
    return BatchedProbe(*(torch.cat([getattr(p, f) for p in parts]) for f in ("weight", "bias", "mean", "scale")),
                        max(p.iterations for p in parts))


def _solve_in_row_span(n: int, d: int) -> bool:
    """Whether to solve in the span of the ``n`` (centred) training rows instead of all ``d``
    features: the L2 optimum lies there, exactly, and it is the smaller problem."""
    return 2 * n < d


def _fit_group(X: Tensor, y: Tensor, *, C: float, balanced: bool, max_iter: int, tol: float, solver: str) -> BatchedProbe:
    """The probes of one group of cells, solved together."""
    X = X.float()
    std, mean = torch.std_mean(X, dim=1, unbiased=False)
    scale = std.clamp_min(1e-12)
    Z = (X - mean[:, None]) / scale[:, None]
    n, d = Z.shape[1], Z.shape[2]
    basis = None
    if _solve_in_row_span(n, d):
        basis, _ = torch.linalg.qr(Z.transpose(1, 2))  # (cell, d, n), orthonormal columns
        Z = torch.bmm(Z, basis)
    target = y.float()
    sample_weight = torch.ones_like(target)
    if balanced:
        for c in (0, 1):
            sample_weight[y == c] = len(y) / (2 * int((y == c).sum()))
    width = Z.shape[2]
    params, iterations = _solve(Z, target, sample_weight, C, solver=solver, max_iter=max_iter, tol=tol)
    weight = params[:, :width].detach()
    if basis is not None:
        weight = torch.bmm(basis, weight[:, :, None])[..., 0]
    return BatchedProbe(weight.contiguous().clone(), params[:, width].detach().clone(), mean, scale, iterations)
