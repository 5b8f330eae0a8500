import numpy as np
import pytest

from mechkit.results import LabelledArray, Provenance


def make(dtype=np.float32):
    values = np.arange(24).reshape(2, 3, 4).astype(dtype)
    return LabelledArray(values, ("model", "layer", "head"),
                         {"model": ["gemma", "smol"], "layer": [0, 1, 2], "head": [0, 1, 2, 3]},
                         name="score", provenance=Provenance(model="gemma", seed=3, settings={"k": 10}),
                         attrs={"skipped": ["year_to_next_year"]})


def test_sel_by_label_drops_or_keeps_axes():
    arr = make()
    one = arr.sel(model="smol")
    assert one.axes == ("layer", "head") and one.values[2, 3] == 23
    kept = arr.sel(model=["smol"], head=[3, 0])
    assert kept.axes == ("model", "layer", "head") and kept.shape == (1, 3, 2)
    assert kept.values[0, 0].tolist() == [15, 12]
    assert kept.labels["head"] == [3, 0]


def test_isel_with_lists_on_two_axes_is_orthogonal():
    arr = make()
    sub = arr.isel(layer=[0, 2], head=[1, 3])
    assert sub.shape == (2, 2, 2)
    assert sub.values[1].tolist() == [[13, 15], [21, 23]]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.bool_])
def test_save_load_round_trip_is_lossless(tmp_path, dtype):
    arr = make(dtype)
    path = arr.save(tmp_path / "r.npz")
    back = LabelledArray.load(path)
    assert back == arr
    assert back.values.dtype == arr.values.dtype
    assert not list(tmp_path.glob(".*partial"))


def test_to_pandas_long_format():
    frame = make().to_pandas()
    assert list(frame.columns) == ["model", "layer", "head", "score"]
    assert len(frame) == 24
    row = frame[(frame["model"] == "smol") & (frame["layer"] == 2) & (frame["head"] == 3)]
    assert row["score"].item() == 23


def test_bad_construction_is_explained():
    with pytest.raises(ValueError, match="2 dimensions but 3 axis names"):
        LabelledArray(np.zeros((2, 2)), ("a", "b", "c"))
    with pytest.raises(ValueError, match="has 2 entries but 3 labels"):
        LabelledArray(np.zeros((2, 2)), ("a", "b"), {"a": [1, 2, 3]})
    with pytest.raises(KeyError, match="not a label of axis 'layer'"):
        make().sel(layer=7)
    with pytest.raises(KeyError, match="no axis 'position'"):
        make().sel(position=1)


def test_provenance_records_versions():
    prov = Provenance()
    assert {"mechkit", "transformer-lens", "transformers", "torch"} <= set(prov.versions)
    assert Provenance.from_dict(prov.to_dict()) == prov
