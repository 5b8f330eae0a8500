"""The Triton projection kernels agree with the torch reference on fresh random inputs.

On a machine without a CUDA GPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set in conftest.py before Triton is first imported); on a GPU the same tests
compile and run them for real. Sizes are deliberately odd (not multiples of any block).
"""

from __future__ import annotations

import pytest
import torch

from mechkit.errors import MechkitError

CUDA = torch.cuda.is_available()

triton = pytest.importorskip("triton")

from mechkit.kernels import projection_rank, projection_topk
from mechkit.kernels.projection import projection_rank_reference

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(seed: int, heads: int, n: int, r: int, vocab: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(heads, n, r, generator=g).to(dtype).to(DEVICE)
    B = torch.randn(heads, r, vocab, generator=g).to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, (heads, n), generator=g).to(DEVICE)
    return Y, B, targets


def _rank_bounds(Y, B, targets, eps: float):
    """Ranks any correct float32 computation can give: strictly-larger counts with the
    target's float64 score moved up (fewest) or down (most) by ``eps`` relative."""
    scores = Y.double() @ B.double()
    own = scores.gather(-1, targets[..., None])
    tol = eps * scores.abs().amax(-1, keepdim=True)
    not_own = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, targets[..., None], False)
    low = ((scores > own + tol) & not_own).sum(-1)
    high = ((scores > own - tol) & not_own).sum(-1)
    return low, high


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_rank_matches_the_reference_on_odd_sizes(dtype, seed):
    Y, B, targets = _inputs(seed, heads=3, n=45, r=40, vocab=1237, dtype=dtype)
    got = projection_rank(Y, B, targets, backend="triton")
    ref = projection_rank(Y, B, targets, backend="reference")
    low, high = _rank_bounds(Y, B, targets, eps=1e-5)
    assert ((got >= low) & (got <= high)).all(), "a Triton rank lies outside what float32 rounding allows"
    assert ((ref >= low) & (ref <= high)).all()
    assert (got == ref).float().mean() >= 0.98  # near-ties aside, the two paths agree row for row
    capped = projection_rank(Y, B, targets, k=7, backend="triton")
    assert torch.equal(capped, got.clamp(max=7)) or ((capped != got.clamp(max=7)).sum() <= 1)


def test_triton_rank_with_a_shared_and_a_factored_projection():
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(2, 33, 24, generator=g).to(DEVICE)
    A = torch.randn(24, 50, generator=g).to(DEVICE)
    C = torch.randn(50, 611, generator=g).to(DEVICE)
    targets = torch.randint(0, 611, (2, 33), generator=g).to(DEVICE)
    for B, factor in ((A @ C, None), (A, C)):  # shared (r, V) for all heads; factored A @ C
        got = projection_rank(Y, B, targets, C=factor, backend="triton")
        low, high = _rank_bounds(Y, (A @ C)[None].expand(2, -1, -1), targets, eps=1e-5)
        assert ((got >= low) & (got <= high)).all()
    single = projection_rank(Y[0], A @ C, targets[0], backend="triton")  # the unbatched form
    assert torch.equal(single, projection_rank_reference(Y[0], A @ C, targets[0])) or (
        (single != projection_rank_reference(Y[0], A @ C, targets[0])).sum() <= 1)


@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 5), (torch.bfloat16, 37), (torch.float16, 1)])
def test_triton_topk_matches_the_reference_on_odd_sizes(dtype, k):
    Y, B, _ = _inputs(7, heads=2, n=29, r=40, vocab=1111, dtype=dtype)
    scores, index = projection_topk(Y, B, k, backend="triton")
    ref_scores, ref_index = projection_topk(Y, B, k, backend="reference")
    assert scores.shape == index.shape == (2, 29, k)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert (scores[..., :-1] >= scores[..., 1:]).all()  # descending
    exact = Y.double() @ B.double()
    torch.testing.assert_close(exact.gather(-1, index).float(), scores, rtol=1e-4, atol=1e-4)  # each index holds its score
    assert (index == ref_index).float().mean() >= 0.99


def test_triton_topk_breaks_ties_towards_the_lower_index():
    Y = torch.ones(1, 3, 16, device=DEVICE)
    B = torch.zeros(1, 16, 300, device=DEVICE)
    B[..., [7, 250, 100]] = 1.0  # three equal top scores
    _, index = projection_topk(Y, B, 4, backend="triton")
    assert index[0, 0].tolist() == [7, 100, 250, 0]


def test_triton_topk_redoes_rows_whose_candidates_overflow():
    # All scores equal: every column passes the threshold, far more than the buffer holds.
    Y = torch.ones(1, 70, 16, device=DEVICE)
    B = torch.ones(1, 16, 2000, device=DEVICE)
    scores, index = projection_topk(Y, B, 3, backend="triton")
    assert index[0].tolist() == [[0, 1, 2]] * 70 and torch.all(scores == 16)


def test_triton_topk_collects_again_where_the_tight_threshold_lets_too_few_through():
    from mechkit.kernels.triton_projection import topk_triton

    g = torch.Generator().manual_seed(11)
    V, k, block_n = 3001, 5, 128
    config = dict(block_m=64, block_n=block_n, margin=3.0)
    Y = torch.randn(2, 23, 32, generator=g).abs()
    B = torch.randn(2, 32, V, generator=g) * 0.01
    # Sampled tiles are every 4th here (24 tiles, k = 5): give four of them one huge column each,
    # so the tight threshold (4th largest sampled maximum) admits only those four columns.
    every = max(1, min(8, -(-V // block_n) // k))
    assert every == 4
    for tile in (0, 4, 8, 12):
        B[:, :, tile * block_n + 3] = 1.0
    B[:, :, 2 * block_n + 7] = 0.9  # the 5th best: in an unsampled tile, under the tight threshold
    timings: dict = {}
    scores, index = topk_triton(Y.to(DEVICE), B.to(DEVICE), k, timings=timings, config=config)
    ref_scores, ref_index = projection_topk(Y.to(DEVICE), B.to(DEVICE), k, backend="reference")
    assert timings["redone rows"] == 2 * 23  # every row went through the safe threshold
    assert torch.equal(index.cpu(), ref_index.cpu())
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert set(index[0, 0].tolist()) == {3, 4 * block_n + 3, 8 * block_n + 3, 12 * block_n + 3, 2 * block_n + 7}


@pytest.mark.parametrize(("seed", "config"), [(0, dict()), (1, dict(margin=1.0)), (2, dict(margin=3.0, every=3, block_m=32)),
                                             (3, dict(chunk=16, block_r=16)), (4, dict(every=2, block_n=32, paired=True))])
def test_triton_topk_over_a_sampled_vocabulary_matches_the_reference(seed, config):
    from mechkit.kernels.triton_projection import topk_triton

    # 65 column tiles of 64: three words of flags per row; chunk=16 splits the rows over three
    # chunks and scores a tile's flagged rows in several blocks
    Y, B, _ = _inputs(seed, heads=3, n=37, r=24, vocab=4099, dtype=torch.float32)
    timings: dict = {}
    scores, index = topk_triton(Y, B, 7, config=config, timings=timings)
    ref_scores, ref_index = projection_topk(Y, B, 7, backend="reference")
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    assert (index == ref_index).float().mean() >= 0.99
    if config.get("margin") == 3.0:  # (pick = k here: the threshold is safe, no row needs a second round)
        assert timings["redone rows"] == 0


def test_triton_topk_where_every_row_wants_the_same_tile():
    """A skewed vocabulary (as real heads have: a few tokens score high for every source): one tile
    flagged by every row, so the gather pass scores it for whole chunks, block after block."""
    from mechkit.kernels.triton_projection import topk_triton

    Y, B, _ = _inputs(5, heads=2, n=70, r=16, vocab=2500, dtype=torch.float32)
    Y = Y.abs()
    B[:, :, 100:140] = B[:, :, 100:140].abs() + 3.0  # columns 100-139 beat every other column for every row
    timings: dict = {}
    scores, index = topk_triton(Y, B, 9, config=dict(chunk=32, block_r=16), timings=timings)
    ref_scores, ref_index = projection_topk(Y, B, 9, backend="reference")
    assert ((index >= 100) & (index < 140)).all()
    assert torch.equal(index.cpu(), ref_index.cpu())
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paired", [False, True])
def test_the_flag_pass_marks_the_tiles_that_reach_each_rows_threshold(paired):
    """Pass 1 on its own against torch: the threshold is the pick-th largest of the sampled tile
    maxima, every tile whose maximum reaches it (or comes within float rounding of it) is flagged,
    and no tile further below it than the slack."""
    import triton

    from mechkit.kernels.triton_projection import FLAG_SLACK, TOPK_CONFIG, _flag_pass

    g = torch.Generator().manual_seed(3)
    H, n, r, V, block_n, every, pick = 2, 21, 24, 2900, 32, 3, 5
    Y = torch.randn(H, n, r, generator=g).to(DEVICE)
    B = torch.randn(H, r, V, generator=g).to(DEVICE)
    tiles = triton.cdiv(V, block_n)  # 91 tiles: three words of flags
    config = {**TOPK_CONFIG, "block_m": 16, "block_n": block_n, "every": every, "paired": paired}
    flags, thresh = _flag_pass(Y, B, pick, config)  # (91 tiles: paired, the last pair's second half is past V)
    scores = (Y.double() @ B.double()).cpu()
    padded = torch.nn.functional.pad(scores, (0, tiles * block_n - V), value=float("-inf"))
    tile_max = padded.view(H, n, tiles, block_n).amax(-1)
    expected = tile_max[..., ::every].topk(pick, dim=-1).values[..., -1]
    torch.testing.assert_close(thresh.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    bits = (flags.cpu()[:, :, None, :] >> torch.arange(32)[None, None, :, None]) & 1  # (H, word, bit, n)
    flagged = bits.reshape(H, -1, n)[:, :tiles].permute(0, 2, 1).bool()
    reaches = tile_max >= expected[..., None] - 1e-4
    slack = FLAG_SLACK * tile_max[..., ::every].topk(pick, dim=-1).values.abs().amax(-1)
    below = tile_max < (expected - slack)[..., None] - 1e-4
    assert flagged[reaches].all() and not flagged[below].any()
    # each row flags (at least) the tiles of its pick largest sampled maxima, the one at the threshold included
    assert (flagged[..., ::every].sum(-1) >= pick).all()


def test_the_select_kernel_keeps_the_best_candidates_ties_to_the_lower_column():
    """The top-k's last pass (which the interpreted end-to-end tests replace by its torch rule,
    too slow there) against that rule: random candidates with -inf padding, equal scores, and
    negative scores, whose raw float bits order backwards."""
    from mechkit.kernels.projection import top_by_score_then_index
    from mechkit.kernels.triton_projection import _select_kernel

    g = torch.Generator().manual_seed(4)
    H, n, cap, k = 2, 5, 32, 7
    scores = torch.randn(H, n, cap, generator=g).round(decimals=1)  # rounding makes many ties
    scores[..., 20:] = float("-inf")  # unfilled slots
    scores[0, 0, :20] = -0.5  # a row of equal negative scores: the lowest columns win
    columns = torch.stack([torch.randperm(1000, generator=g)[:cap] for _ in range(H * n)]).view(H, n, cap).int()
    got_s = torch.empty(H, n, k, device=DEVICE)
    got_i = torch.empty(H, n, k, dtype=torch.long, device=DEVICE)
    _select_kernel[(triton.cdiv(H * n, 4),)](scores.to(DEVICE), columns.to(DEVICE), got_s, got_i, H * n, k,
                                             CAP=cap, K_PAD=8, BLOCK_ROWS=4)
    want_s, want_i = top_by_score_then_index(scores, columns, k)
    assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_s.cpu(), want_s)
    assert got_i[0, 0].tolist() == sorted(columns[0, 0, :20].tolist())[:k]


def test_requesting_triton_without_a_gpu_falls_back_with_a_notice(monkeypatch):
    if CUDA:
        pytest.skip("a GPU is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    Y, B, targets = _inputs(0, heads=1, n=5, r=8, vocab=50, dtype=torch.float32)
    with pytest.warns(UserWarning, match="Triton requested but"):
        got = projection_rank(Y, B, targets, backend="triton")
    assert torch.equal(got, projection_rank(Y, B, targets, backend="reference"))


def test_batched_and_backend_errors_are_clear():
    Y, B, targets = _inputs(0, heads=2, n=5, r=8, vocab=50, dtype=torch.float32)
    with pytest.raises(MechkitError, match="batched form"):
        projection_rank(Y, B[:1], targets)
    with pytest.raises(MechkitError, match="backend must be one of"):
        projection_rank(Y, B, targets, backend="cuda")
    with pytest.raises(MechkitError, match="k=60"):
        projection_topk(Y, B, 60, backend="triton")
    with pytest.raises(MechkitError, match="must lie in"):
        projection_rank(Y, B, targets + 50, backend="triton")
