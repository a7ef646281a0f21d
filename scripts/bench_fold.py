"""Milliseconds per image of the fold alone (``welford.Folder``), float64 against float32.

The fold is what a fit does with the features of each image once the backbone gave them:
a rank-k update of every position's (d, d) float64 ``m2``. This times it as the fit runs
it, with the fit's own fold sizes (``fit.fold_samples``: the images whose features are
buffered before a fold) and position blocks (``welford.fold_plan``), on random float32
features offset by 1000, and reports the error of each fold against two-pass float64
statistics of the same features. No backbone, no files.

For a large ``d`` only ``--positions`` of the model's P positions are folded (the
positions are independent); the time is scaled to all P. Output: one JSON line per case.

    python scripts/bench_fold.py                      # d=550 (wr50-rd550) and d=100 (r18-rd100)
    python scripts/bench_fold.py --dims 550 --positions 128 --folds 3
    python scripts/bench_fold.py --threads 1          # one core: less sensitive to a busy machine
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from padim_ooc.fit import fold_samples
from padim_ooc.welford import FOLDS, Folder, Moments, fold_plan

PRESETS = {550: 128, 100: 512}  # positions folded per case (of P = 56 x 56 = 3136)
GRID = 56 * 56
BATCH = 32


def two_pass(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (p, d) and m2 (p, d, d) of x (p, n, d), float64, centred on the exact mean."""
    x = x.astype(np.float64)
    mean = x.mean(axis=1)
    c = x - mean[:, None]
    return mean, np.einsum("pni,pnj->pij", c, c, optimize=True)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def run(dims: int, positions: int, folds: int, fold: str, seed: int = 0) -> dict:
    nb = fold_samples(GRID, dims, BATCH)  # images per fold, as the fit buffers them
    rng = np.random.default_rng(seed)
    mix = (rng.normal(size=(dims, dims)) / np.sqrt(dims)).astype(np.float32)
    x = torch.from_numpy(rng.normal(size=(positions, nb, dims)).astype(np.float32) @ mix + 1000)
    acc = Moments.zeros(positions, dims)
    folder = Folder(acc, max_samples=nb, fold=fold)
    times = []
    for k in range(folds + 1):  # the first fold allocates the buffers: not timed
        view = folder.reserve(nb)
        view.copy_(x if k == 0 else x.roll(k, dims=1))  # other samples each fold, same values
        start = time.perf_counter()
        folder.commit(nb)  # a full buffer: folded now
        times.append(time.perf_counter() - start)
    folder.flush()
    everything = torch.cat([x] + [x.roll(k, dims=1) for k in range(1, folds + 1)], dim=1).numpy()
    mean_ref, m2_ref = two_pass(everything)
    per_image = float(np.median(times[1:])) / nb * GRID / positions
    block, lower = fold_plan(positions, dims, nb, "cpu", fold)
    return {"fold": fold, "dims": dims, "grid_positions": GRID, "positions_timed": positions,
            "images_per_fold": nb, "block_positions": block, "one_triangle": lower,
            "ms_per_image": round(per_image * 1e3, 2), "threads": torch.get_num_threads(),
            "rel_err_mean": rel(acc.mean, mean_ref), "rel_err_m2": rel(acc.m2, m2_ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="*", default=list(PRESETS))
    ap.add_argument("--positions", type=int, default=None, help="positions folded (default: 128 at d=550, 512 at d=100)")
    ap.add_argument("--folds", type=int, default=3, help="timed folds per case (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and BLAS threads (default: as a fit runs, torch's and OpenBLAS's own)")
    args = ap.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # scipy's OpenBLAS (syrk) too
    for dims in args.dims:
        for fold in FOLDS:
            print(json.dumps(run(dims, args.positions or PRESETS.get(dims, 256), args.folds, fold)), flush=True)


if __name__ == "__main__":
    main()
