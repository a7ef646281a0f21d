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
