"""True/false probing on the bundled models: the model, not the data (shuffled-label control)."""

import numpy as np
import pytest

from mechkit.data.probing_sets import true_false
from mechkit.probing import probe_layers

pytestmark = pytest.mark.real


@pytest.mark.parametrize("name", ["gemma", "smollm2"])
def test_true_false_is_decodable_and_the_shuffled_control_is_at_chance(name, request):
    model = request.getfixturevalue(name)
    data = true_false(per_relation=15)  # split by subject: no country or word on both sides
    result = probe_layers(model, data, ["resid_post"], control=8, progress=False)  # one seeded split
    auc = result.scores.sel(stream="resid_post", metric="auc").values[0]
    control = result.control.sel(stream="resid_post", metric="auc").values[0]
    assert np.nanmax(auc) >= 0.75
    assert np.nanmax(np.abs(control - 0.5)) <= 0.05
    assert result.scores.attrs["split"] == "by group"
