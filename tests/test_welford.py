"""Welford/Chan kernels against numpy two-pass float64, on data with a large offset."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from padim_ooc.welford import Moments, advance, merge, merge_, update_

from conftest import rel, two_pass

P, D = 5, 6


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(42)
    # mean ~1e4, variance ~1, correlated dimensions: the raw-moment formula loses ~8 digits here
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    x = rng.normal(size=(P, 61, D)) @ mix + 1e4 + rng.normal(size=(P, 1, D))
    return x


SPLITS = {
    "single": [61],
    "ones": [1] * 61,
    "uneven": [1, 2, 7, 13, 1, 30, 7],
    "halves": [30, 31],
    "leading_one": [1, 60],
    "trailing_one": [60, 1],
}


@pytest.mark.parametrize("split", list(SPLITS))
def test_update_matches_two_pass(data, split):
    mean_ref, m2_ref = two_pass(data)
    acc = Moments.zeros(P, D)
    start = 0
    for size in SPLITS[split]:
        batch = torch.from_numpy(data[:, start:start + size])
        update_(acc, batch[:2], start=0, stop=2)  # uneven position blocks
        update_(acc, batch[2:], start=2, stop=P)
        advance(acc, size)
        start += size
    assert acc.n == 61
    assert rel(acc.mean, mean_ref) <= 1e-10
    assert rel(acc.m2, m2_ref) <= 1e-10


@pytest.mark.parametrize("split", list(SPLITS))
def test_merge_of_shards_both_orders(data, split):
    mean_ref, m2_ref = two_pass(data)
    bounds = np.cumsum([0] + SPLITS[split])
    shards = [Moments.from_batch(torch.from_numpy(data[:, a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    for order in (shards, shards[::-1]):
        total = Moments.zeros(P, D)
        for s in order:
            merge_(total, s)
        assert total.n == 61
        assert rel(total.mean, mean_ref) <= 1e-10
        assert rel(total.m2, m2_ref) <= 1e-10


def test_functional_merge_every_pair_direction(data):
    """merge(a, b) == merge(b, a) == two-pass, for every cut point; inputs untouched."""
    mean_ref, m2_ref = two_pass(data)
    for cut in (1, 5, 30, 60):
        a = Moments.from_batch(torch.from_numpy(data[:, :cut]))
        b = Moments.from_batch(torch.from_numpy(data[:, cut:]))
        a_mean = a.mean.clone()
        for x, y in itertools.permutations([a, b]):
            m = merge(x, y)
            assert m.n == 61
            assert rel(m.mean, mean_ref) <= 1e-10
            assert rel(m.m2, m2_ref) <= 1e-10
        assert torch.equal(a.mean, a_mean)


def test_merge_with_empty_is_identity(data):
    a = Moments.from_batch(torch.from_numpy(data[:, :10]))
    empty = Moments.zeros(P, D)
    for m in (merge(a, empty), merge(empty, a)):
        assert m.n == 10 and torch.equal(m.mean, a.mean) and torch.equal(m.m2, a.m2)


def test_raw_moments_would_fail_here(data):
    """The data really is hard: the one-pass raw-moment formula in float32 is far off."""
    _, m2_ref = two_pass(data)
    x = torch.from_numpy(data).float()
    n = x.shape[1]
    s = x.sum(1)
    raw = torch.einsum("pni,pnj->pij", x, x) - s.unsqueeze(2) * s.unsqueeze(1) / n
    assert rel(raw.numpy(), m2_ref) > 1e-3


def test_covariance(data):
    acc = Moments.from_batch(torch.from_numpy(data))
    for p in range(P):
        np.testing.assert_allclose(acc.covariance()[p].numpy(), np.cov(data[p].T), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        Moments.from_batch(torch.from_numpy(data[:, :1])).covariance()


@pytest.mark.parametrize("lower_only", [False, True])
@pytest.mark.parametrize("max_samples", [1, 5, 8, 61, 100])
def test_folder_buffers_and_folds_exactly(data, max_samples, lower_only):
    """Buffered folding (full buffers, a batch larger than the buffer, partial flushes) == two-pass,
    with full batched products and with one-triangle BLAS syrk updates mirrored at the flush."""
    from padim_ooc.welford import Folder

    mean_ref, m2_ref = two_pass(data)
    acc = Moments.zeros(P, D)
    folder = Folder(acc, block=2, max_samples=max_samples, lower_only=lower_only)
    start = 0
    for size in SPLITS["uneven"]:
        batch = torch.from_numpy(data[:, start:start + size].copy())
        folder.add(batch)
        batch.fill_(0)  # the folder must have copied it
        start += size
    folder.flush()
    assert acc.n == 61
    assert rel(acc.mean, mean_ref) <= 1e-10
    assert rel(acc.m2, m2_ref) <= 1e-10


def test_folder_reserve_commit_and_a_dropped_reservation(data):
    """Samples written into reserved views are folded only once committed; an uncommitted
    view (a batch refused after it was embedded) leaves no trace."""
    from padim_ooc.welford import Folder

    keep = np.concatenate([data[:, :20], data[:, 30:]], axis=1)
    mean_ref, m2_ref = two_pass(keep)
    acc = Moments.zeros(P, D)
    folder = Folder(acc, max_samples=16)
    for lo, hi in [(0, 7), (7, 20), (20, 30), (30, 45), (45, 61)]:
        view = folder.reserve(hi - lo, torch.float64)
        assert view.shape == (P, hi - lo, D)
        view.copy_(torch.from_numpy(data[:, lo:hi]))
        if (lo, hi) != (20, 30):
            folder.commit(hi - lo)
    folder.flush()
    assert acc.n == 51
    assert rel(acc.mean, mean_ref) <= 1e-10 and rel(acc.m2, m2_ref) <= 1e-10


def test_folder_one_triangle_at_large_dims_is_exact_and_symmetric():
    """From SYRK_MIN_DIMS on the CPU the folder updates one triangle with BLAS syrk (in place on
    the store's float64 matrices) and mirrors it at the flush: exact and exactly symmetric."""
    from padim_ooc.welford import SYRK_MIN_DIMS, Folder

    rng = np.random.default_rng(3)
    d = SYRK_MIN_DIMS + 3
    x = rng.normal(size=(3, 40, d)) + 5e3
    mean_ref, m2_ref = two_pass(x)
    acc = Moments.zeros(3, d)
    folder = Folder(acc, max_samples=16)
    assert folder.lower_only and not Folder(Moments.zeros(3, SYRK_MIN_DIMS - 1), max_samples=16).lower_only
    for lo in range(0, 40, 9):
        folder.add(torch.from_numpy(x[:, lo:lo + 9].copy()))
    folder.flush()
    assert acc.n == 40
    assert rel(acc.mean, mean_ref) <= 1e-10 and rel(acc.m2, m2_ref) <= 1e-10
    assert torch.equal(acc.m2, acc.m2.transpose(1, 2))


def test_folder_keeps_buffered_samples_when_the_dtype_changes():
    """A batch of another dtype replaces the buffer only after the buffered samples were folded."""
    from padim_ooc.welford import Folder

    x = np.random.default_rng(7).normal(size=(P, 61, D)).astype(np.float32).astype(np.float64)  # exact in both
    mean_ref, m2_ref = two_pass(x)
    acc = Moments.zeros(P, D)
    folder = Folder(acc, max_samples=64)
    folder.add(torch.from_numpy(x[:, :30].copy()))
    folder.add(torch.from_numpy(x[:, 30:].copy()).float())
    folder.flush()
    assert acc.n == 61
    assert rel(acc.mean, mean_ref) <= 1e-10 and rel(acc.m2, m2_ref) <= 1e-10


# ---- the float32 fold: float32 scatter products, float64 means, centring, merges and accumulators
def _offset_features(d, n, positions=3, seed=11):
    """float32 features (positions, n, d): correlated dimensions, variance ~1, offset ~1000."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(positions, n, d)) @ mix + 1000 + rng.normal(size=(positions, 1, d))
    return x.astype(np.float32)


@pytest.mark.parametrize("lower_only", [False, True])
@pytest.mark.parametrize("d", [100, 150])
@pytest.mark.parametrize("max_samples, sizes", [(1, [1] * 40), (256, [32] * 9 + [12]), (300, [300])],
                         ids=["batches_of_1", "batches_of_32_folds_of_256", "one_fold_of_300"])
def test_float32_fold_within_1e6_of_two_pass_float64(d, lower_only, max_samples, sizes):
    """The float32 fold against numpy two-pass float64 statistics of the very same float32
    features, offset by 1000: mean and covariance within 1e-6 relative (measured ~2e-7)."""
    from padim_ooc.welford import Folder

    x = _offset_features(d, sum(sizes))
    mean_ref, m2_ref = two_pass(x.astype(np.float64))
    acc = Moments.zeros(x.shape[0], d)
    folder = Folder(acc, max_samples=max_samples, block=2, lower_only=lower_only, fold="float32")
    start = 0
    for size in sizes:
        folder.add(torch.from_numpy(x[:, start:start + size]))
        start += size
    folder.flush()
    assert acc.n == sum(sizes) and acc.mean.dtype == acc.m2.dtype == torch.float64
    assert rel(acc.mean, mean_ref) <= 1e-6
    assert rel(acc.covariance(), m2_ref / (acc.n - 1)) <= 1e-6
    if lower_only:
        assert torch.equal(acc.m2, acc.m2.transpose(1, 2))


@pytest.mark.parametrize("fold", ["float64", "float32"])
def test_fold_modes_on_the_same_features(fold):
    """The same float32 features through both folds: float64 within 1e-10 of two-pass, float32
    within 1e-6 (and not exact: it does round)."""
    from padim_ooc.welford import Folder

    x = _offset_features(120, 90, seed=5)
    mean_ref, m2_ref = two_pass(x.astype(np.float64))
    acc = Moments.zeros(x.shape[0], 120)
    folder = Folder(acc, max_samples=64, fold=fold)
    for lo in range(0, 90, 30):
        folder.add(torch.from_numpy(x[:, lo:lo + 30]))
    folder.flush()
    err = rel(acc.m2, m2_ref)
    if fold == "float64":
        assert rel(acc.mean, mean_ref) <= 1e-10 and err <= 1e-10
    else:
        assert rel(acc.mean, mean_ref) <= 1e-6 and 1e-12 < err <= 1e-6


def test_unknown_fold_is_a_one_line_error():
    from padim_ooc.errors import PadimError
    from padim_ooc.welford import FOLDS, Folder, check_fold, fold_plan

    assert FOLDS == ("float64", "float32") and check_fold("float32") == "float32"
    for call in (lambda: check_fold("float16"), lambda: Folder(Moments.zeros(2, 3), max_samples=4, fold="half"),
                 lambda: fold_plan(4, 3, 8, fold="fp32")):
        with pytest.raises(PadimError, match="--fold must be float64 or float32, not") as err:
            call()
        assert "\n" not in str(err.value)


def test_float32_fold_work_space_is_counted():
    """fold_plan's blocks for the float32 fold hold its float32 rows and scratch too."""
    from padim_ooc.welford import FOLD_BLOCK_BYTES, fold_plan, fold_row_bytes

    assert fold_row_bytes(100, 63, "float32") == 64 * 100 * 8 + 63 * 100 * 4 + 100 * 100 * 4
    assert fold_row_bytes(550, 63, "float32", lower_only=True) == 64 * 550 * 8 + 63 * 550 * 4
    block32, _ = fold_plan(3136, 100, 63, fold="float32")
    block64, _ = fold_plan(3136, 100, 63)
    assert block32 < block64 and block32 * fold_row_bytes(100, 63, "float32") <= FOLD_BLOCK_BYTES
