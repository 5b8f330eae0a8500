"""Multi-class head probes: planted carrier heads are found by both families; the logistic fit
equals scikit-learn; importance equals brute-force references; fits are seeded; bad input refused."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from mechkit.errors import MechkitError
from mechkit.probing.multiclass import (
    evaluate_multiclass,
    fit_head_probe,
    head_importance,
)

CLASSES, HEADS, FEATURES = 8, 24, 16


@pytest.fixture(autouse=True)
def one_thread():
    """The matrices here are small: a second intra-op thread only adds synchronisation, which on a
    loaded machine made the mlp fits 20x slower. Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(per_class=40, shift=3.0, seed=0):
    """Features where class c is carried only by its two heads ``carriers[c]``; other heads are noise.

    Each carrier head's features are shifted, on examples of its class, along a random unit
    direction by ``shift`` noise standard deviations; the 16 carriers are distinct heads and the
    remaining 8 heads carry nothing. Also returns a stratified (train, test) split, 3:1.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), per_class)
    X = rng.normal(size=(len(y), HEADS, FEATURES))
    carriers = rng.permutation(HEADS)[:2 * CLASSES].reshape(CLASSES, 2)
    for c, heads in enumerate(carriers):
        for h in heads:
            direction = rng.normal(size=FEATURES)
            X[y == c, h] += shift * direction / np.linalg.norm(direction)
    test = np.zeros(len(y), dtype=bool)
    for c in range(CLASSES):
        test[rng.permutation(np.flatnonzero(y == c))[:per_class // 4]] = True
    X = torch.tensor(X, dtype=torch.float32) + 3.0  # an offset, to exercise the standardisation
    return X, torch.tensor(y), carriers, np.flatnonzero(~test), np.flatnonzero(test)


@pytest.mark.parametrize("family, options", [("logistic", {"C": 0.1}), ("mlp", {"epochs": 20})])
def test_planted_carrier_heads_are_each_class_top_two(family, options):
    X, y, carriers, train, test = planted()
    probe = fit_head_probe(X[train], y[train], family=family, n_classes=CLASSES, seed=0, **options)
    scores = evaluate_multiclass(probe, X[test], y[test])
    assert scores["majority_baseline"] == pytest.approx(1 / CLASSES)
    assert scores["accuracy"] > 0.6 and scores["macro_f1"] > 0.6, scores  # chance is 0.125

    importance = head_importance(probe, X[test], y[test])
    assert importance.shape == (CLASSES, HEADS) and torch.isfinite(importance).all()
    top = importance.abs().topk(2, dim=1).indices.numpy()
    for c in range(CLASSES):
        # two selected and two planted: precision 1 and recall 1 both mean the sets are equal
        assert set(top[c]) == set(carriers[c]), (c, top[c], carriers[c], importance[c])
        # the carriers push towards their class
        assert (importance[c, carriers[c]] > 0).all()
    # and the selection is not marginal: the weakest carrier beats the strongest other head
    for c in range(CLASSES):
        others = np.setdiff1d(np.arange(HEADS), carriers[c])
        assert importance[c, carriers[c]].abs().min() > 2 * importance[c, others].abs().max()


def test_logistic_equals_sklearn_multinomial():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 150)
    X = rng.normal(size=(150, 3, 5)) + 0.7 * (np.eye(4)[y] @ rng.normal(size=(4, 15))).reshape(150, 3, 5)
    Xt = torch.tensor(X, dtype=torch.float32)
    probe = fit_head_probe(Xt, torch.tensor(y), family="logistic", C=0.5)
    Z = X.reshape(150, -1)
    Z = (Z - Z.mean(0)) / Z.std(0)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(Z, y)
    np.testing.assert_allclose(probe.weight.reshape(4, -1).numpy(), ref.coef_, atol=2e-3)
    np.testing.assert_allclose(torch.softmax(probe.logits(Xt), -1).numpy(), ref.predict_proba(Z), atol=1e-3)


def test_logistic_span_solve_equals_sklearn_with_more_features_than_examples():
    rng = np.random.default_rng(2)
    y = np.arange(30) % 3
    X = rng.normal(size=(30, 10, 8))
    X[:, 2, 0] += 2.0 * y
    probe = fit_head_probe(torch.tensor(X, dtype=torch.float32), torch.tensor(y), C=0.3)
    Z = X.reshape(30, -1)
    Z = (Z - Z.mean(0)) / Z.std(0)
    ref = LogisticRegression(C=0.3, tol=1e-10, max_iter=10_000).fit(Z, y)
    np.testing.assert_allclose(probe.weight.reshape(3, -1).numpy(), ref.coef_, atol=2e-3)


def test_logistic_importance_equals_brute_force():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(90, 6, 4, generator=gen) * 2 + 1
    y = torch.arange(90) % 5
    X[:, 1, 0] += y
    probe = fit_head_probe(X, y, family="logistic")
    Xe = torch.randn(40, 6, 4, generator=gen)
    ye = torch.randint(0, 5, (40,), generator=gen)
    W = probe.weight.double()  # d logit_c / d z = W_c for a linear model
    Z = ((Xe - probe.mean) / probe.scale).double()
    reference = torch.zeros(5, 6, dtype=torch.float64)
    for c in range(5):
        for h in range(6):
            rows = [i for i in range(40) if ye[i] == c]
            reference[c, h] = sum(float((W[c, h] * Z[i, h]).sum()) for i in rows) / len(rows) / 4
    torch.testing.assert_close(head_importance(probe, Xe, ye).double(), reference, rtol=1e-4, atol=1e-5)


def test_mlp_importance_equals_per_example_jacobian_and_ignores_dropout():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(30, 5, 6, generator=gen)
    y = torch.arange(30) % 3
    probe = fit_head_probe(X, y, family="mlp", epochs=3, width=4, hidden=16, dropout=0.5)
    P = probe.projected(X)
    assert P.shape == (30, 5, 4)
    reference = torch.zeros(3, 5)
    for c in range(3):
        rows = (y == c).nonzero()[:, 0]
        for i in rows:
            jac = torch.autograd.functional.jacobian(lambda p, c=c: probe.network.readout(p[None])[0, c], P[i])
            reference[c] += (jac * P[i]).mean(-1) / len(rows)
    first = head_importance(probe, X, y)
    torch.testing.assert_close(first, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_importance(probe, X, y), first, rtol=0, atol=0)  # no dropout at read time


def test_missing_class_in_evaluation_gives_nan_row():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(30, 4, 3, generator=gen)
    y = torch.arange(30) % 3
    probe = fit_head_probe(X, y)
    importance = head_importance(probe, X[y != 1], y[y != 1])
    assert torch.isnan(importance[1]).all() and torch.isfinite(importance[[0, 2]]).all()


def test_same_seed_same_logits_and_other_seed_other_weights():
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(48, 6, 5, generator=gen)
    y = torch.arange(48) % 4
    options = {"family": "mlp", "epochs": 4, "width": 8, "hidden": 32, "batch_size": 16}
    a = fit_head_probe(X, y, seed=11, **options)
    b = fit_head_probe(X, y, seed=11, **options)
    c = fit_head_probe(X, y, seed=12, **options)
    torch.testing.assert_close(a.logits(X), b.logits(X), rtol=0, atol=0)
    torch.testing.assert_close(a.network.projection, b.network.projection, rtol=0, atol=0)
    assert not torch.equal(a.network.projection, c.network.projection)
    assert not torch.equal(a.logits(X), c.logits(X))
    # the fit leaves the global RNG alone (its randomness comes from the seed only)
    state = torch.get_rng_state()
    fit_head_probe(X, y, seed=11, **options)
    assert torch.equal(state, torch.get_rng_state())
    la = fit_head_probe(X, y, family="logistic", seed=1).logits(X)
    torch.testing.assert_close(la, fit_head_probe(X, y, family="logistic", seed=1).logits(X), rtol=0, atol=0)


def test_early_stopping_stops_and_keeps_the_best_epoch():
    X, y, _, train, _ = planted(per_class=12)
    X, y = X[train], y[train]
    options = {"family": "mlp", "validation": 0.25, "width": 8, "hidden": 32, "seed": 3}
    stopped = fit_head_probe(X, y, epochs=300, patience=3, **options)
    assert 3 < stopped.iterations < 300
    # the best epoch was `patience` epochs before the stop; the same seeded run cut off there
    # ends on that epoch's weights, which early stopping must have restored
    best = stopped.iterations - 3
    cut = fit_head_probe(X, y, epochs=best, patience=300, **options)
    assert cut.iterations == best
    torch.testing.assert_close(stopped.logits(X), cut.logits(X), rtol=0, atol=0)
    assert evaluate_multiclass(stopped, X, y)["accuracy"] > 0.5


@pytest.mark.parametrize("call, message", [
    (lambda X, y: fit_head_probe(X[0], y), "example, head, feature"),
    (lambda X, y: fit_head_probe(X, y[:-1]), "one per example"),
    (lambda X, y: fit_head_probe(X, y.float()), "integer"),
    (lambda X, y: fit_head_probe(X, y - 1), r"\[0, "),
    (lambda X, y: fit_head_probe(X, y, n_classes=2), r"\[0, 2\)"),
    (lambda X, y: fit_head_probe(X, y, n_classes=4), r"\[3\] have no training example"),
    (lambda X, y: fit_head_probe(X, torch.zeros_like(y)), "at least two classes"),
    (lambda X, y: fit_head_probe(X.index_put((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"))), y),
     r"heads \[1\]"),
    (lambda X, y: fit_head_probe(X.index_put((torch.tensor([2]),), torch.tensor(float("inf"))), y, family="mlp"),
     "NaN or infinite"),
    (lambda X, y: fit_head_probe(X, y, family="svm"), "family"),
    (lambda X, y: fit_head_probe(X, y, C=-1.0), "positive"),
    (lambda X, y: fit_head_probe(X, y, family="mlp", dropout=1.0), "dropout"),
    (lambda X, y: head_importance(fit_head_probe(X, y), X[:, :2], y), "do not fit"),
    (lambda X, y: head_importance(fit_head_probe(X, y), X, y + 1), r"\[0, 3\)"),
    (lambda X, y: evaluate_multiclass(fit_head_probe(X, y), X, y[:4]), "one per example"),
    (lambda X, y: fit_head_probe(X, y).logits(X[:, :, :2]), "do not fit"),
])
def test_bad_input_is_refused(call, message):
    X = torch.randn(12, 3, 4, generator=torch.Generator().manual_seed(7))
    y = torch.arange(12) % 3
    with pytest.raises(MechkitError, match=message):
        call(X, y)
