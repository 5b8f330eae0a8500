"""MAPS on the bundled models: the chunked fast path equals brute-force rows; chance stays low."""

import pytest
import torch

from mechkit.data import builtin_relations
from mechkit.heads import classify_heads
from mechkit.heads.classification import source_representations, tokenise_relation
from mechkit.heads.weights import BridgeWeights
from mechkit.kernels import projection_rank

pytestmark = pytest.mark.real
RELATIONS = {r.name: r for r in builtin_relations()}


@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_fast_ranks_equal_brute_force_full_rows(name, request):
    model = request.getfixturevalue(name)
    weights = BridgeWeights(model)
    W_U = weights.W_U().detach().float()
    for relation, (layer, head) in (("country_to_capital", (0, 0)), ("name_copying", (weights.n_layers - 6, 1))):
        tok = tokenise_relation(model, RELATIONS[relation])
        first, later = source_representations(weights, tok.sources[:64])
        x = first if layer == 0 else later
        with torch.no_grad():
            Y = x @ weights.W_V(layer)[head]
            full = Y @ (weights.W_O(layer)[head] @ W_U)  # the brute force: every score of every row
        own = full[torch.arange(len(Y)), tok.targets[:64]]
        brute = (full > own[:, None]).sum(-1)  # the target is never larger than itself
        fast = projection_rank(Y, weights.W_O(layer)[head], tok.targets[:64], C=W_U)
        assert torch.equal(fast, brute)
        capped = projection_rank(Y, weights.W_O(layer)[head], tok.targets[:64], C=W_U, k=10)
        assert torch.equal(capped, fast.clamp(max=10))


def test_smollm2_has_relation_heads_far_above_the_shuffled_null(smollm2):
    relations = [RELATIONS[n] for n in ("name_copying", "country_to_capital", "english_to_german")]
    result = classify_heads(smollm2, relations, layers=[22, 23, 24], progress=False)
    implemented = float((result.scores.values >= result.threshold).mean())
    assert result.top_heads("name_copying", 1)[0][:2] == (1, 2)  # head 23.2, found on the full run
    assert result.scores.sel(layer=23, head=2, relation="name_copying").values > 0.5
    assert implemented >= 10 * result.false_positive_rate()
    assert "year_to_next_year" not in result.relations  # not asked for
