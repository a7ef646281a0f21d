"""Shared fixtures and helpers: small real image files on disk, a random-weight backbone, a
fitted model, independent numpy references, synthetic stores, the CLI in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from padim_ooc.data import decode_rgb
from padim_ooc.store import ModelStore
from padim_ooc.welford import Moments


# the command line, as a user runs it (a subprocess: its exit code and stderr are what a user sees)
CLI = [sys.executable, "-m", "padim_ooc"]


def run_cli(*args, ok=True, timeout=300):
    """Run ``padim-ooc ARGS...`` in a subprocess; with ``ok``, assert it exited 0."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def pytest_configure(config):
    """The test process runs torch on at most 2 threads. In a hook, not at import: a Dask worker
    that unpickles a function of this module imports it, and must keep its own thread count."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))

CROP = 64
RESIZE = 72


def write_images(folder: Path, count: int, *, seed: int, size=(80, 80), start: int = 0) -> list[Path]:
    """Write ``count`` smooth random RGB PNGs (with a little structure, like real photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[0], 0:size[1]] / max(size)
    paths = []
    for i in range(count):
        base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)), np.cos(5 * yy + rng.uniform(0, 6)),
                         np.sin(4 * (xx + yy))], axis=-1)
        img = 127 + 60 * base + rng.normal(0, 20, size + (3,))
        path = folder / f"img{start + i:04d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """40 images: 20 in ``a/``, 20 in ``b/``."""
    root = tmp_path_factory.mktemp("images")
    write_images(root / "a", 20, seed=1)
    write_images(root / "b", 20, seed=2, start=20)
    return root


@pytest.fixture(scope="session")
def extractor():
    from padim_ooc import Extractor

    return Extractor("resnet18", weights=None, seed=0, resize=RESIZE, crop=CROP, device="cpu")


def fit_summary(sources, model, extractor=None, *, client=None, shards=None, **options):
    """The fit pipeline (``run_fit``) without finalize unless asked: its :class:`FitSummary`.

    ``options`` are :class:`padim_ooc.options.FitOptions` fields; ``client`` and
    ``shards`` go to its :class:`~padim_ooc.options.Cluster`.
    """
    from padim_ooc.fit import run_fit
    from padim_ooc.options import Cluster, FitOptions

    options.setdefault("finalize", False)
    opts = FitOptions(cluster=Cluster(client=client, shards=shards), **options)
    return run_fit(sources, model, opts, extractor=extractor)[0]


def score_options(**fields):
    """:class:`padim_ooc.options.ScoreOptions` with ``fields``."""
    from padim_ooc.options import ScoreOptions

    return ScoreOptions(**fields)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, image_dir, extractor) -> Path:
    """A finalized model of ``image_dir/a`` (20 images; the ``extractor`` fixture's resnet18,
    random weights, Rd100, crop 64; batches of 10), made once per test module: a module's
    tests may change it (finalize it again, extend it)."""
    import padim_ooc as po

    path = tmp_path_factory.mktemp("fitted") / "m.zarr"
    po.fit([image_dir / "a"], path, extractor=extractor, batch_size=10, loader_workers=0)
    return path


@pytest.fixture(scope="module")
def fitted_model(fitted):
    """:func:`fitted`, opened (a :class:`padim_ooc.Model` on the CPU)."""
    import padim_ooc as po

    return po.open_model(fitted, device="cpu")


# ---- shared helpers: independent references, synthetic stores, the CLI in this process ----

# Features computed in other processes, with other thread counts or in other batch compositions
# agree only to float32 rounding (other convolution kernels sum in another order). Measured on
# a 2-core AVX-512 EPYC, the test process against Dask workers and subprocesses running oneDNN's
# AVX kernels (ONEDNN_MAX_CPU_ISA=AVX: what another machine or thread count does), and batch 1
# against 7 and 32: features 1.5e-6, two-pass mean 2.5e-7, covariance 1.8e-6, float32 precision
# 5.4e-6 (relative to its largest entry), image scores 2.2e-6 (each rel = max|a - b| / max|b|,
# scores elementwise). On that CPU thread counts alone changed nothing; the AVX-512
# Xeon measured 1.3e-7 for the mean. The bounds are 4-6x the measured noise: a wrong statistic
# (a lost or doubled image, a wrong merge) is off by 1e-2 or more. Exactness (<= 1e-10) is
# asserted only against two-pass float64 statistics of the very same features.
NOISE_MEAN = 1e-6
NOISE_COV = 1e-5
NOISE_PRECISION = 3e-5
NOISE_SCORES = 1e-5


def features_of(extractor, paths, batch_size) -> np.ndarray:
    """(P, N, d) float64: the extractor's features of ``paths`` in batches of ``batch_size``, in this process."""
    x = torch.stack([extractor.preprocess(decode_rgb(Path(p).read_bytes())) for p in paths])
    feats = torch.cat([extractor.embed(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return feats.flatten(2).permute(2, 0, 1).double().numpy()


def _two_pass_of(f: np.ndarray):
    mean = f.mean(axis=1)
    c = f - mean[:, None, :]
    return mean, np.einsum("pni,pnj->pij", c, c) / (f.shape[1] - 1)


def _stats_here(config, paths, batch_size):
    """Two-pass statistics of features computed where this runs (a Dask worker's task)."""
    from padim_ooc.extractor import Extractor

    return _two_pass_of(features_of(Extractor.from_config(config, device="cpu"), paths, batch_size))


def exact_stats_on(client, config, paths, batch_size):
    """Two-pass float64 mean and covariance of features computed on a Dask worker of ``client``
    (its thread count and kernels: what the workers of a sharded fit compute), numpy only."""
    return client.submit(_stats_here, config, [str(p) for p in paths], batch_size, pure=False).result()


def exact_stats(extractor, paths, batch_size):
    """Two-pass float64 mean and covariance of the extractor's own features, numpy only.

    The features are computed with the same batch composition as the fit
    (oneDNN convolutions on the CPU differ by ~1e-6 with the batch size).
    """
    return _two_pass_of(features_of(extractor, paths, batch_size))


def rel(a, b) -> float:
    """Largest absolute difference relative to the largest value of the reference ``b`` (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


CONFIG = {"backbone": "resnet18", "layers": ["layer1"], "layer_channels": [64], "channels": list(range(4)),
          "dims": 4, "seed": 0, "weights": "random:seed=0", "weights_digest": "x", "resize": 64, "crop": 64,
          "normalize_mean": [0.5] * 3, "normalize_std": [0.5] * 3, "grid": [3, 5]}


def moments(n, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(15, n, 4)))
    return Moments.from_batch(x)


def synthetic(path, x, digests, config=CONFIG):
    """A store holding the statistics of samples ``x`` (P, n, d) with ledger ``digests``."""
    store = ModelStore.create(path, config)
    store.checkpoint(Moments.from_batch(torch.from_numpy(x)), digests)
    return store


def two_pass(x):
    mean = x.mean(axis=1)
    c = x - mean[:, None, :]
    return mean, np.einsum("pni,pnj->pij", c, c)


def make_mvtec_class(root: Path, *, seed: int = 0, n_train: int = 20, n_good: int = 6,
                     types=("scratch", "spot"), n_defect: int = 5, masks: bool = True,
                     size=(80, 80)) -> Path:
    """A small MVTec AD class: smooth random images; defects are dark or bright
    rectangles, the mask (0/255 PNG, same size as the image) marks exactly them."""
    write_images(root / "train" / "good", n_train, seed=seed, size=size)
    write_images(root / "test" / "good", n_good, seed=seed + 1, size=size)
    rng = np.random.default_rng(seed + 2)
    for k, name in enumerate(types):
        for path in write_images(root / "test" / name, n_defect, seed=seed + 3 + k, size=size):
            img = np.asarray(Image.open(path)).copy()
            mask = np.zeros(img.shape[:2], np.uint8)
            for _ in range(rng.integers(1, 3)):
                y, x = rng.integers(4, size[0] - 20), rng.integers(4, size[1] - 16)
                mask[y:y + rng.integers(6, 16), x:x + rng.integers(5, 12)] = 255
            img[mask > 0] = 0 if k % 2 == 0 else 255
            Image.fromarray(img).save(path)
            if masks:
                (root / "ground_truth" / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth" / name / f"{path.stem}_mask.png")
    return root


def nearest_resize_crop(mask: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Reference: nearest neighbour at pixel centres (src = floor((dst + 0.5) * in / out)),
    then a centre crop starting at round((resize - crop) / 2)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(resize) + 0.5) * h / resize).astype(int), h - 1)
    cols = np.minimum(((np.arange(resize) + 0.5) * w / resize).astype(int), w - 1)
    big = mask[np.ix_(rows, cols)]
    top = int(round((resize - crop) / 2))
    return big[top:top + crop, top:top + crop]


def main_exit(capsys, *args):
    """Run ``cli.main(args)`` in this process (no interpreter start-up: fast); returns
    (exit code, stdout, stderr)."""
    from padim_ooc import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def cli_json(capsys, *args):
    """``cli.main(args)`` in this process, exit 0; its JSON output."""
    code, out, err = main_exit(capsys, *args)
    assert code == 0, err
    return json.loads(out)


def cli_error(capsys, *args, text):
    """``cli.main(args)`` in this process: one ``error: ...`` line holding ``text``, exit 2; that line."""
    code, out, err = main_exit(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], err
    return err
