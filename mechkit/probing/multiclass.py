"""One multi-class probe over every attention head at once, and each head's importance per class.

Function-specific heads (Ma et al. 2025, "Cognitive Mirrors") are read from a single probe that
sees all heads together: the features of every head on sub-questions labelled with one of several
cognitive functions go into one classifier, and a head's importance for a function is the mean,
over held-out examples of that function, of gradient x activation of the head's (projected)
features for that function's logit, averaged over the projected width. Training one probe over
all heads (rather than one probe per head) lets the heads compete, so the importance says which
heads the decision rests on, not merely which heads carry some information.

Two families:

- ``"logistic"``: multinomial logistic regression on the concatenated head features,
  standardised with the training split's mean and standard deviation, solved as scikit-learn's
  ``LogisticRegression(C=C)`` (``C * sum(cross-entropy) + ||W||^2 / 2``, intercept unpenalised)
  with full-batch L-BFGS in float32. The problem is convex and solved from zero, so the fit is
  deterministic. The per-head features the importance is read from are the standardised inputs.
- ``"mlp"``: the paper's form: a bias-free linear projection shared by all heads (each head's
  features to ``width`` dims, the same weights for every head), then an MLP over the
  concatenation of the projected heads (``hidden`` units, ReLU, dropout) to the class logits,
  trained with AdamW on minibatches for a fixed number of epochs (optionally stopping early on a
  held-out slice of the training set), seeded and deterministic on a CPU. The importance is read
  from the projection's output. The projection has no bias so that, on standardised inputs, a
  projected feature is zero at the training mean: gradient x activation measures against that
  zero, and a head whose features carry nothing contributes about nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.metrics import f1_score
from torch import Tensor, nn

from mechkit.errors import MechkitError

FAMILIES = ("logistic", "mlp")


class HeadNetwork(nn.Module):
    """Standardised head features -> per-head projection -> class logits.

    ``projection`` (width, feature), shared by every head, is ``None`` for the logistic family
    (the per-head features are the standardised inputs themselves); ``hidden`` is ``None`` for
    the logistic family (``output`` reads the concatenated heads directly).
    """

    def __init__(self, heads: int, features: int, classes: int, *, family: str, width: int, hidden: int,
                 dropout: float):
        super().__init__()
        self.family, self.dropout = family, dropout
        # skip_init: left uninitialised (fit_head_probe fills them from its seeded generator), so
        # building a network never draws from torch's global random state
        if family == "mlp":
            self.projection = nn.Parameter(torch.empty(width, features))
            self.hidden = nn.utils.skip_init(nn.Linear, heads * width, hidden)
            self.output = nn.utils.skip_init(nn.Linear, hidden, classes)
        else:
            self.projection = None
            self.hidden = None
            self.output = nn.utils.skip_init(nn.Linear, heads * features, classes)

    def project(self, Z: Float[Tensor, "example head feature"]) -> Float[Tensor, "example head width"]:
        return Z if self.projection is None else Z @ self.projection.T

    def readout(self, P: Float[Tensor, "example head width"], generator: torch.Generator | None = None
                ) -> Float[Tensor, "example class"]:
        """Class logits from projected heads; dropout (seeded by ``generator``) only in training mode."""
        h = P.flatten(1)
        if self.hidden is not None:
            h = torch.relu(self.hidden(h))
            if self.training and self.dropout > 0:
                keep = torch.rand(h.shape, generator=generator, device=h.device) >= self.dropout
                h = h * keep / (1 - self.dropout)
        return self.output(h)

    def forward(self, Z: Float[Tensor, "example head feature"], generator: torch.Generator | None = None
                ) -> Float[Tensor, "example class"]:
        return self.readout(self.project(Z), generator)


@dataclass
class HeadProbe:
    """A fitted multi-class probe over all heads, with the training split's standardisation."""

    family: str
    n_classes: int
    network: HeadNetwork
    mean: Float[Tensor, "head feature"]
    scale: Float[Tensor, "head feature"]
    iterations: int  # L-BFGS iterations (logistic) or epochs trained (mlp)

    def standardise(self, X: Tensor) -> Float[Tensor, "example head feature"]:
        """``X`` (example, head, feature) in the training split's standard units."""
        if X.ndim != 3 or tuple(X.shape[1:]) != tuple(self.mean.shape):
            raise MechkitError(f"features of shape {tuple(X.shape)} do not fit a probe over {self.mean.shape[0]} "
                               f"heads of {self.mean.shape[1]} features; pass (example, head, feature)")
        return (X.to(self.mean.device, torch.float32) - self.mean) / self.scale

    def projected(self, X: Tensor) -> Float[Tensor, "example head width"]:
        """The per-head features importance is read from: standardised inputs (logistic) or the projection."""
        with torch.no_grad():
            return self.network.project(self.standardise(X))

    def logits(self, X: Tensor) -> Float[Tensor, "example class"]:
        """Class logits in eval mode (no dropout)."""
        self.network.eval()
        with torch.no_grad():
            return self.network(self.standardise(X))

    def predict(self, X: Tensor) -> Int[Tensor, " example"]:
        return self.logits(X).argmax(-1)

    @property
    def weight(self) -> Float[Tensor, "class head feature"]:
        """The logistic family's weights on standardised features, per head."""
        if self.family != "logistic":
            raise MechkitError(f"weight is defined for the logistic family only; this probe is {self.family!r}")
        return self.network.output.weight.detach().reshape(self.n_classes, *self.mean.shape)


def _check_labels(y, n_examples: int, n_classes: int | None) -> tuple[Tensor, int]:
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != n_examples:
        raise MechkitError(f"labels must be one per example: {n_examples} examples but labels of shape "
                           f"{tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise MechkitError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.long()
    if n_classes is None:
        n_classes = int(y.max()) + 1 if y.numel() else 0
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise MechkitError(f"labels must lie in [0, {n_classes}), got {sorted(set(y[bad].tolist()))[:10]}; "
                           "pass n_classes to match the labels")
    return y, n_classes


def _check_features(X: Tensor) -> None:
    if not isinstance(X, Tensor) or X.ndim != 3:
        shape = tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__
        raise MechkitError(f"features must be a (example, head, feature) tensor, got {shape}")
    if X.shape[0] == 0 or X.shape[1] == 0 or X.shape[2] == 0:
        raise MechkitError(f"features of shape {tuple(X.shape)} are empty; need examples, heads and features")
    if not torch.isfinite(X).all():
        bad = (~torch.isfinite(X)).any(-1).any(0).nonzero()[:, 0].tolist()
        raise MechkitError(f"features contain NaN or infinite values (heads {bad[:10]}); check the activations")


def fit_head_probe(
    X: Tensor,
    y: Tensor,
    *,
    family: str = "logistic",
    n_classes: int | None = None,
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-5,
    seed: int = 0,
    epochs: int = 200,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    width: int = 64,
    hidden: int = 512,
    dropout: float = 0.3,
    validation: float = 0.0,
    patience: int = 20,
) -> HeadProbe:
    """Fit one multi-class probe on ``X`` (example, head, feature) and labels ``y`` (example,) in [0, n_classes).

    ``n_classes`` defaults to ``max(y) + 1``; every class needs at least one training example.

    ``C``, ``max_iter`` and ``tol`` apply to the logistic family; ``seed``, ``epochs``,
    ``batch_size``, ``lr``, ``weight_decay``, ``width``, ``hidden``, ``dropout``, ``validation``
    and ``patience`` to the mlp family. With ``validation`` > 0, that fraction of each class's
    training examples (at least one, when the class has two or more) is held out; training stops
    after ``patience`` epochs without a lower held-out loss and keeps the best epoch's weights.
    """
    if family not in FAMILIES:
        raise MechkitError(f"family must be one of {FAMILIES}, got {family!r}")
    _check_features(X)
    y, n_classes = _check_labels(y, X.shape[0], n_classes)
    if n_classes < 2:
        raise MechkitError(f"a probe needs at least two classes, got n_classes={n_classes}")
    counts = torch.bincount(y, minlength=n_classes)
    if (counts == 0).any():
        raise MechkitError(f"classes {(counts == 0).nonzero()[:, 0].tolist()} have no training example (class "
                           f"counts {counts.tolist()}); drop them and renumber, or use more data")
    if C <= 0 or max_iter < 1 or epochs < 1 or batch_size < 1 or width < 1 or hidden < 1:
        raise MechkitError(f"C, max_iter, epochs, batch_size, width and hidden must be positive, got C={C}, "
                           f"max_iter={max_iter}, epochs={epochs}, batch_size={batch_size}, width={width}, "
                           f"hidden={hidden}")
    if not 0 <= dropout < 1 or not 0 <= validation < 1:
        raise MechkitError(f"dropout and validation must lie in [0, 1), got dropout={dropout}, "
                           f"validation={validation}")

    X = X.float()
    y = y.to(X.device)
    _, heads, features = X.shape
    generator = torch.Generator().manual_seed(seed)
    network = HeadNetwork(heads, features, n_classes, family=family, width=width, hidden=hidden, dropout=dropout)
    with torch.no_grad():  # seeded, torch's default bound: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for p, fan_in in _fan_ins(network):
            bound = 1 / math.sqrt(fan_in)
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
    network.to(X.device)

    if family == "logistic":
        mean, scale = _standardisation(X)
        iterations = _fit_logistic(network, ((X - mean) / scale).flatten(1), y, n_classes, C=C, max_iter=max_iter,
                                   tol=tol)
        network.eval()
        return HeadProbe(family, n_classes, network, mean, scale, iterations)

    held = torch.zeros(len(y), dtype=torch.bool)
    if validation > 0:
        order = torch.randperm(len(y), generator=generator)
        y_cpu = y.cpu()
        for c in range(n_classes):
            members = order[y_cpu[order] == c]
            take = min(max(1, round(validation * len(members))), len(members) - 1)
            held[members[:take]] = True
    held = held.to(X.device)
    train_X, train_y = X[~held], y[~held]
    mean, scale = _standardisation(train_X)
    Z, Z_held, y_held = (train_X - mean) / scale, (X[held] - mean) / scale, y[held]
    dropout_generator = torch.Generator(device=X.device).manual_seed(seed + 1)
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_loss, since_best, epoch = None, math.inf, 0, 0
    for epoch in range(1, epochs + 1):
        network.train()
        order = torch.randperm(len(train_y), generator=generator).to(X.device)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(network(Z[batch], dropout_generator), train_y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if len(y_held):
            network.eval()
            with torch.no_grad():
                held_loss = nn.functional.cross_entropy(network(Z_held), y_held).item()
            if held_loss < best_loss:
                best, best_loss, since_best = {k: v.clone() for k, v in network.state_dict().items()}, held_loss, 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
    if best is not None:
        network.load_state_dict(best)
    network.eval()
    return HeadProbe(family, n_classes, network, mean, scale, epoch)


def _fan_ins(network: HeadNetwork) -> list[tuple[Tensor, int]]:
    pairs = [] if network.projection is None else [(network.projection, network.projection.shape[1])]
    for layer in (network.hidden, network.output):
        if layer is not None:
            pairs += [(layer.weight, layer.in_features), (layer.bias, layer.in_features)]
    return pairs


def _standardisation(X: Float[Tensor, "example head feature"]) -> tuple[Tensor, Tensor]:
    """Training mean and std per (head, feature); a constant feature gets scale 1, as in scikit-learn."""
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def _fit_logistic(network: HeadNetwork, Z: Float[Tensor, "example d"], y: Tensor, n_classes: int, *, C: float,
                  max_iter: int, tol: float) -> int:
    """Multinomial L2 logistic regression by full-batch L-BFGS, written into ``network.output``.

    With fewer than half as many examples as features the weights are solved in the span of the
    training rows (where the L2-optimal weights lie), as in the binary trainer.
    """
    n, d = Z.shape
    basis = None
    if 2 * n < d:
        basis, _ = torch.linalg.qr(Z.T)  # (d, n), orthonormal columns
        Z = Z @ basis
    width = Z.shape[1]
    onehot = nn.functional.one_hot(y, n_classes).float()
    params = torch.zeros(n_classes, width + 1, device=Z.device)
    params.grad = torch.zeros_like(params)
    optimiser = torch.optim.LBFGS([params], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-10,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective():
        # Loss and gradient by hand (two matmuls), no autograd graph per evaluation.
        w, b = params[:, :width], params[:, width]
        logits = Z @ w.T + b
        loss = C * nn.functional.cross_entropy(logits, y, reduction="sum") + 0.5 * (w**2).sum()
        residual = C * (torch.softmax(logits, -1) - onehot)  # (example, class)
        params.grad[:, :width] = residual.T @ Z + w
        params.grad[:, width] = residual.sum(0)
        return loss

    optimiser.step(objective)
    weight = params[:, :width]
    if basis is not None:
        weight = weight @ basis.T
    with torch.no_grad():
        network.output.weight.copy_(weight)
        network.output.bias.copy_(params[:, width])
    return int(optimiser.state[optimiser._params[0]].get("n_iter", 0))


def head_importance(probe: HeadProbe, X: Tensor, y: Tensor) -> Float[Tensor, "class head"]:
    """Signed (class, head) importance on ``X`` (example, head, feature) with labels ``y`` (example,).

    For class c: the mean over the examples with ``y == c`` of ``d logit_c / d P[h] * P[h]``,
    averaged over the projected width of head h (``P = probe.projected(X)``), in eval mode (no
    dropout). A class with no example in ``y`` gets a row of NaN. Rank heads by the absolute
    value; the sign says whether the head's features push towards (+) or away from (-) the class.
    """
    _check_features(X)
    y, _ = _check_labels(y, X.shape[0], probe.n_classes)
    network = probe.network
    network.eval()
    P = probe.projected(X)
    y = y.to(P.device)
    importance = torch.full((probe.n_classes, P.shape[1]), math.nan, device=P.device)
    for c in range(probe.n_classes):
        members = P[y == c].detach().requires_grad_(True)
        if not len(members):
            continue
        # Examples do not interact in eval mode, so the gradient of the summed logit is each
        # example's own gradient.
        (grad,) = torch.autograd.grad(network.readout(members)[:, c].sum(), members)
        importance[c] = (grad * members).detach().mean(-1).mean(0)
    return importance


def evaluate_multiclass(probe: HeadProbe, X: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 and the majority-class baseline accuracy (on the same ``y``) of the probe on ``X``."""
    _check_features(X)
    y, _ = _check_labels(y, X.shape[0], probe.n_classes)
    truth = y.cpu().numpy()
    predicted = probe.predict(X).cpu().numpy()
    return {
        "accuracy": float((predicted == truth).mean()),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0.0)),
        "majority_baseline": float(np.bincount(truth).max() / len(truth)),
        "n_examples": len(truth),
    }
