"""Measure the binned pixel metrics against the exact ones on PaDiM-like synthetic maps.

The numbers quoted in README.md ("How exact are the pixel metrics") and in
padim_ooc/binned.py come from this script:

    python scripts/measure_metric_error.py            # about 2-4 minutes on 2 cores
    python scripts/measure_metric_error.py --quick    # one seed, the small size only

Maps: smooth Mahalanobis-like noise around 10 (sd 2), elliptic defect regions in
half the images, each lifted by a blurred bump of random height 4-10 (exact pixel
AUROC about 0.95, PRO about 0.8). Conditions: clean; one normal pixel at 2e4 or
2e5 (a hot pixel); a hot blob (a blurred 31 x 31 spot of height 2e4 in a good
image, about 1,800 pixels above 1e3). Each is measured with the default bin
scale ("log tails": linear between the 1 % and 99 % quantiles, logarithmic
beyond) and with plain equal-width bins between the min and max ("min-max",
tail 0, the former behaviour).
One-shot: ``pixel_auroc`` / ``pro_score`` with ``max_exact_pixels=0`` on the
whole set. Stream: ``PixelMetrics`` fed 8 images at a time, good images first
(as evaluate feeds them), exact for the first 16 images, binned after; in the
"rising" variant batch k is scaled by 1 + k / 2, so the range has to widen.
Exact references: sklearn's ``roc_auc_score`` and ``exact_pro_curve`` (tested
against a brute-force per-threshold PRO in tests/test_metrics.py).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from padim_ooc.evaluation.metrics import DEFAULT_TAIL, PixelMetrics, exact_pro_curve, pixel_auroc, pro_score
from padim_ooc.evaluation.pro import partial_area


SCALES = ((DEFAULT_TAIL, "log tails"), (0.0, "min-max"))


def realistic_maps(seed: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks, maps) of shape (n, size, size); defects in images 0 .. n/2 - 1.

    tests/test_metrics.py uses these maps too (with one far outlier added)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, size, size)), (0, 4, 4))
    maps = 10 + 2 * noise / noise.std()
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            (cy, cx), (ry, rx) = rng.integers(0, size, 2), rng.uniform(2, size / 6, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    bump = ndimage.gaussian_filter(masks.astype(float), (0, 3, 3))
    maps += rng.uniform(4, 10, (n, 1, 1)) * bump
    return masks, maps.astype(np.float32)


def add_hot(maps: np.ndarray, kind: str) -> np.ndarray:
    """A copy of ``maps`` with a hot pixel or blob in the last (good) image."""
    maps = maps.copy()
    if kind.startswith("pixel"):
        maps[-1, 5, 5] = float(kind.split("@")[1])
    elif kind == "blob@2e4":
        spot = np.zeros(maps.shape[1:])
        spot[20:51, 20:51] = 1.0
        spot = ndimage.gaussian_filter(spot, 4)
        maps[-1] += (2e4 * spot / spot.max()).astype(np.float32)
    return maps


def exact(masks, maps):
    return roc_auc_score(masks.ravel(), maps.ravel()), partial_area(*exact_pro_curve(masks, maps), 0.3)


def one_shot(masks, maps, tail):
    return (pixel_auroc(masks, maps, max_exact_pixels=0, tail=tail),
            pro_score(masks, maps, max_exact_pixels=0, tail=tail))


def stream(masks, maps, tail, rising):
    order = np.r_[np.arange(len(masks) // 2, len(masks)), np.arange(len(masks) // 2)]  # good first
    masks, maps = masks[order], maps[order].copy()
    if rising:
        for k, start in enumerate(range(0, len(maps), 8)):
            maps[start:start + 8] *= 1 + k / 2
    pm = PixelMetrics(max_exact_pixels=16 * maps[0].size, tail=tail)
    for start in range(0, len(maps), 8):
        pm.update(masks[start:start + 8], maps[start:start + 8])
    res = pm.result()
    assert res["method"] == "binned"
    return (res["pixel_auroc"], res["pro"]), exact(masks, maps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, the small size only")
    args = ap.parse_args()
    seeds = [0] if args.quick else [0, 1, 2, 3]
    sizes = [(24, 128)] if args.quick else [(24, 128), (52, 224)]
    hots = ["none", "pixel@2e4", "pixel@2e5", "blob@2e4"]
    t0 = time.perf_counter()
    print("| case | pixels | hot | bins | exact pixel AUROC | exact PRO | max err AUROC | max err PRO |")
    print("| --- | ---: | --- | --- | --- | --- | ---: | ---: |")
    rows = []
    for n, size in sizes:
        for hot in hots:
            for tail, name in SCALES:
                errs, refs = [], []
                for seed in seeds:
                    masks, maps = realistic_maps(seed, n, size)
                    maps = add_hot(maps, hot)
                    ref = exact(masks, maps)
                    got = one_shot(masks, maps, tail)
                    errs.append(np.abs(np.subtract(got, ref)))
                    refs.append(ref)
                rows.append(("one-shot", n * size * size, hot, name, refs, errs))
    if not args.quick:
        n, size = 48, 224
        for rising in (False, True):
            for hot in ("none", "pixel@2e5"):
                for tail, name in SCALES:
                    errs, refs = [], []
                    for seed in seeds:
                        masks, maps = realistic_maps(seed, n, size)
                        got, ref = stream(masks, add_hot(maps, hot), tail, rising)
                        errs.append(np.abs(np.subtract(got, ref)))
                        refs.append(ref)
                    rows.append(("stream, rising x1-x3.5" if rising else "stream", n * size * size, hot,
                                 name, refs, errs))
    for case, pixels, hot, name, refs, errs in rows:
        refs, errs = np.array(refs), np.array(errs)
        print(f"| {case} | {pixels:,} | {hot} | {name} | {refs[:, 0].min():.3f}-{refs[:, 0].max():.3f} "
              f"| {refs[:, 1].min():.3f}-{refs[:, 1].max():.3f} | {errs[:, 0].max():.1e} | {errs[:, 1].max():.1e} |")
    print(f"\n{len(seeds)} seed(s), {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
