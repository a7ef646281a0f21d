"""Tests of padim_ooc.evaluation.metrics against sklearn and against brute-force references."""
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from padim_ooc.evaluation import binned
from padim_ooc.evaluation.metrics import (DEFAULT_N_BINS, PixelRocAccumulator, ProAccumulator,
                               image_auroc, pixel_auroc, pro_score, bin_layout, log_tails)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import measure_metric_error  # noqa: E402  (its synthetic maps: one generator for the tests and the script)

BOTH_PATHS = pytest.mark.parametrize("max_exact", [10**9, 0], ids=["exact", "binned"])


def realistic_maps(seed, n=24, size=128, outlier=True):
    """PaDiM-like data (the maps scripts/measure_metric_error.py measures on: smooth
    Mahalanobis-like noise around 10, elliptic defects in half the images with a
    blurred bump of random height), with one far outlier (which stretches the bin
    range the way a hot pixel does in practice)."""
    masks, maps = measure_metric_error.realistic_maps(seed, n, size)
    if outlier:
        maps[-1, 0, 0] = 200.0
    return masks, maps


def boxes_case(seed, n=6, size=30, cell=10):
    """Masks made of separated rectangles (at least one pixel of gap, so the
    listed boxes are exactly the 8-connected regions), two images without any
    defect, and the list of regions as (image, slice, slice)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    regions = []
    for i in range(n - 2):
        for cy in range(0, size, cell):
            for cx in range(0, size, cell):
                if rng.random() < 0.5:
                    h, w = rng.integers(1, cell - 1, 2)
                    y, x = cy + rng.integers(0, cell - h), cx + rng.integers(0, cell - w)
                    region = (i, slice(y, y + h), slice(x, x + w))
                    masks[region] = True
                    regions.append(region)
    maps = rng.normal(size=masks.shape) + masks * rng.uniform(0, 3, masks.shape)
    return masks, maps, regions


def bruteforce_pro(masks, maps, regions, thresholds, fpr_limit=0.3):
    """PRO from its definition, one threshold at a time, plus the point (0, 0)
    for a threshold above every score; area by walking the segments."""
    normal = maps[~masks]
    points = [(0.0, 0.0)]
    for t in np.sort(thresholds)[::-1]:
        fpr = np.mean(normal >= t)
        pro = np.mean([np.mean(maps[r] >= t) for r in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def sorted_exact_pro(masks, maps, fpr_limit=0.3):
    """Exact PRO for large inputs: sort all pixels by score and take one curve
    point after each group of tied scores (cumulative counts, no thresholds)."""
    labels = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    weights, normal, n_regions = [], [], 0
    for lab in labels:
        sizes = np.bincount(lab.ravel())
        weights.append(np.where(lab > 0, 1.0 / sizes[lab], 0.0).ravel())
        normal.append((lab == 0).ravel())
        n_regions += lab.max()
    order = np.argsort(-maps.ravel().astype(np.float64), kind="stable")
    scores = maps.ravel()[order]
    weights, normal = np.concatenate(weights)[order], np.concatenate(normal)[order]
    ends = np.append(np.nonzero(np.diff(scores))[0], scores.size - 1)
    fpr = np.append(0.0, np.cumsum(normal)[ends] / normal.sum())
    pro = np.append(0.0, np.cumsum(weights)[ends] / n_regions)
    keep = fpr <= fpr_limit
    nxt = np.argmax(~keep)  # first point past the limit
    x = np.append(fpr[keep], fpr_limit)
    y = np.append(pro[keep], np.interp(fpr_limit, fpr[nxt - 1:nxt + 1], pro[nxt - 1:nxt + 1]))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def pairwise_auc(labels, scores):
    """Mann-Whitney from its definition: the share of (positive, negative) pairs in which
    the positive scores higher, a tie counting one half."""
    labels, scores = np.asarray(labels).ravel() != 0, np.asarray(scores, np.float64).ravel()
    pos, neg = scores[labels], scores[~labels]
    wins = ties = 0
    for p in pos:
        wins += int(np.sum(p > neg))
        ties += int(np.sum(p == neg))
    return (wins + 0.5 * ties) / (pos.size * neg.size)


# ---------------------------------------------------------------- image AUROC

@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.normal(size=50) + labels, 1)  # rounding makes ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_is_the_pairwise_win_rate(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    scores = rng.integers(0, 5, 40) + labels  # many ties
    expected = pairwise_auc(labels, scores)
    assert 0.5 < expected < 1
    assert image_auroc(labels, scores) == pytest.approx(expected, abs=1e-12)
    # reversed orientation: defects scoring lower give 1 - AUC; all tied gives 1/2
    assert image_auroc(labels, -scores) == pytest.approx(1 - expected, abs=1e-12)
    assert image_auroc(labels, np.zeros(40)) == 0.5
    assert image_auroc([0, 0, 1], [1.0, 3.0, 2.0]) == 0.5  # wins one pair, loses one


def test_image_auroc_errors():
    with pytest.raises(ValueError, match="only label 1"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 .good. or 1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="equal length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------- pixel AUROC

def test_pixel_auroc_exact_path_matches_sklearn():
    masks, maps = realistic_maps(0, n=6, size=32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    # n_bins=2 would be far off if the binned path were taken by mistake
    assert pixel_auroc(masks, maps, n_bins=2) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("sign", [1, -1])
def test_pixel_auroc_exact_is_the_pairwise_win_rate(sign):
    rng = np.random.default_rng(3)
    masks = rng.random((3, 9, 11)) < 0.2
    maps = sign * (rng.integers(0, 20, masks.shape) + 6.0 * masks)  # ties, both orientations
    expected = pairwise_auc(masks, maps)
    assert (expected > 0.5) == (sign > 0)
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # binned: distinct integers fall in distinct bins, ties in one: the same pairs win
    assert pixel_auroc(masks, maps, max_exact_pixels=0, tail=0) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_binned_close_to_exact():
    masks, maps = realistic_maps(1)  # 24 x 128 x 128 = 393,216 pixels
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    assert 0.9 < exact < 0.99  # the data look like a working detector
    errors = {nb: abs(pixel_auroc(masks, maps, max_exact_pixels=0, n_bins=nb) - exact)
              for nb in (8, 2**10, DEFAULT_N_BINS)}
    assert errors[DEFAULT_N_BINS] < 1e-5  # measured 4.2e-7
    assert errors[2**10] < 1e-3  # measured 1.1e-4
    assert errors[8] > 1e-3  # coarse bins are visibly wrong: the check can fail


def test_pixel_auroc_binned_ties_count_half():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2] = True
    maps = np.full(masks.shape, 3.0)
    assert pixel_auroc(masks, maps, max_exact_pixels=0) == 0.5
    maps[0, 0, 0] = 4.0  # one defect pixel above all: 1/8 of pairs won, the rest tied
    assert pixel_auroc(masks, maps, max_exact_pixels=0) == pytest.approx(1 / 8 + 7 / 8 / 2)


def test_pixel_accumulator_batches_equal_one_shot():
    masks, maps = realistic_maps(2, n=10, size=32)
    lo, hi = float(maps.min()), float(maps.max())
    whole = PixelRocAccumulator(lo, hi).update(masks, maps)
    parts = PixelRocAccumulator(lo, hi)
    for part in (slice(0, 3), slice(3, 4), slice(4, 10)):  # uneven batches
        parts.update(masks[part], maps[part])
    np.testing.assert_array_equal(parts.pos_hist_, whole.pos_hist_)
    np.testing.assert_array_equal(parts.neg_hist_, whole.neg_hist_)
    assert parts.auroc() == whole.auroc() == pixel_auroc(masks, maps, max_exact_pixels=0, tail=0)
    merged = PixelRocAccumulator(lo, hi).update(masks[:4], maps[:4]).merge(
        PixelRocAccumulator(lo, hi).update(masks[4:], maps[4:]))
    assert merged.auroc() == whole.auroc()
    with pytest.raises(ValueError, match="same class and settings"):
        merged.merge(PixelRocAccumulator(lo, hi + 1))


def test_pixel_accumulator_clips_out_of_range():
    acc = PixelRocAccumulator(0.0, 1.0, n_bins=4)
    acc.update(np.array([[[1, 0, 0]]]), np.array([[[7.0, -5.0, 0.6]]]))
    np.testing.assert_array_equal(acc.pos_hist_, [0, 0, 0, 1])
    np.testing.assert_array_equal(acc.neg_hist_, [1, 0, 1, 0])
    assert acc.auroc() == 1.0


def test_pixel_auroc_errors():
    masks, maps = np.zeros((2, 3, 3)), np.ones((2, 3, 3))
    for limit in (10**9, 0):  # exact and binned paths
        with pytest.raises(ValueError, match="both defect and normal"):
            pixel_auroc(masks, maps, max_exact_pixels=limit)
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        pixel_auroc(masks, maps[:1])
    with pytest.raises(ValueError, match="lo < hi"):
        PixelRocAccumulator(1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        PixelRocAccumulator(0.0, 1.0).update(masks, maps * np.nan)


# ---------------------------------------------------------------------- PRO

@pytest.mark.parametrize("seed", range(3))
def test_pro_accumulator_matches_bruteforce_on_the_same_thresholds(seed):
    masks, maps, regions = boxes_case(seed)
    n = 64  # coarse on purpose: exact agreement then checks the binned logic itself
    edges = np.linspace(maps.min(), maps.max(), n + 1)
    expected = bruteforce_pro(masks, maps, regions, edges[:-1])  # top edge = (0, 0)
    acc = ProAccumulator(maps.min(), maps.max(), n_thresholds=n).update(masks, maps)
    assert acc.score() == pytest.approx(expected, abs=1e-12)
    binned_min_max = pro_score(masks, maps, max_exact_pixels=0, n_thresholds=n, tail=0)
    assert binned_min_max == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_exact_pro_is_every_distinct_score_a_threshold(seed):
    masks, maps, regions = boxes_case(seed)
    if seed == 2:
        maps = np.round(maps)  # heavy ties: groups of equal scores are one curve point
    exact = bruteforce_pro(masks, maps, regions, np.unique(maps))
    assert pro_score(masks, maps) == pytest.approx(exact, abs=1e-12)
    assert pro_score(masks, maps, fpr_limit=0.1) == pytest.approx(
        bruteforce_pro(masks, maps, regions, np.unique(maps), fpr_limit=0.1), abs=1e-12)
    # the binned path on the same data: close with the default bins, visibly off with 4
    assert abs(pro_score(masks, maps, max_exact_pixels=0) - exact) < 5e-5
    assert abs(pro_score(masks, maps, max_exact_pixels=0, n_thresholds=4) - exact) > 1e-3


def test_pro_exact_and_binned_on_realistic_maps():
    masks, maps = realistic_maps(1)  # 24 x 128 x 128, 393,216 pixels, one pixel at 200
    exact = sorted_exact_pro(masks, maps)
    assert 0.7 < exact < 0.95
    assert pro_score(masks, maps) == pytest.approx(exact, abs=1e-12)  # exact path
    assert abs(pro_score(masks, maps, max_exact_pixels=0) - exact) < 1e-5
    assert abs(pro_score(masks, maps, max_exact_pixels=0, n_thresholds=2**10) - exact) < 1e-3


@pytest.mark.parametrize("hot", [2e4, 2e5])
def test_binned_range_ignores_a_hot_pixel(hot):
    """One normal pixel far above every other score: the min-max bins (tail=0) lose their
    resolution, the scale with logarithmic tails keeps it."""
    masks, maps = realistic_maps(1, outlier=False)
    maps[-1, 0, 0] = hot  # image 23 has no defect: a normal pixel
    exact_auc, exact_pro = roc_auc_score(masks.ravel(), maps.ravel()), sorted_exact_pro(masks, maps)
    lo, hi, core = bin_layout(maps)
    assert hi == hot and core[1] < 30  # the linear core stays on the real scores
    robust = (pixel_auroc(masks, maps, max_exact_pixels=0), pro_score(masks, maps, max_exact_pixels=0))
    min_max = (pixel_auroc(masks, maps, max_exact_pixels=0, tail=0),
               pro_score(masks, maps, max_exact_pixels=0, tail=0))
    assert abs(robust[0] - exact_auc) < 1e-5 and abs(robust[1] - exact_pro) < 1e-5, robust
    assert abs(min_max[1] - exact_pro) > 5e-4  # what the fix is for (measured 8.5e-4 at 2e4)


@BOTH_PATHS
def test_pro_perfect_detector_is_one(max_exact):
    masks, _, _ = boxes_case(0)
    assert pro_score(masks, masks.astype(float), max_exact_pixels=max_exact) == 1.0


@BOTH_PATHS
def test_pro_constant_map(max_exact):
    masks, _, _ = boxes_case(0)
    maps = np.zeros(masks.shape)
    # every pixel tied: the curve is the diagonal PRO = FPR, area 0.3**2 / 2, / 0.3
    assert pro_score(masks, maps, max_exact_pixels=max_exact) == pytest.approx(0.15, abs=1e-12)
    assert pro_score(masks, maps, fpr_limit=1.0, max_exact_pixels=max_exact) == pytest.approx(0.5, abs=1e-12)


@BOTH_PATHS
def test_pro_hand_computed(max_exact):
    pro_score = lambda *a, **k: globals()["pro_score"](*a, max_exact_pixels=max_exact, **k)
    # one row: region A (2 px), 10 normal pixels scored 10..1, region B (2 px)
    masks = np.array([[[1, 1] + [0] * 10 + [1, 1]]])
    maps = np.array([[[20.0, 5.5] + list(range(10, 0, -1)) + [8.5, 0.5]]])
    # t=20: (FPR 0, PRO .25); t=10, 9: FPR .1, .2; t=8.5: B half found, PRO .5;
    # t=8: FPR .3. Area = .2 * .25 + .1 * .5 = .1 -> / .3 = 1/3
    assert pro_score(masks, maps) == pytest.approx(1 / 3, abs=1e-12)
    # up to FPR .25 (inside the flat piece from .2 to .3): (.05 + .05 * .5) / .25
    assert pro_score(masks, maps, fpr_limit=0.25) == pytest.approx(0.3, abs=1e-12)
    # an image without defects, all scores 0, adds 14 normal pixels: FPR steps 1/24.
    # t=20 (0, .25); t=10, 9 (2/24); t=8.5 PRO .5; t=8, 7, 6 (5/24); t=5.5 A full,
    # PRO .75; t=5 (6/24 = .25). Area = (2 * .25 + 3 * .5 + 1 * .75) / 24 -> / .25 = 11/24
    masks2, maps2 = np.concatenate([masks, 0 * masks]), np.concatenate([maps, 0 * maps])
    assert pro_score(masks2, maps2, fpr_limit=0.25) == pytest.approx(11 / 24, abs=1e-12)


@BOTH_PATHS
def test_pro_connectivity(max_exact):
    pro_score = lambda *a, **k: globals()["pro_score"](*a, max_exact_pixels=max_exact, **k)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :2] = masks[0, 1, 2] = True  # a pair and a pixel touching it diagonally
    maps = np.arange(16.0).reshape(1, 4, 4) + 100 * masks
    maps[0, 0, :2] = -1.0  # the pair below everything, the lone pixel above everything
    # 8-connected: one region of 3 px, 1/3 found; 4-connected: (0 + 1) / 2 regions
    assert pro_score(masks, maps) == pytest.approx(1 / 3, abs=1e-12)
    assert pro_score(masks, maps, connectivity=4) == pytest.approx(1 / 2, abs=1e-12)


def test_pro_accumulator_batches_equal_one_shot():
    masks, maps, _ = boxes_case(3)
    lo, hi = maps.min(), maps.max()
    parts = ProAccumulator(lo, hi)
    for part in (slice(0, 1), slice(1, 5), slice(5, 6)):
        parts.update(masks[part], maps[part])
    assert parts.n_regions_ == ndimage.label(masks[0], np.ones((3, 3)))[1] + sum(
        ndimage.label(m, np.ones((3, 3)))[1] for m in masks[1:])
    whole = ProAccumulator(lo, hi).update(masks, maps)
    np.testing.assert_array_equal(parts.neg_hist_, whole.neg_hist_)
    assert parts.score() == pytest.approx(whole.score(), abs=1e-12)
    assert parts.score() == pytest.approx(pro_score(masks, maps, max_exact_pixels=0, tail=0), abs=1e-12)
    merged = ProAccumulator(lo, hi).update(masks[:2], maps[:2]).merge(
        ProAccumulator(lo, hi).update(masks[2:], maps[2:]))
    assert merged.score() == pytest.approx(parts.score(), abs=1e-12)


def test_one_shot_forms_give_the_same_result_in_chunks(monkeypatch):
    masks, maps, _ = boxes_case(4)
    expected = (pixel_auroc(masks, maps, max_exact_pixels=0), pro_score(masks, maps, max_exact_pixels=0))
    monkeypatch.setattr(binned, "_CHUNK_PIXELS", 2000)  # 2 images of 900 px a chunk
    assert pixel_auroc(masks, maps, max_exact_pixels=0) == expected[0]
    assert pro_score(masks, maps, max_exact_pixels=0) == pytest.approx(expected[1], abs=1e-12)


def test_masks_stored_as_0_255_count_as_defects():
    masks, maps, _ = boxes_case(5)
    png_like = masks.astype(np.uint8) * 255
    assert pixel_auroc(png_like, maps) == pixel_auroc(masks, maps)
    assert pixel_auroc(png_like, maps, max_exact_pixels=0) == pixel_auroc(
        masks, maps, max_exact_pixels=0)
    assert pro_score(png_like, maps) == pro_score(masks, maps)
    assert pro_score(png_like, maps, max_exact_pixels=0) == pro_score(masks, maps, max_exact_pixels=0)


@BOTH_PATHS
def test_pro_edge_cases(max_exact):
    pro_score = lambda *a, **k: globals()["pro_score"](*a, max_exact_pixels=max_exact, **k)
    maps = np.random.default_rng(0).normal(size=(3, 8, 8))
    assert np.isnan(pro_score(np.zeros(maps.shape), maps))
    with pytest.raises(ValueError, match="0 normal pixels"):
        pro_score(np.ones(maps.shape), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        pro_score(maps > 1, maps, fpr_limit=0)
    with pytest.raises(ValueError, match="connectivity"):
        pro_score(maps > 1, maps, connectivity=6)
    with pytest.raises(ValueError, match="NaN"):
        pro_score(maps > 1, maps * np.nan)


def test_bin_layout_and_log_tails():
    values = np.r_[np.arange(10_000.0), 1e9]
    assert bin_layout(values, tail=0) == (0.0, 1e9, None)
    lo, hi, core = bin_layout(values, tail=1e-2)
    assert (lo, hi) == (0.0, 1e9) and core == pytest.approx(tuple(np.quantile(values, [1e-2, 1 - 1e-2])))
    assert bin_layout(np.arange(50.0))[2] is None  # too few values for a 1 % tail: no core
    assert bin_layout(np.full(50_000, 3.0)) == (3.0, 4.0, None)
    with pytest.raises(ValueError, match="NaN"):
        bin_layout(np.array([0.0, np.inf]))
    # the scale: identity in the core, w * log1p(distance / w) outside (w = core width), increasing
    v = np.array([-20.0, 0.0, 5.0, 10.0, 30.0, 1e9])
    expected = [0 - 10 * np.log(3), 0, 5, 10, 10 + 10 * np.log(3), 10 + 10 * np.log1p(1e8 - 1)]
    np.testing.assert_allclose(log_tails(v, (0.0, 10.0)), expected, rtol=1e-12)
    np.testing.assert_array_equal(log_tails(v, None), v)
