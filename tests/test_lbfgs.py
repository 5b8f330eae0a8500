"""The batched L-BFGS solves independent problems each to its own optimum, each stopping on its own."""

import pytest
import torch

from mechkit.probing import fit_probes
from mechkit.probing.lbfgs import batched_lbfgs


class Quadratics:
    """Cell c: 0.5 (x - m_c)^T A_c (x - m_c), with A_c of condition number 10^c (slower cells later)."""

    def __init__(self, cells: int, p: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.minima = torch.randn(cells, p, generator=g, dtype=torch.float64)
        Q, _ = torch.linalg.qr(torch.randn(cells, p, p, generator=g, dtype=torch.float64))
        spectrum = torch.stack([torch.logspace(0, c, p, dtype=torch.float64) for c in range(cells)])
        self.A = Q @ torch.diag_embed(spectrum) @ Q.transpose(1, 2)
        self.running = torch.arange(cells)
        self.evaluations = 0

    def compact(self, keep):
        self.running = self.running[keep]

    def __call__(self, x, rows):
        cells = self.running if rows is None else self.running[rows]
        self.evaluations += 1
        diff = x - self.minima[cells]
        grad = torch.einsum("cij,cj->ci", self.A[cells], diff)
        return 0.5 * (diff * grad).sum(1), grad


def test_each_cell_reaches_its_own_minimum_and_stops_on_its_own():
    problem = Quadratics(cells=4, p=12)
    x, iterations = batched_lbfgs(problem, torch.zeros(4, 12, dtype=torch.float64), compact=problem.compact,
                                  tol=1e-9, max_iter=500)
    torch.testing.assert_close(x, problem.minima, atol=1e-4, rtol=0)  # stopped by the gradient or the loss change
    assert iterations[0] < iterations[-1] < 500  # the well-conditioned cell left the batch early
    assert problem.running.numel() == 0 or problem.running.tolist() == [3]


def test_max_iter_returns_the_last_iterate_of_unfinished_cells():
    problem = Quadratics(cells=4, p=12)
    x, iterations = batched_lbfgs(problem, torch.zeros(4, 12, dtype=torch.float64), compact=problem.compact,
                                  tol=1e-14, ftol=0.0, max_iter=3)
    assert iterations[-1] == 3 and (iterations <= 3).all() and torch.isfinite(x).all()
    assert (x[-1] - problem.minima[-1]).abs().max() > 1e-3  # the ill-conditioned cell is not solved in 3 steps


@pytest.mark.parametrize("solver", ["batched", "torch"])
def test_both_solvers_give_the_same_probes(solver):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(5, 200, 30, generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    X[:, :, 0] += (2 * y - 1).float() * torch.arange(5).float()[:, None]  # from no signal to a strong one
    probe = fit_probes(X, y, solver=solver)
    other = fit_probes(X, y, solver="torch" if solver == "batched" else "batched")
    torch.testing.assert_close(probe.weight, other.weight, atol=2e-3, rtol=0)
    torch.testing.assert_close(probe.bias, other.bias, atol=2e-3, rtol=0)
