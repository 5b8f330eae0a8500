"""L-BFGS for many independent problems at once, each stopping on its own.

``torch.optim.LBFGS`` treats a batch of problems as one: every cell runs until the slowest
converges, and its per-iteration Python work (the two-loop recursion over the history, the
line search) is paid once per solve, so solving cells one at a time pays it once per cell. Here
the recursion, the line search (backtracking to Armijo's condition) and the stopping test are
batched tensors over the cells still running; a cell that converges leaves the batch, and the
objective is told to drop its data, so later iterations touch only the cells still working.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# objective(x, cells) -> (loss (k,), grad (k, p)) for the k cells ``cells`` (indices into the
# problems still running, in the order of the batch the objective was last compacted to).
Objective = Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]


def batched_lbfgs(
    objective: Objective,
    x0: Tensor,
    *,
    compact: Callable[[Tensor], None],
    max_iter: int = 500,
    tol: float = 1e-5,
    ftol: float = 1e-10,
    history: int = 20,
    armijo: float = 1e-4,
    max_backtracks: int = 30,
) -> tuple[Tensor, Tensor]:
    """Minimise ``cells`` independent smooth objectives from ``x0`` (cells, p).

    ``objective(x, None)`` evaluates every running cell at ``x`` (one row each);
    ``objective(x, rows)`` only the running cells at positions ``rows``. ``compact(keep)``
    tells the objective that only the running cells at positions ``keep`` go on (it drops the
    others' data). A cell stops when its largest gradient entry is at most ``tol`` or its loss
    stops changing (by at most ``ftol`` relative). Returns the solutions (cells, p) and each cell's iteration count.
    """
    cells, p = x0.shape
    solution = x0.clone()
    iterations = torch.zeros(cells, dtype=torch.long)
    running = torch.arange(cells)
    x = x0.clone()
    loss, grad = objective(x, None)
    previous = torch.full_like(loss, float("inf"))  # the last iteration's loss (none yet: never "unchanged")
    # History oldest -> newest along dim 1. A rejected pair (no curvature) is stored as zeros with a
    # unit diagonal in R, which makes it inert in the compact form below.
    S = x.new_zeros(cells, 0, p)
    Y = x.new_zeros(cells, 0, p)
    SY = x.new_zeros(cells, 0, 0)  # s_i . y_j and y_i . y_j, updated one row and column per step
    YY = x.new_zeros(cells, 0, 0)
    gamma = x.new_ones(cells)
    for it in range(max_iter):
        done = (grad.abs().amax(1) <= tol) | ((previous - loss).abs() <= ftol * loss.abs().clamp_min(1.0))
        if done.any():
            solution[running[done]] = x[done]
            iterations[running[done]] = it
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                return solution, iterations
            running, x, loss, grad = running[keep], x[keep], loss[keep], grad[keep]
            S, Y, SY, YY, gamma, previous = S[keep], Y[keep], SY[keep], YY[keep], gamma[keep], previous[keep]
            compact(keep)
        direction = -_inverse_hessian_times(S, Y, SY, YY, gamma, grad)
        slope = (grad * direction).sum(1)
        uphill = slope >= 0  # lost curvature: fall back to steepest descent for those cells
        if uphill.any():
            direction[uphill] = -grad[uphill]
            slope[uphill] = -(grad[uphill] ** 2).sum(1)
        step = torch.ones_like(loss)
        if it == 0:  # no curvature yet: a first step of unit length
            step = 1.0 / grad.norm(dim=1).clamp_min(1e-12)
        trial = x + step[:, None] * direction
        new_loss, new_grad = objective(trial, None)
        failing = ~(new_loss <= loss + armijo * step * slope)
        for _ in range(max_backtracks):
            if not failing.any():
                break
            rows = failing.nonzero()[:, 0]
            step[rows] = step[rows] * 0.5
            trial[rows] = x[rows] + step[rows, None] * direction[rows]
            sub_loss, sub_grad = objective(trial[rows], rows)
            new_loss[rows], new_grad[rows] = sub_loss, sub_grad
            failing[rows] = ~(sub_loss <= loss[rows] + armijo * step[rows] * slope[rows])
        s, y = trial - x, new_grad - grad
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        accept = sy > 1e-10 * yy.clamp_min(1e-30)
        s, y = s * accept[:, None], y * accept[:, None]
        S, Y, SY, YY = _append_pair(S, Y, SY, YY, s, y, history)
        gamma = torch.where(accept, sy / yy.clamp_min(1e-30), gamma)
        previous = loss
        x, loss, grad = trial, new_loss, new_grad
    solution[running] = x
    iterations[running] = max_iter
    return solution, iterations


def _append_pair(S: Tensor, Y: Tensor, SY: Tensor, YY: Tensor, s: Tensor, y: Tensor,
                 history: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Add the newest pair (dropping the oldest beyond ``history``) and the new row and column of
    the inner-product matrices: O(m p) per step instead of recomputing them in O(m^2 p)."""
    if S.shape[1] >= history:
        keep = history - 1
        S, Y = S[:, S.shape[1] - keep:], Y[:, Y.shape[1] - keep:]
        SY, YY = SY[:, SY.shape[1] - keep:, SY.shape[2] - keep:], YY[:, YY.shape[1] - keep:, YY.shape[2] - keep:]
    S, Y = torch.cat([S, s[:, None]], dim=1), torch.cat([Y, y[:, None]], dim=1)
    s_row = torch.bmm(s[:, None, :], Y.transpose(1, 2))  # (cells, 1, k): s_new . y_j, the new one last
    y_col = torch.bmm(S[:, :-1], y[:, :, None])  # (cells, k-1, 1): s_i . y_new
    y_row = torch.bmm(y[:, None, :], Y.transpose(1, 2))  # (cells, 1, k): y_new . y_j
    SY = torch.cat([torch.cat([SY, y_col], dim=2), s_row], dim=1)
    YY = torch.cat([torch.cat([YY, y_row[:, :, :-1].transpose(1, 2)], dim=2), y_row], dim=1)
    return S, Y, SY, YY


def _inverse_hessian_times(S: Tensor, Y: Tensor, SY: Tensor, YY: Tensor, gamma: Tensor, g: Tensor) -> Tensor:
    """H g for the L-BFGS inverse-Hessian approximation in compact form (Byrd, Nocedal and Schnabel
    1994): a handful of batched products and two triangular solves per iteration, instead of the
    two-loop recursion's 4m small operations. ``SY[i, j] = s_i . y_j``, ``YY[i, j] = y_i . y_j``."""
    if S.shape[1] == 0:
        return gamma[:, None] * g
    R = torch.triu(SY)
    diag = torch.diagonal(R, dim1=1, dim2=2)
    inert = diag == 0  # rejected pairs: a unit diagonal keeps R invertible and the pair inert
    R = R + torch.diag_embed(inert.to(R.dtype))
    D = torch.diag_embed(torch.diagonal(SY, dim1=1, dim2=2))
    p1 = torch.bmm(S, g[:, :, None])  # (cells, m, 1)
    p2 = gamma[:, None, None] * torch.bmm(Y, g[:, :, None])
    v = torch.linalg.solve_triangular(R, p1, upper=True)
    middle = torch.bmm(D + gamma[:, None, None] * YY, v) - p2
    a = torch.linalg.solve_triangular(R.transpose(1, 2), middle, upper=False)
    return (gamma[:, None] * g + torch.bmm(S.transpose(1, 2), a)[..., 0]
            - gamma[:, None] * torch.bmm(Y.transpose(1, 2), v)[..., 0])


__all__ = ["batched_lbfgs"]
